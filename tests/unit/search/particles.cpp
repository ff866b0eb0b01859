#include "infuse/search/cpu/particles.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "reference/search.hpp"
#include "support/random.hpp"

namespace {

using infuse::host_view;
using infuse::search::particle_status;
using infuse::search::resampling;

struct resampled {
  std::vector<std::int32_t> parents;
  std::vector<particle_status> status;
};

// `groups` groups sharing the same log-weights (batch stride 0), each with its own seed.
resampled run_resample(resampling method, const std::vector<float>& log_weights,
                       std::int64_t groups, std::uint64_t base_seed) {
  const auto n = static_cast<std::int64_t>(log_weights.size());
  std::vector<std::uint64_t> seeds(groups);
  for (std::int64_t g = 0; g < groups; ++g) seeds[g] = base_seed + g;
  const std::vector<std::int64_t> positions(groups, 3);
  resampled out{std::vector<std::int32_t>(groups * n, -7),
                std::vector<particle_status>(groups, particle_status::ok)};
  infuse::search::resample(infuse::exec::cpu{}, method,
                           host_view<const float, 2>(log_weights.data(), {groups, n}, {0, 1}),
                           host_view<const std::uint64_t, 1>(seeds.data(), {groups}),
                           host_view<const std::int64_t, 1>(positions.data(), {groups}),
                           host_view<std::int32_t, 2>(out.parents.data(), {groups, n}),
                           host_view<particle_status, 1>(out.status.data(), {groups}));
  return out;
}

std::vector<double> normalised(const std::vector<float>& log_weights) {
  double max = -INFINITY;
  for (const float l : log_weights) max = std::max<double>(max, l);
  std::vector<double> w;
  double total = 0.0;
  for (const float l : log_weights) total += std::exp(l - max);
  for (const float l : log_weights) w.push_back(std::exp(l - max) / total);
  return w;
}

}  // namespace

TEST_CASE("resample: parents ascending, offspring as expected for both methods") {
  INFUSE_RANDOM(rng);
  const std::int64_t n = 16;
  const std::int64_t groups = 50'000;
  auto log_weights = rng.normals<float>(n, 1.5);
  log_weights[3] = -INFINITY;  // a dead particle is never chosen
  const auto w = normalised(log_weights);
  for (const resampling method : {resampling::multinomial, resampling::systematic}) {
    CAPTURE(static_cast<int>(method));
    const auto out = run_resample(method, log_weights, groups, rng.engine()());
    std::vector<std::int64_t> total(n, 0);
    bool sorted = true;
    bool within_one = true;
    CHECK(std::count(out.status.begin(), out.status.end(), particle_status::ok) == groups);
    for (std::int64_t g = 0; g < groups; ++g) {
      std::vector<std::int64_t> count(n, 0);
      for (std::int64_t k = 0; k < n; ++k) {
        const std::int32_t parent = out.parents[g * n + k];
        if (parent < 0 || parent >= n) FAIL("parent out of range: " << parent);
        ++count[parent];
        if (k > 0 && parent < out.parents[g * n + k - 1]) sorted = false;
      }
      for (std::int64_t i = 0; i < n; ++i) {
        total[i] += count[i];
        if (std::abs(static_cast<double>(count[i]) - n * w[i]) >= 1.0) within_one = false;
      }
    }
    CHECK(sorted);
    CHECK(total[3] == 0);
    if (method == resampling::multinomial) {
      // Pooled over the groups, the draws are n * groups independent draws from w.
      const auto test = infuse::reference::chi_square(total, w);
      INFO("chi-square " << test.statistic << ", p = " << test.p_value);
      CHECK(test.p_value > 1e-6);
      CHECK_FALSE(within_one);  // multinomial counts do stray by a whole particle
    } else {
      CHECK(within_one);
      // Unbiased: the mean count is n w_i; systematic counts vary by less than 1.
      for (std::int64_t i = 0; i < n; ++i) {
        CAPTURE(i);
        CHECK(std::abs(static_cast<double>(total[i]) / groups - n * w[i]) < 0.02);
      }
    }
  }
}

TEST_CASE("resample: invalid weights flag the group and leave the identity") {
  const std::vector<std::vector<float>> cases = {
      {0.0f, NAN, 1.0f}, {0.0f, INFINITY, 1.0f}, {-INFINITY, -INFINITY, -INFINITY}};
  for (const auto& log_weights : cases) {
    const auto out = run_resample(resampling::systematic, log_weights, 2, 1);
    CHECK(out.status[0] == particle_status::invalid_weights);
    CHECK(out.parents == std::vector<std::int32_t>{0, 1, 2, 0, 1, 2});
  }
  const auto one = run_resample(resampling::multinomial, {-INFINITY, 2.0f, -INFINITY}, 1, 9);
  CHECK(one.status[0] == particle_status::ok);
  CHECK(one.parents == std::vector<std::int32_t>{1, 1, 1});
}

TEST_CASE("resample rejects mismatched shapes before writing") {
  const std::vector<float> log_weights(6, 0.0f);
  const std::vector<std::uint64_t> seeds(2, 1);
  const std::vector<std::int64_t> positions(2, 0);
  std::vector<std::int32_t> parents(6, -7);
  std::vector<particle_status> status(2);
  CHECK_THROWS_WITH_AS(
      infuse::search::resample(infuse::exec::cpu{}, resampling::systematic,
                               host_view<const float, 2>(log_weights.data(), {2, 3}),
                               host_view<const std::uint64_t, 1>(seeds.data(), {2}),
                               host_view<const std::int64_t, 1>(positions.data(), {2}),
                               host_view<std::int32_t, 2>(parents.data(), {3, 2}),
                               host_view<particle_status, 1>(status.data(), {2})),
      doctest::Contains("parents.extent(0) is 3"), infuse::error);
  CHECK(parents[0] == -7);
}

TEST_CASE("best_of_n: highest score, ties to the lower index, NaN never wins") {
  using infuse::search::best_of_n;
  const std::vector<float> scores = {1.0f, 3.0f, NAN, 3.0f, -2.0f};
  CHECK(best_of_n(scores.data(), 5) == 1);
  const std::vector<float> nan_first = {NAN, -5.0f};
  CHECK(best_of_n(nan_first.data(), 2) == 1);
  const std::vector<float> all_nan = {NAN, NAN};
  CHECK(best_of_n(all_nan.data(), 2) == -1);
  CHECK(best_of_n(scores.data(), 0) == -1);
}

TEST_CASE("rollover_budget: even shares, unused steps carried to the next stage") {
  infuse::search::rollover_budget budget(10, 4);  // shares 3, 3, 2, 2
  CHECK(budget.allowance() == 3);
  CHECK(budget.finish(1) == 2);    // stage 0 used 1 of 3
  CHECK(budget.allowance() == 5);  // 3 + 2
  CHECK(budget.finish(5) == 0);
  CHECK(budget.allowance() == 2);
  CHECK(budget.finish(99) == 0);  // clamped to the allowance
  CHECK(budget.allowance() == 2);
  CHECK(budget.finish(0) == 2);
  CHECK(budget.done());
  CHECK(budget.allowance() == 0);
  // Whatever is used, the total spent never exceeds the budget and the last stage gets the rest.
  INFUSE_RANDOM(rng);
  infuse::search::rollover_budget random_budget(1000, 7);
  std::int64_t spent = 0;
  while (!random_budget.done()) {
    const std::int64_t allowed = random_budget.allowance();
    const std::int64_t used = rng.integer(0, allowed);
    spent += used;
    const bool last = random_budget.stage() == 6;
    random_budget.finish(used);
    if (last) CHECK(allowed == 1000 - (spent - used));
  }
  CHECK(spent <= 1000);
}
