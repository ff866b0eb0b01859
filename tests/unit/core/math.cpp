#include <doctest/doctest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <numbers>
#include <span>
#include <vector>

#include "infuse/core/math.hpp"
#include "reference/compare.hpp"
#include "reference/softmax.hpp"
#include "support/random.hpp"
#include "support/tolerance.hpp"

namespace {

using infuse::log_base;
using infuse::reference::base_tag;
using infuse::reference::ln_base;
constexpr double tolerance = infuse::test::tolerance<float>::relative;

// A float lse is rounded to |lse| * 2^-24 each time it is computed or stored; `roundings` counts
// how many such errors the result may have gathered.
double lse_error_bound(double reference, double roundings) {
  return tolerance + roundings * 0x1p-24 * std::abs(reference);
}

void check_lse(float lse, double reference, double roundings = 4.0) {
  if (reference == -INFINITY) {
    CHECK(lse == -INFINITY);
  } else {
    CHECK(std::abs(lse - reference) <= lse_error_bound(reference, roundings));
  }
}

// The float64 softmax-weighted sum, and the same over |values|: the scale of the rounding errors
// of a sum whose terms may cancel.
struct weighted_sum {
  std::vector<double> value;
  std::vector<double> magnitude;
};

// ||out - value|| / ||magnitude||, +inf when out is not finite.
double rounding_error(const std::vector<float>& out, const weighted_sum& expected) {
  double difference = 0.0;
  double norm = 0.0;
  for (std::size_t d = 0; d < out.size(); ++d) {
    if (!std::isfinite(out[d])) return INFINITY;
    difference += (out[d] - expected.value[d]) * (out[d] - expected.value[d]);
    norm += expected.magnitude[d] * expected.magnitude[d];
  }
  return norm > 0.0 ? std::sqrt(difference / norm) : std::sqrt(difference);
}

// One chunk of keys run through an online softmax, with the unnormalised weighted sum of values.
template <log_base Base>
struct chunk {
  infuse::softmax_state<Base> state;
  std::vector<float> acc;

  chunk(std::span<const float> scores, std::span<const float> values, std::size_t dim)
      : acc(dim, 0.0f) {
    for (std::size_t i = 0; i < scores.size(); ++i) {
      const infuse::softmax_rescale factors = state.add(scores[i]);
      for (std::size_t d = 0; d < dim; ++d) {
        acc[d] = acc[d] * factors.previous + factors.incoming * values[i * dim + d];
      }
    }
  }

  void merge(const chunk& other) {
    const infuse::softmax_rescale factors = state.merge(other.state);
    for (std::size_t d = 0; d < acc.size(); ++d) {
      acc[d] = acc[d] * factors.previous + factors.incoming * other.acc[d];
    }
  }

  std::vector<float> output() const {
    std::vector<float> out(acc);
    for (float& value : out) value *= state.inverse_sum();
    return out;
  }
};

// Splits [0, count) at random cut points into `parts` chunks, some of them possibly empty.
std::vector<std::size_t> random_cuts(infuse::test::seeded_rng& random, std::size_t count,
                                     std::size_t parts) {
  std::vector<std::size_t> cuts{0, count};
  for (std::size_t i = 1; i < parts; ++i) {
    cuts.push_back(static_cast<std::size_t>(random.integer(0, static_cast<std::int64_t>(count))));
  }
  std::sort(cuts.begin(), cuts.end());
  return cuts;
}

// Runs the scores in chunks and merges them three ways: as states in a random order, as
// normalised partials all at once (the split-KV reduction), and as partials folded pairwise in
// place. Each result is checked against the float64 reference.
template <log_base Base>
void check_chunked(infuse::test::seeded_rng& random, const std::vector<float>& scores,
                   const std::vector<float>& values, std::size_t dim, std::size_t parts) {
  const std::span<const float> all_scores(scores);
  const std::span<const float> all_values(values);
  std::vector<float> magnitudes(values);
  for (float& value : magnitudes) value = std::abs(value);
  const weighted_sum reference{
      infuse::reference::softmax_weighted_sum(all_scores, all_values, dim, ln_base<Base>),
      infuse::reference::softmax_weighted_sum(all_scores, std::span<const float>(magnitudes), dim,
                                              ln_base<Base>)};
  const double reference_lse = infuse::reference::log_sum_exp(all_scores, ln_base<Base>);
  // The weights of normalised partials come from their float lses, each off by a few roundings,
  // and a pairwise fold adds one per merge.
  const double finite_lse = std::isfinite(reference_lse) ? reference_lse : 0.0;
  const double all_at_once_roundings = 8.0;
  const auto folded_roundings = 8.0 + 2.0 * static_cast<double>(parts);

  const std::vector<std::size_t> cuts = random_cuts(random, scores.size(), parts);
  std::vector<chunk<Base>> chunks;
  for (std::size_t c = 0; c + 1 < cuts.size(); ++c) {
    const std::size_t length = cuts[c + 1] - cuts[c];
    chunks.emplace_back(all_scores.subspan(cuts[c], length),
                        all_values.subspan(cuts[c] * dim, length * dim), dim);
  }

  // Normalised partials, in a workspace with padding between them; an empty partial's output is
  // NaN to prove that it is never read.
  const std::size_t stride = dim + 3;
  std::vector<float> outputs(chunks.size() * stride, NAN);
  std::vector<float> lses;
  for (std::size_t c = 0; c < chunks.size(); ++c) {
    lses.push_back(chunks[c].state.natural_lse());
    if (lses.back() == -INFINITY) continue;
    const std::vector<float> output = chunks[c].output();
    std::copy(output.begin(), output.end(),
              outputs.begin() + static_cast<std::ptrdiff_t>(c * stride));
  }

  {
    INFO("merged as states, in a random order");
    std::vector<chunk<Base>> pending(chunks);
    while (pending.size() > 1) {
      const auto last = static_cast<std::int64_t>(pending.size()) - 1;
      const auto into = static_cast<std::size_t>(random.integer(0, last));
      auto from = static_cast<std::size_t>(random.integer(0, last - 1));
      if (from >= into) ++from;
      pending[into].merge(pending[from]);
      pending.erase(pending.begin() + static_cast<std::ptrdiff_t>(from));
    }
    CHECK(rounding_error(pending[0].output(), reference) <= tolerance);
    check_lse(pending[0].state.natural_lse(), reference_lse);
  }
  {
    INFO("merged as normalised partials, all at once");
    std::vector<float> out(dim, NAN);
    const float lse =
        infuse::merge_partials(outputs.data(), stride, lses.data(), lses.size(), out.data(), dim);
    CHECK(rounding_error(out, reference) <= lse_error_bound(finite_lse, all_at_once_roundings));
    check_lse(lse, reference_lse, all_at_once_roundings);
  }
  {
    INFO("merged as normalised partials, folded pairwise in place");
    std::vector<float> out(outputs.begin(), outputs.begin() + static_cast<std::ptrdiff_t>(dim));
    float lse = lses[0];
    for (std::size_t c = 1; c < chunks.size(); ++c) {
      lse = infuse::merge_partials({out.data(), lse}, {outputs.data() + c * stride, lses[c]},
                                   out.data(), dim);
    }
    if (lse == -INFINITY) std::fill(out.begin(), out.end(), 0.0f);  // one empty chunk: never merged
    CHECK(rounding_error(out, reference) <= lse_error_bound(finite_lse, folded_roundings));
    check_lse(lse, reference_lse, folded_roundings);
  }
}

}  // namespace

TEST_CASE_TEMPLATE("online softmax over random chunks matches the float64 softmax", Base,
                   base_tag<log_base::e>, base_tag<log_base::two>) {
  INFUSE_RANDOM(random);
  for (int trial = 0; trial < 20; ++trial) {
    // Float accumulation error grows with the count: 512 keys stay well inside tolerance<float>
    // (the worst of 1e5 trials at 256 keys is 2e-6; at 2000 keys, 7e-6).
    const auto count = static_cast<std::size_t>(random.integer(0, 512));
    const std::size_t dims[] = {1, 7, 64, 128};
    const std::size_t dim = dims[random.integer(0, 3)];
    const auto parts = static_cast<std::size_t>(random.integer(1, 12));
    // Far from 0, score differences stay exact in float while lses lose |lse| * 2^-24.
    const double offset = random.integer(0, 3) == 0 ? random.uniform(-1e4, 1e4) : 0.0;
    std::vector<float> scores(count);
    for (float& score : scores) score = static_cast<float>(offset + random.normal(0.0, 4.0));
    const std::vector<float> values = random.normals(count * dim);
    CAPTURE(count);
    CAPTURE(dim);
    CAPTURE(parts);
    CAPTURE(offset);
    check_chunked<Base::value>(random, scores, values, dim, parts);
  }
}

TEST_CASE_TEMPLATE("online softmax edge cases", Base, base_tag<log_base::e>,
                   base_tag<log_base::two>) {
  using state = infuse::softmax_state<Base::value>;
  INFUSE_RANDOM(random);

  SUBCASE("length 0: the empty state") {
    const state empty;
    CHECK(empty.lse() == -INFINITY);
    CHECK(empty.natural_lse() == -INFINITY);
    CHECK(empty.inverse_sum() == 0.0f);
    CHECK(empty.probability(0.0f) == 0.0f);
    CHECK(empty.probability(-INFINITY) == 0.0f);
    std::vector<float> out(5, NAN);
    CHECK(infuse::merge_partials(nullptr, 0, nullptr, 0, out.data(), out.size()) == -INFINITY);
    CHECK(out == std::vector<float>(5, 0.0f));
  }
  SUBCASE("length 1: the score itself, weight 1") {
    const auto score = static_cast<float>(random.normal(0.0, 100.0));
    state one;
    const infuse::softmax_rescale factors = one.add(score);
    CHECK(factors.previous == 0.0f);
    CHECK(factors.incoming == 1.0f);
    CHECK(one.max == score);
    CHECK(one.sum == 1.0f);
    CHECK(one.lse() == score);
    CHECK(one.inverse_sum() == 1.0f);
    CHECK(one.probability(score) == 1.0f);
  }
  SUBCASE("all -inf: empty, never NaN") {
    const std::vector<float> scores(17, -INFINITY);
    const std::vector<float> values = random.normals(scores.size() * 3);
    check_chunked<Base::value>(random, scores, values, 3, 4);
    state masked;
    for (const float score : scores) {
      const infuse::softmax_rescale factors = masked.add(score);
      CHECK(factors.previous == 0.0f);
      CHECK(factors.incoming == 0.0f);
    }
    CHECK(masked.lse() == -INFINITY);
    CHECK(masked.inverse_sum() == 0.0f);
  }
  SUBCASE("scores 1e4 apart: no overflow, the highest group wins") {
    std::vector<float> scores;
    for (const double level : {0.0, 1e4, -1e4}) {
      for (int i = 0; i < 50; ++i) scores.push_back(static_cast<float>(level + random.normal()));
    }
    const std::vector<float> values = random.normals(scores.size() * 8);
    for (const std::size_t parts : {1, 3, 7}) {
      check_chunked<Base::value>(random, scores, values, 8, parts);
    }
  }
  SUBCASE("the extremes of float: no overflow") {
    state extreme;
    for (const float score : {-FLT_MAX, FLT_MAX, 0.0f, -FLT_MAX, FLT_MAX}) extreme.add(score);
    CHECK(extreme.max == FLT_MAX);
    CHECK(extreme.sum == 2.0f);
    CHECK(std::isfinite(extreme.inverse_sum()));
    CHECK(extreme.probability(-FLT_MAX) == 0.0f);
  }
  SUBCASE("merging empty with non-empty, in both orders, changes nothing") {
    state full;
    for (int i = 0; i < 10; ++i) full.add(static_cast<float>(random.normal(0.0, 5.0)));

    state empty_first;
    const infuse::softmax_rescale into_empty = empty_first.merge(full);
    CHECK(into_empty.previous == 0.0f);
    CHECK(into_empty.incoming == 1.0f);
    CHECK(empty_first.max == full.max);
    CHECK(empty_first.sum == full.sum);

    state full_first = full;
    const infuse::softmax_rescale from_empty = full_first.merge(state{});
    CHECK(from_empty.previous == 1.0f);
    CHECK(from_empty.incoming == 0.0f);
    CHECK(full_first.max == full.max);
    CHECK(full_first.sum == full.sum);

    const std::vector<float> output = random.normals(6);
    const std::vector<float> garbage(6, NAN);
    const float lse = full.natural_lse();
    std::vector<float> out(6);
    CHECK(infuse::merge_partials({garbage.data(), -INFINITY}, {output.data(), lse}, out.data(),
                                 6) == lse);
    CHECK(out == output);
    CHECK(infuse::merge_partials({output.data(), lse}, {garbage.data(), -INFINITY}, out.data(),
                                 6) == lse);
    CHECK(out == output);
  }
}

TEST_CASE_TEMPLATE("non-finite scores give the documented results", Base, base_tag<log_base::e>,
                   base_tag<log_base::two>) {
  using state = infuse::softmax_state<Base::value>;
  INFUSE_RANDOM(random);
  const std::vector<float> scores = random.normals(20);
  state finite;
  for (const float score : scores) finite.add(score);

  SUBCASE("-inf contributes nothing: the same bits as without it") {
    state masked;
    for (const float score : scores) {
      masked.add(score);
      const infuse::softmax_rescale factors = masked.add(-INFINITY);
      CHECK(factors.previous == 1.0f);
      CHECK(factors.incoming == 0.0f);
    }
    CHECK(masked.max == finite.max);
    CHECK(masked.sum == finite.sum);
  }
  SUBCASE("NaN or +inf anywhere makes lse, 1/sum and probabilities NaN") {
    for (const float bad : {NAN, INFINITY}) {
      for (const std::size_t at : {std::size_t{0}, std::size_t{7}, scores.size()}) {
        CAPTURE(bad);
        CAPTURE(at);
        state poisoned;
        for (std::size_t i = 0; i <= scores.size(); ++i) {
          if (i == at) poisoned.add(bad);
          if (i < scores.size()) poisoned.add(scores[i]);
        }
        CHECK(std::isnan(poisoned.lse()));
        CHECK(std::isnan(poisoned.natural_lse()));
        CHECK(std::isnan(poisoned.inverse_sum()));
        CHECK(std::isnan(poisoned.probability(scores[0])));
        state merged = finite;
        merged.merge(poisoned);
        CHECK(std::isnan(merged.lse()));
        poisoned.merge(finite);
        CHECK(std::isnan(poisoned.lse()));
      }
    }
  }
  SUBCASE("a NaN or +inf partial lse makes the merged output and lse NaN") {
    const std::size_t dim = 4;
    std::vector<float> outputs = random.normals(3 * dim);
    for (const float bad : {NAN, INFINITY}) {
      CAPTURE(bad);
      std::vector<float> lses = {1.0f, bad, -INFINITY};
      std::vector<float> out(dim);
      CHECK(
          std::isnan(infuse::merge_partials(outputs.data(), dim, lses.data(), 3, out.data(), dim)));
      for (const float value : out) CHECK(std::isnan(value));
      CHECK(std::isnan(infuse::merge_partials({outputs.data(), 0.5f}, {outputs.data() + dim, bad},
                                              out.data(), dim)));
      for (const float value : out) CHECK(std::isnan(value));
    }
  }
}

TEST_CASE("probability is the softmax over the scores seen") {
  INFUSE_RANDOM(random);
  const std::vector<float> scores = random.normals(500, 3.0);
  infuse::softmax_state<log_base::e> state;
  for (const float score : scores) state.add(score);
  const double lse = infuse::reference::log_sum_exp(std::span<const float>(scores));
  std::vector<float> probabilities;
  std::vector<double> reference;
  for (const float score : scores) {
    probabilities.push_back(state.probability(score));
    reference.push_back(std::exp(score - lse));
  }
  CHECK(infuse::reference::relative_error(probabilities, reference) <= tolerance);
}

TEST_CASE("log_sum_exp matches float64 and does not overflow") {
  INFUSE_RANDOM(random);
  for (int trial = 0; trial < 20; ++trial) {
    const auto count = static_cast<std::size_t>(random.integer(1, 5000));
    const double scale = random.uniform(0.1, 1000.0);
    const std::vector<float> scores = random.normals(count, scale);
    const double reference = infuse::reference::log_sum_exp(std::span<const float>(scores));
    CAPTURE(count);
    CAPTURE(scale);
    check_lse(infuse::log_sum_exp(scores), reference);
  }
  CHECK(infuse::log_sum_exp(std::span<const float>()) == -INFINITY);
  const std::vector<float> masked(4, -INFINITY);
  CHECK(infuse::log_sum_exp(masked) == -INFINITY);
  const std::vector<float> one = {-3.25f};
  CHECK(infuse::log_sum_exp(one) == -3.25f);
  const std::vector<float> huge = {1e30f, 1e30f, -1e30f};
  CHECK(infuse::log_sum_exp(huge) == 1e30f);
  const std::vector<float> twice = {80.0f, 80.0f};
  CHECK(infuse::log_sum_exp(twice) == doctest::Approx(80.0 + std::numbers::ln2).epsilon(1e-7));
}

TEST_CASE("fast_exp2 on the host is 2^x within an ulp") {
  for (float x = -149.5f; x < 128.0f; x += 0.0137f) {
    const double exact = std::exp2(static_cast<double>(x));
    const float power = infuse::fast_exp2(x);
    CAPTURE(x);
    CHECK(std::abs(power - exact) <= std::max(0x1p-23 * exact, 0x1p-149));
  }
  for (int exponent = -126; exponent < 128; ++exponent) {
    CHECK(infuse::fast_exp2(static_cast<float>(exponent)) == std::ldexp(1.0f, exponent));
  }
  CHECK(infuse::fast_exp2(-INFINITY) == 0.0f);
  CHECK(infuse::fast_exp2(INFINITY) == INFINITY);
  CHECK(std::isnan(infuse::fast_exp2(NAN)));
}
