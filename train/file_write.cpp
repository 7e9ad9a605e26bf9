// Checked POSIX writes: every write, sync, close and rename is checked and reported with its path.
#include "train/file_write.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

namespace gbmoe {
namespace fs = std::filesystem;

WriteError::WriteError(const std::string& path, int error)
    : std::runtime_error(path + ": " +
                         (error == ENOSPC ? std::string("no space left on device")
                                          : std::string(std::strerror(error)))) {}

bool write_all(int fd, const void* data, size_t size) {
  const auto* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd, p, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (n == 0) errno = ENOSPC;
      return false;
    }
    p += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

void write_file(const std::string& path, const std::function<bool(int fd)>& fill) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw WriteError(path, errno);
  errno = 0;
  const bool ok = fill(fd) && ::fdatasync(fd) == 0;
  const int error = errno;
  const bool closed = ::close(fd) == 0;
  if (!ok) throw WriteError(path, error ? error : EIO);
  if (!closed) throw WriteError(path, errno);
}

void write_text(const std::string& path, const std::string& text) {
  write_file(path, [&](int fd) { return write_all(fd, text.data(), text.size()); });
}

void write_text_atomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp" + std::to_string(::getpid());
  std::error_code ec;
  try {
    write_text(tmp, text);
  } catch (...) {
    fs::remove(tmp, ec);
    throw;
  }
  fs::rename(tmp, path, ec);
  if (ec) {
    fs::remove(tmp, ec);
    throw WriteError(path, ec.value());
  }
}

}  // namespace gbmoe
