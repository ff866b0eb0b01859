// Float64 target distributions of search::sample, straight from the definition in
// include/infuse/search/sample.hpp (sorting, no integer weights), the goodness-of-fit test that
// compares draws with them, and the exact integer definition that every backend must match.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <vector>

#include "infuse/search/sample.hpp"

namespace infuse::reference {

// One request's sampling problem, in plain containers.
struct sampling_case {
  std::vector<float> logits;
  double temperature = 1.0;
  std::int64_t top_k = 0;  // <= 0: none
  double top_p = 1.0;
  double min_p = 0.0;
  std::vector<std::uint32_t> bitmask;  // empty: every token allowed
  std::vector<std::int32_t> penalty_tokens;
  std::vector<std::int32_t> penalty_counts;
  double presence = 0.0, frequency = 0.0, repetition = 1.0;
  std::vector<std::int32_t> bias_tokens;
  std::vector<float> bias_values;
};

// The adjusted logits (bias, penalties; -inf for tokens the bitmask forbids), in float64.
inline std::vector<double> adjusted_logits(const sampling_case& c) {
  std::vector<double> a(c.logits.begin(), c.logits.end());
  for (std::size_t j = 0; j < c.bias_tokens.size(); ++j) a[c.bias_tokens[j]] += c.bias_values[j];
  for (std::size_t j = 0; j < c.penalty_tokens.size(); ++j) {
    double& v = a[c.penalty_tokens[j]];
    v = v > 0 ? v / c.repetition : v * c.repetition;
    v -= c.penalty_counts[j] * c.frequency + c.presence;
  }
  if (!c.bitmask.empty()) {
    for (std::size_t t = 0; t < a.size(); ++t) {
      if (((c.bitmask[t / 32] >> (t % 32)) & 1u) == 0) a[t] = -INFINITY;
    }
  }
  return a;
}

// Tokens in decreasing order of adjusted logit (ties: lower id first).
inline std::vector<std::int32_t> by_decreasing_logit(const std::vector<double>& a) {
  std::vector<std::int32_t> order(a.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](std::int32_t x, std::int32_t y) { return a[x] > a[y]; });
  return order;
}

// The filtered distribution: probabilities per token, summing to 1.
inline std::vector<double> filtered_distribution(const sampling_case& c) {
  const std::vector<double> a = adjusted_logits(c);
  const auto order = by_decreasing_logit(a);
  const double max = a[order[0]];
  std::vector<double> w(a.size(), 0.0);
  for (std::size_t t = 0; t < a.size(); ++t) w[t] = std::exp((a[t] - max) / c.temperature);
  std::vector<bool> keep(a.size(), true);
  for (std::size_t t = 0; t < a.size(); ++t) keep[t] = a[t] > -INFINITY;
  if (c.top_k > 0 && c.top_k < std::int64_t(a.size())) {
    const double kth = a[order[c.top_k - 1]];
    for (std::size_t t = 0; t < a.size(); ++t) keep[t] = keep[t] && a[t] >= kth;
  }
  if (c.top_p < 1.0) {
    double total = 0;
    for (std::size_t t = 0; t < a.size(); ++t) total += keep[t] ? w[t] : 0.0;
    double running = 0;
    double cut = 0;
    for (const std::int32_t t : order) {
      if (!keep[t]) continue;
      running += w[t];
      if (running >= c.top_p * total) {
        cut = w[t];
        break;
      }
    }
    for (std::size_t t = 0; t < a.size(); ++t) keep[t] = keep[t] && w[t] >= cut;
  }
  for (std::size_t t = 0; t < a.size(); ++t) keep[t] = keep[t] && w[t] >= c.min_p;
  double total = 0;
  for (std::size_t t = 0; t < a.size(); ++t) total += keep[t] ? w[t] : 0.0;
  std::vector<double> p(a.size(), 0.0);
  for (std::size_t t = 0; t < a.size(); ++t) p[t] = keep[t] ? w[t] / total : 0.0;
  return p;
}

// The running top-p masses (as shares of the top-k mass) in decreasing logit order: a top_p
// within `margin` of one of them is a boundary case whose float32 and float64 cuts may differ.
inline bool top_p_near_boundary(sampling_case c, double margin) {
  const double p = c.top_p;
  if (p >= 1.0) return false;
  c.top_p = 1.0;
  const auto q = filtered_distribution(c);
  const auto order = by_decreasing_logit(adjusted_logits(c));
  double running = 0;
  for (const std::int32_t t : order) {
    running += q[t];
    if (std::abs(running - p) < margin) return true;
  }
  return false;
}

// The G statistic (likelihood ratio) of observed counts against expected probabilities, bins of
// expected count below 5 merged (in the order given) into one tail bin, and the critical value of
// chi-square with bins - 1 degrees of freedom at significance 1e-6 (Wilson-Hilferty). A count in
// a bin of probability 0 fails outright (statistic +inf).
struct fit {
  double statistic;
  double critical;
  int bins;
  bool rejects() const { return statistic > critical; }
};

inline fit g_test(const std::vector<std::int64_t>& counts, const std::vector<double>& probability) {
  std::int64_t draws = 0;
  for (const auto n : counts) draws += n;
  std::vector<double> observed, expected;
  double tail_observed = 0, tail_expected = 0;
  for (std::size_t t = 0; t < counts.size(); ++t) {
    const double e = probability[t] * double(draws);
    if (probability[t] == 0.0) {
      if (counts[t] > 0) return {INFINITY, 0.0, 0};
      continue;
    }
    if (e >= 5.0) {
      observed.push_back(double(counts[t]));
      expected.push_back(e);
    } else {
      tail_observed += double(counts[t]);
      tail_expected += e;
    }
  }
  if (tail_expected > 0) {
    if (tail_expected < 5.0 && !expected.empty()) {  // fold a small tail into the smallest bin
      const auto smallest = std::min_element(expected.begin(), expected.end()) - expected.begin();
      observed[smallest] += tail_observed;
      expected[smallest] += tail_expected;
    } else {
      observed.push_back(tail_observed);
      expected.push_back(tail_expected);
    }
  }
  double g = 0;
  for (std::size_t i = 0; i < observed.size(); ++i) {
    if (observed[i] > 0) g += 2.0 * observed[i] * std::log(observed[i] / expected[i]);
  }
  // 2 sum o ln(o/e) ignores sum(o - e) = 0 only when the totals agree, which they do here.
  const double df = std::max<double>(1.0, double(observed.size()) - 1.0);
  const double z = 4.753424;  // the standard normal quantile of 1 - 1e-6
  const double h = 2.0 / (9.0 * df);
  const double critical = df * std::pow(1.0 - h + z * std::sqrt(h), 3.0);
  return {g, critical, int(observed.size())};
}

}  // namespace infuse::reference

namespace infuse::reference {

// The exact integer definition of search::sample (include/infuse/search/sample.hpp, steps 1-6)
// written plainly: sorting instead of selections, the shared float math of the library for the
// adjusted logits and the weights. A backend must match it token for token and bit for bit.
struct exact_draw {
  std::int32_t token;
  float logprob;
  int status;  // search::row_status as an integer
};

inline exact_draw exact_sample(const sampling_case& c, std::uint64_t random) {
  namespace d = infuse::search::detail;
  const auto vocab = static_cast<std::int64_t>(c.logits.size());
  std::vector<float> a(c.logits.begin(), c.logits.end());
  std::vector<bool> allowed(a.size(), true);
  for (std::size_t j = 0; j < c.bias_tokens.size(); ++j) a[c.bias_tokens[j]] += c.bias_values[j];
  for (std::size_t j = 0; j < c.penalty_tokens.size(); ++j) {
    float& v = a[c.penalty_tokens[j]];
    v = d::penalized(v, c.penalty_counts[j], float(c.presence), float(c.frequency),
                     float(c.repetition));
  }
  if (!c.bitmask.empty()) {
    for (std::int64_t t = 0; t < vocab; ++t) allowed[t] = (c.bitmask[t / 32] >> (t % 32)) & 1u;
  }
  std::vector<std::int32_t> tokens;
  for (std::int32_t t = 0; t < vocab; ++t) {
    if (allowed[t]) tokens.push_back(t);
  }
  float max = -INFINITY;
  for (const auto t : tokens) {
    if (std::isnan(a[t])) return {0, NAN, 1};
    max = std::max(max, a[t]);
  }
  if (tokens.empty() || max == -INFINITY) return {0, NAN, 2};
  const auto temperature = float(c.temperature);
  if (temperature == 0.0f) {
    for (const auto t : tokens) {
      if (a[t] == max) return {t, 0.0f, 0};
    }
  }
  // Decreasing adjusted logit, ties by id.
  std::stable_sort(tokens.begin(), tokens.end(),
                   [&](std::int32_t x, std::int32_t y) { return a[x] > a[y]; });
  std::vector<std::int32_t> kept;
  const auto k = static_cast<std::int64_t>(c.top_k);
  const float kth = k > 0 && k < std::int64_t(tokens.size()) ? a[tokens[k - 1]] : -INFINITY;
  std::vector<std::uint64_t> weight(a.size(), 0);
  std::uint64_t total = 0;
  for (const auto t : tokens) {
    weight[t] = d::integer_weight(d::relative_weight(a[t], max, temperature));
    if (a[t] >= kth && weight[t] > 0) {
      kept.push_back(t);
      total += weight[t];
    }
  }
  std::uint64_t cut = 0;
  if (c.top_p < 1.0) {
    std::vector<std::uint64_t> w;
    for (const auto t : kept) w.push_back(weight[t]);
    std::sort(w.begin(), w.end(), std::greater<>());
    const std::uint64_t target = d::top_p_mass(float(c.top_p), total);
    std::uint64_t running = 0;
    for (const auto v : w) {
      running += v;
      if (running >= target) {
        cut = v;
        break;
      }
    }
  }
  std::vector<std::int32_t> final_tokens;
  std::uint64_t final_total = 0;
  for (const auto t : kept) {
    if (weight[t] < cut) continue;
    if (c.min_p > 0 && d::relative_weight(a[t], max, temperature) < float(c.min_p)) continue;
    final_tokens.push_back(t);
    final_total += weight[t];
  }
  std::sort(final_tokens.begin(), final_tokens.end());
  const std::uint64_t target = d::scaled_draw(random, final_total);
  std::uint64_t running = 0;
  std::int32_t chosen = final_tokens.back();
  for (const auto t : final_tokens) {
    running += weight[t];
    if (running > target) {
      chosen = t;
      break;
    }
  }
  const float log_total = static_cast<float>(std::log(double(final_total) * 0x1p-40));
  const float dchosen = a[chosen] == max ? 0.0f : (a[chosen] - max) / temperature;
  return {chosen, dchosen - log_total, 0};
}

}  // namespace infuse::reference

namespace infuse::reference {

// Random values for the list-valued filters of Set: a bitmask allowing about 3/4 of the tokens,
// each token penalized with probability penalty_share and biased with probability bias_share.
template <class Set, class Rng>
void random_token_filters(Rng& rng, std::int64_t vocab, double penalty_share, double bias_share,
                          sampling_case& c) {
  namespace filter = infuse::search::filter;
  if constexpr (Set::template has<filter::token_bitmask>) {
    c.bitmask.resize(std::size_t((vocab + 31) / 32));
    for (auto& word : c.bitmask) word = rng.bits32() | rng.bits32();
  }
  if constexpr (Set::template has<filter::penalties>) {
    for (std::int32_t t = 0; t < vocab; ++t) {
      if (rng.uniform() < penalty_share) {
        c.penalty_tokens.push_back(t);
        c.penalty_counts.push_back(std::int32_t(rng.integer(1, 4)));
      }
    }
    c.presence = rng.uniform(0.0, 1.0);
    c.frequency = rng.uniform(0.0, 0.5);
    c.repetition = rng.uniform(1.0, 1.5);
  }
  if constexpr (Set::template has<filter::logit_bias>) {
    for (std::int32_t t = 0; t < vocab; ++t) {
      if (rng.uniform() < bias_share) {
        c.bias_tokens.push_back(t);
        c.bias_values.push_back(float(rng.uniform(-3.0, 3.0)));
      }
    }
  }
}

}  // namespace infuse::reference

// The filter combinations the sampling tests cover, on either backend.
namespace infuse::reference::filter_sets {

using infuse::search::filters;
namespace filter = infuse::search::filter;

using t_only = filters<filter::temperature>;
using k_only = filters<filter::temperature, filter::top_k>;
using p_only = filters<filter::temperature, filter::top_p>;
using k_and_p = filters<filter::top_k, filter::top_p, filter::temperature>;
using m_only = filters<filter::min_p>;
using k_p_m = filters<filter::temperature, filter::top_k, filter::top_p, filter::min_p>;
using masked = filters<filter::token_bitmask, filter::top_p>;
using penalized = filters<filter::penalties, filter::temperature>;
using biased = filters<filter::logit_bias, filter::top_k>;
using everything = filters<filter::temperature, filter::top_k, filter::top_p, filter::min_p,
                           filter::token_bitmask, filter::penalties, filter::logit_bias>;

}  // namespace infuse::reference::filter_sets

TYPE_TO_STRING_AS("temperature", infuse::reference::filter_sets::t_only);
TYPE_TO_STRING_AS("top_k", infuse::reference::filter_sets::k_only);
TYPE_TO_STRING_AS("top_p", infuse::reference::filter_sets::p_only);
TYPE_TO_STRING_AS("top_k+top_p", infuse::reference::filter_sets::k_and_p);
TYPE_TO_STRING_AS("min_p", infuse::reference::filter_sets::m_only);
TYPE_TO_STRING_AS("top_k+top_p+min_p", infuse::reference::filter_sets::k_p_m);
TYPE_TO_STRING_AS("bitmask+top_p", infuse::reference::filter_sets::masked);
TYPE_TO_STRING_AS("penalties", infuse::reference::filter_sets::penalized);
TYPE_TO_STRING_AS("bias+top_k", infuse::reference::filter_sets::biased);
TYPE_TO_STRING_AS("all filters", infuse::reference::filter_sets::everything);
