// search::sample and search::greedy on exec::cpu: one row per task over OpenMP threads.
//
// Per row, without sorting the vocabulary:
//   1. one pass over the logits: maximum, NaN check, count of allowed tokens, and (with top_k) a
//      candidate buffer of the tokens at or above a running threshold, raised to the k-th largest
//      of the buffer whenever it fills (nth_element), so that all but O(k) tokens are rejected
//      by one SIMD comparison per vector;
//   2. without top_k (or when ties at the threshold overflow the buffer), a second pass gathers
//      every allowed token at or above the threshold;
//   3. on the candidates: integer weights, the top-p cut by a radix select on the weights
//      (8-bit digits, mass histograms), min-p, then the keyed draw in token-id order.
// Tokens named by a penalty or a bias are taken out of the dense pass through a per-thread copy
// of the bitmask and handled as a short list of adjusted logits.
//
// Scratch (candidates, mask words) is per thread and reused across calls: it grows to the
// largest row seen, and a call allocates only when a row needs more than any before it.
#pragma once

#include <hwy/highway.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "infuse/core/view.hpp"
#include "infuse/exec/cpu.hpp"
#include "infuse/search/sample.hpp"

namespace infuse::search::detail {

namespace cpu_sample {

namespace hn = hwy::HWY_NAMESPACE;

struct candidate {
  float logit;
  std::int32_t token;
  std::uint64_t weight;  // set once the row's maximum is known
};

struct listed_token {
  std::int32_t token;
  float logit;  // adjusted: bias, penalties
};

struct row_scratch {
  std::vector<candidate> candidates;
  std::vector<std::uint64_t> radix;
  std::vector<std::uint32_t> mask;
  std::vector<listed_token> listed;
};

inline row_scratch& thread_scratch() {
  thread_local row_scratch scratch;
  return scratch;
}

// One row as the passes see it: dense logits, the allowed-token mask (null: every token) with the
// listed tokens' bits cleared, and the listed tokens with their adjusted logits.
struct row_input {
  const float* logits;
  std::int64_t vocab;
  const std::uint32_t* mask;
  const listed_token* listed;
  std::int64_t listed_count;
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
  for (std::int64_t j = 0; j < row.listed_count; ++j) visit(row.listed[j].token, row.listed[j].logit);
}

// Maximum, NaN, count of allowed tokens, and the lowest-id argmax.
struct row_summary {
  float max = -INFINITY;
  std::int32_t argmax = 0;
  bool nan = false;
  std::int64_t allowed = 0;
};

// The top-k candidate buffer of pass 1: holds every token with logit >= threshold (or >, after
// ties at the threshold overflowed it), threshold never above the final k-th largest logit.
class top_k_buffer {
 public:
  top_k_buffer(std::vector<candidate>& storage, std::int64_t k)
      : k_(k), capacity_(std::max<std::int64_t>(4 * k, 1024)), storage_(storage) {
    if (std::ssize(storage_) < capacity_) storage_.resize(static_cast<std::size_t>(capacity_));
  }

  float threshold() const { return threshold_; }

  INFUSE_FORCE_INLINE void offer(std::int32_t token, float logit) {
    if (!(logit > threshold_ || (logit == threshold_ && !strict_))) return;
    storage_[static_cast<std::size_t>(size_++)] = {logit, token, 0};
    if (size_ == capacity_) compact();
  }

  // After the pass: the k-th largest logit, and whether the buffer holds every token at or above
  // it (false when ties at it were dropped: the caller gathers them again).
  struct result {
    float kth;
    bool complete;
  };
  result finish() {
    if (size_ >= k_) {
      return {nth_largest(), true};  // above a dropped tie value, if any: complete
    }
    return {threshold_, false};  // fewer than k above the dropped ties: they include the k-th
  }

  std::int64_t size() const { return size_; }

 private:
  float nth_largest() {
    auto* data = storage_.data();
    std::nth_element(data, data + (k_ - 1), data + size_,
                     [](const candidate& a, const candidate& b) { return a.logit > b.logit; });
    return data[k_ - 1].logit;
  }

  void compact() {
    const float kth = nth_largest();
    auto* data = storage_.data();
    auto* above_end = std::partition(data, data + size_,
                                     [kth](const candidate& c) { return c.logit > kth; });
    auto* tie_end = std::partition(above_end, data + size_,
                                   [kth](const candidate& c) { return c.logit == kth; });
    threshold_ = kth;
    if (tie_end - data <= capacity_ / 2) {
      size_ = tie_end - data;
      strict_ = false;
    } else {  // mostly ties: keep those above, and gather the ties again at the end if needed
      size_ = above_end - data;
      strict_ = true;
    }
  }

  std::int64_t k_;
  std::int64_t capacity_;
  std::vector<candidate>& storage_;
  std::int64_t size_ = 0;
  float threshold_ = -INFINITY;
  bool strict_ = false;
};

// Pass 1: the row summary, and every allowed token offered to `buffer` when there is one.
template <class Buffer>
row_summary first_pass(const row_input& row, Buffer* buffer) {
  row_summary summary;
  const auto visit = [&](std::int32_t token, float logit) {
    if (logit != logit) summary.nan = true;
    if (logit > summary.max || (logit == summary.max && token < summary.argmax)) {
      summary.max = logit;
      summary.argmax = token;
    }
    ++summary.allowed;
    if constexpr (!std::is_same_v<Buffer, std::nullptr_t>) buffer->offer(token, logit);
  };
  if (row.mask != nullptr || row.listed_count > 0) {
    for_each_allowed(row, visit);
    return summary;
  }
  // Dense and unmasked: whole vectors whose maximum is below the buffer's threshold and that
  // hold no NaN are settled by their maximum alone.
  const hn::ScalableTag<float> d;
  const std::int64_t lanes = static_cast<std::int64_t>(hn::Lanes(d));
  const std::int64_t block = 4 * lanes;
  auto vmax = hn::Set(d, -INFINITY);
  std::int64_t t = 0;
  for (; t + block <= row.vocab; t += block) {
    const float* x = row.logits + t;
    const auto v0 = hn::LoadU(d, x);
    const auto v1 = hn::LoadU(d, x + lanes);
    const auto v2 = hn::LoadU(d, x + 2 * lanes);
    const auto v3 = hn::LoadU(d, x + 3 * lanes);
    const auto m = hn::Max(hn::Max(v0, v1), hn::Max(v2, v3));
    const auto nan = hn::Or(hn::Or(hn::IsNaN(v0), hn::IsNaN(v1)),
                            hn::Or(hn::IsNaN(v2), hn::IsNaN(v3)));
    float limit = INFINITY;
    if constexpr (!std::is_same_v<Buffer, std::nullptr_t>) limit = buffer->threshold();
    if (!hn::AllFalse(d, nan) || !hn::AllFalse(d, hn::Ge(m, hn::Set(d, limit)))) {
      for (std::int64_t i = 0; i < block; ++i) visit(static_cast<std::int32_t>(t + i), x[i]);
    } else {
      vmax = hn::Max(vmax, m);
      summary.allowed += block;
    }
  }
  // The vectors settled by their maximum: the first token holding it is found only if it beats
  // what the scalar visits saw (ties keep the lower id, so search from the start).
  const float vector_max = hn::GetLane(hn::MaxOfLanes(d, vmax));
  if (vector_max > summary.max || (vector_max == summary.max && vector_max != -INFINITY)) {
    const std::int64_t end = t;
    for (std::int64_t i = 0; i < end; ++i) {
      if (row.logits[i] == vector_max) {
        if (vector_max > summary.max || i < summary.argmax) summary.argmax = static_cast<std::int32_t>(i);
        break;
      }
    }
    summary.max = vector_max;
  }
  for (; t < row.vocab; ++t) visit(static_cast<std::int32_t>(t), row.logits[t]);
  return summary;
}

// Every allowed token with logit >= threshold, in the order of for_each_allowed.
inline void gather(const row_input& row, float threshold, std::vector<candidate>& out,
                   std::int64_t& count) {
  count = 0;
  for_each_allowed(row, [&](std::int32_t token, float logit) {
    if (logit >= threshold) {
      if (count == std::ssize(out)) out.resize(std::max<std::size_t>(1024, 2 * out.size()));
      out[static_cast<std::size_t>(count++)] = {logit, token, 0};
    }
  });
}

// The largest weight v such that the weights >= v sum to at least `target` (<= their total):
// a radix select on 8-bit digits from the top, with the mass of each digit value.
inline std::uint64_t top_p_threshold(const candidate* candidates, std::int64_t count,
                                     std::uint64_t target, std::vector<std::uint64_t>& scratch) {
  scratch.resize(static_cast<std::size_t>(count));
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

template <class TopOut>
row_result sample_row(const row_input& row, const row_filters& filters, row_scratch& scratch,
                      TopOut&& write_top) {
  const bool use_top_k = filters.top_k > 0 && filters.temperature > 0.0f;
  std::int64_t count = 0;
  row_summary summary;
  float threshold = -INFINITY;
  bool complete = false;
  if (use_top_k) {
    top_k_buffer buffer(scratch.candidates, filters.top_k);
    summary = first_pass(row, &buffer);
    if (summary.allowed > filters.top_k) {
      const auto found = buffer.finish();
      threshold = found.kth;
      complete = found.complete;
      count = buffer.size();
    }
  } else {
    summary = first_pass<std::nullptr_t>(row, nullptr);
  }
  if (summary.nan) return {0, NAN, row_status::nan_logits};
  if (summary.allowed == 0 || summary.max == -INFINITY) {
    return {0, NAN, row_status::no_token_allowed};
  }
  if (filters.temperature == 0.0f) {
    write_top(nullptr, 0, summary.argmax, 0.0f);
    return {summary.argmax, 0.0f, row_status::ok};
  }
  if (!complete) gather(row, threshold, scratch.candidates, count);

  // Integer weights of the candidates at or above the top-k threshold (those with weight 0 can
  // never be drawn nor count towards top-p).
  candidate* c = scratch.candidates.data();
  std::int64_t kept = 0;
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
  const std::uint64_t cut =
      filters.top_p < 1.0f
          ? top_p_threshold(c, kept, top_p_mass(filters.top_p, total), scratch.radix)
          : 0;
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
  // The draw, in token-id order (the top-k buffer holds its few candidates in any order).
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
  write_top(c, final_count, -1, log_total);
  const float d = c[chosen].logit == summary.max
                      ? 0.0f
                      : (c[chosen].logit - summary.max) / filters.temperature;
  return {c[chosen].token, d - log_total, row_status::ok};
}

}  // namespace cpu_sample

template <>
struct sample_body<exec::cpu> {
  template <class Set, class Logits>
  static void sample(const exec::cpu& exec, Logits logits, const sample_rows<host_memory>& rows,
                     const sample_params<host_memory, Set>& params,
                     const sample_outputs<host_memory>& out) {
    validate_sample_values<Set>(logits.extent(1), rows, params);
    run<Set>(exec, logits, rows, &params, out);
  }

  template <class Logits>
  static void greedy(const exec::cpu& exec, Logits logits, const sample_outputs<host_memory>& out) {
    run<filters<>>(exec, logits, {}, nullptr, out);
  }

 private:
  // Greedy when params is null.
  template <class Set, class Logits>
  static void run(const exec::cpu& exec, Logits logits, const sample_rows<host_memory>& rows,
                  const sample_params<host_memory, Set>* params,
                  const sample_outputs<host_memory>& out) {
    using namespace cpu_sample;
    const std::int64_t vocab = logits.extent(1);
    const std::int64_t words = (vocab + 31) / 32;
    const std::int64_t top_n = out.top_tokens.extent(1);
    exec.parallel_for(logits.extent(0), [&](std::int64_t r) {
      row_scratch& scratch = thread_scratch();
      row_input row{&logits(r, 0), vocab, nullptr, nullptr, 0};
      row_filters filters;
      filters.temperature = 0.0f;  // greedy unless the parameters say otherwise
      if (params != nullptr) {
        const std::int32_t q = rows.request(r);
        filters.temperature = 1.0f;
        filters.random = sample_bits(params->seed(q), static_cast<std::uint64_t>(rows.position(r)));
        if constexpr (Set::template has<filter::temperature>) filters.temperature = params->temperature(q);
        if constexpr (Set::template has<filter::top_k>) {
          filters.top_k = std::max<std::int64_t>(0, params->top_k(q));
        }
        if constexpr (Set::template has<filter::top_p>) filters.top_p = params->top_p(q);
        if constexpr (Set::template has<filter::min_p>) filters.min_p = params->min_p(q);
        constexpr bool masked = Set::template has<filter::token_bitmask>;
        constexpr bool listed = Set::template has<filter::penalties> ||
                                Set::template has<filter::logit_bias>;
        if constexpr (masked || listed) {
          scratch.mask.resize(static_cast<std::size_t>(words));
          for (std::int64_t w = 0; w < words; ++w) {
            if constexpr (masked) {
              scratch.mask[w] = params->bitmask(q, w);
            } else {
              scratch.mask[w] = ~0u;
            }
          }
          row.mask = scratch.mask.data();
        }
        if constexpr (listed) build_listed<Set>(*params, q, row, scratch);
      }
      const auto write_top = [&](const candidate* kept, std::int64_t count, std::int32_t greedy,
                                 float log_total) {
        if (top_n == 0) return;
        std::int64_t j = 0;
        if (kept == nullptr) {
          out.top_tokens(r, j) = greedy;
          out.top_logprobs(r, j++) = 0.0f;
        } else {
          std::vector<candidate> best(kept, kept + count);
          const auto shown = std::min<std::int64_t>(top_n, count);
          std::partial_sort(best.begin(), best.begin() + shown, best.end(),
                            [](const candidate& a, const candidate& b) {
                              return a.logit > b.logit || (a.logit == b.logit && a.token < b.token);
                            });
          for (; j < shown; ++j) {
            out.top_tokens(r, j) = best[j].token;
            const float d = best[j].logit == best[0].logit
                                ? 0.0f
                                : (best[j].logit - best[0].logit) / filters.temperature;
            out.top_logprobs(r, j) = d - log_total;
          }
        }
        for (; j < top_n; ++j) {
          out.top_tokens(r, j) = -1;
          out.top_logprobs(r, j) = -INFINITY;
        }
      };
      const row_result result = sample_row(row, filters, scratch, write_top);
      if (result.status != row_status::ok) {
        for (std::int64_t j = 0; j < top_n; ++j) {
          out.top_tokens(r, j) = -1;
          out.top_logprobs(r, j) = -INFINITY;
        }
      }
      out.token(r) = result.token;
      out.logprob(r) = result.logprob;
      out.status(r) = result.status;
    });
  }

  // The tokens named by the penalties or the bias of request q: their adjusted logits, their bits
  // cleared from the row's mask (a token the bitmask forbids stays forbidden).
  template <class Set>
  static void build_listed(const sample_params<host_memory, Set>& params, std::int32_t q,
                           cpu_sample::row_input& row, cpu_sample::row_scratch& scratch) {
    auto& listed = scratch.listed;
    listed.clear();
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
      std::uint32_t& word = scratch.mask[static_cast<std::size_t>(token / 32)];
      const std::uint32_t bit = 1u << (token % 32);
      if ((word & bit) != 0) {
        word &= ~bit;
        listed.push_back({token, logit});
      }
    }
    row.listed = listed.data();
    row.listed_count = std::ssize(listed);
  }
};

}  // namespace infuse::search::detail
