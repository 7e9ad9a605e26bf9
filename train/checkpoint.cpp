// Atomic checkpoint directories: write into a temporary sibling, seal it with a manifest of
// checksums, rename into place; verification before resuming; the training state with expert
// shards gathered on save and sliced on load.
#include "train/checkpoint.h"

#include <unistd.h>

#include "parallel/expert_parallel.h"
#include "parallel/runtime.h"
#include "train/file_write.h"
#include "train/run_dir.h"
#include "train/sampler.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <map>
#include <sstream>
#include <thread>

namespace gbmoe {
namespace fs = std::filesystem;

namespace {

constexpr const char* kManifestMagic = "gbmoe-checkpoint-manifest 1";
// The files of a checkpoint the manifest covers; state.pt and meta.txt are required.
const std::vector<std::string> kCheckpointFiles = {"state.pt", "meta.txt", "config.yaml"};

std::string step_name(int64_t step) {
  std::ostringstream s;
  s << "step_" << std::setw(8) << std::setfill('0') << step;
  return s.str();
}

// 64-bit checksum of a byte stream, 8 bytes at a time (FNV-style multiply, xor-shift mixed):
// fast enough to verify multi-GB checkpoints at start.
class Checksum {
 public:
  void add(const unsigned char* p, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      uint64_t w;
      std::memcpy(&w, p + i, 8);
      mix(w);
    }
    for (; i < n; ++i) mix(p[i]);
    bytes_ += n;
  }
  uint64_t value() const { return h_ ^ bytes_; }

 private:
  void mix(uint64_t w) {
    h_ = (h_ ^ w) * 0x100000001b3ULL;
    h_ ^= h_ >> 29;
  }
  uint64_t h_ = 0xcbf29ce484222325ULL;
  uint64_t bytes_ = 0;
};

std::string hex(uint64_t v) {
  std::ostringstream s;
  s << std::hex << std::setw(16) << std::setfill('0') << v;
  return s.str();
}

// Size and checksum of a file, read in chunks that are a multiple of 8 bytes.
std::pair<int64_t, std::string> file_checksum(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return {-1, ""};
  std::vector<unsigned char> buf(size_t{4} << 20);
  Checksum sum;
  int64_t size = 0;
  while (in) {
    in.read(reinterpret_cast<char*>(buf.data()), static_cast<std::streamsize>(buf.size()));
    const auto n = static_cast<size_t>(in.gcount());
    sum.add(buf.data(), n);
    size += static_cast<int64_t>(n);
  }
  return {size, hex(sum.value())};
}

std::string text_checksum(const std::string& text) {
  Checksum sum;
  sum.add(reinterpret_cast<const unsigned char*>(text.data()), text.size());
  return hex(sum.value());
}

// The manifest of a checkpoint directory whose files are written.
std::string manifest_text(const fs::path& dir, const CheckpointMeta& meta) {
  std::ostringstream m;
  m << kManifestMagic << "\n"
    << "step " << meta.step << "\n"
    << "config " << (meta.config_fingerprint.empty() ? "-" : meta.config_fingerprint) << "\n"
    << "tensors " << meta.tensors << "\n";
  for (const auto& name : kCheckpointFiles) {
    if (!fs::exists(dir / name)) continue;
    const auto [size, sum] = file_checksum(dir / name);
    if (size < 0) throw WriteError((dir / name).string() + ": cannot be read back");
    m << "file " << name << " " << size << " " << sum << "\n";
  }
  const std::string body = m.str();
  return body + "check " + text_checksum(body) + "\n";
}

struct Manifest {
  int64_t step = -1;
  std::string config_fingerprint;
  int64_t tensors = -1;
  std::map<std::string, std::pair<int64_t, std::string>> files;  // name -> (size, checksum)
};

// Parses dir/manifest.txt; on failure returns nullopt-like (step -1) and sets why.
Manifest read_manifest(const fs::path& dir, std::string& why) {
  Manifest m;
  const fs::path path = dir / "manifest.txt";
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    why = "it has no manifest.txt (the save was interrupted, or an older build wrote it)";
    return m;
  }
  std::stringstream buffer;
  buffer << in.rdbuf();
  const std::string text = buffer.str();
  const auto check_at = text.rfind("check ");
  if (text.rfind(std::string(kManifestMagic) + "\n", 0) != 0 || check_at == std::string::npos ||
      text.substr(check_at) != "check " + text_checksum(text.substr(0, check_at)) + "\n") {
    why = path.string() + " is damaged (bad header or checksum)";
    return m;
  }
  std::istringstream lines(text.substr(0, check_at));
  std::string line;
  std::getline(lines, line);  // the magic
  while (std::getline(lines, line)) {
    std::istringstream fields(line);
    std::string key;
    fields >> key;
    if (key == "step") {
      fields >> m.step;
    } else if (key == "config") {
      fields >> m.config_fingerprint;
    } else if (key == "tensors") {
      fields >> m.tensors;
    } else if (key == "file") {
      std::string name, sum;
      int64_t size = -1;
      fields >> name >> size >> sum;
      m.files[name] = {size, sum};
    }
  }
  return m;
}

// The model settings in which two configs differ: "model.dim 64 (checkpoint) vs 32".
std::string model_differences(const Config& stored, const Config& current) {
  std::string out;
  for (const auto& key : Config::keys()) {
    if (key.rfind("model.", 0) != 0 || stored.get(key) == current.get(key)) continue;
    out += (out.empty() ? "" : ", ") + key + " " + stored.get(key) + " (checkpoint) vs " +
           current.get(key) + " (config)";
  }
  return out;
}

}  // namespace

std::string config_fingerprint(const Config& config) {
  std::string text;
  for (const auto& key : Config::keys()) {
    if (key.rfind("model.", 0) == 0) text += key + "=" + config.get(key) + "\n";
  }
  return text_checksum(text);
}

std::string checkpoint_problem(const std::string& dir_name, const Config* config) {
  const fs::path dir(dir_name);
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return "it is not a directory";
  std::string why;
  const Manifest m = read_manifest(dir, why);
  if (!why.empty()) return why;
  for (const auto& required : {"state.pt", "meta.txt"}) {
    if (!m.files.count(required)) return std::string("its manifest lists no ") + required;
  }
  for (const auto& [name, expected] : m.files) {
    const auto [size, sum] = file_checksum(dir / name);
    if (size < 0) return name + " is missing or unreadable";
    if (size != expected.first) {
      return name + " holds " + std::to_string(size) + " bytes, the manifest says " +
             std::to_string(expected.first) + " (truncated or replaced)";
    }
    if (sum != expected.second) return name + " fails its checksum (zeroed or overwritten)";
  }
  CheckpointMeta meta;
  try {
    meta = read_checkpoint_meta(dir_name);
  } catch (const std::exception& e) {
    return error_message(e);
  }
  try {
    SamplerState::from_string(meta.sampler_state);
  } catch (const std::exception& e) {
    return "meta.txt: " + error_message(e);
  }
  const std::string name = dir.filename().string();
  if (meta.step != m.step) {
    return "meta.txt says step " + std::to_string(meta.step) + ", the manifest step " +
           std::to_string(m.step);
  }
  if (name.rfind("step_", 0) == 0 && name != step_name(meta.step)) {
    return "the directory name " + name + " disagrees with its step " + std::to_string(meta.step);
  }
  if (config && m.config_fingerprint != "-" &&
      m.config_fingerprint != config_fingerprint(*config)) {
    std::string differences;
    try {
      differences =
          model_differences(Config::from_yaml_file((dir / "config.yaml").string()), *config);
    } catch (const std::exception&) {
    }
    return "it was written for another model configuration" +
           (differences.empty() ? std::string() : " (" + differences + ")");
  }
  return "";
}

std::vector<std::string> list_checkpoints(const std::string& run_dir) {
  std::vector<std::string> out;
  fs::path dir = fs::path(run_dir) / "checkpoints";
  if (!fs::is_directory(dir)) return out;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const auto name = entry.path().filename().string();
    if (entry.is_directory() && name.rfind("step_", 0) == 0 &&
        name.find('.') == std::string::npos && fs::exists(entry.path() / "meta.txt")) {
      out.push_back(entry.path().string());
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::string write_checkpoint(const std::string& run_dir, const CheckpointMeta& meta, int64_t keep,
                             const std::function<void(const std::string& dir)>& write_files) {
  fs::path root = fs::path(run_dir) / "checkpoints";
  fs::path final_dir = root / step_name(meta.step);
  fs::path tmp_dir = root / (step_name(meta.step) + ".tmp" + std::to_string(::getpid()));
  try {
    std::error_code ec;
    fs::create_directories(root, ec);
    if (ec) throw WriteError(root.string(), ec.value());
    fs::remove_all(tmp_dir, ec);
    fs::create_directories(tmp_dir, ec);
    if (ec) throw WriteError(tmp_dir.string(), ec.value());
    write_files(tmp_dir.string());
    std::ostringstream text;
    text << "step " << meta.step << "\n"
         << "sampler " << meta.sampler_state << "\n";
    write_text((tmp_dir / "meta.txt").string(), text.str());
    if (!meta.config_yaml.empty()) {
      write_text((tmp_dir / "config.yaml").string(), meta.config_yaml);
    }
    write_text((tmp_dir / "manifest.txt").string(), manifest_text(tmp_dir, meta));
    // Replace an older checkpoint of the same step only once the new one is complete.
    if (fs::exists(final_dir)) {
      fs::path old = root / (step_name(meta.step) + ".old" + std::to_string(::getpid()));
      fs::rename(final_dir, old);
      fs::rename(tmp_dir, final_dir);
      fs::remove_all(old);
    } else {
      fs::rename(tmp_dir, final_dir);
    }
    write_text_atomically((root / "latest").string(), final_dir.filename().string() + "\n");
  } catch (const std::exception& e) {
    std::error_code ec;
    fs::remove_all(tmp_dir, ec);
    std::string message = error_message(e);
    if (message.find("No space left on device") != std::string::npos &&
        message.find("no space left on device") == std::string::npos) {
      message += " (no space left on device)";
    }
    const auto previous = list_checkpoints(run_dir);
    throw std::runtime_error(
        "cannot write the checkpoint of step " + std::to_string(meta.step) + " (" +
        final_dir.string() + "): " + message + "; its partial files were removed; " +
        (previous.empty() ? std::string("no earlier checkpoint exists")
                          : "the previous checkpoint " + previous.back() + " is kept") +
        ". Free space under train.run_dir (" + run_dir +
        ") and resume with --set train.resume=auto");
  }
  auto all = list_checkpoints(run_dir);
  for (size_t i = 0; i + static_cast<size_t>(keep) < all.size(); ++i) {
    if (all[i] != final_dir.string()) fs::remove_all(all[i]);
  }
  return final_dir.string();
}

std::string resolve_resume(const std::string& run_dir, const std::string& resume,
                           const Config* config) {
  if (resume.empty()) return "";
  if (resume == "auto") {
    // The one `latest` names first, then the others newest first.
    std::vector<std::string> candidates;
    const fs::path latest = fs::path(run_dir) / "checkpoints" / "latest";
    if (fs::exists(latest)) {
      std::ifstream in(latest);
      std::string name;
      in >> name;
      if (!name.empty() && name.find('/') == std::string::npos &&
          fs::is_directory(fs::path(run_dir) / "checkpoints" / name)) {
        candidates.push_back((fs::path(run_dir) / "checkpoints" / name).string());
      }
    }
    auto all = list_checkpoints(run_dir);
    for (auto it = all.rbegin(); it != all.rend(); ++it) {
      if (std::find(candidates.begin(), candidates.end(), *it) == candidates.end()) {
        candidates.push_back(*it);
      }
    }
    std::string refused;
    for (const auto& dir : candidates) {
      const std::string why = checkpoint_problem(dir, config);
      if (why.empty()) {
        if (!refused.empty()) {
          log0("train.resume=auto: refused", refused, "\n  resuming from ", dir, " instead");
        }
        return dir;
      }
      refused += "\n  " + dir + ": " + why;
    }
    TORCH_CHECK(refused.empty(), "train.resume=auto: no checkpoint in ", run_dir,
                "/checkpoints can be resumed from:", refused,
                "\nstart over with --set train.resume=\"\" --set train.overwrite=true, or "
                "set train.resume to a checkpoint directory");
    return "";
  }
  const std::string why = checkpoint_problem(resume, config);
  TORCH_CHECK(why.empty(), "train.resume (", resume, ") is not a checkpoint to resume from: ", why,
              "; use \"auto\" or a path under ", run_dir, "/checkpoints");
  return resume;
}

CheckpointMeta read_checkpoint_meta(const std::string& dir) {
  const auto path = (fs::path(dir) / "meta.txt").string();
  std::ifstream in(path);
  TORCH_CHECK(in, "cannot read checkpoint metadata ", path);
  CheckpointMeta meta;
  std::string key;
  bool have_step = false, have_sampler = false;
  while (in >> key) {
    if (key == "step") {
      have_step = static_cast<bool>(in >> meta.step);
    } else if (key == "sampler") {
      std::getline(in, meta.sampler_state);
      meta.sampler_state.erase(0, meta.sampler_state.find_first_not_of(' '));
      have_sampler = !meta.sampler_state.empty();
    } else {
      std::string rest;
      std::getline(in, rest);
    }
  }
  TORCH_CHECK(have_step && have_sampler, "checkpoint metadata ", path,
              " is incomplete (needs 'step' and 'sampler' lines)");
  TORCH_CHECK(meta.step >= 0, "checkpoint metadata ", path, " has a negative step (", meta.step,
              ")");
  return meta;
}

namespace {

// The AdamW state tensors of a parameter, by archive suffix.
std::vector<std::pair<std::string, torch::Tensor*>> adamw_tensors(
    torch::optim::AdamWParamState& st) {
  return {{"exp_avg", &st.exp_avg()},
          {"exp_avg_sq", &st.exp_avg_sq()},
          {"max_exp_avg_sq", &st.max_exp_avg_sq()}};
}

torch::optim::AdamWParamState* adamw_state(torch::optim::AdamW& optimizer, const torch::Tensor& p) {
  auto found = optimizer.state().find(p.unsafeGetTensorImpl());
  if (found == optimizer.state().end()) return nullptr;
  auto* st = dynamic_cast<torch::optim::AdamWParamState*>(found->second.get());
  TORCH_CHECK(st, "optimizer state of a parameter is not AdamW state");
  return st;
}

// Full tensor on the CPU: expert shards are concatenated over the expert-parallel group.
torch::Tensor full_tensor(const torch::Tensor& t, bool sharded, Communicator& expert_parallel) {
  auto local = t.detach().contiguous();
  if (sharded && expert_parallel.size() > 1) local = expert_parallel.all_gather(local);
  return local.cpu().clone();
}

// Copies this rank's part of a stored full tensor into t (a shard: its block along dim 0 of P).
void copy_part(const torch::Tensor& full, const torch::Tensor& t, bool sharded, int64_t P,
               int64_t rank, const std::string& key, const std::string& path) {
  torch::Tensor part = full;
  if (sharded && P > 1 && t.dim() > 0 && full.dim() == t.dim() && full.size(0) == P * t.size(0)) {
    const auto shard = expert_shard(full.size(0), P, rank);
    part = full.narrow(0, shard.first, shard.count);
  }
  TORCH_CHECK(part.sizes() == t.sizes(), "checkpoint ", path, ": ", key, " has shape ",
              full.sizes(), " but the model needs ", t.sizes(),
              sharded && P > 1 ? c10::str(" (an expert shard of ", P, " ranks)") : std::string());
  TORCH_CHECK(!full.is_floating_point() || torch::isfinite(full).all().item<bool>(), "checkpoint ",
              path, ": ", key,
              " holds non-finite values (NaN or Inf); resume from an earlier checkpoint");
  torch::NoGradGuard no_grad;
  t.copy_(part);
}

torch::serialize::InputArchive open_state(const std::string& path) {
  TORCH_CHECK(fs::exists(path), "checkpoint state ", path,
              " does not exist (checkpoints of older builds held model.pt and optimizer.pt "
              "instead and cannot be read)");
  torch::serialize::InputArchive archive;
  try {
    archive.load_from(path);
  } catch (const std::exception& e) {
    std::string why = error_message(e);
    why = why.substr(0, why.find('\n'));
    TORCH_CHECK(false, "checkpoint state ", path, " cannot be read (", why,
                "): the file is truncated or corrupt; resume from another checkpoint");
  }
  return archive;
}

// The tensor count the manifest beside a state file records, or -1.
int64_t manifest_tensors(const std::string& path) {
  std::string why;
  const auto m = read_manifest(fs::path(path).parent_path(), why);
  return why.empty() ? m.tensors : -1;
}

// Reads the model's parameters and buffers; expert tensors (rule) are this rank's block of P.
void read_model(torch::serialize::InputArchive& archive, const std::string& path,
                torch::nn::Module& model, int64_t P, int64_t rank,
                const ExpertParameterRule& rule) {
  auto read = [&](const std::string& name, const torch::Tensor& into, bool buffer) {
    torch::Tensor full;
    TORCH_CHECK(archive.try_read("model/" + name, full, buffer), "checkpoint ", path,
                " lacks model/", name);
    copy_part(full, into, rule(name), P, rank, "model/" + name, path);
  };
  for (const auto& item : model.named_parameters()) read(item.key(), item.value(), false);
  for (const auto& item : model.named_buffers()) read(item.key(), item.value(), true);
  // A state whose weights are all zero is no trained model (a zero-filled save that kept its
  // format): refuse it rather than train on from nothing.
  bool any_weight = false;
  for (const auto& item : model.named_parameters()) {
    if (item.value().numel() > 0 && item.value().ne(0).any().item<bool>()) {
      any_weight = true;
      break;
    }
  }
  TORCH_CHECK(any_weight || model.named_parameters().is_empty(), "checkpoint ", path,
              ": every weight is zero; resume from another checkpoint");
}

// The entries of the training state in state.pt's order, holding the live tensors (detached).
std::vector<StateEntry> state_entries(torch::nn::Module& model, torch::optim::AdamW& optimizer,
                                      const ExpertParameterRule& rule) {
  std::vector<StateEntry> out;
  for (const auto& item : model.named_parameters()) {
    const auto& name = item.key();
    const bool sharded = rule(name);
    out.push_back({"model/" + name, item.value().detach(), 0, sharded, false});
    auto* st = adamw_state(optimizer, item.value());
    if (!st) continue;
    out.push_back({"adamw/" + name + "/step", torch::Tensor(), st->step(), sharded, false});
    for (const auto& [suffix, tensor] : adamw_tensors(*st)) {
      if (tensor->defined()) {
        out.push_back({"adamw/" + name + "/" + suffix, tensor->detach(), 0, sharded, true});
      }
    }
  }
  for (const auto& item : model.named_buffers()) {
    out.push_back({"model/" + item.key(), item.value().detach(), 0, rule(item.key()), true});
  }
  return out;
}

// The archive of a checkpoint's state.pt, the number of entries in it, and the first tensor
// that is not finite ("" when all are).
struct GatheredState {
  torch::serialize::OutputArchive archive;
  int64_t entries = 0;
  std::string non_finite;
};

// Archives the entries with full(entry) as each tensor (the shard joined to the full tensor).
GatheredState archive_state(const std::vector<StateEntry>& entries,
                            const std::function<torch::Tensor(const StateEntry&)>& full) {
  GatheredState g;
  for (const auto& e : entries) {
    ++g.entries;
    if (!e.tensor.defined()) {
      g.archive.write(e.key, c10::IValue(e.count));
      continue;
    }
    const auto t = full(e);
    if (g.non_finite.empty() && t.is_floating_point() && !torch::isfinite(t).all().item<bool>()) {
      g.non_finite = e.key;
    }
    g.archive.write(e.key, t, e.buffer);
  }
  return g;
}

GatheredState gather_state(torch::nn::Module& model, torch::optim::AdamW& optimizer,
                           Communicator& expert_parallel, const ExpertParameterRule& rule) {
  return archive_state(
      state_entries(model, optimizer, rule ? rule : expert_parameter_rule(model)),
      [&](const StateEntry& e) { return full_tensor(e.tensor, e.sharded, expert_parallel); });
}

// Saves an archive to path with every write checked (a full disk is named, not swallowed).
void save_archive(torch::serialize::OutputArchive& archive, const std::string& path) {
  write_file(path, [&](int fd) {
    // After a failed write the rest is dropped but reported as written: the zip writer throws
    // from its destructor (std::terminate) when a write comes back short.
    int failure = 0;
    archive.save_to([&](const void* data, size_t size) -> size_t {
      if (!failure && !write_all(fd, data, size)) failure = errno;
      return size;
    });
    errno = failure;
    return failure == 0;
  });
}

// World rank 0's write of a gathered state as the checkpoint of step; throws naming the reason.
std::string write_state(const Config& config, int64_t step, const std::string& sampler_state,
                        GatheredState& state) {
  const std::string& run_dir = config.train.run_dir;
  if (!state.non_finite.empty()) {
    const auto previous = list_checkpoints(run_dir);
    throw std::runtime_error("refusing to checkpoint step " + std::to_string(step) + ": " +
                             state.non_finite + " holds non-finite values; " +
                             (previous.empty()
                                  ? std::string("no earlier checkpoint exists")
                                  : "the last good checkpoint " + previous.back() + " is kept"));
  }
  CheckpointMeta meta{step, sampler_state, config.to_yaml(), state.entries,
                      config_fingerprint(config)};
  return write_checkpoint(run_dir, meta, config.train.keep_checkpoints, [&](const std::string& d) {
    save_archive(state.archive, (fs::path(d) / "state.pt").string());
  });
}

fs::path stop_parts_dir(const std::string& run_dir) {
  return fs::path(run_dir) / "checkpoints" / "stop_parts.tmp";
}

// Rank r > 0 of world rank 0's expert-parallel group: its shards and the step, as part_<r>.pt
// (renamed into place once complete, so that rank 0 never reads a part of one).
void write_part(const std::string& run_dir, const TrainingStateCopy& copy) {
  const fs::path dir = stop_parts_dir(run_dir);
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw WriteError(dir.string(), ec.value());
  torch::serialize::OutputArchive part;
  part.write("step", c10::IValue(copy.step));
  for (const auto& e : copy.entries) {
    if (e.sharded && e.tensor.defined()) part.write(e.key, e.tensor, e.buffer);
  }
  const fs::path path = dir / ("part_" + std::to_string(copy.expert_rank) + ".pt");
  save_archive(part, path.string() + ".partial");
  fs::rename(path.string() + ".partial", path, ec);
  if (ec) throw WriteError(path.string(), ec.value());
}

// World rank 0: the parts of ranks 1..P-1, each of the copy's step, waited for up to wait_s.
std::vector<torch::serialize::InputArchive> read_parts(const std::string& run_dir,
                                                       const TrainingStateCopy& copy,
                                                       double wait_s) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(wait_s);
  std::vector<torch::serialize::InputArchive> parts(static_cast<size_t>(copy.expert_size - 1));
  for (int r = 1; r < copy.expert_size; ++r) {
    const fs::path path = stop_parts_dir(run_dir) / ("part_" + std::to_string(r) + ".pt");
    while (!fs::exists(path)) {
      TORCH_CHECK(std::chrono::steady_clock::now() < deadline, "the expert shards of ",
                  "expert-parallel rank ", r, " did not appear as ", path.string(), " within ",
                  wait_s, " s (the ranks of an expert-parallel group must share train.run_dir)");
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    auto& part = parts[static_cast<size_t>(r - 1)];
    c10::IValue step;
    part.load_from(path.string());
    TORCH_CHECK(part.try_read("step", step) && step.toInt() == copy.step, path.string(),
                " holds the shards of another step than ", copy.step,
                " (the stop came between two ranks' optimizer steps)");
  }
  return parts;
}

}  // namespace

torch::serialize::OutputArchive gather_training_state(torch::nn::Module& model,
                                                      torch::optim::AdamW& optimizer,
                                                      Communicator& expert_parallel,
                                                      const ExpertParameterRule& rule) {
  return std::move(gather_state(model, optimizer, expert_parallel, rule).archive);
}

std::string save_checkpoint(const Config& config, int64_t step, const std::string& sampler_state,
                            torch::nn::Module& model, torch::optim::AdamW& optimizer,
                            const ProcessGroups& groups) {
  Communicator& world = *groups.world;
  // Rank 0 writes; only its expert-parallel group (expert-data-parallel rank 0) gathers.
  GatheredState state;
  if (groups.expert_data_parallel->rank() == 0) {
    state = gather_state(model, optimizer, *groups.expert_parallel, nullptr);
  }
  std::string error, dir;
  if (world.rank() == 0) {
    try {
      dir = write_state(config, step, sampler_state, state);
    } catch (const std::exception& e) {
      error = error_message(e);
    }
  }
  // Instead of a barrier: every rank learns whether rank 0's write failed, and stops with it.
  stop_together_if(world, error);
  log0("checkpoint ", dir);
  return (fs::path(config.train.run_dir) / "checkpoints" / step_name(step)).string();
}

TrainingStateCopy copy_training_state(torch::nn::Module& model, torch::optim::AdamW& optimizer,
                                      const ProcessGroups& groups, int64_t step,
                                      std::string sampler_state) {
  TrainingStateCopy copy;
  copy.step = step;
  copy.sampler_state = std::move(sampler_state);
  copy.world_rank = groups.world->rank();
  copy.expert_rank = groups.expert_parallel->rank();
  copy.expert_size = groups.expert_parallel->size();
  if (groups.expert_data_parallel->rank() != 0) return copy;
  torch::NoGradGuard no_grad;
  for (auto& e : state_entries(model, optimizer, expert_parameter_rule(model))) {
    if (copy.world_rank != 0 && !e.sharded) continue;
    if (e.tensor.defined()) e.tensor = e.tensor.cpu().clone();
    copy.entries.push_back(std::move(e));
  }
  return copy;
}

std::string write_training_state_copy(const Config& config, const TrainingStateCopy& copy,
                                      double wait_s) {
  const std::string& run_dir = config.train.run_dir;
  if (copy.entries.empty()) return "";
  if (copy.world_rank != 0) {
    write_part(run_dir, copy);
    return "";
  }
  std::error_code ec;
  try {
    auto parts = read_parts(run_dir, copy, wait_s);
    auto state = archive_state(copy.entries, [&](const StateEntry& e) {
      if (!e.sharded || parts.empty()) return e.tensor;
      std::vector<torch::Tensor> blocks{e.tensor};
      for (size_t r = 0; r < parts.size(); ++r) {
        blocks.emplace_back();
        TORCH_CHECK(parts[r].try_read(e.key, blocks.back(), e.buffer), "the expert shards of ",
                    "expert-parallel rank ", r + 1, " lack ", e.key);
      }
      return e.tensor.dim() == 0 ? torch::stack(blocks) : torch::cat(blocks);
    });
    const std::string dir = write_state(config, copy.step, copy.sampler_state, state);
    fs::remove_all(stop_parts_dir(run_dir), ec);
    return dir;
  } catch (...) {
    fs::remove_all(stop_parts_dir(run_dir), ec);
    throw;
  }
}

void load_training_state(const std::string& path, torch::nn::Module& model,
                         torch::optim::AdamW& optimizer, const Communicator& expert_parallel,
                         const ExpertParameterRule& shard_rule) {
  const auto rule = shard_rule ? shard_rule : expert_parameter_rule(model);
  auto archive = open_state(path);
  const int64_t expected = manifest_tensors(path);
  const auto found = static_cast<int64_t>(archive.keys().size());
  TORCH_CHECK(expected < 0 || found == expected, "checkpoint state ", path, " holds ", found,
              " entries but its manifest says ", expected, "; resume from another checkpoint");
  const int64_t P = expert_parallel.size(), rank = expert_parallel.rank();
  read_model(archive, path, model, P, rank, rule);
  for (const auto& item : model.named_parameters()) {
    const auto& p = item.value();
    const std::string prefix = "adamw/" + item.key() + "/";
    c10::IValue step;
    if (!archive.try_read(prefix + "step", step)) continue;
    auto st = std::make_unique<torch::optim::AdamWParamState>();
    st->step(step.toInt());
    for (const auto& [suffix, tensor] : adamw_tensors(*st)) {
      torch::Tensor full;
      if (!archive.try_read(prefix + suffix, full, /*is_buffer=*/true)) continue;
      *tensor = torch::empty_like(p, torch::MemoryFormat::Contiguous);
      copy_part(full, *tensor, rule(item.key()), P, rank, prefix + suffix, path);
    }
    optimizer.state()[p.unsafeGetTensorImpl()] = std::move(st);
  }
}

void load_model_state(const std::string& path, torch::nn::Module& model) {
  auto archive = open_state(path);
  read_model(archive, path, model, 1, 0, [](const std::string&) { return false; });
}

}  // namespace gbmoe
