// Online softmax and log-sum-exp merging: the math that every attention kernel shares, on both
// backends.
//
// Attention over a long KV sequence is split into chunks. Each chunk runs an online softmax
// (Milakov & Gimelshein, "Online normalizer calculation for softmax", 2018; FlashAttention): a
// running maximum m and a running sum l = sum_i exp(s_i - m), with the accumulator of weighted
// values rescaled whenever m grows. Chunks then merge exactly, either as states (m, l) with
// unnormalised accumulators, or as normalised partial outputs with their log-sum-exp
// lse = m + log(l) (the split-KV reduction of FlashInfer and FlashDecoding).
//
// Non-finite input has a defined result (IEEE arithmetic is assumed: no -ffast-math, which
// would drop the NaN checks below):
//   - a score of -inf (masked) contributes nothing, and an empty state or partial (m = -inf,
//     l = 0) merges and adds without producing NaN;
//   - a score or lse of NaN or +inf makes the state's sum NaN, hence lse(), inverse_sum(),
//     probability() and every merged output NaN, so that the caller can detect it from the lse.
#pragma once

#include <cmath>
#include <cstddef>
#include <numbers>
#include <span>

#include "infuse/core/config.hpp"

namespace infuse {

// 2^x, the one exponential of the softmax.
//
// On the device: the single instruction ex2.approx.ftz.f32 (relative error about 2^-22), instead of
// exp2f's several instructions that handle subnormal results. Flushing results below 2^-126 to zero
// is harmless here: softmax weights are relative to the maximum, whose weight is 1. On the host:
// exp2f. Both give 0 for -inf, +inf for +inf and NaN for NaN.
INFUSE_HOST_DEVICE INFUSE_FORCE_INLINE float fast_exp2(float x) {
#if defined(INFUSE_DEVICE_PASS)
  float power;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(power) : "f"(x));
  return power;
#else
  return exp2f(x);
#endif
}

// The base of the logarithms a softmax_state holds: its scores, its maximum and its lse.
// Base two saves the multiplication by log2(e) per score when the caller folds log2(e) into the
// attention scale (FlashInfer does this); base e takes scores as they are.
enum class log_base { e, two };

namespace detail {

// log2(base): turns a difference of logarithms in `Base` into an exponent of 2.
template <log_base Base>
inline constexpr float log2_of_base = Base == log_base::e ? std::numbers::log2e_v<float> : 1.0f;

// ln(base): turns a logarithm in `Base` into a natural logarithm.
template <log_base Base>
inline constexpr float ln_of_base = Base == log_base::e ? 1.0f : std::numbers::ln2_v<float>;

}  // namespace detail

// The factors of one online-softmax step. After state.add(score):
//   acc = acc * previous + incoming * value
// and after state_a.merge(state_b), with acc_a and acc_b accumulated against each state:
//   acc_a = acc_a * previous + incoming * acc_b
// A value whose weight is 0 (a masked score) must be skipped by the caller if it may be non-finite,
// since 0 * inf is NaN.
struct softmax_rescale {
  float previous;
  float incoming;
};

// Running maximum and sum of an online softmax, in logarithms of base `Base`:
//   max = max_i s_i,  sum = sum_i Base^(s_i - max).
// The default state is empty: no scores, max = -inf, sum = 0.
template <log_base Base>
struct softmax_state {
  float max = -INFINITY;
  float sum = 0.0f;

  // Adds one score (in base `Base`); -inf adds nothing.
  INFUSE_HOST_DEVICE softmax_rescale add(float score) { return merge(softmax_state{score, 1.0f}); }

  // Merges another state into this one: afterwards this state covers the scores of both.
  INFUSE_HOST_DEVICE softmax_rescale merge(const softmax_state& other) {
    // fmaxf ignores a NaN maximum; the NaN still reaches the sum through its factor.
    const float merged_max = fmaxf(max, other.max);
    const float origin = finite_origin(merged_max);
    const softmax_rescale factors{power(max - origin), power(other.max - origin)};
    sum = sum * factors.previous + other.sum * factors.incoming;
    max = merged_max;
    return factors;
  }

  // log(sum_i Base^s_i) in base `Base`: -inf when empty.
  INFUSE_HOST_DEVICE float lse() const {
    if constexpr (Base == log_base::e) {
      return max + logf(sum);
    } else {
      return max + log2f(sum);
    }
  }

  // The same lse as a natural logarithm, as attention kernels report it.
  INFUSE_HOST_DEVICE float natural_lse() const { return lse() * detail::ln_of_base<Base>; }

  // 1 / sum, which normalises an accumulator; 0 when empty, so that an empty output is 0.
  INFUSE_HOST_DEVICE float inverse_sum() const { return sum == 0.0f ? 0.0f : 1.0f / sum; }

  // The softmax probability Base^(score - lse) of a score among those this state has seen.
  INFUSE_HOST_DEVICE float probability(float score) const {
    return power(score - finite_origin(max)) * inverse_sum();
  }

 private:
  // With no finite maximum (nothing but -inf seen), measure from 0 instead: -inf - -inf is NaN,
  // while Base^(-inf - 0) = 0 is the weight that an empty side must get.
  INFUSE_HOST_DEVICE static float finite_origin(float maximum) {
    return maximum == -INFINITY ? 0.0f : maximum;
  }
  // Base^exponent, exactly 1 at 0 even where the device's 2^x is approximate there: the side that
  // holds the maximum keeps its sum and accumulator unchanged however many scores follow.
  INFUSE_HOST_DEVICE static float power(float exponent) {
    return exponent == 0.0f ? 1.0f : fast_exp2(exponent * detail::log2_of_base<Base>);
  }
};

// log(sum_i exp(scores[i])), natural logarithm; -inf for no scores or only -inf.
INFUSE_HOST_DEVICE inline float log_sum_exp(const float* scores, std::size_t count) {
  softmax_state<log_base::e> state;
  for (std::size_t i = 0; i < count; ++i) state.add(scores[i]);
  return state.lse();
}

inline float log_sum_exp(std::span<const float> scores) {
  return log_sum_exp(scores.data(), scores.size());
}

// A normalised partial result over a set of keys: output = sum_i p_i v_i with the softmax p over
// those keys (head_dim floats), and lse = log sum_i exp(s_i), a natural logarithm. An empty set
// has lse = -inf; its output is never read. A float lse is only as exact as |lse| * 2^-24, and
// the merge weights exp(lse_i - lse) inherit that error: far from 0 (scores of 1e4), merging
// states, which keep max and sum apart, is the more exact way.
struct partial_result {
  const float* output;
  float lse;
};

namespace detail {

// The union of `count` disjoint partials: partial i's weight in the union is exp(lse_i - lse),
// i.e. the softmax over the partials' lses. `out` may be the first partial's output.
template <class PartialAt>
INFUSE_HOST_DEVICE float merge_partials(std::size_t count, PartialAt partial_at, float* out,
                                        std::size_t head_dim) {
  softmax_state<log_base::e> state;
  for (std::size_t i = 0; i < count; ++i) state.add(partial_at(i).lse);
  bool written = false;
  for (std::size_t i = 0; i < count; ++i) {
    const partial_result partial = partial_at(i);
    const float weight = state.probability(partial.lse);
    if (weight == 0.0f) continue;  // empty, or too small to matter: its output is not read
    for (std::size_t d = 0; d < head_dim; ++d) {
      const float term = weight * partial.output[d];
      out[d] = written ? out[d] + term : term;
    }
    written = true;
  }
  if (!written) {
    for (std::size_t d = 0; d < head_dim; ++d) out[d] = 0.0f;
  }
  return state.lse();
}

}  // namespace detail

// Merges two partials over disjoint key sets into `out` (head_dim floats) and returns the lse of
// their union. `out` may be a.output (accumulating in place). Both empty: out = 0, lse = -inf.
INFUSE_HOST_DEVICE inline float merge_partials(partial_result a, partial_result b, float* out,
                                               std::size_t head_dim) {
  const auto partial_at = [a, b](std::size_t i) { return i == 0 ? a : b; };
  return detail::merge_partials(2, partial_at, out, head_dim);
}

// The split-KV reduction: merges `count` partials, partial i being the head_dim floats at
// outputs + i * stride with lse lses[i], into `out`, and returns the lse of the union. `out` may
// be `outputs` (partial 0). No partials, or only empty ones: out = 0, lse = -inf.
INFUSE_HOST_DEVICE inline float merge_partials(const float* outputs, std::size_t stride,
                                               const float* lses, std::size_t count, float* out,
                                               std::size_t head_dim) {
  const auto partial_at = [outputs, stride, lses](std::size_t i) {
    return partial_result{outputs + i * stride, lses[i]};
  };
  return detail::merge_partials(count, partial_at, out, head_dim);
}

}  // namespace infuse
