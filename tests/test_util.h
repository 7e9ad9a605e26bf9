// Helpers shared by the tests: exception-message checks, gradient comparison, kernel mode.
#pragma once

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "moe/kernels.h"

namespace gbmoe {

/// Sets the kernel mode (moe/kernels.h) for a scope and restores the one before.
class KernelModeGuard {
 public:
  explicit KernelModeGuard(KernelMode mode) : saved_(kernel_mode()) { set_kernel_mode(mode); }
  ~KernelModeGuard() { set_kernel_mode(saved_); }
  KernelModeGuard(const KernelModeGuard&) = delete;
  KernelModeGuard& operator=(const KernelModeGuard&) = delete;

 private:
  KernelMode saved_;
};

/// The bytes of a file ("" when it cannot be read).
inline std::string slurp(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

/// Replaces a file with bytes, creating its directory.
inline void spit(const std::filesystem::path& p, const std::string& bytes) {
  if (p.has_parent_path()) std::filesystem::create_directories(p.parent_path());
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << bytes;
}

/// Runs f and expects a c10::Error (or std::exception) whose message contains needle.
template <typename F>
void expect_throw_with(F&& f, const std::string& needle) {
  try {
    f();
  } catch (const std::exception& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(needle), std::string::npos)
        << "message \"" << what << "\" lacks \"" << needle << "\"";
    return;
  }
  ADD_FAILURE() << "expected an exception mentioning \"" << needle << "\"";
}

/// The message of the exception f throws; "" and a test failure when it throws none. For
/// checking several parts of one message.
template <typename F>
std::string exception_message(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an exception";
  return "";
}

/// Largest relative difference |a - b| / max(|b|, floor) over all elements.
inline double max_rel_diff(const torch::Tensor& a, const torch::Tensor& b, double floor = 1e-12) {
  auto ad = a.detach().to(torch::kDouble), bd = b.detach().to(torch::kDouble);
  auto scale = torch::maximum(bd.abs().max(), torch::full({}, floor, bd.options()));
  return ((ad - bd).abs().max() / scale).item<double>();
}

}  // namespace gbmoe
