// JSON-lines corpora: good records become domain directories, bad ones (not JSON, invalid
// UTF-8, missing fields, unusable domains, empty text) are counted; .gz files read the same;
// a file of only bad records fails.
#include "train/jsonl_corpus.h"

#include <gtest/gtest.h>
#include <zlib.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "tests/test_util.h"
#include "train/token_dataset.h"

namespace gbmoe {
namespace {

namespace fs = std::filesystem;

const char* kLines =
    "{\"text\": \"the cat sat\", \"domain\": \"animals\"}\n"
    "{\"text\": \"one two\", \"domain\": \"numbers\", \"id\": 7}\n"
    "\n"
    "not json\n"
    "{\"text\": \"bad \xff byte\", \"domain\": \"animals\"}\n"
    "{\"domain\": \"animals\"}\n"
    "{\"text\": 5, \"domain\": \"animals\"}\n"
    "{\"text\": \"x\", \"domain\": \"../up\"}\n"
    "{\"text\": \"  \\n \", \"domain\": \"numbers\"}\n"
    "{\"text\": \"d\\u00e9j\\u00e0 vu\", \"domain\": \"animals\"}";  // no final newline

std::string temp_dir(const std::string& name) {
  const auto dir = fs::temp_directory_path() / ("gbmoe-jsonl-" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

std::string read(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

void expect_counts(const JsonlSummary& s) {
  EXPECT_EQ(s.records, 9);
  EXPECT_EQ(s.invalid_json, 1);
  EXPECT_EQ(s.invalid_utf8, 1);
  EXPECT_EQ(s.missing_field, 2);
  EXPECT_EQ(s.bad_domain, 1);
  EXPECT_EQ(s.empty_text, 1);
  EXPECT_EQ(s.domains.at("animals"), 2);
  EXPECT_EQ(s.domains.at("numbers"), 1);
}

TEST(Jsonl, GoodRecordsBecomeDomainDocumentsAndBadOnesAreCounted) {
  const auto dir = temp_dir("plain");
  std::ofstream(dir + "/c.jsonl") << kLines;
  const auto s = jsonl_to_domain_dirs({dir + "/c.jsonl"}, dir + "/out");
  expect_counts(s);
  EXPECT_EQ(read(dir + "/out/animals/0-000000001.txt"), "the cat sat");
  EXPECT_EQ(read(dir + "/out/animals/0-000000010.txt"), "d\xc3\xa9j\xc3\xa0 vu");
  EXPECT_EQ(read(dir + "/out/numbers/0-000000002.txt"), "one two");
  const auto text = format_jsonl_summary(s, JsonlFields());
  EXPECT_NE(text.find("2 records without a string field \"text\" or \"domain\""), std::string::npos)
      << text;
  EXPECT_NE(text.find("1 records with invalid UTF-8"), std::string::npos) << text;
}

TEST(Jsonl, GzipFilesAndOtherFieldNames) {
  const auto dir = temp_dir("gz");
  std::string lines = kLines;
  for (const auto& [from, to] : {std::pair<std::string, std::string>{"\"text\"", "\"body\""}}) {
    for (size_t p = lines.find(from); p != std::string::npos; p = lines.find(from, p + 1)) {
      lines.replace(p, from.size(), to);
    }
  }
  gzFile gz = gzopen((dir + "/c.jsonl.gz").c_str(), "wb");
  gzwrite(gz, lines.data(), static_cast<unsigned>(lines.size()));
  gzclose(gz);
  JsonlFields fields;
  fields.text = "body";
  expect_counts(jsonl_to_domain_dirs({dir + "/c.jsonl.gz"}, dir + "/out", fields));
  fields.domain = "";
  const auto one = jsonl_to_domain_dirs({dir + "/c.jsonl.gz"}, dir + "/one", fields);
  EXPECT_EQ(one.domains.size(), 1u);
  EXPECT_EQ(one.domains.at("all"), 4);  // the ../up record is good without a domain field
}

TEST(Jsonl, OnlyBadRecordsOrAMissingFileFail) {
  const auto dir = temp_dir("bad");
  std::ofstream(dir + "/bad.jsonl") << "{\"title\": \"x\"}\n[1, 2]\n";
  const auto msg =
      exception_message([&] { jsonl_to_domain_dirs({dir + "/bad.jsonl"}, dir + "/out"); });
  EXPECT_NE(msg.find("every one of the 2 records of " + dir + "/bad.jsonl is bad"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("1 records that are not a JSON object"), std::string::npos) << msg;
  expect_throw_with([&] { jsonl_to_domain_dirs({dir + "/none.jsonl"}, dir + "/out"); },
                    "--jsonl file \"" + dir + "/none.jsonl\" does not exist");
}

}  // namespace
}  // namespace gbmoe
