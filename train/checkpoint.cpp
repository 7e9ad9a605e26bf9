// Atomic checkpoint directories: write into a temporary sibling, fsync-free rename into place;
// the training state with expert shards gathered on save and sliced on load.
#include "train/checkpoint.h"

#include <unistd.h>

#include "parallel/expert_parallel.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <sstream>

namespace gbmoe {
namespace fs = std::filesystem;

namespace {

std::string step_name(int64_t step) {
  std::ostringstream s;
  s << "step_" << std::setw(8) << std::setfill('0') << step;
  return s.str();
}

void write_text_atomically(const fs::path& path, const std::string& text) {
  auto tmp = path;
  tmp += ".tmp" + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    TORCH_CHECK(out, "cannot write ", tmp.string());
    out << text;
    out.close();
    TORCH_CHECK(out, "writing ", tmp.string(), " failed (disk full?)");
  }
  fs::rename(tmp, path);
}

}  // namespace

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
  fs::create_directories(root);
  fs::path final_dir = root / step_name(meta.step);
  fs::path tmp_dir = root / (step_name(meta.step) + ".tmp" + std::to_string(::getpid()));
  fs::remove_all(tmp_dir);
  fs::create_directories(tmp_dir);
  write_files(tmp_dir.string());
  std::ostringstream text;
  text << "step " << meta.step << "\n"
       << "sampler " << meta.sampler_state << "\n";
  write_text_atomically(tmp_dir / "meta.txt", text.str());
  if (!meta.config_yaml.empty()) write_text_atomically(tmp_dir / "config.yaml", meta.config_yaml);
  // Replace an older checkpoint of the same step only once the new one is complete.
  if (fs::exists(final_dir)) {
    fs::path old = root / (step_name(meta.step) + ".old" + std::to_string(::getpid()));
    fs::rename(final_dir, old);
    fs::rename(tmp_dir, final_dir);
    fs::remove_all(old);
  } else {
    fs::rename(tmp_dir, final_dir);
  }
  write_text_atomically(root / "latest", final_dir.filename().string() + "\n");
  auto all = list_checkpoints(run_dir);
  for (size_t i = 0; i + static_cast<size_t>(keep) < all.size(); ++i) fs::remove_all(all[i]);
  return final_dir.string();
}

std::string resolve_resume(const std::string& run_dir, const std::string& resume) {
  if (resume.empty()) return "";
  if (resume == "auto") {
    fs::path latest = fs::path(run_dir) / "checkpoints" / "latest";
    if (fs::exists(latest)) {
      std::ifstream in(latest);
      std::string name;
      in >> name;
      fs::path dir = fs::path(run_dir) / "checkpoints" / name;
      if (!name.empty() && fs::exists(dir / "meta.txt")) return dir.string();
    }
    auto all = list_checkpoints(run_dir);
    return all.empty() ? "" : all.back();
  }
  TORCH_CHECK(fs::exists(fs::path(resume) / "meta.txt"), "train.resume (", resume,
              ") is not a checkpoint directory (no meta.txt); use \"auto\" or a path under ",
              run_dir, "/checkpoints");
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
  torch::NoGradGuard no_grad;
  t.copy_(part);
}

torch::serialize::InputArchive open_state(const std::string& path) {
  TORCH_CHECK(fs::exists(path), "checkpoint state ", path,
              " does not exist (checkpoints of older builds held model.pt and optimizer.pt "
              "instead and cannot be read)");
  torch::serialize::InputArchive archive;
  archive.load_from(path);
  return archive;
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
}

}  // namespace

torch::serialize::OutputArchive gather_training_state(torch::nn::Module& model,
                                                      torch::optim::AdamW& optimizer,
                                                      Communicator& expert_parallel,
                                                      const ExpertParameterRule& shard_rule) {
  const auto rule = shard_rule ? shard_rule : expert_parameter_rule(model);
  torch::serialize::OutputArchive archive;
  for (const auto& item : model.named_parameters()) {
    const auto& name = item.key();
    const bool sharded = rule(name);
    archive.write("model/" + name, full_tensor(item.value(), sharded, expert_parallel));
    auto* st = adamw_state(optimizer, item.value());
    if (!st) continue;
    archive.write("adamw/" + name + "/step", c10::IValue(st->step()));
    for (const auto& [suffix, tensor] : adamw_tensors(*st)) {
      if (tensor->defined()) {
        archive.write("adamw/" + name + "/" + suffix,
                      full_tensor(*tensor, sharded, expert_parallel), /*is_buffer=*/true);
      }
    }
  }
  for (const auto& item : model.named_buffers()) {
    archive.write("model/" + item.key(),
                  full_tensor(item.value(), rule(item.key()), expert_parallel),
                  /*is_buffer=*/true);
  }
  return archive;
}

void load_training_state(const std::string& path, torch::nn::Module& model,
                         torch::optim::AdamW& optimizer, const Communicator& expert_parallel,
                         const ExpertParameterRule& shard_rule) {
  const auto rule = shard_rule ? shard_rule : expert_parameter_rule(model);
  auto archive = open_state(path);
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
