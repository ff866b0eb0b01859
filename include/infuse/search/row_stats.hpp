// Row statistics of logits, in one pass: entropy, maximum probability, log-sum-exp, the margin
// between the two largest logits and the argmax, per row of logits (rows, vocab). They drive
// entropy-switched decoding (Entropy Adaptive Decoding switches to the larger model above an
// entropy threshold), early exit and self-consistency; majority_vote is the last step of the
// latter.
//
//   search::row_stats(exec, logits, stats);   // logits (rows,vocab), stats (rows)
//
// One pass: a running maximum m, S = sum_x e^(x - m) and W = sum_x e^(x - m) (x - m), rescaled
// whenever m grows (the online softmax of core/math.hpp with one more moment). Then
//   lse = m + ln S,  max_probability = 1 / S,  entropy = ln S - W / S (nats).
// The margin is between the top two LOGITS, x_(1) - x_(2) = ln(p_(1) / p_(2)): it does not depend
// on the normalisation, and a tie at the top gives 0. A row of one finite logit has margin +inf.
//
// Bad input: a row holding NaN or +inf, or no finite logit at all (vocab 0, all -inf), gets
// flags = row_flag::invalid, argmax -1 and NaN statistics; -inf logits (masked tokens) are fine.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "infuse/core/concepts.hpp"
#include "infuse/core/config.hpp"
#include "infuse/core/view.hpp"

namespace infuse::search {

enum class row_flag : std::uint32_t {
  ok = 0,
  invalid = 1,  // NaN or +inf in the row, or no finite logit
};

struct row_statistics {
  float entropy;          // nats
  float max_probability;  // softmax probability of the argmax
  float log_sum_exp;      // ln sum_x e^x
  float margin;           // largest logit minus the second largest (0 on a tie, +inf for one)
  std::int32_t argmax;    // the lowest index among the largest logits; -1 when invalid
  row_flag flags;
};

namespace detail {

// The running state of row_stats over a part of a row; parts merge in any order and grouping with
// the same result up to rounding (the argmax exactly: ties go to the lower index).
struct row_stats_state {
  float max = -INFINITY;
  float second = -INFINITY;
  // S and W, relative to max, summed in float64: a float sum over 128k terms drifts by 1e-4.
  double sum = 0.0;
  double weighted = 0.0;
  std::int32_t argmax = -1;
  bool invalid = false;

  INFUSE_HOST_DEVICE void add(float x, std::int32_t index) {
    if (!(x < INFINITY)) {  // NaN or +inf
      invalid = true;
      return;
    }
    if (x == -INFINITY) return;  // a masked token weighs nothing
    if (x > max) {
      // Shift the origin from max to x: S' = S e^d + 1, W' = e^d (W + d S) with d = max - x.
      const float shift = max - x;
      const double scale = expf(shift);
      weighted = sum == 0.0 ? 0.0 : scale * (weighted + shift * sum);
      sum = sum * scale + 1.0;
      second = max;
      max = x;
      argmax = index;
    } else {
      const float offset = x - max;
      const double weight = expf(offset);
      sum += weight;
      weighted += weight * offset;
      if (x > second) second = x;
    }
  }

  INFUSE_HOST_DEVICE void merge(const row_stats_state& other) {
    invalid = invalid || other.invalid;
    if (other.sum == 0.0) return;
    if (sum == 0.0) {
      const bool keep_invalid = invalid;
      *this = other;
      invalid = keep_invalid;
      return;
    }
    const float merged_max = fmaxf(max, other.max);
    const float own_shift = max - merged_max;
    const float other_shift = other.max - merged_max;
    const double own_scale = expf(own_shift);
    const double other_scale = expf(other_shift);
    weighted = own_scale * (weighted + own_shift * sum) +
               other_scale * (other.weighted + other_shift * other.sum);
    sum = sum * own_scale + other.sum * other_scale;
    second = fmaxf(fmaxf(second, other.second), fminf(max, other.max));
    if (other.max > max || (other.max == max && other.argmax < argmax)) argmax = other.argmax;
    max = merged_max;
  }

  INFUSE_HOST_DEVICE row_statistics finish() const {
    if (invalid || sum == 0.0) {
      return {NAN, NAN, NAN, NAN, -1, row_flag::invalid};
    }
    const double log_sum = log(sum);
    return {static_cast<float>(log_sum - weighted / sum),
            static_cast<float>(1.0 / sum),
            static_cast<float>(max + log_sum),
            max - second,
            argmax,
            row_flag::ok};
  }
};

// The checks both bodies of search::row_stats run before any work: logits (rows,vocab) with any
// row stride, stats (rows), both views that `Exec` can read.
template <class Exec, class Logits, class Stats>
void require_row_stats(const Logits& logits, const Stats& stats) {
  static_check_view<Exec, 2, Logits>();
  static_check_view<Exec, 1, Stats>();
  static_assert(std::is_same_v<typename Logits::value_type, float> &&
                    std::is_same_v<typename Stats::element_type, row_statistics>,
                "infuse: row_stats reads float logits and writes row_statistics");
  constexpr const char* call = "infuse::search::row_stats";
  require_view(logits, call, "logits", {any_extent, any_extent});
  require_view(stats, call, "stats", {{logits.extent(0), "logits.extent(0), the rows"}});
}

}  // namespace detail

// The statistics of one row of `vocab` logits, sequentially (the CPU body and small rows).
INFUSE_HOST_DEVICE inline row_statistics row_stats(const float* logits, std::int64_t vocab) {
  detail::row_stats_state state;
  for (std::int64_t x = 0; x < vocab; ++x) state.add(logits[x], static_cast<std::int32_t>(x));
  return state.finish();
}

struct vote_result {
  std::int32_t answer;  // the most frequent answer, the smallest on a tie; -1 for no answers
  std::int32_t count;   // how many of the answers it got
};

// Self-consistency's majority vote over `count` answer ids (each sampled answer mapped to an id by
// the caller). O(count^2) without scratch memory: self-consistency votes over a few dozen
// samples, and the same code runs in a device thread.
INFUSE_HOST_DEVICE inline vote_result majority_vote(const std::int32_t* answers,
                                                    std::int64_t count) {
  vote_result best{-1, 0};
  for (std::int64_t i = 0; i < count; ++i) {
    std::int32_t votes = 0;
    for (std::int64_t j = 0; j < count; ++j) votes += answers[j] == answers[i] ? 1 : 0;
    if (votes > best.count || (votes == best.count && answers[i] < best.answer)) {
      best = {answers[i], votes};
    }
  }
  return best;
}

}  // namespace infuse::search
