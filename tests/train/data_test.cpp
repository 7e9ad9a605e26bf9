// Tests of the data pipeline: tokenizer round trip, build_dataset's shards, index and split,
// and the clear errors for bad input and damaged files.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "test_util.h"
#include "train/data.h"

namespace gbmoe {
namespace {

namespace fs = std::filesystem;

// Deterministic pseudo-text so the corpus needs no fixture files.
struct TextGen {
  uint64_t s;
  uint64_t next() { return s = s * 6364136223846793005ULL + 1442695040888963407ULL, s >> 33; }
  template <size_t N>
  const char* pick(const char* const (&words)[N]) {
    return words[next() % N];
  }
};

std::string prose(uint64_t seed, int sentences) {
  static const char* const words[] = {"the",    "whale",   "sea",    "ship",    "captain",
                                      "sailed", "over",    "a",      "grey",    "morning",
                                      "and",    "Ishmael", "said",   "nothing", "of",
                                      "his",    "long",    "voyage", "to",      "Nantucket"};
  TextGen g{seed};
  std::string t;
  for (int i = 0; i < sentences; ++i) {
    const int n = 5 + static_cast<int>(g.next() % 9);
    for (int w = 0; w < n; ++w) t += std::string(w ? " " : "") + g.pick(words);
    t += (i % 4 == 3) ? ".\n\n" : ". ";
  }
  return t + "\n";
}

std::string code(uint64_t seed, int functions) {
  static const char* const names[] = {"count", "value", "index", "total", "size", "item"};
  TextGen g{seed};
  std::string t = "#include <vector>\n\n";
  for (int f = 0; f < functions; ++f) {
    const std::string a = g.pick(names), b = g.pick(names);
    t += "int " + a + "_" + std::to_string(f) + "(const std::vector<int>& " + b + ") {\n";
    t += "  int " + a + " = 0;\n  for (size_t i = 0; i < " + b + ".size(); ++i) {\n";
    t += "    " + a + " += " + b + "[i] * " + std::to_string(g.next() % 100) + ";\n  }\n";
    t += "\treturn " + a + ";\n}\n\n";
  }
  return t;
}

std::string math(uint64_t seed, int lemmas) {
  static const char* const ops[] = {"+", "*", "-"};
  TextGen g{seed};
  std::string t;
  for (int l = 0; l < lemmas; ++l) {
    const std::string op = g.pick(ops);
    t += "Lemma l" + std::to_string(l) + " : forall n m : nat, n " + op + " m = m " + op +
         " n.\nProof.\n  intros n m. induction n; simpl; auto.\nQed.\n\n";
  }
  return t;
}

// A tiny corpus of three domains with eight files each, built once per test process.
class DataBuildTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    root_ = fs::temp_directory_path() / ("gbmoe_data_test_" + std::to_string(getpid()));
    fs::remove_all(root_);
    for (int i = 0; i < 8; ++i) {
      spit(raw() / "code" / ("f" + std::to_string(i) + ".txt"), code(i, 6 + i));
      spit(raw() / "math" / ("m" + std::to_string(i) + ".txt"), math(100 + i, 5 + 2 * i));
      spit(raw() / "prose" / ("ch" + std::to_string(i) + ".txt"), prose(200 + i, 20 + 3 * i));
    }
    spit(raw() / "prose" / "empty.txt", "");  // skipped: nothing to lose
    spit(raw() / ".cache" / "marker.txt", "hidden entries are not domains");
    summary_ = build_dataset(base_options(corpus()));
  }
  static void TearDownTestSuite() { fs::remove_all(root_); }

  static fs::path raw() { return root_ / "raw"; }
  static fs::path corpus() { return root_ / "corpus"; }
  static DataBuildOptions base_options(const fs::path& out) {
    return DataBuildOptions(raw().string(), out.string()).vocab_size(400).seed(0).threads(2);
  }
  // A copy of the built dataset that a test may damage.
  static fs::path copy_corpus(const std::string& name) {
    const fs::path dst = root_ / name;
    fs::remove_all(dst);
    fs::copy(corpus(), dst);
    return dst;
  }

  static fs::path root_;
  static DataBuildSummary summary_;
};

fs::path DataBuildTest::root_;
DataBuildSummary DataBuildTest::summary_;

TEST_F(DataBuildTest, IndexIsConsistentWithSummaryAndFiles) {
  auto train = TokenDataset::open(corpus().string(), "train");
  auto val = TokenDataset::open(corpus().string(), "val");
  const std::vector<std::string> names = {"code", "math", "prose"};
  EXPECT_EQ(train.domain_names(), names);
  EXPECT_EQ(val.domain_names(), names);
  EXPECT_EQ(train.token_bytes(), 2u);
  EXPECT_LE(train.vocab_size(), 400);
  EXPECT_EQ(train.vocab_size(), summary_.vocab_size);
  EXPECT_EQ(static_cast<int64_t>(fs::file_size(corpus() / "train.bin")), 2 * train.num_tokens());

  const int eos = Tokenizer::load((corpus() / "tokenizer.model").string()).eos_id();
  for (const TokenDataset* ds : {&train, &val}) {
    std::vector<int64_t> docs(3, 0), tokens(3, 0);
    int64_t offset = 0;
    for (const Document& d : ds->documents()) {
      EXPECT_EQ(d.offset, offset);
      offset += d.length;
      docs[d.domain] += 1;
      tokens[d.domain] += d.length;
      EXPECT_EQ(ds->tokens(d.offset + d.length - 1, 1).item<int64_t>(), eos);
      EXPECT_LT(ds->tokens(d.offset, d.length).max().item<int64_t>(), ds->vocab_size());
    }
    EXPECT_EQ(offset, ds->num_tokens());
    for (int d = 0; d < 3; ++d) {
      const auto& s = summary_.domains[d];
      EXPECT_EQ(docs[d], ds == &train ? s.train_documents : s.val_documents);
      EXPECT_EQ(tokens[d], ds == &train ? s.train_tokens : s.val_tokens);
    }
  }
  EXPECT_EQ(summary_.domains[2].files, 8);  // the empty file is not a document
  const std::string meta = slurp(corpus() / "meta.json");
  EXPECT_NE(meta.find("\"name\": \"prose\""), std::string::npos) << meta;
  EXPECT_NE(meta.find("\"vocab_size\": " + std::to_string(summary_.vocab_size)), std::string::npos);
}

TEST_F(DataBuildTest, TokenizerRoundTripsEveryDocument) {
  const Tokenizer tok = Tokenizer::load((corpus() / "tokenizer.model").string());
  std::set<std::string> sources;
  for (const auto& e : fs::recursive_directory_iterator(raw())) {
    if (!e.is_regular_file()) continue;
    const std::string text = slurp(e.path());
    EXPECT_EQ(tok.decode(tok.encode(text)), text) << e.path();
    sources.insert(text);
  }
  const std::string odd = "  two  spaces,\ttab\n\n\nnewlines {}[]<>~`|\\ 0123456789 end";
  EXPECT_EQ(tok.decode(tok.encode(odd)), odd);
  EXPECT_EQ(tok.decode(tok.encode("Grüße, naïve café")), "Grüße, naïve café");  // byte fallback

  // Every stored document decodes to one of the source files.
  for (const char* split : {"train", "val"}) {
    auto ds = TokenDataset::open(corpus().string(), split);
    for (const Document& d : ds.documents()) {
      auto t = ds.tokens(d.offset, d.length - 1);
      std::vector<int> ids(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + t.numel());
      EXPECT_TRUE(sources.count(tok.decode(ids))) << split << " document at " << d.offset;
    }
  }
}

TEST_F(DataBuildTest, ValidationHoldsEveryDomain) {
  auto val = TokenDataset::open(corpus().string(), "val");
  std::set<int64_t> domains;
  for (const Document& d : val.documents()) domains.insert(d.domain);
  EXPECT_EQ(domains.size(), 3u);
  for (const auto& s : summary_.domains) {
    EXPECT_GE(s.val_documents, 1) << s.name;
    EXPECT_GE(s.train_documents, 6) << s.name;
  }
}

TEST_F(DataBuildTest, SplitIsDeterministicFromTheSeed) {
  const fs::path again = root_ / "again", other = root_ / "other_seed";
  build_dataset(base_options(again));
  for (const char* f : {"tokenizer.model", "train.bin", "train.idx", "val.bin", "val.idx"}) {
    EXPECT_EQ(slurp(corpus() / f), slurp(again / f)) << f << " differs between equal builds";
  }
  build_dataset(base_options(other).seed(12345).val_fraction(0.25));
  EXPECT_NE(slurp(corpus() / "val.idx"), slurp(other / "val.idx"));
  auto val = TokenDataset::open(other.string(), "val");
  EXPECT_EQ(val.num_documents(), 6);  // round(0.25 * 8) files per domain
}

TEST_F(DataBuildTest, ExistingTokenizerGivesTheSameShards) {
  const fs::path out = root_ / "with_tokenizer";
  const auto s =
      build_dataset(base_options(out).tokenizer((corpus() / "tokenizer.model").string()));
  EXPECT_EQ(s.vocab_size, summary_.vocab_size);
  EXPECT_EQ(slurp(corpus() / "train.bin"), slurp(out / "train.bin"));
  EXPECT_EQ(slurp(corpus() / "tokenizer.model"), slurp(out / "tokenizer.model"));
}

TEST_F(DataBuildTest, LongFilesAreSplitWithoutLosingText) {
  const fs::path out = root_ / "split_docs";
  const auto s = build_dataset(
      base_options(out).max_doc_bytes(300).tokenizer((corpus() / "tokenizer.model").string()));
  int64_t docs = 0, docs_before = 0;
  for (size_t d = 0; d < s.domains.size(); ++d) {
    docs += s.domains[d].train_documents + s.domains[d].val_documents;
    docs_before += summary_.domains[d].train_documents + summary_.domains[d].val_documents;
    EXPECT_EQ(s.domains[d].bytes, summary_.domains[d].bytes);
  }
  EXPECT_GT(docs, 3 * docs_before);
  // The parts of the first code file, in order, decode to the whole file.
  const Tokenizer tok = Tokenizer::load((out / "tokenizer.model").string());
  std::string all;
  for (const char* split : {"train", "val"}) {
    auto ds = TokenDataset::open(out.string(), split);
    for (const Document& d : ds.documents()) {
      auto t = ds.tokens(d.offset, d.length - 1);
      const std::string text =
          tok.decode(std::vector<int>(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + t.numel()));
      EXPECT_LE(text.size(), 300u);
      if (d.domain == 0) all += text;
    }
  }
  std::string expected;
  for (int i = 0; i < 8; ++i)
    expected += slurp(raw() / "code" / ("f" + std::to_string(i) + ".txt"));
  EXPECT_EQ(all.size(), expected.size());
}

TEST_F(DataBuildTest, TruncatedBinIsReported) {
  const fs::path dir = copy_corpus("truncated_bin");
  const auto size = fs::file_size(dir / "train.bin");
  fs::resize_file(dir / "train.bin", size - 200);
  auto full = TokenDataset::open(corpus().string(), "train");
  expect_throw_with([&] { TokenDataset::open(dir.string(), "train"); },
                    (dir / "train.bin").string() + " holds " +
                        std::to_string(full.num_tokens() - 100) + " tokens but " +
                        (dir / "train.idx").string() + " says " +
                        std::to_string(full.num_tokens()) + ": the file is truncated");
  fs::resize_file(dir / "train.bin", size - 3);
  expect_throw_with([&] { TokenDataset::open(dir.string(), "train"); }, "1 stray bytes");
}

TEST_F(DataBuildTest, CorruptFilesAreReported) {
  const fs::path dir = copy_corpus("corrupt");
  std::string idx = slurp(dir / "val.idx");
  spit(dir / "val.idx", "NOTANIDX" + idx.substr(8));
  expect_throw_with([&] { TokenDataset::open(dir.string(), "val"); },
                    "has magic \"NOTANIDX\", expected \"GBMOEIDX\"");
  spit(dir / "val.idx", idx.substr(0, idx.size() - 5));
  expect_throw_with([&] { TokenDataset::open(dir.string(), "val"); },
                    "val.idx fails its checksum: the file is truncated or corrupt");
  spit(dir / "val.idx", idx.substr(0, 10));
  expect_throw_with([&] { TokenDataset::open(dir.string(), "val"); }, "val.idx");
  spit(dir / "val.idx", idx);
  std::string bin = slurp(dir / "val.bin");
  bin[bin.size() / 2] ^= 0x5a;
  spit(dir / "val.bin", bin);
  expect_throw_with([&] { TokenDataset::open(dir.string(), "val"); },
                    "val.bin does not match the checksum in");
  EXPECT_NO_THROW(TokenDataset::open(dir.string(), "val", /*verify_checksum=*/false));
  fs::remove(dir / "train.idx");
  expect_throw_with([&] { TokenDataset::open(dir.string(), "train"); },
                    "train.idx cannot be opened");
  expect_throw_with([&] { TokenDataset::open(dir.string(), "test"); }, "split \"test\"");
}

TEST_F(DataBuildTest, BadInputGivesClearErrors) {
  expect_throw_with(
      [&] { build_dataset(base_options(root_ / "x").input((root_ / "nope").string())); },
      "--input \"" + (root_ / "nope").string() + "\" does not exist");
  expect_throw_with([&] { build_dataset(base_options(root_ / "x").vocab_size(100)); },
                    "--vocab-size (100) must be in");
  expect_throw_with([&] { build_dataset(base_options(root_ / "x").val_fraction(0)); },
                    "--val-fraction (0) must be in (0, 1)");
  expect_throw_with([&] { build_dataset(base_options(raw() / "out")); }, "must not contain");
  expect_throw_with(
      [&] { build_dataset(base_options(root_ / "x").tokenizer((raw() / "code/f0.txt").string())); },
      "--tokenizer \"" + (raw() / "code/f0.txt").string() + "\"");

  const fs::path bad = root_ / "bad_raw";
  spit(bad / "a" / "1.txt", "one");
  spit(bad / "a" / "2.txt", "two");
  spit(bad / "b" / "1.txt", "lonely");
  expect_throw_with([&] { build_dataset(base_options(root_ / "x").input(bad.string())); },
                    "domain \"b\" (" + (bad / "b").string() + ") holds 1 non-empty .txt files");
  spit(bad / "b" / "2.txt", std::string("caf\xe9 latin1"));
  expect_throw_with([&] { build_dataset(base_options(root_ / "x").input(bad.string())); },
                    (bad / "b" / "2.txt").string() + " is not valid UTF-8 at byte 3");

  const fs::path busy = root_ / "busy";
  spit(busy / "notes.txt", "precious");
  expect_throw_with([&] { build_dataset(base_options(busy)); }, "holds no gbmoe dataset");
  EXPECT_EQ(slurp(busy / "notes.txt"), "precious");
}

TEST_F(DataBuildTest, ExistingDatasetIsKeptUnlessOverwritten) {
  const fs::path dir = copy_corpus("keep");
  spit(root_ / "keep.tmp-999999999" / "train.bin", "left by an interrupted run");
  const std::string before = slurp(dir / "train.bin");
  expect_throw_with([&] { build_dataset(base_options(dir)); }, "pass --overwrite");
  // A failing rebuild leaves the old dataset in place.
  expect_throw_with(
      [&] { build_dataset(base_options(dir).overwrite(true).tokenizer((raw() / "x").string())); },
      "--tokenizer");
  EXPECT_EQ(slurp(dir / "train.bin"), before);
  EXPECT_NO_THROW(TokenDataset::open(dir.string(), "train"));
  build_dataset(base_options(dir).overwrite(true).seed(7));
  EXPECT_NO_THROW(TokenDataset::open(dir.string(), "train"));
  for (const auto& e : fs::directory_iterator(root_)) {
    EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << e.path();
    EXPECT_EQ(e.path().filename().string().find(".old-"), std::string::npos) << e.path();
  }
}

TEST(TokenFilesTest, TokenWidthFollowsTheVocabulary) {
  EXPECT_EQ(token_bytes_for_vocab(4096), 2u);
  EXPECT_EQ(token_bytes_for_vocab(65535), 2u);
  EXPECT_EQ(token_bytes_for_vocab(65536), 4u);
  const fs::path dir = fs::temp_directory_path() / ("gbmoe_width_" + std::to_string(getpid()));
  fs::create_directories(dir);
  for (int64_t vocab : {1000, 70000}) {
    const std::vector<int> ids = {0, 1, static_cast<int>(vocab - 1), 999, 2};
    {
      TokenFileWriter w(dir.string(), "train", vocab, {"only"});
      w.add_document(0, ids);
      w.add_document(0, {5, 6});
      w.commit();
    }
    auto ds = TokenDataset::open(dir.string(), "train");
    EXPECT_EQ(ds.token_bytes(), vocab <= 65535 ? 2u : 4u);
    EXPECT_EQ(fs::file_size(dir / "train.bin"), 7 * ds.token_bytes());
    EXPECT_EQ(ds.num_documents(), 2);
    auto t = ds.tokens(0, 5);
    EXPECT_EQ(std::vector<int64_t>(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + 5),
              std::vector<int64_t>(ids.begin(), ids.end()));
    EXPECT_EQ(ds.document(1).offset, 5);
    expect_throw_with([&] { ds.tokens(6, 2); }, "outside [0, 7)");
  }
  TokenFileWriter w(dir.string(), "val", 1000, {"only"});
  expect_throw_with([&] { w.add_document(0, {1000}); }, "token id 1000 is outside");
  expect_throw_with([&] { w.add_document(1, {1}); }, "document domain 1");
  fs::remove_all(dir);
}

// A .bin whose ids do not fit the vocabulary of its .idx (an index rewritten for a smaller
// vocabulary) fails at open naming the file and the id, not as an embedding lookup mid-run.
TEST(TokenFilesTest, TokenIdsBeyondTheVocabularyAreNamedAtOpen) {
  const fs::path dir = fs::temp_directory_path() / ("gbmoe_ids_" + std::to_string(getpid()));
  fs::create_directories(dir);
  {
    TokenFileWriter w(dir.string(), "train", 1000, {"only"});
    w.add_document(0, {1, 2, 999, 3});
    w.commit();
  }
  auto index = TokenIndex::parse(slurp(dir / "train.idx"), "train.idx");
  index.vocab_size = 500;
  spit(dir / "train.idx", index.serialize());
  expect_throw_with([&] { TokenDataset::open(dir.string(), "train"); },
                    (dir / "train.bin").string() +
                        " holds token id 999 (token 2) outside its vocabulary of 500 ids");
  fs::remove_all(dir);
}

TEST(TokenFilesTest, SplitsWithOtherDomainsAreNamed) {
  const fs::path dir = fs::temp_directory_path() / ("gbmoe_dom_" + std::to_string(getpid()));
  fs::create_directories(dir);
  for (const auto& [split, domains] : std::vector<std::pair<std::string, std::vector<std::string>>>{
           {"train", {"code", "prose"}}, {"val", {"code"}}}) {
    TokenFileWriter w(dir.string(), split, 100, domains);
    for (size_t d = 0; d < domains.size(); ++d) w.add_document(static_cast<int64_t>(d), {1, 2, 3});
    w.commit();
  }
  const auto train = TokenDataset::open(dir.string(), "train");
  const auto val = TokenDataset::open(dir.string(), "val");
  expect_throw_with([&] { check_same_domains(train, val, dir.string()); },
                    "the train split has domains [code, prose] but the val split [code]");
  EXPECT_NO_THROW(check_same_domains(train, train, dir.string()));
  {
    TokenFileWriter w(dir.string(), "val", 100, {"code", "prose"});
    w.add_document(0, {1, 2, 3});
    w.commit();
  }
  expect_throw_with(
      [&] { check_same_domains(train, TokenDataset::open(dir.string(), "val"), dir.string()); },
      "domain prose has 0 tokens in " + (dir / "val.bin").string());
  fs::remove_all(dir);
}

}  // namespace
}  // namespace gbmoe
