// search::sample and search::greedy on exec::cpu: one row per task over OpenMP threads, scratch
// from the caller's workspace (one slot per thread, sample_workspace_bytes).
//
// Per row, without sorting the vocabulary, on dense rows (no bitmask, penalty or bias) with SIMD:
//   - top_k: one pass keeps the maximum, a NaN flag and a buffer of the tokens at or above a
//     running threshold (compress-stores), raised to the k-th largest of the buffer whenever it
//     fills, so that all but O(k) tokens are rejected by one comparison per vector;
//   - top_p without top_k: a pass for the maximum, a pass for the relative weights (vector
//     portable_exp, bit-identical to the scalar one) and their total, a mass histogram on the top
//     bits of the weights that locates the cut, and the exact cut among the tokens of that bucket
//     and above;
//   - min_p, temperature alone: a pass for the maximum, then only the tokens that can pass (weight
//     above 2^-40, or above min_p: logit >= max + T ln(min_p) with a margin) are gathered;
//   - on the few candidates: integer weights, the top-p cut by a radix select on the weights
//     (8-bit digits, mass histograms), min-p, then the keyed draw in token-id order.
// Rows with a bitmask, penalties or biases take the same steps with a scalar visit of the allowed
// tokens; tokens named by a penalty or a bias are taken out of the dense visit through the
// thread's copy of the bitmask and handled as a short list of adjusted logits.
#pragma once

#include <hwy/highway.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>

#include "infuse/core/view.hpp"
#include "infuse/exec/cpu.hpp"
#include "infuse/search/sample.hpp"

namespace infuse::search::detail {

namespace cpu_sample {

namespace hn = hwy::HWY_NAMESPACE;
using float_tag = hn::ScalableTag<float>;

struct candidate {
  float logit;
  std::int32_t token;
  std::uint64_t weight;  // set once the row's maximum is known
};

struct listed_token {
  std::int32_t token;
  float logit;  // adjusted: bias, penalties
};

// Widest vector of any target, for the slack of compress-stores.
inline constexpr std::int64_t max_lanes = HWY_MAX_BYTES / sizeof(float);
// Mass histogram of the top-p cut without top_k: the top 16 bits of a weight's float (exponent
// and 7 mantissa bits) for weights in [2^-41, 1]; smaller ones have integer weight 0.
inline constexpr std::uint32_t histogram_low = (127u - 41u) << 7;
inline constexpr std::uint32_t histogram_buckets = (41u << 7) + 1u;

// A thread's share of the workspace: byte offsets inside one slot, each 64-byte aligned.
struct scratch_layout {
  std::int64_t candidates, radix, probe_logits, probe_tokens, histogram, mask, listed, slot;

  static constexpr std::int64_t round_up(std::int64_t bytes) { return (bytes + 63) / 64 * 64; }

  static constexpr scratch_layout of(std::int64_t vocab) {
    scratch_layout l{};
    std::int64_t at = 0;
    const auto take = [&at](std::int64_t bytes) {
      const std::int64_t offset = at;
      at += round_up(bytes);
      return offset;
    };
    l.candidates = take(vocab * std::int64_t{sizeof(candidate)});
    l.radix = take(vocab * std::int64_t{sizeof(std::uint64_t)});  // also the weights, as floats
    l.probe_logits = take((vocab + max_lanes) * std::int64_t{sizeof(float)});
    l.probe_tokens = take((vocab + max_lanes) * std::int64_t{sizeof(std::int32_t)});
    l.histogram = take(std::int64_t{histogram_buckets} * std::int64_t{sizeof(std::uint64_t)});
    l.mask = take((vocab + 31) / 32 * std::int64_t{sizeof(std::uint32_t)});
    l.listed = take(vocab * std::int64_t{sizeof(listed_token)});
    l.slot = at;
    return l;
  }
};

struct row_scratch {
  candidate* candidates;       // (vocab)
  std::uint64_t* radix;        // (vocab)
  float* probe_logits;         // (vocab + max_lanes)
  std::int32_t* probe_tokens;  // (vocab + max_lanes)
  std::uint64_t* histogram;    // (histogram_buckets)
  std::uint32_t* mask;         // (words)
  listed_token* listed;        // (vocab)

  static row_scratch at(std::byte* slot, const scratch_layout& l) {
    return {reinterpret_cast<candidate*>(slot + l.candidates),
            reinterpret_cast<std::uint64_t*>(slot + l.radix),
            reinterpret_cast<float*>(slot + l.probe_logits),
            reinterpret_cast<std::int32_t*>(slot + l.probe_tokens),
            reinterpret_cast<std::uint64_t*>(slot + l.histogram),
            reinterpret_cast<std::uint32_t*>(slot + l.mask),
            reinterpret_cast<listed_token*>(slot + l.listed)};
  }
};

// portable_exp on a vector: the same correctly rounded operations in the same order, hence the
// same floats lane by lane (Round is round-to-nearest-even, as rintf in the default mode).
template <class D, class V = hn::Vec<D>>
INFUSE_FORCE_INLINE V portable_exp(D d, V x) {
  const hn::RebindToSigned<D> di;
  const auto t = hn::MulAdd(x, hn::Set(d, 1.44269504088896341f), hn::Zero(d));
  const auto n = hn::Round(t);
  const auto r = hn::Sub(t, n);
  auto p = hn::Set(d, 1.52527338e-5f);
  p = hn::MulAdd(p, r, hn::Set(d, 1.54035304e-4f));
  p = hn::MulAdd(p, r, hn::Set(d, 1.33335581e-3f));
  p = hn::MulAdd(p, r, hn::Set(d, 9.61812911e-3f));
  p = hn::MulAdd(p, r, hn::Set(d, 5.55041087e-2f));
  p = hn::MulAdd(p, r, hn::Set(d, 2.40226507e-1f));
  p = hn::MulAdd(p, r, hn::Set(d, 6.93147181e-1f));
  p = hn::MulAdd(p, r, hn::Set(d, 1.0f));
  const auto in_range = hn::Ge(x, hn::Set(d, -30.0f));  // false for NaN, as in the scalar code
  const auto n_safe = hn::IfThenElseZero(in_range, n);
  const auto scale =
      hn::BitCast(d, hn::ShiftLeft<23>(hn::Add(hn::ConvertTo(di, n_safe), hn::Set(di, 127))));
  return hn::IfThenElseZero(in_range, hn::Mul(p, scale));
}

// relative_weight on a vector (max finite).
template <class D, class V = hn::Vec<D>>
INFUSE_FORCE_INLINE V relative_weights(D d, V a, V max, V temperature) {
  return hn::IfThenElse(hn::Eq(a, max), hn::Set(d, 1.0f),
                        portable_exp(d, hn::Div(hn::Sub(a, max), temperature)));
}

// Calls f(lane) for each lane set in `mask`, in increasing order.
template <class D, class F>
INFUSE_FORCE_INLINE void for_each_set_lane(D d, hn::Mask<D> mask, F&& f) {
  std::uint8_t bytes[(max_lanes + 7) / 8] = {};
  hn::StoreMaskBits(d, mask, bytes);
  for (std::int64_t b = 0; b < (static_cast<std::int64_t>(hn::Lanes(d)) + 7) / 8; ++b) {
    for (unsigned bits = bytes[b]; bits != 0; bits &= bits - 1) f(8 * b + __builtin_ctz(bits));
  }
}

// One row as the passes see it: dense logits, the allowed-token mask (null: every token) with the
// listed tokens' bits cleared, and the listed tokens with their adjusted logits.
struct row_input {
  const float* logits;
  std::int64_t vocab;
  const std::uint32_t* mask;
  const listed_token* listed;
  std::int64_t listed_count;

  bool dense() const { return mask == nullptr && listed_count == 0; }
};

// Calls visit(token, logit) for every allowed token: dense ones in id order, then listed ones.
template <class Visit>
INFUSE_FORCE_INLINE void for_each_allowed(const row_input& row, Visit&& visit) {
  if (row.mask == nullptr) {
    for (std::int64_t t = 0; t < row.vocab; ++t) visit(static_cast<std::int32_t>(t), row.logits[t]);
  } else {
    const std::int64_t words = (row.vocab + 31) / 32;
    for (std::int64_t w = 0; w < words; ++w) {
      std::uint32_t bits = row.mask[w];
      if (w == words - 1 && row.vocab % 32 != 0) bits &= (1u << (row.vocab % 32)) - 1u;
      while (bits != 0) {
        const auto t = static_cast<std::int32_t>(w * 32 + __builtin_ctz(bits));
        bits &= bits - 1u;
        visit(t, row.logits[t]);
      }
    }
  }
  for (std::int64_t j = 0; j < row.listed_count; ++j)
    visit(row.listed[j].token, row.listed[j].logit);
}

// Maximum, NaN, count of allowed tokens, and the lowest-id argmax.
struct row_summary {
  float max = -INFINITY;
  std::int32_t argmax = 0;
  bool nan = false;
  std::int64_t allowed = 0;

  // Takes one allowed token: ties of the max go to the lower token id.
  void observe(std::int32_t token, float logit) {
    if (logit != logit) nan = true;
    if (logit > max || (logit == max && token < argmax)) {
      max = logit;
      argmax = token;
    }
    ++allowed;
  }
};

// The top-k buffer: holds every token with logit >= threshold (or >, after ties at the threshold
// overflowed it), the threshold never above the final k-th largest logit. Tokens stay in the
// order they were offered.
class top_k_buffer {
 public:
  top_k_buffer(const row_scratch& scratch, std::int64_t k, std::int64_t vocab)
      : k_(k),
        capacity_(std::min(std::max<std::int64_t>(4 * k, 1024), vocab)),
        logits_(scratch.probe_logits),
        tokens_(scratch.probe_tokens),
        select_(reinterpret_cast<float*>(scratch.radix)) {}

  float threshold() const { return threshold_; }
  bool strict() const { return strict_; }

  INFUSE_FORCE_INLINE void offer(std::int32_t token, float logit) {
    if (!(logit > threshold_ || (logit == threshold_ && !strict_))) return;
    logits_[size_] = logit;
    tokens_[size_++] = token;
    if (size_ >= capacity_) compact();
  }

  // The tokens of a vector whose lanes are set in `keep` (at most max_lanes past capacity).
  template <class D, class M>
  INFUSE_FORCE_INLINE void offer(D d, hn::Vec<D> logits, M keep, std::int64_t first_token) {
    // Compress in registers and store whole vectors (the slack allows it): a compress-store to
    // memory is microcoded and slow on some x86 cores.
    const hn::RebindToSigned<D> di;
    hn::StoreU(hn::Compress(logits, keep), d, logits_ + size_);
    hn::StoreU(hn::Compress(hn::Iota(di, static_cast<std::int32_t>(first_token)),
                            hn::RebindMask(di, keep)),
               di, tokens_ + size_);
    size_ += static_cast<std::int64_t>(hn::CountTrue(d, keep));
    if (size_ >= capacity_) compact();
  }

  // After the pass: the k-th largest logit, and whether the buffer holds every token at or above
  // it (false when ties at it were dropped: the caller gathers them again).
  struct result {
    float kth;
    bool complete;
  };
  result finish() {
    if (size_ >= k_) return {nth_largest(), true};  // above a dropped tie value, if any
    return {threshold_, false};  // fewer than k above the dropped ties: they include the k-th
  }

  std::int64_t size() const { return size_; }
  const float* logits() const { return logits_; }
  const std::int32_t* tokens() const { return tokens_; }

 private:
  float nth_largest() {
    std::copy(logits_, logits_ + size_, select_);
    std::nth_element(select_, select_ + (k_ - 1), select_ + size_, std::greater<float>());
    return select_[k_ - 1];
  }

  void compact() {
    const float kth = nth_largest();
    std::int64_t at_or_above = 0;
    for (std::int64_t i = 0; i < size_; ++i) at_or_above += logits_[i] >= kth;
    threshold_ = kth;
    strict_ = at_or_above > capacity_ / 2;  // mostly ties: keep those above, gather ties later
    std::int64_t kept = 0;
    for (std::int64_t i = 0; i < size_; ++i) {
      if (logits_[i] > kth || (logits_[i] == kth && !strict_)) {
        logits_[kept] = logits_[i];
        tokens_[kept++] = tokens_[i];
      }
    }
    size_ = kept;
  }

  std::int64_t k_;
  std::int64_t capacity_;
  float* logits_;
  std::int32_t* tokens_;
  float* select_;
  std::int64_t size_ = 0;
  float threshold_ = -INFINITY;
  bool strict_ = false;
};

// The lowest id holding `value` in a dense row (which holds it).
inline std::int32_t first_equal(const float* logits, std::int64_t vocab, float value) {
  const float_tag d;
  const auto lanes = static_cast<std::int64_t>(hn::Lanes(d));
  std::int64_t t = 0;
  for (; t + lanes <= vocab; t += lanes) {
    const auto hit = hn::Eq(hn::LoadU(d, logits + t), hn::Set(d, value));
    if (!hn::AllFalse(d, hit)) return static_cast<std::int32_t>(t + hn::FindFirstTrue(d, hit));
  }
  for (; t < vocab; ++t) {
    if (logits[t] == value) break;
  }
  return static_cast<std::int32_t>(t);
}

// Pass 1: the row summary, and every allowed token offered to `buffer` when there is one.
template <class Buffer>
row_summary first_pass(const row_input& row, Buffer* buffer) {
  constexpr bool buffered = !std::is_same_v<Buffer, std::nullptr_t>;
  row_summary summary;
  const auto visit = [&](std::int32_t token, float logit) {
    summary.observe(token, logit);
    if constexpr (buffered) buffer->offer(token, logit);
  };
  if (!row.dense()) {
    for_each_allowed(row, visit);
    return summary;
  }
  const float_tag d;
  const auto lanes = static_cast<std::int64_t>(hn::Lanes(d));
  auto vmax = hn::Set(d, -INFINITY);
  auto nan = hn::Zero(d);  // NaN lanes as all-ones bits: a mask carried in a register
  float threshold = -INFINITY;
  bool strict = false;
  if constexpr (buffered) {
    threshold = buffer->threshold();
    strict = buffer->strict();
  }
  auto limit = hn::Set(d, threshold);
  std::int64_t t = 0;
  for (; t + lanes <= row.vocab; t += lanes) {
    const auto x = hn::LoadU(d, row.logits + t);
    vmax = hn::Max(vmax, x);
    nan = hn::Or(nan, hn::VecFromMask(d, hn::IsNaN(x)));
    if constexpr (buffered) {
      const auto keep = strict ? hn::Gt(x, limit) : hn::Ge(x, limit);
      if (!hn::AllFalse(d, keep)) {
        buffer->offer(d, x, keep, t);
        strict = buffer->strict();
        limit = hn::Set(d, buffer->threshold());
      }
    }
  }
  summary.allowed = t;
  summary.nan = !hn::AllFalse(d, hn::MaskFromVec(nan));
  for (; t < row.vocab; ++t) visit(static_cast<std::int32_t>(t), row.logits[t]);
  const float vector_max = hn::GetLane(hn::MaxOfLanes(d, vmax));
  if (!summary.nan && vector_max >= summary.max) {  // the tail's argmax has the higher ids
    summary.max = vector_max;
    summary.argmax = first_equal(row.logits, row.vocab, vector_max);
  }
  return summary;
}

// Every allowed token with logit >= threshold, in the order of for_each_allowed.
inline std::int64_t gather(const row_input& row, float threshold, candidate* out) {
  std::int64_t count = 0;
  const auto keep = [&](std::int32_t token, float logit) {
    if (logit >= threshold) out[count++] = {logit, token, 0};
  };
  if (!row.dense()) {
    for_each_allowed(row, keep);
    return count;
  }
  const float_tag d;
  const auto lanes = static_cast<std::int64_t>(hn::Lanes(d));
  std::int64_t t = 0;
  for (; t + lanes <= row.vocab; t += lanes) {
    const auto hit = hn::Ge(hn::LoadU(d, row.logits + t), hn::Set(d, threshold));
    if (hn::AllFalse(d, hit)) continue;
    for_each_set_lane(d, hit, [&](std::int64_t lane) {
      out[count++] = {row.logits[t + lane], static_cast<std::int32_t>(t + lane), 0};
    });
  }
  for (; t < row.vocab; ++t) keep(static_cast<std::int32_t>(t), row.logits[t]);
  return count;
}

// The largest weight v such that the weights >= v sum to at least `target` (<= their total):
// a radix select on 8-bit digits from the top, with the mass of each digit value.
inline std::uint64_t top_p_threshold(const candidate* candidates, std::int64_t count,
                                     std::uint64_t target, std::uint64_t* scratch) {
  for (std::int64_t i = 0; i < count; ++i) scratch[i] = candidates[i].weight;
  std::uint64_t prefix = 0;
  std::uint64_t mass_above = 0;
  std::int64_t active = count;
  for (int shift = 40; shift >= 0; shift -= 8) {
    std::uint64_t mass[256] = {};
    for (std::int64_t i = 0; i < active; ++i) mass[(scratch[i] >> shift) & 255u] += scratch[i];
    int digit = 255;
    for (; digit > 0; --digit) {
      if (mass_above + mass[digit] >= target) break;
      mass_above += mass[digit];
    }
    prefix |= std::uint64_t(digit) << shift;
    std::int64_t kept = 0;
    for (std::int64_t i = 0; i < active; ++i) {
      if (((scratch[i] >> shift) & 255u) == std::uint64_t(digit)) scratch[kept++] = scratch[i];
    }
    active = kept;
  }
  return prefix;
}

// The top-p cut of a dense row without top_k, max finite: the total of every weight, then the
// histogram bucket (top 16 bits of the float weight) where the running mass from the top reaches
// the target; the candidates are the tokens of that bucket and above. Returns their count, or
// -1 when the weights below the bucket could tie with the cut (the caller takes every token).
struct top_p_result {
  std::int64_t count;  // candidates with their weights, or -1
  std::uint64_t cut;
};
inline top_p_result top_p_candidates(const row_input& row, float max, float temperature,
                                     float top_p, const row_scratch& scratch,
                                     std::uint64_t& total) {
  const float_tag d;
  const hn::Repartition<double, float_tag> dd;
  const hn::Repartition<std::int64_t, float_tag> di64;
  const hn::RebindToUnsigned<float_tag> du;
  const auto lanes = static_cast<std::int64_t>(hn::Lanes(d));
  float* weights = reinterpret_cast<float*>(scratch.radix);
  std::uint64_t* mass = scratch.histogram;
  std::fill(mass, mass + histogram_buckets, std::uint64_t{0});
  const auto vmax = hn::Set(d, max);
  const auto vtemperature = hn::Set(d, temperature);
  const auto scale = hn::Set(dd, 0x1p40);
  auto sum = hn::Zero(di64);
  const auto add_weight = [&](std::uint32_t bits) {
    float w = 0;
    std::memcpy(&w, &bits, sizeof w);
    if (bits >= histogram_low << 16 && bits <= 0x3F800000u) {
      mass[(bits >> 16) - histogram_low] += integer_weight(w);
    }
  };
  std::int64_t t = 0;
  for (; t + lanes <= row.vocab; t += lanes) {
    const auto w = relative_weights(d, hn::LoadU(d, row.logits + t), vmax, vtemperature);
    hn::StoreU(w, d, weights + t);
    // integer_weight lane by lane: w * 2^40 is exact in double, the conversion truncates
#if HWY_TARGET == HWY_SCALAR  // one lane: no halves to widen separately
    sum = hn::Add(sum, hn::ConvertTo(di64, hn::Mul(hn::PromoteTo(dd, w), scale)));
#else
    const hn::Half<float_tag> dh;
    const auto low = hn::PromoteTo(dd, hn::LowerHalf(dh, w));
    const auto high_half = hn::PromoteTo(dd, hn::UpperHalf(dh, w));
    sum = hn::Add(sum, hn::ConvertTo(di64, hn::Mul(low, scale)));
    sum = hn::Add(sum, hn::ConvertTo(di64, hn::Mul(high_half, scale)));
#endif
    const auto high = hn::Ge(w, hn::Set(d, 0x1p-41f));  // histogram_low
    if (hn::AllFalse(d, high)) continue;
    alignas(64) std::uint32_t lane_bits[max_lanes];
    hn::Store(hn::BitCast(du, w), du, lane_bits);
    for_each_set_lane(d, high, [&](std::int64_t lane) { add_weight(lane_bits[lane]); });
  }
  total = static_cast<std::uint64_t>(hn::GetLane(hn::SumOfLanes(di64, sum)));
  for (; t < row.vocab; ++t) {
    weights[t] = relative_weight(row.logits[t], max, temperature);
    total += integer_weight(weights[t]);
    std::uint32_t bits = 0;
    std::memcpy(&bits, &weights[t], sizeof bits);
    add_weight(bits);
  }
  const std::uint64_t target = top_p_mass(top_p, total);
  std::uint64_t above = 0;
  std::uint32_t bucket = histogram_buckets - 1;
  for (;; --bucket) {
    above += mass[bucket];
    if (above >= target || bucket == 0) break;
  }
  const std::uint32_t low_bits = (bucket + histogram_low) << 16;
  float low = 0;
  std::memcpy(&low, &low_bits, sizeof low);
  std::int64_t count = 0;
  for (t = 0; t + lanes <= row.vocab; t += lanes) {
    const auto hit = hn::Ge(hn::LoadU(d, weights + t), hn::Set(d, low));
    if (hn::AllFalse(d, hit)) continue;
    for_each_set_lane(d, hit, [&](std::int64_t lane) {
      const std::int64_t token = t + lane;
      scratch.candidates[count++] = {row.logits[token], static_cast<std::int32_t>(token),
                                     integer_weight(weights[token])};
    });
  }
  for (; t < row.vocab; ++t) {
    if (weights[t] >= low) {
      scratch.candidates[count++] = {row.logits[t], static_cast<std::int32_t>(t),
                                     integer_weight(weights[t])};
    }
  }
  // Every weight outside is below `low`: its integer weight is at most that of the float below.
  const std::uint64_t outside = integer_weight(std::nextafter(low, 0.0f));
  if (above < target) return {-1, 0};
  const std::uint64_t cut = top_p_threshold(scratch.candidates, count, target, scratch.radix);
  return {cut > outside ? count : -1, cut};
}

struct row_filters {
  float temperature = 1.0f;
  std::int64_t top_k = 0;  // 0: none
  float top_p = 1.0f;
  float min_p = 0.0f;
  std::uint64_t random = 0;
};

struct row_result {
  std::int32_t token;
  float logprob;
  row_status status;
};

// The lowest logit a token with a nonzero integer weight (and, when `min_p` > 0, a relative
// weight >= min_p) can have: (a - max) / T below ln(2^-40) - 0.01, or below ln(min_p) - 0.05,
// gives a weight below them whatever the rounding of portable_exp (relative error < 1e-6).
inline float lowest_kept_logit(float max, float temperature, float min_p) {
  double bound = -27.736;  // ln(2^-40) - 0.01
  if (min_p > 0.0f) bound = std::max(bound, std::log(double(min_p)) - 0.05);
  const double low = double(max) + double(temperature) * bound;
  float low_float = static_cast<float>(low);
  if (double(low_float) > low) low_float = std::nextafter(low_float, -INFINITY);
  return low_float;
}

// Samples one row; write_top(kept, count, greedy token, log total) writes the top-n outputs and
// may reorder `kept`.
template <class TopOut>
row_result sample_row(const row_input& row, const row_filters& filters, const row_scratch& scratch,
                      TopOut&& write_top) {
  const bool greedy = filters.temperature == 0.0f;
  const bool use_top_k = !greedy && filters.top_k > 0 && filters.top_k < row.vocab;
  std::int64_t count = -1;  // -1: candidates not gathered yet
  row_summary summary;
  float threshold = -INFINITY;
  candidate* c = scratch.candidates;
  if (use_top_k) {
    top_k_buffer buffer(scratch, filters.top_k, row.vocab);
    summary = first_pass(row, &buffer);
    if (summary.allowed > filters.top_k) {
      const auto found = buffer.finish();
      threshold = found.kth;
      if (found.complete) {
        count = buffer.size();
        for (std::int64_t i = 0; i < count; ++i) {
          c[i] = {buffer.logits()[i], buffer.tokens()[i], 0};
        }
      }
    }
  } else {
    summary = first_pass<std::nullptr_t>(row, nullptr);
  }
  if (summary.nan) return {0, NAN, row_status::nan_logits};
  if (summary.allowed == 0 || summary.max == -INFINITY) {
    return {0, NAN, row_status::no_token_allowed};
  }
  if (greedy) {
    write_top(nullptr, 0, summary.argmax, 0.0f);
    return {summary.argmax, 0.0f, row_status::ok};
  }
  // Integer weights of the candidates at or above the top-k threshold (those with weight 0 can
  // never be drawn nor count towards top-p), and the top-p cut among them.
  std::int64_t kept = -1;
  std::uint64_t cut = 0;
  if (count < 0 && !use_top_k && filters.top_p < 1.0f && row.dense() && summary.max < INFINITY) {
    std::uint64_t total = 0;
    const top_p_result found =
        top_p_candidates(row, summary.max, filters.temperature, filters.top_p, scratch, total);
    kept = found.count;
    cut = found.cut;
  }
  if (kept < 0) {
    if (count < 0) {
      const float low = lowest_kept_logit(summary.max, filters.temperature,
                                          filters.top_p < 1.0f ? 0.0f : filters.min_p);
      count = gather(row, std::max(threshold, low), c);
    }
    kept = 0;
    std::uint64_t total = 0;
    for (std::int64_t i = 0; i < count; ++i) {
      if (!(c[i].logit >= threshold)) continue;
      const std::uint64_t weight =
          integer_weight(relative_weight(c[i].logit, summary.max, filters.temperature));
      if (weight == 0) continue;
      c[kept] = {c[i].logit, c[i].token, weight};
      total += weight;
      ++kept;
    }
    cut = filters.top_p < 1.0f
              ? top_p_threshold(c, kept, top_p_mass(filters.top_p, total), scratch.radix)
              : 0;
  }
  std::int64_t final_count = 0;
  std::uint64_t final_total = 0;
  for (std::int64_t i = 0; i < kept; ++i) {
    if (c[i].weight < cut) continue;
    if (filters.min_p > 0.0f &&
        relative_weight(c[i].logit, summary.max, filters.temperature) < filters.min_p) {
      continue;
    }
    c[final_count++] = c[i];
    final_total += c[i].weight;
  }
  // The draw, in token-id order (the listed tokens come after the dense ones).
  const auto by_token = [](const candidate& a, const candidate& b) { return a.token < b.token; };
  if (!std::is_sorted(c, c + final_count, by_token)) std::sort(c, c + final_count, by_token);
  const std::uint64_t target = scaled_draw(filters.random, final_total);
  std::uint64_t running = 0;
  std::int64_t chosen = final_count - 1;
  for (std::int64_t i = 0; i < final_count; ++i) {
    running += c[i].weight;
    if (running > target) {
      chosen = i;
      break;
    }
  }
  const float log_total = static_cast<float>(std::log(double(final_total) * 0x1p-40));
  const float d =
      c[chosen].logit == summary.max ? 0.0f : (c[chosen].logit - summary.max) / filters.temperature;
  const row_result result{c[chosen].token, d - log_total, row_status::ok};
  write_top(c, final_count, -1, log_total);
  return result;
}

// One row's filters from the call's parameters (greedy when params is null); the bitmask and the
// token lists are built separately, into the row's scratch.
template <class Set>
row_filters filters_of(const sample_rows<host_memory>& rows,
                       const sample_params<host_memory, Set>* params, std::int64_t r) {
  row_filters f;
  f.temperature = 0.0f;
  if (params == nullptr) return f;
  const std::int32_t q = rows.request(r);
  f.temperature = 1.0f;
  f.random = sample_bits(params->seed(q), static_cast<std::uint64_t>(rows.position(r)));
  if constexpr (Set::template has<filter::temperature>) f.temperature = params->temperature(q);
  if constexpr (Set::template has<filter::top_k>) {
    f.top_k = std::max<std::int64_t>(0, params->top_k(q));
  }
  if constexpr (Set::template has<filter::top_p>) f.top_p = params->top_p(q);
  if constexpr (Set::template has<filter::min_p>) f.min_p = params->min_p(q);
  return f;
}

// Writes row r's outputs: as sample_row's write_top(kept, count, greedy token, log total), the
// top-n tokens and log-probabilities; then finish() the token, log-probability and status.
struct row_writer {
  const sample_outputs<host_memory>& out;
  std::int64_t r;
  float temperature;

  void operator()(candidate* kept, std::int64_t count, std::int32_t greedy, float log_total) const {
    const std::int64_t top_n = out.top_tokens.extent(1);
    std::int64_t j = 0;
    if (top_n > 0 && kept == nullptr) {
      out.top_tokens(r, j) = greedy;
      out.top_logprobs(r, j++) = 0.0f;
    } else if (top_n > 0) {
      const auto shown = std::min<std::int64_t>(top_n, count);
      std::partial_sort(kept, kept + shown, kept + count,
                        [](const candidate& a, const candidate& b) {
                          return a.logit > b.logit || (a.logit == b.logit && a.token < b.token);
                        });
      for (; j < shown; ++j) {
        out.top_tokens(r, j) = kept[j].token;
        const float d =
            kept[j].logit == kept[0].logit ? 0.0f : (kept[j].logit - kept[0].logit) / temperature;
        out.top_logprobs(r, j) = d - log_total;
      }
    }
    clear_top(j);
  }

  void clear_top(std::int64_t from) const {
    for (std::int64_t j = from; j < out.top_tokens.extent(1); ++j) {
      out.top_tokens(r, j) = -1;
      out.top_logprobs(r, j) = -INFINITY;
    }
  }

  void finish(const row_result& result) const {
    if (result.status != row_status::ok) clear_top(0);
    out.token(r) = result.token;
    out.logprob(r) = result.logprob;
    out.status(r) = result.status;
  }
};

}  // namespace cpu_sample

template <>
struct sample_body<exec::cpu> {
  // One slot of scratch per thread that runs rows, plus alignment slack.
  template <class Set>
  static std::int64_t workspace_bytes(const exec::cpu& exec, std::int64_t rows,
                                      std::int64_t vocab) {
    const std::int64_t slots = std::min<std::int64_t>(exec.threads(), rows);
    return slots > 0 ? slots * cpu_sample::scratch_layout::of(vocab).slot + 64 : 0;
  }

  template <class Set, class Logits>
  static void sample(const exec::cpu& exec, Logits logits, const sample_rows<host_memory>& rows,
                     const sample_params<host_memory, Set>& params,
                     const sample_outputs<host_memory>& out,
                     const view<std::byte, 1, host_memory>& workspace) {
    validate_sample_values<Set>(logits.extent(1), rows, params);
    run<Set>(exec, logits, rows, &params, out, workspace.data());
  }

  template <class Logits>
  static void greedy(const exec::cpu& exec, Logits logits, const sample_outputs<host_memory>& out) {
    run<filters<>>(exec, logits, {}, nullptr, out, nullptr);
  }

 private:
  // Greedy when params is null (no scratch needed: workspace may be null).
  template <class Set, class Logits>
  static void run(const exec::cpu& exec, Logits logits, const sample_rows<host_memory>& rows,
                  const sample_params<host_memory, Set>* params,
                  const sample_outputs<host_memory>& out, std::byte* workspace) {
    using namespace cpu_sample;
    const std::int64_t vocab = logits.extent(1);
    const std::int64_t words = (vocab + 31) / 32;
    const scratch_layout layout = scratch_layout::of(vocab);
    std::byte* base = nullptr;
    if (workspace != nullptr) {
      const auto address = reinterpret_cast<std::uintptr_t>(workspace);
      base = workspace + ((64 - address % 64) % 64);
    }
    exec.parallel_for_ranges(logits.extent(0), [&](int thread, std::int64_t begin,
                                                   std::int64_t end) {
      const row_scratch scratch =
          base != nullptr ? row_scratch::at(base + thread * layout.slot, layout) : row_scratch{};
      for (std::int64_t r = begin; r < end; ++r) {
        row_input row{&logits(r, 0), vocab, nullptr, nullptr, 0};
        const row_filters filters = filters_of(rows, params, r);
        if (params != nullptr) {
          const std::int32_t q = rows.request(r);
          constexpr bool masked = Set::template has<filter::token_bitmask>;
          constexpr bool listed =
              Set::template has<filter::penalties> || Set::template has<filter::logit_bias>;
          if constexpr (masked || listed) {
            for (std::int64_t w = 0; w < words; ++w) {
              if constexpr (masked) {
                scratch.mask[w] = params->bitmask(q, w);
              } else {
                scratch.mask[w] = ~0u;
              }
            }
            row.mask = scratch.mask;
          }
          if constexpr (listed) build_listed<Set>(*params, q, row, scratch);
        }
        const row_writer writer{out, r, filters.temperature};
        writer.finish(sample_row(row, filters, scratch, writer));
      }
    });
  }

  // The tokens named by the penalties or the bias of request q: their adjusted logits, their bits
  // cleared from the row's mask (a token the bitmask forbids stays forbidden).
  template <class Set>
  static void build_listed(const sample_params<host_memory, Set>& params, std::int32_t q,
                           cpu_sample::row_input& row, const cpu_sample::row_scratch& scratch) {
    std::int64_t count = 0;
    std::int32_t p = 0, p_end = 0, b = 0, b_end = 0;
    if constexpr (Set::template has<filter::penalties>) {
      p = params.penalty_offsets(q);
      p_end = params.penalty_offsets(q + 1);
    }
    if constexpr (Set::template has<filter::logit_bias>) {
      b = params.bias_offsets(q);
      b_end = params.bias_offsets(q + 1);
    }
    while (p < p_end || b < b_end) {
      std::int32_t token = std::numeric_limits<std::int32_t>::max();
      if constexpr (Set::template has<filter::penalties>) {
        if (p < p_end) token = std::min(token, params.penalty_tokens(p));
      }
      if constexpr (Set::template has<filter::logit_bias>) {
        if (b < b_end) token = std::min(token, params.bias_tokens(b));
      }
      float logit = row.logits[token];
      if constexpr (Set::template has<filter::logit_bias>) {
        if (b < b_end && params.bias_tokens(b) == token) logit += params.bias_values(b++);
      }
      if constexpr (Set::template has<filter::penalties>) {
        if (p < p_end && params.penalty_tokens(p) == token) {
          logit = penalized(logit, params.penalty_counts(p++), params.presence_penalty(q),
                            params.frequency_penalty(q), params.repetition_penalty(q));
        }
      }
      std::uint32_t& word = scratch.mask[token / 32];
      const std::uint32_t bit = 1u << (token % 32);
      if ((word & bit) != 0) {
        word &= ~bit;
        scratch.listed[count++] = {token, logit};
      }
    }
    row.listed = scratch.listed;
    row.listed_count = count;
  }
};

}  // namespace infuse::search::detail
