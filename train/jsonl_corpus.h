// JSON-lines corpora (plain or .gz) as users have them: each record's text and domain fields
// become one document of the directory layout gbmoe-data builds from (DIR/<domain>/*.txt).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace gbmoe {

/// Example:
///   auto s = jsonl_to_domain_dirs({"web.jsonl.gz"}, "staging", JsonlFields().text("content"));
struct JsonlFields {
  /// Field holding the document text (a JSON string).
  std::string text = "text";
  /// Field holding the domain name (a JSON string); "" puts every record in domain "all".
  std::string domain = "domain";
};

/// What jsonl_to_domain_dirs read: good records per domain and bad records by reason.
struct JsonlSummary {
  int64_t records = 0;                     // non-blank lines
  std::map<std::string, int64_t> domains;  // documents written per domain
  int64_t invalid_json = 0;                // not a JSON object
  int64_t invalid_utf8 = 0;                // bytes that are not UTF-8
  int64_t missing_field = 0;               // text or domain absent or not a string
  int64_t bad_domain = 0;                  // a domain name that cannot be a directory name
  int64_t empty_text = 0;                  // text empty or only whitespace
  int64_t bad() const {
    return invalid_json + invalid_utf8 + missing_field + bad_domain + empty_text;
  }
};

/// Writes each good record of the JSON-lines files (".gz" ones decompressed) as
/// out_dir/<domain>/<file index>-<line, 9 digits>.txt (sorting in input order). Bad records are
/// counted, not fatal, unless every record is bad (or there is none): then a DataError names the
/// files and the counts. Missing or unreadable files fail naming the file.
JsonlSummary jsonl_to_domain_dirs(const std::vector<std::string>& files, const std::string& out_dir,
                                  const JsonlFields& fields = {});

/// One line per bad-record reason with a nonzero count, e.g. "3 records without the text field".
std::string format_jsonl_summary(const JsonlSummary& summary, const JsonlFields& fields);

}  // namespace gbmoe
