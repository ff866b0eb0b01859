// search::sample and search::greedy on the CPU: distributions against float64 targets (G tests of
// 10^6 keyed draws), planted errors that the same test must reject, batch invariance, greedy,
// non-finite logits and argument checks.
#include "infuse/search/cpu/sample.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "infuse/exec/cpu.hpp"
#include "reference/sampling.hpp"
#include "support/random.hpp"

namespace {

namespace s = infuse::search;
using namespace infuse::reference::filter_sets;
using infuse::host_memory;
using infuse::host_view;
using infuse::reference::sampling_case;

// Host storage for a batch of rows that all sample request 0 (or the given requests) and views
// onto it, filled for whichever filters Set holds.
template <class Set>
struct batch {
  std::vector<std::int32_t> request;
  std::vector<std::int64_t> position;
  std::vector<std::uint64_t> seed{0x1234u};
  std::vector<float> temperature, top_p, min_p, presence, frequency, repetition, bias_values;
  std::vector<std::int32_t> top_k, penalty_offsets, penalty_tokens, penalty_counts, bias_offsets,
      bias_tokens;
  std::vector<std::uint32_t> bitmask;
  std::vector<std::int32_t> token;
  std::vector<float> logprob;
  std::vector<s::row_status> status;
  s::sample_params<host_memory, Set> params;

  batch(const sampling_case& c, std::int64_t rows, std::int64_t first_position) {
    for (std::int64_t r = 0; r < rows; ++r) {
      request.push_back(0);
      position.push_back(first_position + r);
    }
    token.assign(rows, -7);
    logprob.assign(rows, 0.0f);
    status.assign(rows, s::row_status::ok);
    const std::int64_t vocab = std::ssize(c.logits);
    temperature = {float(c.temperature)};
    top_k = {std::int32_t(c.top_k)};
    top_p = {float(c.top_p)};
    min_p = {float(c.min_p)};
    bitmask = c.bitmask;
    if (bitmask.empty()) bitmask.assign((vocab + 31) / 32, ~0u);
    penalty_tokens = c.penalty_tokens;
    penalty_counts = c.penalty_counts;
    penalty_offsets = {0, std::int32_t(penalty_tokens.size())};
    presence = {float(c.presence)};
    frequency = {float(c.frequency)};
    repetition = {float(c.repetition)};
    bias_tokens = c.bias_tokens;
    bias_values = c.bias_values;
    bias_offsets = {0, std::int32_t(bias_tokens.size())};
    params.seed = {seed.data(), {1}};
    if constexpr (Set::template has<s::filter::temperature>)
      params.temperature = {temperature.data(), {1}};
    if constexpr (Set::template has<s::filter::top_k>) params.top_k = {top_k.data(), {1}};
    if constexpr (Set::template has<s::filter::top_p>) params.top_p = {top_p.data(), {1}};
    if constexpr (Set::template has<s::filter::min_p>) params.min_p = {min_p.data(), {1}};
    if constexpr (Set::template has<s::filter::token_bitmask>) {
      params.bitmask = {bitmask.data(), {1, std::int64_t(bitmask.size())}};
    }
    if constexpr (Set::template has<s::filter::penalties>) {
      params.penalty_offsets = {penalty_offsets.data(), {2}};
      params.penalty_tokens = {penalty_tokens.data(), {std::int64_t(penalty_tokens.size())}};
      params.penalty_counts = {penalty_counts.data(), {std::int64_t(penalty_counts.size())}};
      params.presence_penalty = {presence.data(), {1}};
      params.frequency_penalty = {frequency.data(), {1}};
      params.repetition_penalty = {repetition.data(), {1}};
    }
    if constexpr (Set::template has<s::filter::logit_bias>) {
      params.bias_offsets = {bias_offsets.data(), {2}};
      params.bias_tokens = {bias_tokens.data(), {std::int64_t(bias_tokens.size())}};
      params.bias_values = {bias_values.data(), {std::int64_t(bias_values.size())}};
    }
  }

  s::sample_rows<host_memory> rows() const {
    return {{request.data(), {std::int64_t(request.size())}},
            {position.data(), {std::int64_t(position.size())}}};
  }
  s::sample_outputs<host_memory> outputs() {
    const std::int64_t n = std::ssize(token);
    return {{token.data(), {n}}, {logprob.data(), {n}}, {status.data(), {n}}, {}, {}};
  }
};

// `draws` tokens of one request at positions 0 .. draws - 1: the same row of logits repeated
// (row stride 0), as many rows per call as fit comfortably.
template <class Set>
std::vector<std::int64_t> draw_counts(const sampling_case& c, std::int64_t draws) {
  const std::int64_t vocab = std::ssize(c.logits);
  std::vector<std::int64_t> counts(vocab, 0);
  const std::int64_t chunk = 1 << 16;
  infuse::exec::cpu exec;
  std::vector<std::byte> workspace(std::size_t(s::sample_workspace_bytes<Set>(exec, chunk, vocab)));
  const host_view<std::byte, 1> scratch(workspace.data(), {std::int64_t(workspace.size())});
  for (std::int64_t first = 0; first < draws; first += chunk) {
    const std::int64_t rows = std::min(chunk, draws - first);
    batch<Set> b(c, rows, first);
    const host_view<const float, 2> logits(c.logits.data(), {rows, vocab}, {0, 1});
    s::sample<Set>(exec, logits, b.rows(), b.params, b.outputs(), scratch);
    for (std::int64_t r = 0; r < rows; ++r) {
      REQUIRE(b.status[r] == s::row_status::ok);
      REQUIRE(b.token[r] >= 0);
      REQUIRE(b.token[r] < vocab);
      ++counts[b.token[r]];
    }
  }
  return counts;
}

constexpr std::int64_t statistical_draws = 1'000'000;

// A random case for the filters in Set: normal logits (stddev 2.5), parameters drawn per filter,
// top_p kept away from the boundaries where float32 and float64 cuts could differ.
template <class Set>
sampling_case random_case(infuse::test::seeded_rng& rng, std::int64_t vocab) {
  sampling_case c;
  c.logits = rng.normals<float>(std::size_t(vocab), 2.5);
  if constexpr (Set::template has<s::filter::temperature>) c.temperature = rng.uniform(0.6, 1.6);
  if constexpr (Set::template has<s::filter::top_k>) c.top_k = rng.integer(5, vocab / 2);
  if constexpr (Set::template has<s::filter::min_p>) c.min_p = rng.uniform(0.001, 0.05);
  infuse::reference::random_token_filters<Set>(rng, vocab, 0.2, 0.1, c);
  if constexpr (Set::template has<s::filter::top_p>) {
    do {
      c.top_p = rng.uniform(0.5, 0.95);
    } while (infuse::reference::top_p_near_boundary(c, 1e-4));
  }
  return c;
}

}  // namespace

TEST_CASE_TEMPLATE("search::sample draws from the filtered distribution (G test, 10^6 draws)", Set,
                   t_only, k_only, p_only, k_and_p, m_only, k_p_m, masked, penalized, biased,
                   everything) {
  INFUSE_RANDOM(rng);
  const sampling_case c = random_case<Set>(rng, rng.integer(64, 128));
  const auto fit = infuse::reference::g_test(draw_counts<Set>(c, statistical_draws),
                                             infuse::reference::filtered_distribution(c));
  INFO("G = " << fit.statistic << ", critical " << fit.critical << " over " << fit.bins << " bins");
  CHECK_FALSE(fit.rejects());
}

// The same test, with a kernel whose parameters are planted wrong: it must reject.
TEST_CASE("search::sample G test rejects a temperature off by 1%") {
  INFUSE_RANDOM(rng);
  const sampling_case c = random_case<t_only>(rng, 128);
  sampling_case planted = c;
  planted.temperature *= 1.01;
  const auto fit = infuse::reference::g_test(draw_counts<t_only>(planted, statistical_draws),
                                             infuse::reference::filtered_distribution(c));
  INFO("G = " << fit.statistic << ", critical " << fit.critical);
  CHECK(fit.rejects());
}

TEST_CASE("search::sample G test rejects a top_p boundary off by one token") {
  INFUSE_RANDOM(rng);
  // The planted kernel keeps one token fewer: its top_p ends just below the mass of the last
  // token the true cut keeps (a case whose cut keeps at least two tokens).
  sampling_case c;
  double previous = 0;
  do {
    c = random_case<k_and_p>(rng, 128);
    sampling_case unfiltered = c;
    unfiltered.top_p = 1.0;
    const auto q = infuse::reference::filtered_distribution(unfiltered);
    double running = 0;
    previous = 0;
    for (const std::int32_t t :
         infuse::reference::by_decreasing_logit(infuse::reference::adjusted_logits(c))) {
      previous = running;
      running += q[t];
      if (running >= c.top_p) break;
    }
  } while (previous < 2e-4);
  sampling_case planted = c;
  planted.top_p = previous - 1e-4;
  const auto fit = infuse::reference::g_test(draw_counts<k_and_p>(planted, statistical_draws),
                                             infuse::reference::filtered_distribution(c));
  INFO("G = " << fit.statistic << ", critical " << fit.critical);
  CHECK(fit.rejects());
}

namespace {

// A case for the exact comparison: no boundary avoidance (the exact definition has none to
// avoid), logits of the given shape: 0 normal (stddev 3), 1 flat (stddev 0.3), 2 small integers
// (many ties).
template <class Set>
sampling_case exact_case(infuse::test::seeded_rng& rng, std::int64_t vocab, int shape) {
  sampling_case c = random_case<Set>(rng, 64);  // the parameters; logits and lists redone below
  c.logits.resize(vocab);
  for (auto& x : c.logits) {
    x = shape == 0   ? float(rng.normal(0.0, 3.0))
        : shape == 1 ? float(rng.normal(0.0, 0.3))
                     : float(rng.integer(-3, 3));
  }
  if constexpr (Set::template has<s::filter::top_k>) {
    c.top_k = rng.uniform() < 0.5 ? 50 : rng.integer(1, vocab + 10);
  }
  if constexpr (Set::template has<s::filter::top_p>) c.top_p = rng.uniform(0.05, 1.0);
  if constexpr (Set::template has<s::filter::token_bitmask>) {
    c.bitmask.resize((vocab + 31) / 32);
    for (auto& word : c.bitmask) word = rng.bits32() | rng.bits32();
  }
  c.penalty_tokens.clear();
  c.penalty_counts.clear();
  c.bias_tokens.clear();
  c.bias_values.clear();
  for (std::int32_t t = 0; t < vocab; t += std::int32_t(rng.integer(1, 200))) {
    if constexpr (Set::template has<s::filter::penalties>) {
      c.penalty_tokens.push_back(t);
      c.penalty_counts.push_back(std::int32_t(rng.integer(1, 4)));
    }
    if constexpr (Set::template has<s::filter::logit_bias>) {
      c.bias_tokens.push_back(t);
      c.bias_values.push_back(float(rng.uniform(-3.0, 3.0)));
    }
  }
  return c;
}

}  // namespace

TEST_CASE_TEMPLATE("search::sample matches the exact integer definition bit for bit", Set, t_only,
                   k_only, p_only, k_and_p, m_only, k_p_m, masked, penalized, biased, everything) {
  INFUSE_RANDOM(rng);
  infuse::exec::cpu exec(1);
  for (const std::int64_t vocab : {std::int64_t{1000}, std::int64_t{128256}}) {
    for (int shape = 0; shape < 3; ++shape) {
      CAPTURE(vocab);
      CAPTURE(shape);
      const sampling_case c = exact_case<Set>(rng, vocab, shape);
      const std::int64_t rows = 4;
      batch<Set> b(c, rows, rng.integer(0, 1 << 30));
      std::vector<std::byte> workspace(
          std::size_t(s::sample_workspace_bytes<Set>(exec, rows, vocab)));
      s::sample<Set>(exec, host_view<const float, 2>(c.logits.data(), {rows, vocab}, {0, 1}),
                     b.rows(), b.params, b.outputs(),
                     {workspace.data(), {std::int64_t(workspace.size())}});
      for (std::int64_t r = 0; r < rows; ++r) {
        const auto expected = infuse::reference::exact_sample(
            c, s::detail::sample_bits(b.seed[0], std::uint64_t(b.position[r])));
        CHECK(int(b.status[r]) == expected.status);
        CHECK(b.token[r] == expected.token);
        CHECK(std::memcmp(&b.logprob[r], &expected.logprob, sizeof(float)) == 0);
      }
    }
  }
}

TEST_CASE("search::sample: the vector portable_exp gives the scalar floats, lane by lane") {
  namespace cs = s::detail::cpu_sample;
  INFUSE_RANDOM(rng);
  const cs::float_tag d;
  const auto lanes = static_cast<std::int64_t>(hwy::HWY_NAMESPACE::Lanes(d));
  std::vector<float> logits = rng.normals<float>(1 << 16, 4.0);
  // Edges: the maximum itself, -0 and the smallest steps below it, the -30 cut-off and its
  // neighbours, values whose scaled exponent is a rint tie, infinities, NaN, huge magnitudes.
  const float max = 10.0f;
  for (const float x : {max, std::nextafter(max, 0.0f), max - 30.0f, max - 30.000002f,
                        max - 29.999998f, -INFINITY, NAN, -1e30f, -3e38f, 9.9999999f}) {
    logits.push_back(x);
  }
  for (int k = 0; k < 45; ++k) logits.push_back(max - float((k + 0.5) / 1.4426950408889634));
  while (std::ssize(logits) % lanes != 0) logits.push_back(0.0f);
  std::int64_t compared = 0;
  for (const float temperature : {1.0f, 0.7f, 1.9f, 1e-3f, 37.0f}) {
    std::vector<float> vector_weights(logits.size());
    for (std::size_t t = 0; t < logits.size(); t += std::size_t(lanes)) {
      namespace hn = hwy::HWY_NAMESPACE;
      hn::StoreU(cs::relative_weights(d, hn::LoadU(d, logits.data() + t), hn::Set(d, max),
                                      hn::Set(d, temperature)),
                 d, vector_weights.data() + t);
    }
    for (std::size_t t = 0; t < logits.size(); ++t) {
      const float scalar = s::detail::relative_weight(logits[t], max, temperature);
      if (std::memcmp(&scalar, &vector_weights[t], sizeof(float)) != 0) {
        FAIL_CHECK("logit " << logits[t] << ", temperature " << temperature << ": vector "
                            << vector_weights[t] << ", scalar " << scalar);
      }
      ++compared;
    }
  }
  CHECK(compared > 5 * (1 << 16));
}
