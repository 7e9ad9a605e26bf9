// Small helpers that write JSON numbers and lists for the metrics and analysis files.
#pragma once

#include <cmath>
#include <iomanip>
#include <sstream>
#include <string>
#include <vector>

namespace gbmoe {

/// A number as JSON: 7 significant digits; null for NaN and infinities.
/// Example: json_number(0.25) == "0.25"
inline std::string json_number(double v) {
  if (!std::isfinite(v)) return "null";
  std::ostringstream s;
  s << std::setprecision(7) << v;
  return s.str();
}

/// Example: json_list({1, 0.5}) == "[1,0.5]"
inline std::string json_list(const std::vector<double>& values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) out += (i ? "," : "") + json_number(values[i]);
  return out + "]";
}

/// A string as JSON, with quotes, backslashes and control characters escaped.
/// Example: json_string("a\"b") == "\"a\\\"b\""
inline std::string json_string(const std::string& text) {
  std::ostringstream s;
  s << '"';
  for (unsigned char c : text) {
    if (c == '"' || c == '\\') {
      s << '\\' << c;
    } else if (c < 0x20) {
      s << "\\u" << std::hex << std::setw(4) << std::setfill('0') << static_cast<int>(c)
        << std::dec;
    } else {
      s << c;
    }
  }
  s << '"';
  return s.str();
}

}  // namespace gbmoe
