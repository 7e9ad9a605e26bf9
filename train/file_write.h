// Writes of the run directory that check every step, so that a full disk is reported with the
// path and "no space left on device" instead of a half-written file passing for a whole one.
#pragma once

#include <functional>
#include <stdexcept>
#include <string>

namespace gbmoe {

/// A failed write: "<path>: <reason>", a full disk spelled "no space left on device".
class WriteError : public std::runtime_error {
 public:
  WriteError(const std::string& path, int error);
  using std::runtime_error::runtime_error;
};

/// Writes all of data to fd, retrying short writes; false (errno set) when a write fails.
bool write_all(int fd, const void* data, size_t size);

/// Creates (truncates) path, calls fill(fd) to write it, syncs and closes it; throws WriteError
/// naming path when any of that fails. fill returns false with errno set when it fails.
///
/// Example:
///   write_file("run/x.bin", [&](int fd) { return write_all(fd, buf.data(), buf.size()); });
void write_file(const std::string& path, const std::function<bool(int fd)>& fill);

/// write_file of a text.
void write_text(const std::string& path, const std::string& text);

/// write_text into path + ".tmp<pid>", then renamed over path: readers see the old or the new
/// text, never a part. The temporary file is removed when the write fails.
void write_text_atomically(const std::string& path, const std::string& text);

}  // namespace gbmoe
