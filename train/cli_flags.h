// Command-line flags of the gbmoe tools read as text and converted here, so that a bad value is
// reported with its flag (cxxopts' own conversion error names only the value).
#pragma once

#include <cxxopts.hpp>

#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace gbmoe {

/// The value of --name, declared as cxxopts::value<std::string>(), converted to T.
/// Example: int64_t n = flag<int64_t>(args, "val-batches");  // "--val-batches ("abc") is not ..."
template <typename T>
T flag(const cxxopts::ParseResult& args, const std::string& name) {
  const std::string text = args[name].as<std::string>();
  std::istringstream in(text);
  T value{};
  in >> value;
  if (text.empty() || in.fail() || !in.eof() || (std::is_unsigned<T>::value && text[0] == '-')) {
    throw std::invalid_argument("--" + name + " (\"" + text + "\") is not a valid " +
                                (std::is_floating_point<T>::value ? "number" : "integer"));
  }
  return value;
}

template <>
inline std::string flag<std::string>(const cxxopts::ParseResult& args, const std::string& name) {
  return args[name].as<std::string>();
}

}  // namespace gbmoe
