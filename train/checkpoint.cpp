// Atomic checkpoint directories: write into a temporary sibling, fsync-free rename into place.
#include "train/checkpoint.h"

#include <unistd.h>

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

}  // namespace gbmoe
