// The run directory: flock()ed lock file, cleanup of interrupted saves, the fresh-run check, and
// metrics.jsonl kept in step with the checkpoint a run resumes from.
#include "train/run_dir.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include "parallel/runtime.h"
#include "train/file_write.h"

namespace gbmoe {
namespace fs = std::filesystem;

void stop_together_if(Communicator& world, const std::string& error) {
  auto lengths =
      world.all_gather(torch::tensor({static_cast<int64_t>(error.size())}, torch::kLong));
  for (int r = 0; r < world.size(); ++r) {
    const int64_t n = lengths[r].item<int64_t>();
    if (n == 0) continue;
    auto bytes = torch::zeros({n}, torch::kByte);
    if (world.rank() == r) std::memcpy(bytes.data_ptr(), error.data(), error.size());
    world.broadcast(bytes, r);
    throw JobStopped(
        std::string(static_cast<const char*>(bytes.data_ptr()), static_cast<size_t>(n)));
  }
}

namespace {

std::string this_host() {
  char name[256] = {0};
  if (::gethostname(name, sizeof(name) - 1) != 0) return "unknown host";
  return name;
}

std::string now_text() {
  const std::time_t t = std::time(nullptr);
  char text[64];
  std::strftime(text, sizeof(text), "%Y-%m-%d %H:%M:%S UTC", std::gmtime(&t));
  return text;
}

// Takes run_dir/lock; returns its fd, or throws naming the job that holds it.
int take_lock(const fs::path& run_dir) {
  const fs::path path = run_dir / "lock";
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) throw WriteError(path.string(), errno);
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int error = errno;
    std::string holder(512, '\0');
    const ssize_t n = ::pread(fd, holder.data(), holder.size(), 0);
    holder.resize(n > 0 ? static_cast<size_t>(n) : 0);
    while (!holder.empty() && (holder.back() == '\n' || holder.back() == '\0')) holder.pop_back();
    ::close(fd);
    if (error != EWOULDBLOCK) throw WriteError(path.string(), error);
    throw std::runtime_error(
        "train.run_dir (" + run_dir.string() + ") is in use by another gbmoe-train job (" +
        (holder.empty() ? std::string("holder unknown") : holder) + "; lock file " + path.string() +
        "): wait for it to end, or choose another train.run_dir");
  }
  const std::string text = "pid " + std::to_string(::getpid()) + " on host " + this_host() +
                           ", since " + now_text() + "\n";
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, text.data(), text.size(), 0) < 0) {
    const int error = errno;
    ::close(fd);
    throw WriteError(path.string(), error);
  }
  return fd;
}

// Removes the temporary directories and files of checkpoint saves that were interrupted, and
// moves back a checkpoint that an interrupted replacement of the same step had moved aside.
void clean_interrupted_saves(const fs::path& root) {
  if (!fs::is_directory(root)) return;
  int removed = 0, restored = 0;
  std::vector<fs::path> entries;
  for (const auto& entry : fs::directory_iterator(root)) entries.push_back(entry.path());
  for (const auto& path : entries) {
    const std::string name = path.filename().string();
    if (name.find(".tmp") != std::string::npos) {
      fs::remove_all(path);
      ++removed;
    } else if (const auto old = name.find(".old"); old != std::string::npos) {
      const fs::path original = root / name.substr(0, old);
      if (fs::exists(original)) {
        fs::remove_all(path);
        ++removed;
      } else {
        fs::rename(path, original);
        ++restored;
      }
    }
  }
  if (removed > 0) {
    log0("removed ", removed, " leftovers of interrupted checkpoint saves in ", root.string());
  }
  if (restored > 0) log0("restored ", restored, " checkpoints an interrupted save had moved");
}

// "3 checkpoints (newest step_00000006), metrics.jsonl of 12 lines", or "" for no run.
std::string earlier_run(const fs::path& run_dir) {
  std::vector<std::string> checkpoints;
  const fs::path root = run_dir / "checkpoints";
  if (fs::is_directory(root)) {
    for (const auto& entry : fs::directory_iterator(root)) {
      const auto name = entry.path().filename().string();
      if (name.rfind("step_", 0) == 0) checkpoints.push_back(name);
    }
  }
  std::sort(checkpoints.begin(), checkpoints.end());
  int64_t lines = 0;
  const fs::path metrics = run_dir / "metrics.jsonl";
  std::error_code ec;
  if (fs::exists(metrics) && fs::file_size(metrics, ec) > 0) {
    std::ifstream in(metrics);
    for (std::string line; std::getline(in, line);) ++lines;
  }
  std::string out;
  if (!checkpoints.empty()) {
    out = std::to_string(checkpoints.size()) +
          (checkpoints.size() == 1 ? " checkpoint" : " checkpoints") + ", the newest " +
          checkpoints.back();
  }
  if (lines > 0) {
    out += (out.empty() ? "" : "; ") + std::string("metrics.jsonl of ") + std::to_string(lines) +
           (lines == 1 ? " line" : " lines");
  }
  return out;
}

// The step of a metrics line ({"step":N,...}), or -1 when it has none or is cut off.
int64_t line_step(const std::string& line) {
  const std::string key = "{\"step\":";
  if (line.rfind(key, 0) != 0 || line.empty() || line.back() != '}') return -1;
  try {
    return std::stoll(line.substr(key.size()));
  } catch (const std::exception&) {
    return -1;
  }
}

}  // namespace

RunDirectory::RunDirectory(const Config& config, Communicator& world)
    : config_(config),
      world_(world),
      run_dir_(config.train.run_dir),
      metrics_path_((fs::path(config.train.run_dir) / "metrics.jsonl").string()) {
  std::string error;
  if (world.rank() == 0) {
    try {
      const fs::path dir(run_dir_);
      std::error_code ec;
      fs::create_directories(dir, ec);
      if (ec) throw WriteError("train.run_dir (" + run_dir_ + ")", ec.value());
      lock_fd_ = take_lock(dir);
      clean_interrupted_saves(dir / "checkpoints");
      const std::string earlier = earlier_run(dir);
      if (config.train.resume.empty() && !earlier.empty()) {
        if (!config.train.overwrite) {
          throw std::runtime_error(
              "train.run_dir (" + run_dir_ + ") already holds a run (" + earlier +
              "): resume it with --set train.resume=auto, replace it with --set "
              "train.overwrite=true, or choose another train.run_dir");
        }
        fs::remove_all(dir / "checkpoints");
        fs::remove(dir / "metrics.jsonl");
        log0("train.overwrite: removed the earlier run in ", run_dir_, " (", earlier, ")");
      }
    } catch (const std::exception& e) {
      error = error_message(e);
    }
  }
  try {
    stop_together_if(world, error);
  } catch (...) {
    if (lock_fd_ >= 0) ::close(lock_fd_);
    throw;
  }
}

RunDirectory::~RunDirectory() {
  if (metrics_fd_ >= 0) ::close(metrics_fd_);
  if (lock_fd_ >= 0) ::close(lock_fd_);  // releases the flock
}

void RunDirectory::start(int64_t start_step) {
  std::string error;
  if (world_.rank() == 0) {
    try {
      write_text_atomically((fs::path(run_dir_) / "config.yaml").string(), config_.to_yaml());
      // Lines of steps after start_step come from a run that went on past the checkpoint this
      // one resumes from (or from a cut-off write): the resumed run writes them again.
      std::vector<std::string> kept;
      int64_t dropped = 0;
      if (fs::exists(metrics_path_)) {
        std::ifstream in(metrics_path_);
        for (std::string line; std::getline(in, line);) {
          const int64_t step = line_step(line);
          if (step >= 0 && step <= start_step) {
            kept.push_back(line);
          } else {
            ++dropped;
          }
        }
      }
      if (dropped > 0) {
        std::string text;
        for (const auto& line : kept) text += line + "\n";
        write_text_atomically(metrics_path_, text);
        log0("metrics.jsonl: dropped ", dropped, " lines after step ", start_step,
             " (written after the checkpoint this run resumes from)");
      }
      metrics_fd_ = ::open(metrics_path_.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
      if (metrics_fd_ < 0) throw WriteError(metrics_path_, errno);
    } catch (const std::exception& e) {
      error = error_message(e);
    }
  }
  stop_together_if(world_, error);
}

void RunDirectory::append_metrics(const std::string& line) {
  TORCH_CHECK(metrics_fd_ >= 0, "RunDirectory::append_metrics before start() or off rank 0");
  struct stat st;
  const off_t before = ::fstat(metrics_fd_, &st) == 0 ? st.st_size : -1;
  const std::string text = line + "\n";
  if (write_all(metrics_fd_, text.data(), text.size())) return;
  const int error = errno;
  // A partial line that cannot be cut off is dropped when the run resumes (it does not parse).
  const bool trimmed = before >= 0 && ::ftruncate(metrics_fd_, before) == 0;
  throw std::runtime_error(WriteError(metrics_path_, error).what() +
                           std::string(trimmed ? " (the partial line was removed)" : "") +
                           "; the run stops. Its last checkpoint is kept: free space and resume "
                           "with --set train.resume=auto");
}

}  // namespace gbmoe
