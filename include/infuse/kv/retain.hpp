// KV retention (kv::retain::): which tokens of a sequence stay in the cache, and how many tokens
// each layer may keep. See docs/policies.md#kv-retention.
//
// Retention is two steps on the host:
//   1. selection: a rule picks the positions to keep of one sequence, ascending
//        auto kept = kv::retain::select(kv::retain::heavy_hitter<>{}, cache_view, s);
//   2. compaction (kv/cpu/compact.hpp): the kept tokens' records move to the front of the
//      sequence in order, and the caller then shortens the sequence to the new length
//        kv::retain::compact(exec, cache_view, sequences, kept_indptr, kept, new_lengths);
//        cache.truncate(id, old_length - new_lengths[i]);
//      Compaction moves K/V records and attention mass; the key bounds of a page (key_min,
//      key_max) no longer describe its tokens afterwards and the caller recomputes them.
//
// One token set per sequence: every rule sums its scores over the KV heads and keeps the same
// positions for all heads, so the page table keeps one length per sequence and every kernel that
// walks it stays as it is. Per-head sets (as SnapKV and H2O describe them) would need a length per
// (sequence, head) in the table and in every kernel.
//
// Rules (each a small struct; the template arguments are the defaults of run-time members, so one
// instantiation serves every budget):
//   keep_all                              every token;
//   streaming<Sink, Window>               the first `sink` tokens and the last `window`;
//   heavy_hitter<Budget, Recent>          H2O: the last `recent` tokens, then the highest
//                                         accumulated attention mass (cache_view::mass summed
//                                         over heads) up to `budget` tokens in all;
//   snapkv<Budget, ObservationWindow, Pool>
//                                         SnapKV: the observation window (the last prompt
//                                         tokens) and the top (budget - window) prefix tokens
//                                         by the window's attention, pooled over `pool` tokens;
//   merge<Budget, Threshold, Recent>      Elastic Cache / D2O: H2O's choice, then each evicted
//                                         token folded into its most similar kept token
//                                         (compact_merged in kv/cpu/compact.hpp).
// Ties: of two equal scores the lower position ranks first; NaN ranks below every number.
//
// Per-layer budgets: uniform_budgets, pyramid_budgets (PyramidKV) and prefix_budgets (PrefixKV's
// one global retention ratio found by binary search).
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "infuse/core/error.hpp"
#include "infuse/core/memory.hpp"
#include "infuse/core/view.hpp"
#include "infuse/kv/cache_view.hpp"

namespace infuse::kv::retain {

// Rules opt in with `using identifier = retain::policy_identifier;`.
struct policy_identifier {};

// What a rule ranks tokens by.
enum class score_source {
  none,         // position only
  mass,         // cache_view::mass summed over the KV heads (H2O)
  observation,  // the attention of the observation window, passed by the caller (SnapKV)
};

// A retention rule: a name, where its scores come from, and keep(length, scores) -> the kept
// positions of a sequence of `length` tokens, ascending. `scores` has one entry per position
// (mass), one per prefix position (observation, pooled), or none.
template <class P>
concept policy = requires(const P& rule, std::int64_t length, std::span<const double> scores) {
  typename P::identifier;
  { P::name } -> std::convertible_to<const char*>;
  { P::source } -> std::convertible_to<score_source>;
  { rule.keep(length, scores) } -> std::same_as<std::vector<std::int32_t>>;
}
&&std::same_as<typename P::identifier, policy_identifier>;

template <class P>
constexpr void static_check_policy() {
  static_assert(policy<P>,
                "infuse: this type is not a KV retention rule (kv::retain::policy): it needs "
                "`using identifier = kv::retain::policy_identifier`, a name, a score_source and "
                "keep(length, scores) returning the kept positions; see "
                "docs/policies.md#kv-retention");
}

namespace detail {

// NaN ranks below every number.
inline double rank_value(double score) {
  return std::isnan(score) ? -INFINITY : score;
}

// Appends to `kept` the `count` positions of [0, end) with the highest scores, the lower
// position first among equal scores. Not sorted.
inline void keep_top(std::span<const double> scores, std::int64_t end, std::int64_t count,
                     std::vector<std::int32_t>& kept) {
  const auto first = static_cast<std::ptrdiff_t>(kept.size());
  for (std::int64_t p = 0; p < end; ++p) kept.push_back(static_cast<std::int32_t>(p));
  const auto higher = [&](std::int32_t a, std::int32_t b) {
    const double sa = rank_value(scores[static_cast<std::size_t>(a)]);
    const double sb = rank_value(scores[static_cast<std::size_t>(b)]);
    return sa > sb || (sa == sb && a < b);
  };
  std::nth_element(kept.begin() + first, kept.begin() + first + count, kept.end(), higher);
  kept.resize(static_cast<std::size_t>(first + count));
}

inline void require_scores(std::span<const double> scores, std::int64_t expected,
                           std::string_view call, std::string_view what) {
  require(std::ssize(scores) == expected, call, "scores.size()", std::ssize(scores),
          std::to_string(expected) + " (" + std::string(what) + ")");
}

// H2O's choice, shared by heavy_hitter and merge.
inline std::vector<std::int32_t> keep_heavy(std::int64_t budget, std::int64_t recent,
                                            std::int64_t length, std::span<const double> scores,
                                            std::string_view call) {
  require(budget >= 1, call, "budget", budget, "at least 1 token");
  require(recent >= 0 && recent <= budget, call, "recent", recent,
          "0 to the budget " + std::to_string(budget));
  require(budget <= length, call, "budget", budget,
          "at most the sequence length " + std::to_string(length));
  require_scores(scores, length, call, "one per token");
  std::vector<std::int32_t> kept;
  kept.reserve(static_cast<std::size_t>(budget));
  keep_top(scores, length - recent, budget - recent, kept);
  for (std::int64_t p = length - recent; p < length; ++p)
    kept.push_back(static_cast<std::int32_t>(p));
  std::sort(kept.begin(), kept.end());
  return kept;
}

}  // namespace detail

struct keep_all {
  using identifier = policy_identifier;
  static constexpr const char* name = "keep_all";
  static constexpr score_source source = score_source::none;

  std::vector<std::int32_t> keep(std::int64_t length, std::span<const double>) const {
    require(length >= 0, "infuse::kv::retain::keep_all", "length", length, "at least 0");
    std::vector<std::int32_t> kept(static_cast<std::size_t>(length));
    for (std::int64_t p = 0; p < length; ++p) kept[static_cast<std::size_t>(p)] = std::int32_t(p);
    return kept;
  }
};

template <int Sink = 4, int Window = 1020>
struct streaming {
  static_assert(Sink >= 0 && Window >= 0 && Sink + Window >= 1,
                "infuse: kv::retain::streaming<Sink, Window> keeps at least one token (Sink, "
                "Window >= 0, not both 0); see docs/policies.md#kv-retention");
  using identifier = policy_identifier;
  static constexpr const char* name = "streaming";
  static constexpr score_source source = score_source::none;

  std::int64_t sink = Sink;
  std::int64_t window = Window;

  std::vector<std::int32_t> keep(std::int64_t length, std::span<const double>) const {
    constexpr std::string_view call = "infuse::kv::retain::streaming";
    require(sink >= 0, call, "sink", sink, "at least 0");
    require(window >= 0 && sink + window >= 1, call, "window", window,
            "at least 0, and sink + window at least 1");
    require(sink + window <= length, call, "sink + window", sink + window,
            "at most the sequence length " + std::to_string(length));
    std::vector<std::int32_t> kept;
    kept.reserve(static_cast<std::size_t>(sink + window));
    for (std::int64_t p = 0; p < sink; ++p) kept.push_back(std::int32_t(p));
    for (std::int64_t p = length - window; p < length; ++p) kept.push_back(std::int32_t(p));
    return kept;
  }
};

template <int Budget = 1024, int Recent = 128>
struct heavy_hitter {
  static_assert(Budget >= 1 && Recent >= 0 && Recent <= Budget,
                "infuse: kv::retain::heavy_hitter<Budget, Recent> needs Budget >= 1 and "
                "0 <= Recent <= Budget; see docs/policies.md#kv-retention");
  using identifier = policy_identifier;
  static constexpr const char* name = "heavy_hitter";
  static constexpr score_source source = score_source::mass;

  std::int64_t budget = Budget;
  std::int64_t recent = Recent;

  std::vector<std::int32_t> keep(std::int64_t length, std::span<const double> scores) const {
    return detail::keep_heavy(budget, recent, length, scores, "infuse::kv::retain::heavy_hitter");
  }
};

enum class pooling { max, average };

// SnapKV. The caller passes the attention weights of the last `observation_window` prompt queries
// over the prefix (the tokens before the window); snapkv_scores sums them over queries and heads
// and pools them: score(i) = max (or sum / pool) of the sums at [i - pool/2, i - pool/2 + pool)
// inside the prefix (positions outside count as absent for max, as 0 for the average, as
// SnapKV's max_pool1d / avg_pool1d with padding pool/2 do).
template <int Budget = 1024, int ObservationWindow = 32, int Pool = 7>
struct snapkv {
  static_assert(ObservationWindow >= 1 && Budget >= ObservationWindow && Pool >= 1,
                "infuse: kv::retain::snapkv<Budget, ObservationWindow, Pool> needs "
                "ObservationWindow >= 1, Budget >= ObservationWindow and Pool >= 1; see "
                "docs/policies.md#kv-retention");
  using identifier = policy_identifier;
  static constexpr const char* name = "snapkv";
  static constexpr score_source source = score_source::observation;

  std::int64_t budget = Budget;
  std::int64_t observation_window = ObservationWindow;
  std::int64_t pool = Pool;
  pooling pool_kind = pooling::max;

  void require_valid(std::int64_t length) const {
    constexpr std::string_view call = "infuse::kv::retain::snapkv";
    require(observation_window >= 1, call, "observation_window", observation_window,
            "at least 1 token");
    require(observation_window <= length, call, "observation_window", observation_window,
            "at most the sequence length " + std::to_string(length));
    require(budget >= observation_window && budget <= length, call, "budget", budget,
            "from the observation window " + std::to_string(observation_window) +
                " to the sequence length " + std::to_string(length));
    require(pool >= 1, call, "pool", pool, "at least 1 token");
  }

  // `scores`: the pooled scores of the prefix, length - observation_window of them.
  std::vector<std::int32_t> keep(std::int64_t length, std::span<const double> scores) const {
    require_valid(length);
    const std::int64_t prefix = length - observation_window;
    detail::require_scores(scores, prefix, "infuse::kv::retain::snapkv",
                           "one per prefix token, length - observation_window");
    std::vector<std::int32_t> kept;
    kept.reserve(static_cast<std::size_t>(budget));
    detail::keep_top(scores, prefix, budget - observation_window, kept);
    std::sort(kept.begin(), kept.end());
    for (std::int64_t p = prefix; p < length; ++p) kept.push_back(std::int32_t(p));
    return kept;
  }
};

// Elastic Cache / D2O: kept tokens chosen as heavy_hitter chooses them; compact_merged then folds
// each evicted token into the kept token whose key is most similar by cosine similarity over all
// KV heads at once (the keys of a token concatenated, so that one token set serves every head),
// when that similarity is at least `threshold`; otherwise the evicted token is dropped.
template <int Budget = 1024, float Threshold = 0.5f, int Recent = Budget / 8>
struct merge {
  static_assert(Budget >= 1 && Recent >= 0 && Recent <= Budget,
                "infuse: kv::retain::merge<Budget, Threshold, Recent> needs Budget >= 1 and "
                "0 <= Recent <= Budget; see docs/policies.md#kv-retention");
  static_assert(Threshold >= -1.0f && Threshold <= 1.0f,
                "infuse: kv::retain::merge<Budget, Threshold> takes a cosine Threshold in "
                "[-1, 1]; see docs/policies.md#kv-retention");
  using identifier = policy_identifier;
  static constexpr const char* name = "merge";
  static constexpr score_source source = score_source::mass;

  std::int64_t budget = Budget;
  std::int64_t recent = Recent;
  float threshold = Threshold;

  std::vector<std::int32_t> keep(std::int64_t length, std::span<const double> scores) const {
    return detail::keep_heavy(budget, recent, length, scores, "infuse::kv::retain::merge");
  }
};

static_assert(policy<keep_all> && policy<streaming<>> && policy<heavy_hitter<>> &&
                  policy<snapkv<>> && policy<merge<>>,
              "infuse: the shipped retention rules satisfy kv::retain::policy");

namespace detail {

template <class Layout, class KScheme, class VScheme>
void require_sequence(const cache_view<Layout, KScheme, VScheme, host_memory>& cache,
                      std::int32_t sequence, std::string_view call) {
  require(sequence >= 0 && sequence < cache.sequences(), call, "sequence", sequence,
          "a sequence of the cache view, 0 to " + std::to_string(cache.sequences() - 1));
}

}  // namespace detail

// The H2O score of each token of sequence `sequence`: its accumulated attention mass summed over
// the KV heads, in float64 (heads in order).
template <class Layout, class KScheme, class VScheme>
std::vector<double> mass_scores(const cache_view<Layout, KScheme, VScheme, host_memory>& cache,
                                std::int32_t sequence) {
  constexpr std::string_view call = "infuse::kv::retain::mass_scores";
  detail::require_sequence(cache, sequence, call);
  require(cache.mass != nullptr, call, "cache.mass", cache.mass,
          "the per-token attention mass (pool_pages, slots, k.heads)");
  const std::int64_t length = cache.length(sequence);
  const std::int32_t heads = cache.format.k.heads;
  std::vector<double> scores(static_cast<std::size_t>(length));
  for (std::int64_t t = 0; t < length; ++t) {
    const token_location at = cache.table.locate(sequence, t);
    const float* mass = cache.mass + (std::int64_t{at.page} * cache.format.slots + at.slot) * heads;
    double sum = 0.0;
    for (std::int32_t h = 0; h < heads; ++h) sum += mass[h];
    scores[static_cast<std::size_t>(t)] = sum;
  }
  return scores;
}

// SnapKV's pooled scores from the observation window's attention over the prefix,
// (window queries, heads, prefix): summed over queries and heads in float64, then pooled.
template <int Budget, int ObservationWindow, int Pool>
std::vector<double> snapkv_scores(const snapkv<Budget, ObservationWindow, Pool>& rule,
                                  host_view<const float, 3> observation) {
  constexpr std::string_view call = "infuse::kv::retain::snapkv_scores";
  require_view(observation, call, "observation",
               {{rule.observation_window, "observation_window"}, {any_extent}, {any_extent}},
               stride_rule::any);
  require(rule.pool >= 1, call, "pool", rule.pool, "at least 1 token");
  const std::int64_t prefix = observation.extent(2);
  std::vector<double> summed(static_cast<std::size_t>(prefix), 0.0);
  for (std::int64_t i = 0; i < prefix; ++i) {
    double sum = 0.0;
    for (std::int64_t q = 0; q < observation.extent(0); ++q) {
      for (std::int64_t h = 0; h < observation.extent(1); ++h) sum += observation(q, h, i);
    }
    summed[static_cast<std::size_t>(i)] = sum;
  }
  std::vector<double> pooled(static_cast<std::size_t>(prefix));
  for (std::int64_t i = 0; i < prefix; ++i) {
    const std::int64_t begin = std::max<std::int64_t>(0, i - rule.pool / 2);
    const std::int64_t end = std::min<std::int64_t>(prefix, i - rule.pool / 2 + rule.pool);
    double max = -INFINITY;
    double sum = 0.0;
    for (std::int64_t j = begin; j < end; ++j) {
      const double value = summed[static_cast<std::size_t>(j)];
      max = std::max(max, detail::rank_value(value));
      sum += value;
    }
    pooled[static_cast<std::size_t>(i)] =
        rule.pool_kind == pooling::max ? max : sum / static_cast<double>(rule.pool);
  }
  return pooled;
}

// The kept positions of sequence `sequence` of the cache, ascending, for a rule that ranks by
// position or by attention mass.
template <class P, class Layout, class KScheme, class VScheme>
std::vector<std::int32_t> select(const P& rule,
                                 const cache_view<Layout, KScheme, VScheme, host_memory>& cache,
                                 std::int32_t sequence) {
  static_check_policy<P>();
  static_assert(P::source != score_source::observation,
                "infuse: this retention rule ranks by the observation window's attention: call "
                "select(rule, cache, sequence, observation); see docs/policies.md#kv-retention");
  detail::require_sequence(cache, sequence, "infuse::kv::retain::select");
  if constexpr (P::source == score_source::mass) {
    const std::vector<double> scores = mass_scores(cache, sequence);
    return rule.keep(cache.length(sequence), scores);
  } else {
    return rule.keep(cache.length(sequence), {});
  }
}

// SnapKV's kept positions of sequence `sequence`: `observation` (window queries, heads, prefix)
// with prefix = length - observation_window.
template <int Budget, int ObservationWindow, int Pool, class Layout, class KScheme, class VScheme>
std::vector<std::int32_t> select(const snapkv<Budget, ObservationWindow, Pool>& rule,
                                 const cache_view<Layout, KScheme, VScheme, host_memory>& cache,
                                 std::int32_t sequence, host_view<const float, 3> observation) {
  constexpr std::string_view call = "infuse::kv::retain::select";
  detail::require_sequence(cache, sequence, call);
  const std::int64_t length = cache.length(sequence);
  rule.require_valid(length);
  require(observation.extent(2) == length - rule.observation_window, call, "observation.extent(2)",
          observation.extent(2),
          std::to_string(length - rule.observation_window) +
              " (the prefix: length - observation_window)");
  const std::vector<double> scores = snapkv_scores(rule, observation);
  return rule.keep(length, scores);
}

// ---- Per-layer budgets: how many tokens each of `layers` layers keeps, `total` in all. ----

// total / layers each, the remainder one more to the lowest layers.
inline std::vector<std::int64_t> uniform_budgets(std::int32_t layers, std::int64_t total) {
  constexpr std::string_view call = "infuse::kv::retain::uniform_budgets";
  require(layers >= 1, call, "layers", layers, "at least 1");
  require(total >= 0, call, "total", total, "at least 0");
  std::vector<std::int64_t> budgets(static_cast<std::size_t>(layers), total / layers);
  for (std::int64_t l = 0; l < total % layers; ++l) ++budgets[static_cast<std::size_t>(l)];
  return budgets;
}

// PyramidKV: budgets falling linearly from the lowest layer to the highest. With the mean
// m = total / layers the top layer gets m / beta and the bottom 2m - m / beta (beta >= 1; 1 is
// uniform); the shares are rounded by largest remainder (lower layer first among equal
// remainders), so they sum to `total` exactly.
inline std::vector<std::int64_t> pyramid_budgets(std::int32_t layers, std::int64_t total,
                                                 double beta = 20.0) {
  constexpr std::string_view call = "infuse::kv::retain::pyramid_budgets";
  require(layers >= 1, call, "layers", layers, "at least 1");
  require(total >= 0, call, "total", total, "at least 0");
  require(beta >= 1.0, call, "beta", beta, "at least 1 (1 is uniform)");
  const double mean = static_cast<double>(total) / layers;
  const double top = mean / beta;
  const double bottom = 2.0 * mean - top;
  std::vector<std::int64_t> budgets(static_cast<std::size_t>(layers));
  std::vector<std::pair<double, std::int32_t>> remainders(static_cast<std::size_t>(layers));
  std::int64_t assigned = 0;
  for (std::int32_t l = 0; l < layers; ++l) {
    const double share =
        layers == 1 ? mean : bottom + (top - bottom) * static_cast<double>(l) / (layers - 1);
    const auto whole = static_cast<std::int64_t>(std::floor(share));
    budgets[static_cast<std::size_t>(l)] = whole;
    remainders[static_cast<std::size_t>(l)] = {share - static_cast<double>(whole), l};
    assigned += whole;
  }
  std::sort(remainders.begin(), remainders.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  for (std::int64_t i = 0; i < total - assigned; ++i) {
    ++budgets[static_cast<std::size_t>(remainders[static_cast<std::size_t>(i % layers)].second)];
  }
  return budgets;
}

struct prefix_budget_result {
  double ratio;                       // the global share of each layer's mass that is kept
  std::vector<std::int64_t> budgets;  // tokens per layer
};

// The fewest tokens of one layer whose cumulative mass reaches `ratio` of the layer's total.
// curve[n - 1] = mass of the n heaviest tokens (nondecreasing).
inline std::int64_t tokens_for_ratio(std::span<const double> curve, double ratio) {
  if (curve.empty() || ratio <= 0.0) return 0;
  const double goal = ratio * curve.back();
  const auto reached = std::lower_bound(curve.begin(), curve.end(), goal);
  return reached == curve.end() ? std::ssize(curve) : (reached - curve.begin()) + 1;
}

// PrefixKV: one retention ratio r for all layers, each layer keeping the fewest tokens whose
// mass reaches r of its total; r is the largest (to 2^-50, by bisection) whose total fits
// `budget`. curves[l][n - 1] is the mass of layer l's n heaviest tokens: nonnegative,
// nondecreasing. The total never exceeds the budget, and a larger budget never keeps fewer tokens
// in any layer.
inline prefix_budget_result prefix_budgets(std::span<const std::vector<double>> curves,
                                           std::int64_t budget) {
  constexpr std::string_view call = "infuse::kv::retain::prefix_budgets";
  require(!curves.empty(), call, "curves.size()", curves.size(), "at least 1 layer");
  require(budget >= 0, call, "budget", budget, "at least 0");
  for (std::size_t l = 0; l < curves.size(); ++l) {
    const auto& curve = curves[l];
    for (std::size_t n = 0; n < curve.size(); ++n) {
      require(curve[n] >= (n == 0 ? 0.0 : curve[n - 1]), call,
              "curves[" + std::to_string(l) + "][" + std::to_string(n) + "]", curve[n],
              "nonnegative and at least the entry before it (a cumulative mass)");
    }
  }
  const auto total_for = [&](double ratio) {
    std::int64_t total = 0;
    for (const auto& curve : curves) total += tokens_for_ratio(curve, ratio);
    return total;
  };
  double fits = 0.0;
  if (total_for(1.0) <= budget) {
    fits = 1.0;
  } else {
    double fails = 1.0;
    for (int step = 0; step < 50; ++step) {
      const double middle = 0.5 * (fits + fails);
      (total_for(middle) <= budget ? fits : fails) = middle;
    }
  }
  prefix_budget_result result{fits, {}};
  for (const auto& curve : curves) result.budgets.push_back(tokens_for_ratio(curve, fits));
  return result;
}

}  // namespace infuse::kv::retain
