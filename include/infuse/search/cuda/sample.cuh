// search::sample and search::greedy on exec::cuda: one block per row, each pass a strided visit of
// the row's allowed tokens, the same integer definition as the CPU (search/sample.hpp), hence the
// same token, log-probability and status from the same logits and key.
//
// Per row:
//   1. the parameters, read from device memory and checked (status invalid_parameter otherwise);
//      with penalties or biases, the row copied into the workspace and the listed tokens adjusted;
//   2. the maximum, the lowest-id argmax, a NaN flag and the allowed count (one block reduction);
//   3. top_k: the k-th largest logit by a radix select on ordered_key (4 passes of 8-bit digits,
//      block histograms in shared memory), compared as floats afterwards so that -0 and +0 tie;
//   4. the integer weights and their total; top_p: the cut by the same radix select on the
//      weights with mass histograms (6 passes of 8 bits over the 41-bit weights);
//   5. min_p and the final total; the draw by a uint64 block scan in token-id order;
//   6. the optional top-n outputs, one block reduction per slot.
// Every pass re-reads the row (from L2 when it is small) rather than keeping candidates: the
// passes are exact whatever the ties, and no pass needs more memory than a block's shared memory.
//
// The log-probability uses the device's double log where the CPU uses glibc's; both are within
// one double ulp, so the float result is the same unless log(total) lies within 2^-29 relative
// of a float rounding boundary.
#pragma once

#include "infuse/core/config.hpp"

#if !defined(INFUSE_CUDA_COMPILER)
#error "infuse/search/cuda/sample.cuh is CUDA code: include it from a .cu file compiled by nvcc"
#endif

#include <cstddef>
#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <limits>

#include "infuse/core/view.hpp"
#include "infuse/exec/cuda.cuh"
#include "infuse/search/sample.hpp"

namespace infuse::search::detail {

namespace cuda_sample {

inline constexpr int block = 512;
inline constexpr int digits = 256;
inline constexpr int scan_items = 4;  // consecutive tokens per thread in the draw's scan

// The inverse of ordered_key.
__device__ INFUSE_FORCE_INLINE float key_value(std::uint32_t key) {
  const std::uint32_t bits = (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key;
  return __uint_as_float(bits);
}

// A token ranked by (logit descending, id ascending) as one integer, larger = better; -0 counts
// as +0 (they tie as floats). 0 ranks below every token.
__device__ INFUSE_FORCE_INLINE std::uint64_t rank_of(float logit, std::int64_t token) {
  const float canonical = logit == 0.0f ? 0.0f : logit;
  return (std::uint64_t{ordered_key(canonical)} << 32) |
         (0xFFFFFFFFu - static_cast<std::uint32_t>(token));
}
__device__ INFUSE_FORCE_INLINE std::int32_t rank_token(std::uint64_t rank) {
  return static_cast<std::int32_t>(0xFFFFFFFFu - static_cast<std::uint32_t>(rank));
}
__device__ INFUSE_FORCE_INLINE float rank_logit(std::uint64_t rank) {
  return key_value(static_cast<std::uint32_t>(rank >> 32));
}

struct summary {
  std::uint64_t best;      // rank_of the argmax, 0 when no token is allowed
  std::uint32_t allowed;   // allowed tokens
  std::uint32_t nan;       // a NaN among them
};

struct summary_merge {
  __device__ summary operator()(const summary& a, const summary& b) const {
    return {a.best > b.best ? a.best : b.best, a.allowed + b.allowed, a.nan | b.nan};
  }
};
struct max_op {
  __device__ std::uint64_t operator()(std::uint64_t a, std::uint64_t b) const {
    return a > b ? a : b;
  }
};

struct shared_storage {
  union {
    typename cub::BlockReduce<summary, block>::TempStorage summary_reduce;
    typename cub::BlockReduce<std::uint64_t, block>::TempStorage reduce;
    typename cub::BlockScan<std::uint64_t, block>::TempStorage scan;
  } cub;
  std::uint64_t histogram[digits];
  std::uint64_t prefix;  // radix select: the digits chosen so far
  std::uint64_t above;   // radix select: the measure of the items above the prefix
  std::uint64_t value;   // a block-wide result
  std::int64_t chosen;   // the drawn token
};

// One row as the passes see it: its (adjusted) logits and its allowed-token mask (null: all).
struct row_input {
  const float* logits;     // (vocab)
  const std::uint32_t* mask;  // (ceil(vocab / 32)) or null
  std::int64_t vocab;

  __device__ INFUSE_FORCE_INLINE bool allowed(std::int64_t t) const {
    return mask == nullptr || ((mask[t >> 5] >> (t & 31)) & 1u) != 0;
  }
  // visit(token, logit) for each allowed token of this thread's stride.
  template <class Visit>
  __device__ INFUSE_FORCE_INLINE void for_each(Visit&& visit) const {
    for (std::int64_t t = threadIdx.x; t < vocab; t += block) {
      if (allowed(t)) visit(t, logits[t]);
    }
  }
};

__device__ inline std::uint64_t block_sum(shared_storage& s, std::uint64_t value) {
  const std::uint64_t total = cub::BlockReduce<std::uint64_t, block>(s.cub.reduce).Sum(value);
  if (threadIdx.x == 0) s.value = total;
  __syncthreads();
  const std::uint64_t result = s.value;
  __syncthreads();
  return result;
}

__device__ inline std::uint64_t block_max(shared_storage& s, std::uint64_t value) {
  const std::uint64_t best = cub::BlockReduce<std::uint64_t, block>(s.cub.reduce).Reduce(value, max_op{});
  if (threadIdx.x == 0) s.value = best;
  __syncthreads();
  const std::uint64_t result = s.value;
  __syncthreads();
  return result;
}

// Warp 0 picks the digit of one radix pass as the CPU's top_p_threshold does: the largest digit d
// in 255..1 with above + (measure of the digits above d) + histogram[d] >= target, else 0; and
// adds the measure of the digits above the chosen one to s.above.
__device__ inline void pick_digit(shared_storage& s, std::uint64_t target, int shift) {
  if (threadIdx.x >= 32) return;
  const int lane = static_cast<int>(threadIdx.x);
  std::uint64_t local[8];
  std::uint64_t sum = 0;
  for (int i = 0; i < 8; ++i) {
    local[i] = s.histogram[digits - 1 - 8 * lane - i];
    sum += local[i];
  }
  std::uint64_t inclusive = sum;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const std::uint64_t v = __shfl_up_sync(0xFFFFFFFFu, inclusive, offset);
    if (lane >= offset) inclusive += v;
  }
  const std::uint64_t above = s.above;
  const unsigned crossing = __ballot_sync(0xFFFFFFFFu, above + inclusive >= target);
  const std::uint64_t all = __shfl_sync(0xFFFFFFFFu, inclusive, 31);
  if (crossing == 0) {  // only for a target above the total: digit 0, as the CPU's loop ends
    if (lane == 0) s.above = above + all - s.histogram[0];
    return;
  }
  if (lane != __ffs(static_cast<int>(crossing)) - 1) return;
  std::uint64_t running = above + (inclusive - sum);
  for (int i = 0; i < 8; ++i) {
    const int digit = digits - 1 - 8 * lane - i;
    if (digit == 0 || running + local[i] >= target) {
      s.prefix |= std::uint64_t(digit) << shift;
      break;
    }
    running += local[i];
  }
  s.above = running;
}

// The largest v for which the items with value >= v have a total measure >= target, by 8-bit
// digits from `top_shift` down: item(token, logit, value, measure) says whether a token is an
// item and gives its value and measure.
template <class Item>
__device__ std::uint64_t select_from_top(shared_storage& s, const row_input& row, int top_shift,
                                         std::uint64_t target, Item&& item) {
  if (threadIdx.x == 0) {
    s.prefix = 0;
    s.above = 0;
  }
  for (int shift = top_shift; shift >= 0; shift -= 8) {
    for (int d = static_cast<int>(threadIdx.x); d < digits; d += block) s.histogram[d] = 0;
    __syncthreads();
    const std::uint64_t prefix = s.prefix;
    row.for_each([&](std::int64_t t, float logit) {
      std::uint64_t value = 0, measure = 0;
      if (!item(t, logit, value, measure)) return;
      if ((value >> (shift + 8)) != (prefix >> (shift + 8))) return;
      atomicAdd(reinterpret_cast<unsigned long long*>(&s.histogram[(value >> shift) & 255u]),
                static_cast<unsigned long long>(measure));
    });
    __syncthreads();
    pick_digit(s, target, shift);
    __syncthreads();
  }
  const std::uint64_t result = s.prefix;
  __syncthreads();
  return result;
}

// The row's filters, read from device memory (checked) or greedy.
struct row_filters {
  float temperature = 0.0f;
  std::int64_t top_k = 0;
  float top_p = 1.0f;
  float min_p = 0.0f;
  std::uint64_t random = 0;
};

// The request's list [begin, end) of strictly increasing tokens in [0, vocab), checked by the
// block (each thread a stride of it).
template <class Offsets, class Tokens>
__device__ bool list_valid(const Offsets& offsets, const Tokens& tokens, std::int32_t q,
                           std::int64_t vocab, std::int32_t& begin, std::int32_t& end) {
  begin = offsets(q);
  end = offsets(q + 1);
  bool valid = begin >= 0 && begin <= end && end <= tokens.extent(0);
  if (valid) {
    for (std::int64_t j = begin + static_cast<std::int64_t>(threadIdx.x); j < end; j += block) {
      const std::int32_t token = tokens(j);
      if (token < 0 || token >= vocab || (j > begin && token <= tokens(j - 1))) valid = false;
    }
  }
  return valid;
}

template <class Set, bool Greedy>
__global__ void __launch_bounds__(block)
    sample_kernel(view<const float, 2, device_memory> logits, sample_rows<device_memory> rows,
                  sample_params<device_memory, Set> params, sample_outputs<device_memory> out,
                  float* adjusted) {
  __shared__ shared_storage s;
  const std::int64_t r = blockIdx.x;
  const std::int64_t vocab = logits.extent(1);
  const std::int64_t top_n = out.top_tokens.extent(1);
  row_input row{logits.data() + r * logits.stride(0), nullptr, vocab};
  row_filters f;
  bool valid = true;
  std::int32_t q = 0;
  constexpr bool listed = Set::template has<filter::penalties> || Set::template has<filter::logit_bias>;
  std::int32_t p_begin = 0, p_end = 0, b_begin = 0, b_end = 0;
  if constexpr (!Greedy) {
    q = rows.request(r);
    valid = q >= 0 && q < params.seed.extent(0);
    if (valid) {
      f.temperature = 1.0f;
      f.random = sample_bits(params.seed(q), static_cast<std::uint64_t>(rows.position(r)));
      if constexpr (Set::template has<filter::temperature>) {
        f.temperature = params.temperature(q);
        valid = valid && f.temperature >= 0.0f && f.temperature < INFINITY;
      }
      if constexpr (Set::template has<filter::top_k>) f.top_k = max(0, params.top_k(q));
      if constexpr (Set::template has<filter::top_p>) {
        f.top_p = params.top_p(q);
        valid = valid && f.top_p > 0.0f && f.top_p <= 1.0f;
      }
      if constexpr (Set::template has<filter::min_p>) {
        f.min_p = params.min_p(q);
        valid = valid && f.min_p >= 0.0f && f.min_p <= 1.0f;
      }
      if constexpr (Set::template has<filter::token_bitmask>) row.mask = &params.bitmask(q, 0);
      if constexpr (Set::template has<filter::penalties>) {
        const float repetition = params.repetition_penalty(q);
        valid = valid && repetition > 0.0f && repetition < INFINITY &&
                isfinite(params.presence_penalty(q)) && isfinite(params.frequency_penalty(q)) &&
                list_valid(params.penalty_offsets, params.penalty_tokens, q, vocab, p_begin,
                           p_end);
        for (std::int64_t j = p_begin + static_cast<std::int64_t>(threadIdx.x); valid && j < p_end;
             j += block) {
          if (params.penalty_counts(j) < 1) valid = false;
        }
      }
      if constexpr (Set::template has<filter::logit_bias>) {
        valid = valid && list_valid(params.bias_offsets, params.bias_tokens, q, vocab, b_begin,
                                    b_end);
      }
    }
  }
  const auto finish = [&](std::int32_t token, float logprob, row_status status) {
    if (threadIdx.x == 0) {
      out.token(r) = token;
      out.logprob(r) = logprob;
      out.status(r) = status;
    }
  };
  const auto clear_top = [&](std::int64_t from) {
    for (std::int64_t j = from + static_cast<std::int64_t>(threadIdx.x); j < top_n; j += block) {
      out.top_tokens(r, j) = -1;
      out.top_logprobs(r, j) = -INFINITY;
    }
  };
  if (!__syncthreads_and(valid)) {
    finish(0, NAN, row_status::invalid_parameter);
    clear_top(0);
    return;
  }
  if constexpr (listed && !Greedy) {
    // The adjusted row: bias first, then penalties, as the CPU's build_listed.
    float* copy = adjusted + r * vocab;
    for (std::int64_t t = threadIdx.x; t < vocab; t += block) copy[t] = row.logits[t];
    __syncthreads();
    if constexpr (Set::template has<filter::logit_bias>) {
      for (std::int64_t j = b_begin + static_cast<std::int64_t>(threadIdx.x); j < b_end; j += block) {
        copy[params.bias_tokens(j)] += params.bias_values(j);
      }
      __syncthreads();
    }
    if constexpr (Set::template has<filter::penalties>) {
      for (std::int64_t j = p_begin + static_cast<std::int64_t>(threadIdx.x); j < p_end; j += block) {
        float& a = copy[params.penalty_tokens(j)];
        a = penalized(a, params.penalty_counts(j), params.presence_penalty(q),
                      params.frequency_penalty(q), params.repetition_penalty(q));
      }
      __syncthreads();
    }
    row.logits = copy;
  }

  // The maximum, the argmax, NaN, the allowed count.
  summary mine{0, 0, 0};
  row.for_each([&](std::int64_t t, float logit) {
    ++mine.allowed;
    if (logit != logit) {
      mine.nan = 1;
      return;
    }
    const std::uint64_t rank = rank_of(logit, t);
    if (rank > mine.best) mine.best = rank;
  });
  const summary all = cub::BlockReduce<summary, block>(s.cub.summary_reduce).Reduce(mine, summary_merge{});
  __shared__ summary row_summary;
  if (threadIdx.x == 0) row_summary = all;
  __syncthreads();
  const summary sum = row_summary;
  const float max = rank_logit(sum.best);
  const std::int32_t argmax = rank_token(sum.best);
  if (sum.nan != 0) {
    finish(0, NAN, row_status::nan_logits);
    clear_top(0);
    return;
  }
  if (sum.allowed == 0 || sum.best == 0 || max == -INFINITY) {
    finish(0, NAN, row_status::no_token_allowed);
    clear_top(0);
    return;
  }
  if (f.temperature == 0.0f) {
    finish(argmax, 0.0f, row_status::ok);
    if (threadIdx.x == 0 && top_n > 0) {
      out.top_tokens(r, 0) = argmax;
      out.top_logprobs(r, 0) = 0.0f;
    }
    clear_top(1);
    return;
  }

  // top_k: the k-th largest logit (every tie kept, -0 and +0 alike).
  float kth = -INFINITY;
  if (f.top_k > 0 && f.top_k < static_cast<std::int64_t>(sum.allowed)) {
    const std::uint64_t key = select_from_top(
        s, row, 24, static_cast<std::uint64_t>(f.top_k),
        [](std::int64_t, float logit, std::uint64_t& value, std::uint64_t& measure) {
          value = ordered_key(logit);
          measure = 1;
          return true;
        });
    kth = key_value(static_cast<std::uint32_t>(key));
  }
  const float temperature = f.temperature;
  const auto weight_of = [=](float logit) {
    return integer_weight(relative_weight(logit, max, temperature));
  };
  std::uint64_t part = 0;
  row.for_each([&](std::int64_t, float logit) {
    if (logit >= kth) part += weight_of(logit);
  });
  const std::uint64_t total = block_sum(s, part);

  // top_p: the cut among the kept weights.
  std::uint64_t cut = 0;
  if (f.top_p < 1.0f) {
    cut = select_from_top(s, row, 40, top_p_mass(f.top_p, total),
                          [&](std::int64_t, float logit, std::uint64_t& value,
                              std::uint64_t& measure) {
                            if (!(logit >= kth)) return false;
                            value = measure = weight_of(logit);
                            return value > 0;
                          });
  }
  const float min_p = f.min_p;
  const auto final_weight = [&](float logit) -> std::uint64_t {
    if (!(logit >= kth)) return 0;
    const std::uint64_t w = weight_of(logit);
    if (w == 0 || w < cut) return 0;
    if (min_p > 0.0f && relative_weight(logit, max, temperature) < min_p) return 0;
    return w;
  };
  std::uint64_t final_total = total;
  if (f.top_p < 1.0f || f.min_p > 0.0f) {
    part = 0;
    row.for_each([&](std::int64_t, float logit) { part += final_weight(logit); });
    final_total = block_sum(s, part);
  }

  // The draw: the first token in id order whose running sum exceeds the target.
  const std::uint64_t target = scaled_draw(f.random, final_total);
  if (threadIdx.x == 0) s.chosen = -1;
  std::uint64_t carry = 0;
  constexpr std::int64_t tile = std::int64_t{block} * scan_items;
  for (std::int64_t base = 0; base < vocab; base += tile) {
    std::uint64_t w[scan_items];
    std::uint64_t mine_sum = 0;
    const std::int64_t first = base + std::int64_t{threadIdx.x} * scan_items;
    for (int i = 0; i < scan_items; ++i) {
      const std::int64_t t = first + i;
      w[i] = t < vocab && row.allowed(t) ? final_weight(row.logits[t]) : 0;
      mine_sum += w[i];
    }
    std::uint64_t before = 0, aggregate = 0;
    cub::BlockScan<std::uint64_t, block>(s.cub.scan).ExclusiveSum(mine_sum, before, aggregate);
    std::uint64_t running = carry + before;
    for (int i = 0; i < scan_items; ++i) {
      if (w[i] > 0 && running <= target && running + w[i] > target) s.chosen = first + i;
      running += w[i];
    }
    carry += aggregate;
    __syncthreads();
    if (carry > target) break;
  }
  __syncthreads();
  const std::int64_t chosen = s.chosen >= 0 ? s.chosen : argmax;  // found whenever total > 0
  const float log_total = static_cast<float>(log(static_cast<double>(final_total) * 0x1p-40));
  const float chosen_logit = row.logits[chosen];
  const float d = chosen_logit == max ? 0.0f : (chosen_logit - max) / temperature;
  finish(static_cast<std::int32_t>(chosen), d - log_total, row_status::ok);

  // top-n: the best kept token ranked below the previous one, slot by slot.
  std::uint64_t previous = ~std::uint64_t{0};
  float first_logit = max;
  for (std::int64_t j = 0; j < top_n; ++j) {
    std::uint64_t best = 0;
    row.for_each([&](std::int64_t t, float logit) {
      const std::uint64_t rank = rank_of(logit, t);
      if (rank < previous && rank > best && final_weight(logit) > 0) best = rank;
    });
    best = block_max(s, best);
    if (best == 0) {
      clear_top(j);
      break;
    }
    const float logit = rank_logit(best);
    if (j == 0) first_logit = logit;
    if (threadIdx.x == 0) {
      const float dj = logit == first_logit ? 0.0f : (logit - first_logit) / temperature;
      out.top_tokens(r, j) = rank_token(best);
      out.top_logprobs(r, j) = dj - log_total;
    }
    previous = best;
  }
}

}  // namespace cuda_sample

template <>
struct sample_body<exec::cuda> {
  // With penalties or biases: a copy of each row's adjusted logits (floats, any alignment).
  template <class Set>
  static std::int64_t workspace_bytes(const exec::cuda&, std::int64_t rows, std::int64_t vocab) {
    constexpr bool listed =
        Set::template has<filter::penalties> || Set::template has<filter::logit_bias>;
    if (!listed || rows == 0) return 0;
    return rows * vocab * std::int64_t{sizeof(float)} + std::int64_t{alignof(float)};
  }

  template <class Set, class Logits>
  static void sample(const exec::cuda& exec, Logits logits, const sample_rows<device_memory>& rows,
                     const sample_params<device_memory, Set>& params,
                     const sample_outputs<device_memory>& out,
                     const view<std::byte, 1, device_memory>& workspace) {
    float* adjusted = nullptr;
    if (workspace_bytes<Set>(exec, logits.extent(0), logits.extent(1)) > 0) {
      const auto address = reinterpret_cast<std::uintptr_t>(workspace.data());
      const auto skip = (alignof(float) - address % alignof(float)) % alignof(float);
      adjusted = reinterpret_cast<float*>(workspace.data() + skip);
    }
    launch<Set, false>(exec, logits, rows, params, out, adjusted);
  }

  template <class Logits>
  static void greedy(const exec::cuda& exec, Logits logits,
                     const sample_outputs<device_memory>& out) {
    launch<filters<>, true>(exec, logits, {}, {}, out, nullptr);
  }

 private:
  template <class Set, bool Greedy, class Logits>
  static void launch(const exec::cuda& exec, Logits logits, const sample_rows<device_memory>& rows,
                     const sample_params<device_memory, Set>& params,
                     const sample_outputs<device_memory>& out, float* adjusted) {
    const std::int64_t row_count = logits.extent(0);
    require(row_count <= std::int64_t{std::numeric_limits<int>::max()}, sample_call,
            "logits.extent(0)", row_count, "at most 2^31 - 1 rows (one block each)");
    if (row_count == 0) return;
    const view<const float, 2, device_memory> values(logits);
    exec.launch(cuda_sample::sample_kernel<Set, Greedy>, dim3(static_cast<unsigned>(row_count)),
                dim3(cuda_sample::block), 0, values, rows, params, out, adjusted);
  }
};

}  // namespace infuse::search::detail
