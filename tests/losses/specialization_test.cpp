// Specialization statistics on small fixed routings computed by hand.
#include "losses/specialization.h"

#include <gtest/gtest.h>

#include <cmath>

namespace gbmoe {
namespace {

TEST(Specialization, FrequencyIsShareOfDomainTokens) {
  auto counts = torch::tensor({{4, 2, 0}, {1, 1, 2}}, torch::kLong);  // K = 2: 3 and 2 tokens
  auto freq = domain_selection_frequency(counts, torch::tensor({3, 2}));
  EXPECT_TRUE(torch::allclose(
      freq, torch::tensor({{4.0 / 3, 2.0 / 3, 0.0}, {0.5, 0.5, 1.0}}, torch::kDouble)));
  EXPECT_NEAR(freq[0].sum().item<double>(), 2.0, 1e-15);
}

TEST(Specialization, MutualInformationIsZeroForDomainIndependentRouting) {
  auto counts = torch::tensor({{10, 20, 30}, {5, 10, 15}, {2, 4, 6}}, torch::kDouble);
  EXPECT_NEAR(domain_expert_mutual_information(counts), 0.0, 1e-12);
}

TEST(Specialization, MutualInformationEqualsDomainEntropyWhenSeparated) {
  // Domain 0 only uses experts 0-1, domain 1 only 2, domain 2 only 3: I = H(domain).
  auto counts = torch::tensor({{6, 6, 0, 0}, {0, 0, 3, 0}, {0, 0, 0, 9}}, torch::kDouble);
  const double p0 = 12.0 / 24, p1 = 3.0 / 24, p2 = 9.0 / 24;
  const double h = -(p0 * std::log2(p0) + p1 * std::log2(p1) + p2 * std::log2(p2));
  EXPECT_NEAR(domain_entropy(counts), h, 1e-12);
  EXPECT_NEAR(domain_expert_mutual_information(counts), h, 1e-12);
}

TEST(Specialization, MutualInformationOfAHandComputedCase) {
  // p = [[0.25, 0.25], [0.5, 0]]: I = sum p log2(p / (p_d p_e)).
  auto counts = torch::tensor({{1, 1}, {2, 0}}, torch::kDouble);
  const double i = 0.25 * std::log2(0.25 / (0.5 * 0.75)) + 0.25 * std::log2(0.25 / (0.5 * 0.25)) +
                   0.5 * std::log2(0.5 / (0.5 * 0.75));
  EXPECT_NEAR(domain_expert_mutual_information(counts), i, 1e-12);
}

TEST(Specialization, MaxViolationPerDomainOfAHandComputedCase) {
  // Row means 2, 2, 0: (3 - 2) / 2, (2 - 2) / 2, and 0 for the domain without selections.
  auto counts = torch::tensor({{3, 1, 2}, {2, 2, 2}, {0, 0, 0}}, torch::kLong);
  auto mv = domain_max_violation(counts);
  EXPECT_TRUE(torch::allclose(mv, torch::tensor({0.5, 0.0, 0.0}, torch::kDouble)));
  // A domain on one expert of four: (4 - 1) / 1.
  EXPECT_NEAR(domain_max_violation(torch::tensor({{0, 4, 0, 0}}))[0].item<double>(), 3.0, 1e-15);
}

TEST(Specialization, TopKScoreSumAddsTheSelectedExpertsScores) {
  auto scores = torch::tensor({{0.5, 0.3, 0.2}, {0.1, 0.1, 0.8}}, torch::kFloat);
  auto ids = torch::tensor({{0, 1}, {2, 0}}, torch::kLong);
  auto sums = topk_score_sum(scores, ids);
  ASSERT_EQ(sums.scalar_type(), torch::kDouble);
  EXPECT_NEAR(sums[0].item<double>(), 0.8, 1e-7);
  EXPECT_NEAR(sums[1].item<double>(), 0.9, 1e-7);
  // Uniform scores over E = 4 with K = 2: k / E.
  auto uniform = topk_score_sum(torch::full({3, 4}, 0.25), torch::tensor({{0, 1}, {2, 3}, {1, 2}}));
  EXPECT_TRUE(torch::allclose(uniform, torch::full({3}, 0.5, torch::kDouble)));
}

}  // namespace
}  // namespace gbmoe
