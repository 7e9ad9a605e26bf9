// Routing traces: a written trace reads back record for record, its per-domain frequencies
// equal those computed directly from the same routing and those of analyze_routing on the same
// batches, and damaged files fail naming the file and the byte.
#include "train/routing_trace.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "test_util.h"
#include "train/analysis.h"
#include "train/model.h"

namespace gbmoe {
namespace {
namespace fs = std::filesystem;

fs::path temp_dir(const std::string& name) {
  auto d = fs::temp_directory_path() / ("gbmoe-trace-test-" + name);
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

TEST(RoutingTrace, FrequenciesFromATraceEqualThoseOfTheRouting) {
  const auto dir = temp_dir("fixed");
  const int64_t E = 5, K = 2, L = 2, T = 40;
  RoutingTraceHeader header{E, K, L, {"code", "english", "math"}};
  torch::manual_seed(3);
  std::vector<torch::Tensor> ids, domains, valid;
  {
    RoutingTraceWriter w((dir / "rank0.gbrt").string(), header);
    for (int64_t step = 1; step <= 3; ++step) {
      for (int64_t l = 0; l < L; ++l) {
        ids.push_back(std::get<1>(torch::rand({T, E}).topk(K, -1)));
        domains.push_back(torch::randint(0, 3, {T}, torch::kLong));
        valid.push_back(torch::rand({T}) < 0.8);
        w.add(step, 0, 0, l, ids.back(), domains.back(), valid.back());
      }
    }
  }
  const auto trace = read_routing_trace(routing_trace_files(dir.string()));
  EXPECT_TRUE(trace.header == header);
  ASSERT_EQ(trace.records.size(), ids.size());
  for (size_t r = 0; r < ids.size(); ++r) {
    EXPECT_TRUE(torch::equal(trace.records[r].expert_ids, ids[r].index({valid[r]})));
    EXPECT_TRUE(torch::equal(trace.records[r].domain, domains[r].index({valid[r]})));
  }
  // Direct: per layer and domain, count_selections-style counts of the valid tokens.
  const auto sel = trace_selection(trace);
  for (int64_t l = 0; l < L; ++l) {
    auto counts = torch::zeros({3, E}, torch::kDouble);
    auto tokens = torch::zeros({3}, torch::kDouble);
    for (size_t r = static_cast<size_t>(l); r < ids.size(); r += L) {
      for (int64_t t = 0; t < T; ++t) {
        if (!valid[r][t].item<bool>()) continue;
        const int64_t d = domains[r][t].item<int64_t>();
        tokens[d] += 1;
        for (int64_t k = 0; k < K; ++k) counts[d][ids[r][t][k].item<int64_t>()] += 1;
      }
    }
    EXPECT_TRUE(torch::equal(sel.counts[l], counts)) << "layer " << l;
    EXPECT_TRUE(torch::equal(sel.tokens[l], tokens)) << "layer " << l;
  }
  // A step window keeps only its records.
  const auto step2 = trace_selection(trace, 2, 2);
  EXPECT_EQ(step2.tokens[0].sum().item<double>(), valid[2].sum().item<double>());
  const auto csv = trace_selection_csv(trace, sel);
  EXPECT_EQ(csv.rfind("layer,domain,expert,selections,frequency\n0,code,0,", 0), 0u) << csv;
}

TEST(RoutingTrace, TraceOfModelForwardsEqualsAnalyzeRouting) {
  const auto dir = temp_dir("model");
  torch::manual_seed(5);
  LanguageModel model(LanguageModelOptions(50, 16, 2, 2)
                          .moe_layers({0, 1})
                          .moe(MoELayerOptions(16, 4, 16).router(RouterOptions().top_k(2))));
  model->eval();
  const std::vector<std::string> domains{"a", "b"};
  std::vector<Batch> batches;
  for (int64_t i = 0; i < 4; ++i) {
    Batch b;
    b.inputs = torch::randint(0, 50, {2, 8}, torch::kLong);
    b.mask = torch::rand({2, 8}) < 0.75;
    b.targets = torch::where(b.mask, torch::randint(0, 50, {2, 8}, torch::kLong),
                             torch::full({2, 8}, -100, torch::kLong));
    b.domain = torch::full({2}, i % 2, torch::kLong);
    batches.push_back(b);
  }
  const auto analysis = analyze_routing(model, batches, domains);
  {
    RoutingTraceWriter w((dir / "rank0.gbrt").string(), {4, 2, 2, domains});
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < batches.size(); ++i) {
      RoutingContext routing;
      model->forward(batches[i].inputs, batches[i].mask, &routing);
      w.add_forward(1, 0, static_cast<int64_t>(i), routings_of(routing), batches[i]);
    }
  }
  const auto sel = trace_selection(read_routing_trace({(dir / "rank0.gbrt").string()}));
  for (size_t l = 0; l < 2; ++l) {
    EXPECT_TRUE(torch::equal(sel.counts[l], analysis.layers[l].counts)) << "layer " << l;
    EXPECT_TRUE(torch::equal(sel.tokens[l], analysis.tokens)) << "layer " << l;
  }
  EXPECT_GT(analysis.tokens.sum().item<double>(), 0);
}

TEST(RoutingTrace, AResumedWriterAppendsOnlyToTheSameHeader) {
  const auto path = (temp_dir("append") / "rank0.gbrt").string();
  const RoutingTraceHeader header{4, 2, 1, {"x"}};
  const auto ids = torch::tensor({{0, 1}, {2, 3}}), domain = torch::zeros({2}, torch::kLong);
  RoutingTraceWriter(path, header).add(1, 0, 0, 0, ids, domain, {});
  RoutingTraceWriter(path, header, /*append=*/true).add(2, 0, 0, 0, ids, domain, {});
  auto steps = [&] {
    std::vector<int64_t> s;
    for (const auto& r : read_routing_trace({path}).records) s.push_back(r.step);
    return s;
  };
  EXPECT_EQ(steps(), (std::vector<int64_t>{1, 2}));
  // Another header (another run's shape) starts the file over; so does a fresh writer.
  RoutingTraceWriter(path, {4, 2, 1, {"y"}}, /*append=*/true).add(3, 0, 0, 0, ids, domain, {});
  EXPECT_EQ(steps(), (std::vector<int64_t>{3}));
  RoutingTraceWriter(path, {4, 2, 1, {"y"}}).add(4, 0, 0, 0, ids, domain, {});
  EXPECT_EQ(steps(), (std::vector<int64_t>{4}));
}

TEST(RoutingTrace, DamagedFilesNameTheFileAndByte) {
  const auto dir = temp_dir("bad");
  const auto path = (dir / "rank0.gbrt").string();
  {
    RoutingTraceWriter w(path, {4, 2, 1, {"x"}});
    w.add(1, 0, 0, 0, torch::tensor({{0, 1}, {2, 3}}), torch::zeros({2}, torch::kLong), {});
  }
  const auto size = fs::file_size(path);
  fs::resize_file(path, size - 1);
  expect_throw_with([&] { read_routing_trace({path}); }, "rank0.gbrt at byte");
  expect_throw_with([&] { read_routing_trace({path}); }, "truncated id array");
  std::ofstream(path, std::ios::binary) << "NOTATRACE-----------";
  expect_throw_with([&] { read_routing_trace({path}); }, "bad magic");
  expect_throw_with([&] { routing_trace_files((dir / "none").string()); }, "neither a file");
  expect_throw_with(
      [&] {
        RoutingTraceWriter w(path, {4, 2, 1, {"x"}});
        w.add(1, 0, 0, 0, torch::tensor({{0, 4}}), torch::zeros({1}, torch::kLong), {});
      },
      "expert id outside [0, 4)");
}

}  // namespace
}  // namespace gbmoe
