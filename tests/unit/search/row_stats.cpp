#include "infuse/search/cpu/row_stats.hpp"

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "reference/search.hpp"
#include "support/random.hpp"

namespace {

using infuse::host_view;
using infuse::search::row_flag;
using infuse::search::row_statistics;

std::vector<row_statistics> run_row_stats(const std::vector<float>& logits, std::int64_t rows,
                                          std::int64_t vocab, std::int64_t stride, int threads) {
  std::vector<row_statistics> stats(static_cast<std::size_t>(rows));
  infuse::search::row_stats(infuse::exec::cpu(threads),
                            host_view<const float, 2>(logits.data(), {rows, vocab}, {stride, 1}),
                            host_view<row_statistics, 1>(stats.data(), {rows}));
  return stats;
}

}  // namespace

TEST_CASE("row_stats matches the float64 reference on random rows") {
  INFUSE_RANDOM(rng);
  for (const std::int64_t vocab : {1, 2, 7, 1000, 32000}) {
    const std::int64_t rows = 5;
    const std::int64_t stride = vocab + 3;
    for (const double scale : {0.1, 3.0, 30.0}) {
      std::vector<float> logits(static_cast<std::size_t>(rows * stride), NAN);  // NaN padding
      for (std::int64_t r = 0; r < rows; ++r) {
        for (std::int64_t x = 0; x < vocab; ++x) {
          logits[r * stride + x] = static_cast<float>(rng.normal(0.0, scale));
        }
      }
      if (vocab > 2) logits[2] = -INFINITY;  // masked token
      const auto stats = run_row_stats(logits, rows, vocab, stride, 2);
      for (std::int64_t r = 0; r < rows; ++r) {
        CAPTURE(vocab);
        CAPTURE(scale);
        const auto ref = infuse::reference::row_stats(
            std::span<const float>(logits.data() + r * stride, static_cast<std::size_t>(vocab)));
        const row_statistics& got = stats[static_cast<std::size_t>(r)];
        CHECK(got.flags == row_flag::ok);
        CHECK(got.argmax == ref.argmax);
        CHECK(got.entropy == doctest::Approx(ref.entropy).epsilon(1e-4).scale(1.0));
        CHECK(got.max_probability == doctest::Approx(ref.max_probability).epsilon(1e-5));
        // Float sums of up to 32k terms: a relative error of about 1e-5 in S, absolute in ln S.
        CHECK(std::abs(got.log_sum_exp - ref.log_sum_exp) < 1e-4);
        if (vocab == 1) {
          CHECK(got.margin == INFINITY);
        } else {
          CHECK(got.margin == doctest::Approx(ref.margin).epsilon(1e-6));
        }
      }
    }
  }
}

TEST_CASE("row_stats edge cases: ties, one token, masked and invalid rows") {
  const float inf = INFINITY;
  // rows: tie at the top; one finite logit; uniform; NaN; +inf; all masked
  const std::vector<float> logits = {1.0f, 3.0f, 3.0f, 0.0f, -inf, 2.0f, -inf, -inf,
                                     0.5f, 0.5f, 0.5f, 0.5f, 0.0f, NAN,  1.0f, 2.0f,
                                     0.0f, inf,  1.0f, 2.0f, -inf, -inf, -inf, -inf};
  const auto stats = run_row_stats(logits, 6, 4, 4, 1);
  CHECK(stats[0].argmax == 1);
  CHECK(stats[0].margin == 0.0f);
  CHECK(stats[1].argmax == 1);
  CHECK(stats[1].margin == inf);
  CHECK(stats[1].entropy == 0.0f);
  CHECK(stats[1].max_probability == 1.0f);
  CHECK(stats[1].log_sum_exp == 2.0f);
  CHECK(stats[2].entropy == doctest::Approx(std::log(4.0)));
  CHECK(stats[2].max_probability == doctest::Approx(0.25));
  CHECK(stats[2].argmax == 0);
  for (int r = 3; r < 6; ++r) {
    CAPTURE(r);
    CHECK(stats[r].flags == row_flag::invalid);
    CHECK(stats[r].argmax == -1);
    CHECK(std::isnan(stats[r].entropy));
  }
}

TEST_CASE("row_stats state merges to the sequential result in any split") {
  INFUSE_RANDOM(rng);
  const auto logits = rng.normals<float>(4096, 4.0);
  const auto whole = infuse::search::row_stats(logits.data(), 4096);
  for (int parts : {2, 3, 17, 4096}) {
    infuse::search::detail::row_stats_state merged;
    for (int part = parts - 1; part >= 0; --part) {  // merged in reverse order on purpose
      infuse::search::detail::row_stats_state state;
      for (int x = part * 4096 / parts; x < (part + 1) * 4096 / parts; ++x) state.add(logits[x], x);
      merged.merge(state);
    }
    const auto split = merged.finish();
    CAPTURE(parts);
    CHECK(split.argmax == whole.argmax);
    CHECK(split.entropy == doctest::Approx(whole.entropy).epsilon(1e-4));
    CHECK(std::abs(split.log_sum_exp - whole.log_sum_exp) < 1e-4);
    CHECK(split.margin == doctest::Approx(whole.margin).epsilon(1e-6));
  }
}

TEST_CASE("row_stats rejects mismatched shapes before writing") {
  std::vector<float> logits(8, 0.0f);
  std::vector<row_statistics> stats(3, row_statistics{7.0f, 7.0f, 7.0f, 7.0f, 7, row_flag::ok});
  CHECK_THROWS_WITH_AS(infuse::search::row_stats(infuse::exec::cpu(1),
                                                 host_view<const float, 2>(logits.data(), {2, 4}),
                                                 host_view<row_statistics, 1>(stats.data(), {3})),
                       doctest::Contains("stats.extent(0) is 3"), infuse::error);
  CHECK(stats[0].argmax == 7);
}

TEST_CASE("majority_vote: most frequent answer, ties to the smallest id") {
  using infuse::search::majority_vote;
  const std::vector<std::int32_t> answers = {5, 3, 5, 3, 9};
  CHECK(majority_vote(answers.data(), 5).answer == 3);
  CHECK(majority_vote(answers.data(), 5).count == 2);
  const std::vector<std::int32_t> clear = {4, 1, 4, 4, 1};
  CHECK(majority_vote(clear.data(), 5).answer == 4);
  CHECK(majority_vote(clear.data(), 5).count == 3);
  CHECK(majority_vote(clear.data(), 0).answer == -1);
  CHECK(majority_vote(clear.data(), 1).answer == 4);
}
