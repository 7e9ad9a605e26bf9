// Config: the field table built from the field lists of config.h, and on it YAML loading,
// --set overrides, the help text, the YAML dump and the checks.
#include "train/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <optional>
#include <set>
#include <sstream>
#include <utility>

namespace gbmoe {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// The values a field accepts beyond its type: a numeric interval, a list of names, or the
// model.moe_layers syntax.
struct Allowed {
  double lo = -kInf;
  bool lo_open = false;
  double hi = kInf;
  bool hi_open = false;
  std::vector<std::string> one_of;
  bool layer_list = false;
};

// The allowed-value checks named in the field lists of config.h.
Allowed AnyValue() { return {}; }
Allowed AtLeast(double lo) {
  Allowed a;
  a.lo = lo;
  return a;
}
Allowed Above(double lo) {
  Allowed a = AtLeast(lo);
  a.lo_open = true;
  return a;
}
Allowed AtLeastBelow(double lo, double hi) {
  Allowed a = AtLeast(lo);
  a.hi = hi;
  a.hi_open = true;
  return a;
}
Allowed Between(double lo, double hi) {
  Allowed a = AtLeast(lo);
  a.hi = hi;
  return a;
}
template <class... Names>
Allowed OneOf(Names... names) {
  Allowed a;
  a.one_of = {names...};
  return a;
}
Allowed LayerList() {
  Allowed a;
  a.layer_list = true;
  return a;
}

std::string join(const std::vector<std::string>& parts, const std::string& sep) {
  std::string out;
  for (size_t i = 0; i < parts.size(); ++i) out += (i ? sep : "") + parts[i];
  return out;
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t") - b + 1);
}

std::string node_kind(const YAML::Node& n) {
  if (n.IsNull()) return "an empty value";
  if (n.IsSequence()) return "a list";
  if (n.IsMap()) return "a mapping";
  return "'" + n.Scalar() + "'";
}

// A YAML node as text that YAML::Load reads back to the same node.
std::string yaml_text(const YAML::Node& node) {
  YAML::Emitter e;
  e << YAML::Flow << node;
  return e.c_str();
}

// Shortest text that reads back to the same double, always with a '.' so that YAML readers
// (PyYAML included) see a float: 0.001, 10000.0, 1.0e-05.
std::string format_double(double v) {
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::general);
  std::string s(buf, res.ptr);
  if (s.find('.') == std::string::npos) {
    const auto e = s.find('e');
    s.insert(e == std::string::npos ? s.size() : e, ".0");
  }
  return s;
}

// A bound in a message or in --help: integral bounds without a fraction.
std::string format_bound(double v) {
  if (v == std::floor(v) && std::fabs(v) < 1e15) return std::to_string(static_cast<int64_t>(v));
  return format_double(v);
}

// Parsing and printing per field type. parse returns nullopt when the text is not of the type.
template <class T>
struct Traits;

template <>
struct Traits<int64_t> {
  static constexpr const char* name = "int";
  static constexpr const char* expected = "an integer";
  static std::optional<int64_t> parse(const std::string& text) {
    const std::string s = trim(text);
    int64_t v = 0;
    const char* first = s.data() + (s.size() > 1 && s[0] == '+' ? 1 : 0);
    const auto res = std::from_chars(first, s.data() + s.size(), v);
    if (s.empty() || res.ec != std::errc() || res.ptr != s.data() + s.size()) return std::nullopt;
    return v;
  }
  static std::string format(int64_t v) { return std::to_string(v); }
};

template <>
struct Traits<double> {
  static constexpr const char* name = "float";
  static constexpr const char* expected = "a finite number";
  static std::optional<double> parse(const std::string& text) {
    const std::string s = trim(text);
    double v = 0.0;
    const char* first = s.data() + (s.size() > 1 && s[0] == '+' ? 1 : 0);
    const auto res = std::from_chars(first, s.data() + s.size(), v);
    if (s.empty() || res.ec != std::errc() || res.ptr != s.data() + s.size() || !std::isfinite(v))
      return std::nullopt;
    return v;
  }
  static std::string format(double v) { return format_double(v); }
};

template <>
struct Traits<bool> {
  static constexpr const char* name = "bool";
  static constexpr const char* expected = "true or false";
  static std::optional<bool> parse(const std::string& text) {
    const std::string s = trim(text);
    if (s == "true" || s == "True" || s == "yes" || s == "on" || s == "1") return true;
    if (s == "false" || s == "False" || s == "no" || s == "off" || s == "0") return false;
    return std::nullopt;
  }
  static std::string format(bool v) { return v ? "true" : "false"; }
};

template <>
struct Traits<std::string> {
  static constexpr const char* name = "string";
  static constexpr const char* expected = "a string";
  static std::optional<std::string> parse(const std::string& text) { return text; }
  static std::string format(const std::string& v) { return v; }
};

// balance.schedule: a YAML list of {step, scope, group_size, alpha} mappings, written as one
// flow-style line. parse throws ConfigError("[i].key: ...") for a malformed change; the caller
// puts the setting's key in front.
template <>
struct Traits<BalanceSchedule> {
  static constexpr const char* name = "list";
  static constexpr const char* expected = "a list of changes like [{step: 200, scope: global}]";
  static std::optional<BalanceSchedule> parse(const std::string& text);
  static std::string format(const BalanceSchedule& schedule);
};

// One scalar of a schedule change, by its type; throws naming where it is.
template <class T>
T change_value(const std::string& where, const YAML::Node& node) {
  const std::optional<T> v = node.IsScalar() ? Traits<T>::parse(node.Scalar()) : std::nullopt;
  if (!v)
    throw ConfigError(where + ": expected " + Traits<T>::expected + ", got " + node_kind(node));
  return *v;
}

BalanceChange parse_change(const std::string& at, const YAML::Node& item) {
  if (!item.IsMap()) {
    throw ConfigError(at + ": expected a mapping like {step: 200, scope: global}, got " +
                      node_kind(item));
  }
  BalanceChange c;
  bool has_step = false, has_scope = false;
  for (const auto& kv : item) {
    const std::string key = kv.first.Scalar(), where = at + "." + key;
    if (key == "step") {
      c.step = change_value<int64_t>(where, kv.second), has_step = true;
    } else if (key == "scope") {
      c.scope = change_value<std::string>(where, kv.second), has_scope = true;
    } else if (key == "group_size") {
      c.group_size = change_value<int64_t>(where, kv.second);
    } else if (key == "alpha") {
      c.alpha = change_value<double>(where, kv.second);
    } else {
      throw ConfigError(where + ": unknown key; a change has step, scope, group_size and alpha");
    }
  }
  if (!has_step || !has_scope) {
    throw ConfigError(at + ": a change needs step and scope, e.g. {step: 200, scope: global}");
  }
  return c;
}

std::optional<BalanceSchedule> Traits<BalanceSchedule>::parse(const std::string& text) {
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception&) {
    return std::nullopt;
  }
  if (root.IsNull()) return BalanceSchedule{};
  if (!root.IsSequence()) return std::nullopt;
  BalanceSchedule out;
  for (size_t i = 0; i < root.size(); ++i) {
    out.push_back(parse_change("[" + std::to_string(i) + "]", root[i]));
  }
  return out;
}

// The indices of a comma list like "1,3", or nullopt when s is not one.
std::optional<std::vector<int64_t>> parse_index_list(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');) {
    const auto v = Traits<int64_t>::parse(item);
    if (!v || *v < 0 || std::find(out.begin(), out.end(), *v) != out.end()) return std::nullopt;
    out.push_back(*v);
  }
  if (out.empty() || s.back() == ',') return std::nullopt;
  std::sort(out.begin(), out.end());
  return out;
}

const char* kLayerListRule =
    "must be all, every_other or a comma list of distinct block indices like 1,3";

// Why a value is not allowed ("must be >= 1"), or "" when it is.
std::string violation(const Allowed& a, double v) {
  const bool low = a.lo_open ? v <= a.lo : v < a.lo;
  const bool high = a.hi_open ? v >= a.hi : v > a.hi;
  if (!low && !high) return "";
  if (a.hi == kInf)
    return std::string("must be ") + (a.lo_open ? "> " : ">= ") + format_bound(a.lo);
  return "must be in " + std::string(a.lo_open ? "(" : "[") + format_bound(a.lo) + ", " +
         format_bound(a.hi) + (a.hi_open ? ")" : "]");
}
std::string violation(const Allowed& a, int64_t v) { return violation(a, static_cast<double>(v)); }
std::string violation(const Allowed& a, const std::string& v) {
  if (!a.one_of.empty() && std::find(a.one_of.begin(), a.one_of.end(), v) == a.one_of.end())
    return "must be one of " + join(a.one_of, ", ");
  if (a.layer_list && v != "all" && v != "every_other" && !parse_index_list(v))
    return kLayerListRule;
  return "";
}
std::string violation(const Allowed&, bool) { return ""; }
// A schedule's values are checked against the rest of the config in problems().
std::string violation(const Allowed&, const BalanceSchedule&) { return ""; }

// The allowed values as shown by --help: "softmax|sigmoid", ">= 1", "[0, 1)".
std::string describe(const Allowed& a) {
  if (!a.one_of.empty()) return join(a.one_of, "|");
  if (a.layer_list) return "all|every_other|i,j,...";
  if (a.lo == -kInf && a.hi == kInf) return "";
  if (a.hi == kInf) return std::string(a.lo_open ? "> " : ">= ") + format_bound(a.lo);
  return std::string(a.lo_open ? "(" : "[") + format_bound(a.lo) + ", " + format_bound(a.hi) +
         (a.hi_open ? ")" : "]");
}

// One setting: its key, type, allowed values, help, and typed access through the Config.
struct Field {
  std::string key;  // "section.name"
  std::string type;
  const char* expected;
  Allowed allowed;
  std::string help;
  std::function<std::string(const Config&)> get;
  // Parses, checks and stores text; throws ConfigError naming the key and the text.
  std::function<void(Config&, const std::string&)> set;
  // "key (value) must be ..." when the current value is not allowed, else "".
  std::function<std::string(const Config&)> problem;
};

template <class S, class T>
Field make_field(const std::string& section, const std::string& name, S Config::*sec, T S::*member,
                 Allowed allowed, const char* help) {
  Field f;
  f.key = section + "." + name;
  f.type = Traits<T>::name;
  f.expected = Traits<T>::expected;
  f.allowed = allowed;
  f.help = help;
  f.get = [sec, member](const Config& c) { return Traits<T>::format((c.*sec).*member); };
  f.set = [key = f.key, sec, member, allowed](Config& c, const std::string& text) {
    std::optional<T> v;
    try {
      v = Traits<T>::parse(text);
    } catch (const ConfigError& e) {  // "[i].step: ..." of a schedule change
      throw ConfigError(key + e.what());
    }
    if (!v) {
      throw ConfigError(key + ": expected " + Traits<T>::expected + ", got '" + text + "'");
    }
    const std::string why = violation(allowed, *v);
    if (!why.empty()) throw ConfigError(key + " (" + text + ") " + why);
    (c.*sec).*member = *v;
  };
  f.problem = [key = f.key, sec, member, allowed](const Config& c) {
    const T& v = (c.*sec).*member;
    const std::string why = violation(allowed, v);
    return why.empty() ? why : key + " (" + Traits<T>::format(v) + ") " + why;
  };
  return f;
}

// Every field, in the order of the lists in config.h.
const std::vector<Field>& fields() {
  static const std::vector<Field> table = [] {
    std::vector<Field> t;
#define GBMOE_FIELD(type, name, default_value, allowed, help) \
  t.push_back(make_field(section, #name, sec, &S::name, allowed, help));
#define GBMOE_SECTION(Struct, member, field_list) \
  {                                               \
    using S = Struct;                             \
    const std::string section = #member;          \
    const auto sec = &Config::member;             \
    field_list(GBMOE_FIELD)                       \
  }
    GBMOE_CONFIG_SECTIONS(GBMOE_SECTION)
#undef GBMOE_SECTION
#undef GBMOE_FIELD
    return t;
  }();
  return table;
}

std::vector<std::string> section_names() {
  std::vector<std::string> out;
#define GBMOE_SECTION_NAME(Struct, member, field_list) out.push_back(#member);
  GBMOE_CONFIG_SECTIONS(GBMOE_SECTION_NAME)
#undef GBMOE_SECTION_NAME
  return out;
}

std::string section_of(const std::string& key) { return key.substr(0, key.find('.')); }

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

// " (did you mean X?)" for the candidate closest to name, or "" when none is close.
std::string suggestion(const std::string& name, const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_d = std::max<size_t>(2, name.size() / 3) + 1;
  for (const auto& c : candidates) {
    const size_t tail = c.find('.') == std::string::npos ? 0 : c.find('.') + 1;
    const size_t d = std::min(edit_distance(name, c), edit_distance(name, c.substr(tail)));
    if (d < best_d) best = c, best_d = d;
  }
  return best.empty() ? "" : " (did you mean " + best + "?)";
}

void require_section(const std::string& section) {
  const auto sections = section_names();
  if (std::find(sections.begin(), sections.end(), section) == sections.end()) {
    throw ConfigError("unknown section '" + section + "'" + suggestion(section, sections) +
                      "; sections are " + join(sections, ", "));
  }
}

const Field& find_field(const std::string& key) {
  for (const auto& f : fields()) {
    if (f.key == key) return f;
  }
  if (key.find('.') != std::string::npos) require_section(section_of(key));
  throw ConfigError("unknown key " + key + suggestion(key, Config::keys()) +
                    "; see gbmoe-train --help for every key");
}

// Re-throws a ConfigError from f with "where: " in front of its message.
template <class F>
void located(const std::string& where, F&& f) {
  try {
    f();
  } catch (const ConfigError& e) {
    throw ConfigError(where + ": " + e.what());
  }
}

std::string at(const std::string& source, const YAML::Mark& mark) {
  if (mark.is_null()) return source;
  return source + ":" + std::to_string(mark.line + 1) + ":" + std::to_string(mark.column + 1);
}

void load_yaml(Config& cfg, const YAML::Node& root, const std::string& source) {
  if (root.IsNull()) return;
  if (!root.IsMap()) {
    throw ConfigError(at(source, root.Mark()) +
                      ": expected a mapping of sections (model:, balance:, ...), got " +
                      node_kind(root));
  }
  std::set<std::string> seen;
  for (const auto& sec : root) {
    const std::string section = sec.first.Scalar();
    located(at(source, sec.first.Mark()), [&] {
      if (!seen.insert(section).second) throw ConfigError("duplicate section " + section);
      require_section(section);
    });
    const YAML::Node& body = sec.second;
    if (body.IsNull()) continue;
    if (!body.IsMap()) {
      throw ConfigError(at(source, body.Mark()) + ": section " + section +
                        " must be a mapping of keys, got " + node_kind(body));
    }
    for (const auto& kv : body) {
      const std::string key = section + "." + kv.first.Scalar();
      const Field* field = nullptr;
      located(at(source, kv.first.Mark()), [&] {
        if (!seen.insert(key).second) throw ConfigError("duplicate key " + key);
        field = &find_field(key);
      });
      const YAML::Node& value = kv.second;
      located(at(source, value.Mark()), [&] {
        const bool list = field->type == "list" && value.IsSequence();
        if (!value.IsScalar() && !list) {
          throw ConfigError(key + ": expected " + field->expected + ", got " + node_kind(value) +
                            (field->type == "string" ? " (write \"\" for an empty string)" : ""));
        }
        field->set(cfg, list ? yaml_text(value) : value.Scalar());
      });
    }
  }
}

// Greedy word wrap of text into lines of at most width characters, each after indent.
std::string wrap(const std::string& text, const std::string& indent, size_t width) {
  std::string out, line;
  std::stringstream words(text);
  for (std::string w; words >> w;) {
    if (!line.empty() && indent.size() + line.size() + 1 + w.size() > width) {
      out += indent + line + "\n";
      line.clear();
    }
    line += (line.empty() ? "" : " ") + w;
  }
  return out + indent + line + "\n";
}

std::string quoted(const std::string& s) {
  YAML::Emitter e;
  e << YAML::DoubleQuoted << s;
  return e.c_str();
}

std::string Traits<BalanceSchedule>::format(const BalanceSchedule& schedule) {
  std::string out = "[";
  for (size_t i = 0; i < schedule.size(); ++i) {
    const auto& c = schedule[i];
    const bool plain = !c.scope.empty() && c.scope.find_first_not_of(
                                               "abcdefghijklmnopqrstuvwxyz_") == std::string::npos;
    out += std::string(i ? ", " : "") + "{step: " + std::to_string(c.step) +
           ", scope: " + (plain ? c.scope : quoted(c.scope)) +
           ", group_size: " + std::to_string(c.group_size) +
           (c.alpha ? ", alpha: " + format_double(*c.alpha) : "") + "}";
  }
  return out + "]";
}

// The attention shape: heads, key/value heads and head size of the model family.
void attention_problems(const ModelConfig& m, std::vector<std::string>& out) {
  const auto n = [](auto v) { return std::to_string(v); };
  if (m.head_dim > 0) {
    if (m.head_dim % 2 != 0) {
      out.push_back("model.head_dim (" + n(m.head_dim) +
                    ") must be even for the rotary embeddings");
    }
  } else if (m.dim % m.num_heads != 0) {
    out.push_back("model.dim (" + n(m.dim) + ") must be divisible by model.num_heads (" +
                  n(m.num_heads) + ")");
  } else if ((m.dim / m.num_heads) % 2 != 0) {
    out.push_back("the head size model.dim / model.num_heads (" + n(m.dim) + " / " +
                  n(m.num_heads) + " = " + n(m.dim / m.num_heads) +
                  ") must be even for the rotary embeddings; change model.dim or model.num_heads");
  }
  if (m.num_kv_heads > 0 && m.num_heads % m.num_kv_heads != 0) {
    out.push_back("model.num_kv_heads (" + n(m.num_kv_heads) + ") must divide model.num_heads (" +
                  n(m.num_heads) + ")");
  }
  if (m.family == "gbmoe" && ((m.num_kv_heads > 0 && m.num_kv_heads != m.num_heads) ||
                              (m.head_dim > 0 && m.head_dim * m.num_heads != m.dim))) {
    out.push_back("model.family gbmoe needs model.num_kv_heads (" + n(m.num_kv_heads) +
                  ") = 0 or model.num_heads (" + n(m.num_heads) + ") and model.head_dim (" +
                  n(m.head_dim) +
                  ") = 0 or model.dim / model.num_heads; set model.family=qwen3_moe, "
                  "mixtral or olmoe for grouped-query attention");
  }
}

// balance.schedule: each change's values, steps increasing within train.steps, and each phase's
// scope against balance.micro_alpha.
void schedule_problems(const Config& c, std::vector<std::string>& out) {
  const auto n = [](auto v) { return std::to_string(v); };
  const auto& schedule = c.balance.schedule;
  const Allowed& scopes = find_field("balance.scope").allowed;
  for (size_t i = 0; i < schedule.size(); ++i) {
    const auto& ch = schedule[i];
    const std::string at = "balance.schedule[" + n(i) + "]";
    if (ch.step < 1 || ch.step >= c.train.steps) {
      out.push_back(at + ".step (" + n(ch.step) + ") must be in [1, train.steps (" +
                    n(c.train.steps) + ")): the change applies after that many steps");
    } else if (i > 0 && ch.step <= schedule[i - 1].step) {
      out.push_back(at + ".step (" + n(ch.step) + ") must be greater than balance.schedule[" +
                    n(i - 1) + "].step (" + n(schedule[i - 1].step) + ")");
    }
    const std::string why = violation(scopes, ch.scope);
    if (!why.empty()) {
      out.push_back(at + ".scope (" + ch.scope + ") " + why);
    } else if (c.balance.micro_alpha > 0 && ch.scope != "global" && ch.scope != "group") {
      out.push_back(at + ".scope (" + ch.scope + ") cannot keep balance.micro_alpha (" +
                    format_double(c.balance.micro_alpha) +
                    "), which only adds to a global or group loss; set balance.micro_alpha=0");
    }
    if (ch.group_size < 0) {
      out.push_back(at + ".group_size (" + n(ch.group_size) + ") must be >= 0 (0 = all ranks)");
    } else if (ch.group_size != 0 && ch.scope != "group") {
      out.push_back(at + ".group_size (" + n(ch.group_size) +
                    ") only applies to scope group, but " + at + ".scope is " + ch.scope +
                    "; leave group_size out or set it to 0");
    }
    if (ch.alpha && !(*ch.alpha >= 0.0 && std::isfinite(*ch.alpha))) {
      out.push_back(at + ".alpha (" + format_double(*ch.alpha) + ") must be >= 0");
    }
  }
}

// The problems validate() reports, in the order of the field lists.
std::vector<std::string> problems(const Config& c) {
  std::vector<std::string> out;
  for (const auto& f : fields()) {
    std::string p = f.problem(c);
    if (!p.empty()) out.push_back(std::move(p));
  }
  if (!out.empty()) return out;  // the cross-field checks assume each value is allowed

  const auto& m = c.model;
  const auto& b = c.balance;
  const auto n = [](auto v) { return std::to_string(v); };
  const auto d = [](double v) { return format_double(v); };
  if (m.top_k > m.num_experts) {
    out.push_back("model.top_k (" + n(m.top_k) + ") must be <= model.num_experts (" +
                  n(m.num_experts) + ")");
  }
  attention_problems(m, out);
  try {
    if (m.moe_layer_indices().empty()) {
      out.push_back("model.moe_layers (" + m.moe_layers + ") selects no block of " +
                    n(m.num_layers) + "; use model.moe_layers=all or raise model.num_layers");
    }
  } catch (const ConfigError& e) {
    out.push_back(e.what());
  }
  if (m.num_experts % c.parallel.expert_parallel != 0) {
    out.push_back("model.num_experts (" + n(m.num_experts) +
                  ") must be divisible by parallel.expert_parallel (" +
                  n(c.parallel.expert_parallel) + ")");
  }
  if (b.group_size != 0 && b.scope != "group") {
    out.push_back("balance.group_size (" + n(b.group_size) +
                  ") only applies to balance.scope group, but the scope is " + b.scope +
                  "; set balance.scope=group or balance.group_size=0");
  }
  if (b.method == "quantile" && m.top_k >= m.num_experts) {
    out.push_back("balance.method quantile needs model.top_k (" + n(m.top_k) +
                  ") < model.num_experts (" + n(m.num_experts) +
                  "): with every expert selected there is nothing to balance");
  }
  if (b.scope == "shuffle" && b.method != "aux_loss") {
    const std::string what = "balance.scope (shuffle) is an ablation of the load-balancing loss";
    out.push_back(what + ", but balance.method is " + b.method + "; set balance.method=aux_loss");
  }
  if (b.micro_alpha > 0 && b.scope != "global" && b.scope != "group") {
    out.push_back("balance.micro_alpha (" + d(b.micro_alpha) +
                  ") only adds to a global or group loss, but balance.scope is " + b.scope +
                  "; raise balance.alpha instead or set balance.micro_alpha=0");
  }
  if (c.optim.min_lr > c.optim.lr) {
    out.push_back("optim.min_lr (" + d(c.optim.min_lr) + ") must be <= optim.lr (" + d(c.optim.lr) +
                  ")");
  }
  if (trim(c.data.dir).empty()) {
    out.push_back(
        "data.dir is empty; set it to the directory gbmoe-data wrote, e.g. "
        "--set data.dir=data/corpus");
  }
  if (trim(c.train.run_dir).empty()) {
    out.push_back(
        "train.run_dir is empty; set it to the directory of this run, e.g. "
        "--set train.run_dir=runs/default");
  }
  if (c.train.eval_every > 0 && c.data.val_batches_per_domain == 0) {
    out.push_back("train.eval_every (" + n(c.train.eval_every) +
                  ") needs data.val_batches_per_domain >= 1, or set train.eval_every=0");
  }
  if (c.train.profile_steps > 0 && c.train.profile_start + c.train.profile_steps > c.train.steps) {
    out.push_back("train.profile_start (" + n(c.train.profile_start) + ") + train.profile_steps (" +
                  n(c.train.profile_steps) + ") must be <= train.steps (" + n(c.train.steps) +
                  "); lower train.profile_start or raise train.steps");
  }
  schedule_problems(c, out);
  return out;
}

void throw_if_any(const std::vector<std::string>& problems) {
  if (problems.empty()) return;
  throw ConfigError("invalid configuration:\n  " + join(problems, "\n  "));
}

}  // namespace

std::vector<int64_t> ModelConfig::moe_layer_indices() const {
  std::vector<int64_t> out;
  if (moe_layers == "all" || moe_layers == "every_other") {
    const int64_t first = moe_layers == "all" ? 0 : 1, stride = moe_layers == "all" ? 1 : 2;
    for (int64_t i = first; i < num_layers; i += stride) out.push_back(i);
    return out;
  }
  const auto list = parse_index_list(moe_layers);
  if (!list) throw ConfigError("model.moe_layers (" + moe_layers + ") " + kLayerListRule);
  if (list->back() >= num_layers) {
    throw ConfigError("model.moe_layers (" + moe_layers + ") names block " +
                      std::to_string(list->back()) + ", but model.num_layers is " +
                      std::to_string(num_layers) + " (blocks 0.." + std::to_string(num_layers - 1) +
                      ")");
  }
  return *list;
}

BalanceConfig BalanceConfig::at_step(int64_t steps_done) const {
  BalanceConfig out = *this;
  for (const auto& change : schedule) {
    if (change.step > steps_done) break;  // validate(): steps increase
    out.scope = change.scope;
    out.group_size = change.group_size;
    if (change.alpha) out.alpha = *change.alpha;
  }
  return out;
}

Config Config::from_yaml_file(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    throw ConfigError("config file '" + path + "' is a directory; give a YAML file, e.g. " +
                      (std::filesystem::path(path) / "default.yaml").string());
  }
  std::ifstream in(path);
  if (!in) throw ConfigError("cannot read config file '" + path + "'");
  std::stringstream text;
  text << in.rdbuf();
  if (in.bad()) throw ConfigError("cannot read config file '" + path + "'");
  // An empty file is more likely a mistake (a wrong or truncated file) than a wish for the
  // defaults, which leaving out --config already gives.
  bool empty = false;
  try {
    const auto documents = YAML::LoadAll(text.str());
    empty = documents.empty() || (documents.size() == 1 && documents[0].IsNull());
  } catch (const YAML::Exception&) {
    // from_yaml_string reports it with the line and column.
  }
  if (empty) {
    throw ConfigError("config file '" + path +
                      "' holds no settings (empty); leave out --config for the defaults");
  }
  return from_yaml_string(text.str(), path);
}

Config Config::from_yaml_string(const std::string& text, const std::string& source) {
  std::vector<YAML::Node> documents;
  try {
    documents = YAML::LoadAll(text);
  } catch (const YAML::Exception& e) {
    throw ConfigError(at(source, e.mark) + ": invalid YAML: " + e.msg);
  }
  if (documents.empty()) return Config();
  if (documents.size() > 1) {
    throw ConfigError(at(source, documents[1].Mark()) + ": a second YAML document (after '---'); " +
                      "a config is one document: merge them or remove the separator");
  }
  const YAML::Node& root = documents[0];
  Config cfg;
  load_yaml(cfg, root, source);
  return cfg;
}

void Config::apply_override(const std::string& key_eq_value) {
  const auto eq = key_eq_value.find('=');
  located("--set " + key_eq_value, [&] {
    if (eq == std::string::npos || trim(key_eq_value.substr(0, eq)).empty()) {
      throw ConfigError("expected section.key=value, e.g. --set model.dim=256");
    }
    set(trim(key_eq_value.substr(0, eq)), key_eq_value.substr(eq + 1));
  });
}

void Config::apply_overrides(const std::vector<std::string>& key_eq_values) {
  for (const auto& kv : key_eq_values) apply_override(kv);
}

void Config::set(const std::string& key, const std::string& value) {
  find_field(key).set(*this, value);
}

std::string Config::get(const std::string& key) const { return find_field(key).get(*this); }

std::vector<std::string> Config::keys() {
  std::vector<std::string> out;
  for (const auto& f : fields()) out.push_back(f.key);
  return out;
}

std::string Config::help_text() {
  const Config defaults;
  std::string out = wrap(
      "Settings: in the --config YAML file as `section:` followed by indented `key: value` lines "
      "(keys left out keep "
      "their default), or on the command line as --set section.key=value (applied after the "
      "file, in order). Free-text strings are quoted below; write \"\" for an empty one.",
      "", 100);
  std::string section;
  for (const auto& f : fields()) {
    if (section_of(f.key) != section) {
      section = section_of(f.key);
      out += "\n" + section + ":\n";
    }
    const std::string allowed = describe(f.allowed);
    const std::string value = f.get(defaults);
    out += "  " + f.key + " (" + (f.allowed.one_of.empty() ? f.type : allowed) + ", default " +
           (f.type == "string" && f.allowed.one_of.empty() ? quoted(value) : value) +
           (f.allowed.one_of.empty() && !allowed.empty() ? ", " + allowed : "") + ")\n";
    out += wrap(f.help, "      ", 100);
  }
  return out;
}

std::string Config::to_yaml() const {
  // (text, help) per line; section lines have no help. Comments align over the whole file.
  std::vector<std::pair<std::string, std::string>> lines;
  std::string section;
  for (const auto& f : fields()) {
    if (section_of(f.key) != section) {
      section = section_of(f.key);
      lines.emplace_back(section + ":", "");
    }
    const std::string value = f.get(*this);
    const bool free_text = f.type == "string" && f.allowed.one_of.empty();
    lines.emplace_back(
        "  " + f.key.substr(section.size() + 1) + ": " + (free_text ? quoted(value) : value),
        f.help);
  }
  size_t width = 0;
  for (const auto& [text, help] : lines) {
    if (!help.empty()) width = std::max(width, text.size());
  }
  std::string out = "# gbmoe-train configuration: defaults, then the config file, then --set.\n";
  for (const auto& [text, help] : lines) {
    out += help.empty() ? text + "\n"
                        : text + std::string(width - text.size(), ' ') + "  # " + help + "\n";
  }
  return out;
}

void Config::validate() const { throw_if_any(problems(*this)); }

void Config::validate_for_world(int world_size) const {
  std::vector<std::string> out = problems(*this);
  const std::string world = std::to_string(world_size);
  if (world_size < 1) {
    out.push_back("the world size (" + world + ") must be >= 1");
  } else {
    if (parallel.expert_parallel > 0 && world_size % parallel.expert_parallel != 0) {
      out.push_back("parallel.expert_parallel (" + std::to_string(parallel.expert_parallel) +
                    ") must divide the world size (" + world + ")");
    }
    if (balance.scope == "group" && balance.group_size > 0 &&
        world_size % balance.group_size != 0) {
      out.push_back("balance.group_size (" + std::to_string(balance.group_size) +
                    ") must divide the world size (" + world + ")");
    }
    for (size_t i = 0; i < balance.schedule.size(); ++i) {
      const int64_t g = balance.schedule[i].group_size;
      if (balance.schedule[i].scope == "group" && g > 0 && world_size % g != 0) {
        out.push_back("balance.schedule[" + std::to_string(i) + "].group_size (" +
                      std::to_string(g) + ") must divide the world size (" + world + ")");
      }
    }
  }
  throw_if_any(out);
}

}  // namespace gbmoe
