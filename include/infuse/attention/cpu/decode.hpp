// The CPU body of attention::decode (attention/attention.hpp): OpenMP threads, Highway SIMD.
//
// Three passes over the units of work, one unit per (sequence, KV head):
//   1. select: the policy's select() writes the unit's token ranges (checked: clipped to the
//      sequence, ascending, disjoint); the selected tokens are cut into split-KV chunks of
//      attention::split_tokens;
//   2. attend: every chunk, on any thread, walks its ranges a tile (up to score_tile tokens of
//      one page) at a time, requesting the next tile's records before reading this one. Scores:
//      a few K vectors at a time against a run of the group's query heads, each chunk of each K
//      vector unpacked in registers (the CPU gemv's unpacking, bit-exact with the scheme's
//      value()) and multiplied by every head of the run, one accumulator per (head, token), all
//      summed across lanes at once; then the score transform (vectorized when it is a scale
//      alone) and an online softmax per head over the tile. V: each chunk of each V vector is
//      unpacked in registers once and added, weighted, to every head's accumulator. Each K and V
//      vector is read from memory once per group;
//   3. merge: the thread that finishes a unit's last chunk merges the unit's chunks as softmax
//      states (max, sum, unnormalised accumulator) and normalises the result into out; the lse
//      and token weights follow from the merged state.
// One parallel region per call (two for policies that rank pages in select()).
// Head dims 64, 96, 128 and 256 (K and V alike) get bodies with a compile-time dim; any other
// dim takes the generic body.
#pragma once

#include <hwy/cache_control.h>
#include <hwy/contrib/math/math-inl.h>
#include <hwy/highway.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <numbers>
#include <span>

#include "infuse/attention/attention.hpp"
#include "infuse/attention/cpu/dequantize.hpp"
#include "infuse/attention/options.hpp"
#include "infuse/core/math.hpp"
#include "infuse/exec/cpu.hpp"
#include "infuse/gemm/cpu/gemv.hpp"
#include "infuse/kv/cache_view.hpp"
#include "infuse/sparse/policy.hpp"

namespace infuse::attention::cpu {

namespace hn = hwy::HWY_NAMESPACE;

namespace detail {

// acc = acc * factor + weight * v over n floats, n a multiple of 32.
template <int Stored>
INFUSE_FORCE_INLINE void scale_add(float* acc, float factor, float weight, const float* v, int n) {
  const float_tag d;
  const int lanes = static_cast<int>(hn::Lanes(d));
  const auto f = hn::Set(d, factor);
  const auto w = hn::Set(d, weight);
  for (int i = 0; i < dims_or<Stored>(n); i += lanes) {
    hn::StoreU(hn::MulAdd(w, hn::LoadU(d, v + i), hn::Mul(f, hn::LoadU(d, acc + i))), d, acc + i);
  }
}

// Asks for the cache lines of n records of `bytes` bytes, the first at `first` and each `stride`
// bytes after the previous: one sweep when they touch (a head's records in hnd pages).
INFUSE_FORCE_INLINE void prefetch_records(const std::uint8_t* first, std::int64_t stride,
                                          std::int64_t n, std::int64_t bytes) {
  if (n == 1 || stride == bytes) {
    for (std::int64_t line = 0; line < n * bytes; line += 64) hwy::Prefetch(first + line);
    return;
  }
  for (std::int64_t j = 0; j < n; ++j) {
    for (std::int64_t line = 0; line < bytes; line += 64) hwy::Prefetch(first + j * stride + line);
  }
}

// The largest of a tile's score_tile scores.
INFUSE_FORCE_INLINE float tile_max(const float* scores) {
  const float_tag d;
  auto m = hn::Set(d, -INFINITY);
  for (std::int64_t j = 0; j < score_tile; j += static_cast<std::int64_t>(hn::Lanes(d))) {
    m = hn::Max(m, hn::LoadU(d, scores + j));
  }
  return hn::GetLane(hn::MaxOfLanes(d, m));
}

// Replaces a tile's base-2 scores by their weights 2^(score - max) (0 for -inf, and all 0 when
// max is -inf) and returns their sum.
INFUSE_FORCE_INLINE float tile_weights(float* scores, float max) {
  const float_tag d;
  if (max == -INFINITY) {
    for (std::int64_t j = 0; j < score_tile; ++j) scores[j] = 0.0f;
    return 0.0f;
  }
  auto sum = hn::Zero(d);
  for (std::int64_t j = 0; j < score_tile; j += static_cast<std::int64_t>(hn::Lanes(d))) {
    const auto s = hn::LoadU(d, scores + j);
    const auto exponent =
        hn::Mul(hn::Sub(s, hn::Set(d, max)), hn::Set(d, std::numbers::ln2_v<float>));
    const auto w = hn::IfThenElseZero(hn::Gt(s, hn::Set(d, -INFINITY)), hn::Exp(d, exponent));
    hn::StoreU(w, d, scores + j);
    sum = hn::Add(sum, w);
  }
  return hn::GetLane(hn::SumOfLanes(d, sum));
}

// A tile's raw dot products of one head as base-2 logits, raw * scale_log2 where visible[j] is
// nonzero and -inf elsewhere: the score transform when it is a scale alone.
INFUSE_FORCE_INLINE void scaled_logits(float* scores, const float* visible, float scale_log2) {
  const float_tag d;
  for (std::int64_t j = 0; j < score_tile; j += static_cast<std::int64_t>(hn::Lanes(d))) {
    const auto s = hn::Mul(hn::LoadU(d, scores + j), hn::Set(d, scale_log2));
    hn::StoreU(
        hn::IfThenElse(hn::Gt(hn::LoadU(d, visible + j), hn::Zero(d)), s, hn::Set(d, -INFINITY)), d,
        scores + j);
  }
}

// Lane r of the result is the sum of the lanes of rows[r], one row per lane: each level adds
// neighbouring lanes of two vectors and concatenates the halves, so the rows keep their order.
template <class D, std::size_t Rows>
INFUSE_FORCE_INLINE hn::Vec<D> sum_rows(D d, hn::Vec<D> (&rows)[Rows]) {
  static_assert(Rows == hn::MaxLanes(D()), "sum_rows takes one row per lane");
#if HWY_TARGET != HWY_SCALAR  // one lane there (nvcc's host pass): nothing to add, no Concat ops
  for (std::size_t n = Rows; n > 1; n /= 2) {
    for (std::size_t i = 0; i < n / 2; ++i) {
      rows[i] = hn::Add(hn::ConcatEven(d, rows[2 * i + 1], rows[2 * i]),
                        hn::ConcatOdd(d, rows[2 * i + 1], rows[2 * i]));
    }
  }
#else
  (void)d;
#endif
  return rows[0];
}

// Float lanes of the registers that unpack scheme S.
template <class S>
inline constexpr int unpack_lanes = static_cast<int>(hn::MaxLanes(gemm::cpu::float_tag<S>()));

// A tile's stored vectors: records of token j of the tile (past the tile's last token, the last
// token's, so that whole register blocks of tokens read valid memory).
struct tile_records {
  const std::uint8_t* codes[score_tile];
  const std::uint8_t* params[score_tile];
};

// Raw scores q_g · k_j of Heads query rows (q_stride floats apart) against the tile's first n K
// vectors, into raw[g * score_tile + j]. Lanes / Heads K vectors at a time: each chunk of each is
// unpacked once in registers and multiplied by every head, one accumulator per (head, token),
// summed across lanes all together at the end.
template <class S, int Stored, int Heads>
INFUSE_FORCE_INLINE void score_heads(const kv::vector_format<S>& f, const tile_records& k,
                                     std::int64_t n, const float* q, int q_stride, float* raw) {
  using tag = gemm::cpu::float_tag<S>;
  const tag d;
  constexpr int lanes = unpack_lanes<S>;
  constexpr int tokens = lanes / Heads;
  static_assert(tokens >= 1 && score_tile % tokens == 0, "whole blocks of tokens per tile");
  const int blocks = dims_or<Stored>(f.stored_dim()) / quant::block_size;
  const int group_dims = S::group > 0 ? S::group : dims_or<Stored>(f.stored_dim());
  for (std::int64_t j0 = 0; j0 < n; j0 += tokens) {
    hn::Vec<tag> acc[lanes];
    for (auto& a : acc) a = hn::Zero(d);
    for (int b = 0; b < blocks; ++b) {
      typename S::params p[tokens];
      const std::uint8_t* block[tokens];
      for (int t = 0; t < tokens; ++t) {
        p[t] = f.group_params(k.params[j0 + t], b * quant::block_size / group_dims);
        block[t] = k.codes[j0 + t] + std::int64_t{b} * S::block_bytes;
      }
      for (int c = 0; c < quant::block_size; c += lanes) {
        hn::Vec<tag> key[tokens];
        for (int t = 0; t < tokens; ++t) {
          key[t] = gemm::cpu::detail::dequantize_chunk<S>(d, block[t], c, p[t]);
        }
        for (int g = 0; g < Heads; ++g) {
          const auto query = hn::LoadU(d, q + g * q_stride + b * quant::block_size + c);
          for (int t = 0; t < tokens; ++t) {
            acc[g * tokens + t] = hn::MulAdd(query, key[t], acc[g * tokens + t]);
          }
        }
      }
    }
    alignas(64) float sums[lanes];
    hn::Store(sum_rows(d, acc), d, sums);
    for (int g = 0; g < Heads; ++g) {
      std::memcpy(raw + g * score_tile + j0, sums + g * tokens, sizeof(float) * tokens);
    }
  }
}

// acc_g = acc_g * factors[g] + sum over the tile's tokens j in needed[0, count) of
// weights[g * score_tile + j] * v_j, for Heads heads (acc rows acc_stride floats apart): each
// chunk of each V vector unpacked once in registers for every head.
template <class S, int Stored, int Heads>
INFUSE_FORCE_INLINE void accumulate_heads(const kv::vector_format<S>& f, const tile_records& v,
                                          const std::int32_t* needed, int count,
                                          const float* weights, const float* factors, float* acc,
                                          std::int64_t acc_stride) {
  using tag = gemm::cpu::float_tag<S>;
  const tag d;
  constexpr int lanes = unpack_lanes<S>;
  const int dims = dims_or<Stored>(f.stored_dim());
  const int group_dims = S::group > 0 ? S::group : dims;
  // Two chunks at a time (both in one block): two independent FMA chains per head.
  for (int at = 0; at < dims; at += 2 * lanes) {
    const int c = at % quant::block_size;
    const std::int64_t block_at = std::int64_t{at / quant::block_size} * S::block_bytes;
    hn::Vec<tag> sum[Heads][2];
    for (int g = 0; g < Heads; ++g) {
      for (int i = 0; i < 2; ++i) {
        sum[g][i] =
            hn::Mul(hn::Set(d, factors[g]), hn::LoadU(d, acc + g * acc_stride + at + i * lanes));
      }
    }
    for (int i = 0; i < count; ++i) {
      const std::int32_t j = needed[i];
      const auto p = f.group_params(v.params[j], at / group_dims);
      const std::uint8_t* block = v.codes[j] + block_at;
      const auto v0 = gemm::cpu::detail::dequantize_chunk<S>(d, block, c, p);
      const auto v1 = gemm::cpu::detail::dequantize_chunk<S>(d, block, c + lanes, p);
      for (int g = 0; g < Heads; ++g) {
        const auto w = hn::Set(d, weights[g * score_tile + j]);
        sum[g][0] = hn::MulAdd(w, v0, sum[g][0]);
        sum[g][1] = hn::MulAdd(w, v1, sum[g][1]);
      }
    }
    for (int g = 0; g < Heads; ++g) {
      for (int i = 0; i < 2; ++i) hn::StoreU(sum[g][i], d, acc + g * acc_stride + at + i * lanes);
    }
  }
}

// Calls pass.template operator()<Heads>(g) for consecutive runs of heads covering [0, group):
// runs of 4, then single heads, none wider than MaxHeads (two run widths keep the instantiations,
// and the compile time, of every head dim and scheme down).
template <int MaxHeads, class Pass>
INFUSE_FORCE_INLINE void for_head_runs(std::int32_t group, Pass&& pass) {
  std::int32_t g = 0;
  const auto runs = [&]<int Heads>() {
    if constexpr (Heads <= MaxHeads) {
      for (; group - g >= Heads; g += Heads) pass.template operator()<Heads>(g);
    }
  };
  runs.template operator()<4>();
  runs.template operator()<1>();
}

// What one thread's scratch holds (floats).
struct thread_scratch {
  float* q;        // (group, k.stored_dim): the group's query, zero past head_dim
  float* scores;   // (group, score_tile)
  float* factors;  // (group): each head's rescale factor for the tile
  float* select;   // the policy's scratch
  std::int64_t select_floats;
};

// The pieces of the workspace, typed.
struct workspace_parts {
  sparse::token_range* ranges;
  std::int64_t* range_offsets;
  std::int64_t* range_counts;
  std::int64_t* chunk_offsets;
  std::int64_t* item_offsets;
  std::int64_t* chunks_done;
  float* partials;
  float* thread_floats;

  workspace_parts(std::span<std::byte> workspace, const decode_workspace_layout& plan) {
    auto* base = reinterpret_cast<std::byte*>(kv::round_up(
        static_cast<std::int64_t>(reinterpret_cast<std::uintptr_t>(workspace.data())), 64));
    ranges = reinterpret_cast<sparse::token_range*>(base + plan.ranges_at);
    range_offsets = reinterpret_cast<std::int64_t*>(base + plan.range_offsets_at);
    range_counts = reinterpret_cast<std::int64_t*>(base + plan.range_counts_at);
    chunk_offsets = reinterpret_cast<std::int64_t*>(base + plan.chunk_offsets_at);
    item_offsets = reinterpret_cast<std::int64_t*>(base + plan.item_offsets_at);
    chunks_done = reinterpret_cast<std::int64_t*>(base + plan.chunks_done_at);
    partials = reinterpret_cast<float*>(base + plan.partials_at);
    thread_floats = reinterpret_cast<float*>(base + plan.thread_scratch_at);
  }
};

// Clips a policy's ranges to [0, length), drops empty ones and any that do not come after the
// previous one: what the kernel walks is always inside the sequence. Returns the new count.
inline std::int64_t sanitize_ranges(sparse::token_range* ranges, std::int64_t count,
                                    std::int64_t length) {
  std::int64_t kept = 0;
  std::int64_t floor = 0;
  for (std::int64_t i = 0; i < count; ++i) {
    const std::int64_t begin = std::max(ranges[i].begin, floor);
    const std::int64_t end = std::min(ranges[i].end, length);
    if (begin >= end) continue;
    ranges[kept++] = {begin, end};
    floor = end;
  }
  return kept;
}

inline std::int64_t selected_tokens(const sparse::token_range* ranges, std::int64_t count) {
  std::int64_t total = 0;
  for (std::int64_t i = 0; i < count; ++i) total += ranges[i].end - ranges[i].begin;
  return total;
}

// Calls visit(t0, t1) for the spans of selected tokens [first, last) (indices into the
// concatenation of the ranges).
template <class Visit>
void for_each_span(const sparse::token_range* ranges, std::int64_t count, std::int64_t first,
                   std::int64_t last, Visit&& visit) {
  std::int64_t skip = first;
  std::int64_t remaining = last - first;
  for (std::int64_t r = 0; r < count && remaining > 0; ++r) {
    const std::int64_t length = ranges[r].end - ranges[r].begin;
    if (skip >= length) {
      skip -= length;
      continue;
    }
    const std::int64_t t0 = ranges[r].begin + skip;
    const std::int64_t t1 = std::min(ranges[r].end, t0 + remaining);
    skip = 0;
    remaining -= t1 - t0;
    visit(t0, t1);
  }
}

// One unit's view of the call.
template <class Cache, class Sparsity>
struct unit_context {
  const Cache& cache;
  const typename Sparsity::params& sparsity;
  score_transform transform;
  std::int32_t sequence;
  std::int32_t kv_head;
  std::int32_t group;
  std::int64_t length;
};

// Tiles whose records are requested ahead of the one being read.
inline constexpr std::int64_t prefetch_tiles = 2;

// Calls visit(page, slot, t, n) for the tiles of selected tokens [first, last) of sequence s:
// runs of at most score_tile tokens t..t+n-1 in slots slot.. of one page.
template <class Cache, class Visit>
void for_each_tile(const Cache& cache, std::int32_t s, const sparse::token_range* ranges,
                   std::int64_t count, std::int64_t first, std::int64_t last, Visit&& visit) {
  for_each_span(ranges, count, first, last, [&](std::int64_t t0, std::int64_t t1) {
    for (std::int64_t t = t0; t < t1;) {
      const kv::token_address at = cache.locate(s, t);
      const std::int64_t run = std::min<std::int64_t>(t1 - t, cache.format.slots - at.slot);
      for (std::int64_t j = 0; j < run; j += score_tile) {
        visit(at.page, at.slot + static_cast<std::int32_t>(j), t + j,
              std::min<std::int64_t>(score_tile, run - j));
      }
      t += run;
    }
  });
}

// The online softmax of one split-KV chunk: selected tokens [first, last) of the unit, into its
// partial slot (group x (acc[v.stored_dim], max, sum)). Scores in base 2: log2(e) is folded in.
// Tile by tile: the next tile's records are requested before this one is read (pages lie
// anywhere: the hardware prefetchers do not follow the walk).
template <int KStored, int VStored, class Cache, class Sparsity>
void attend_chunk(const unit_context<Cache, Sparsity>& u, const sparse::token_range* ranges,
                  std::int64_t count, std::int64_t first, std::int64_t last,
                  const thread_scratch& scratch, float* partial, std::int64_t partial_floats,
                  float* weights, std::int64_t weights_head_stride) {
  using k_scheme = typename Cache::k_scheme;
  using v_scheme = typename Cache::v_scheme;
  const auto& f = u.cache.format;
  const int k_stored = dims_or<KStored>(f.k.stored_dim());
  const int v_stored = dims_or<VStored>(f.v.stored_dim());
  const std::int64_t query = u.length - 1;
  constexpr float log2e = std::numbers::log2e_v<float>;
  const bool scale_only = u.transform.soft_cap == 0.0f && u.transform.alibi_slopes == nullptr;
  const float scale_log2 = u.transform.scale * log2e;
  for (std::int32_t g = 0; g < u.group; ++g) {
    float* acc = partial + g * partial_floats;
    std::memset(acc, 0, sizeof(float) * static_cast<std::size_t>(v_stored));
    acc[v_stored] = -INFINITY;
    acc[v_stored + 1] = 0.0f;
  }
  const auto prefetch_tile = [&](const std::uint8_t* page, std::int32_t slot, std::int64_t n) {
    const auto records = [&](auto&& at, std::int64_t bytes) {
      if (bytes == 0) return;
      const std::uint8_t* first_record = at(slot);
      prefetch_records(first_record, n > 1 ? at(slot + 1) - first_record : bytes, n, bytes);
    };
    records([&](std::int32_t i) { return f.k_codes(page, i, u.kv_head); }, f.k.code_bytes());
    records([&](std::int32_t i) { return f.k_params(page, i, u.kv_head); }, f.k.param_bytes());
    records([&](std::int32_t i) { return f.v_codes(page, i, u.kv_head); }, f.v.code_bytes());
    records([&](std::int32_t i) { return f.v_params(page, i, u.kv_head); }, f.v.param_bytes());
  };
  const auto tile = [&](std::uint8_t* page, std::int32_t slot, std::int64_t t, std::int64_t n) {
    tile_records k;
    tile_records v;
    for (std::int64_t j = 0; j < score_tile; ++j) {
      const auto at = slot + static_cast<std::int32_t>(std::min(j, n - 1));
      k.codes[j] = f.k_codes(page, at, u.kv_head);
      k.params[j] = f.k_params(page, at, u.kv_head);
      v.codes[j] = f.v_codes(page, at, u.kv_head);
      v.params[j] = f.v_params(page, at, u.kv_head);
    }
    // Raw scores, every head of the group against each K vector.
    float* scores = scratch.scores;
    for_head_runs<unpack_lanes<k_scheme>>(u.group, [&]<int Heads>(std::int32_t g) {
      score_heads<k_scheme, KStored, Heads>(f.k, k, n, scratch.q + std::int64_t{g} * k_stored,
                                            k_stored, scores + g * score_tile);
    });
    // Logits (-inf for tokens not visible, and past n) and each head's online softmax.
    alignas(64) float visible[score_tile];
    for (std::int64_t j = 0; j < score_tile; ++j) {
      visible[j] = j < n && Sparsity::visible(u.sparsity, sparse::mask_context{u.sequence, query,
                                                                               t + j, u.length})
                       ? 1.0f
                       : 0.0f;
    }
    bool any = false;
    float* factors = scratch.factors;
    for (std::int32_t g = 0; g < u.group; ++g) {
      float* s = scores + g * score_tile;
      if (scale_only) {
        scaled_logits(s, visible, scale_log2);
      } else {
        const std::int32_t q_head = u.kv_head * u.group + g;
        for (std::int64_t j = 0; j < score_tile; ++j) {
          s[j] = visible[j] != 0.0f ? u.transform(s[j], q_head, query, t + j) * log2e : -INFINITY;
        }
      }
      if (weights != nullptr) {
        std::memcpy(weights + g * weights_head_stride + t, s,
                    sizeof(float) * static_cast<std::size_t>(n));
      }
      float* acc = partial + g * partial_floats;
      softmax_state<log_base::two> state{acc[v_stored], acc[v_stored + 1]};
      factors[g] = state.merge({tile_max(s), 0.0f}).previous;
      state.sum += tile_weights(s, state.max);
      acc[v_stored] = state.max;
      acc[v_stored + 1] = state.sum;
      any = any || state.max != -INFINITY;
    }
    if (!any) return;
    // The weighted V vectors; a token no head weighs is skipped (its V is never read).
    std::int32_t needed[score_tile];
    int needed_count = 0;
    for (std::int32_t j = 0; j < n; ++j) {
      bool weighed = false;
      for (std::int32_t g = 0; g < u.group; ++g) weighed |= scores[g * score_tile + j] != 0.0f;
      if (weighed) needed[needed_count++] = j;
    }
    for_head_runs<4>(u.group, [&]<int Heads>(std::int32_t g) {
      accumulate_heads<v_scheme, VStored, Heads>(f.v, v, needed, needed_count,
                                                 scores + g * score_tile, factors + g,
                                                 partial + g * partial_floats, partial_floats);
    });
  };
  // Each tile is requested prefetch_tiles tiles before it is read.
  struct tile_place {
    std::uint8_t* page;
    std::int32_t slot;
    std::int64_t t;
    std::int64_t n;
  };
  tile_place pending[prefetch_tiles];
  std::int64_t requested = 0;
  const auto read = [&](const tile_place& p) { tile(p.page, p.slot, p.t, p.n); };
  for_each_tile(u.cache, u.sequence, ranges, count, first, last,
                [&](std::uint8_t* page, std::int32_t slot, std::int64_t t, std::int64_t n) {
                  prefetch_tile(page, slot, n);
                  tile_place& place = pending[requested % prefetch_tiles];
                  if (requested >= prefetch_tiles) read(place);
                  place = {page, slot, t, n};
                  ++requested;
                });
  for (std::int64_t i = std::max<std::int64_t>(0, requested - prefetch_tiles); i < requested; ++i) {
    read(pending[i % prefetch_tiles]);
  }
}

}  // namespace detail

// The decode body for Layout, schemes and policy; KStored and VStored are the padded head dims when
// known at compile time (0: read them from the cache's format).
template <int KStored, int VStored, class Layout, class KQuant, class VQuant, class Sparsity,
          class... Optional>
void decode(const exec::cpu& exec, host_view<const float, 3> q,
            const kv::cache_view<Layout, KQuant, VQuant>& cache, host_view<float, 3> out,
            const typename Sparsity::params& sparsity, const options& opt,
            std::span<std::byte> workspace, const decode_workspace_layout& plan,
            const Optional&... outputs) {
  using cache_type = kv::cache_view<Layout, KQuant, VQuant>;
  using infuse::attention::detail::find_output;
  using infuse::attention::detail::has_output;
  constexpr bool want_lse = has_output<lse_output, Optional...>;
  constexpr bool want_weights = has_output<token_weights, Optional...>;
  constexpr bool want_mass = has_output<accumulate_mass, Optional...>;
  const auto& f = cache.format;
  const std::int32_t kv_heads = f.k.heads;
  const std::int32_t group = static_cast<std::int32_t>(q.extent(1) / kv_heads);
  const std::int32_t head_dim = f.k.head_dim;
  const int k_stored = f.k.stored_dim();
  const std::int64_t units = std::int64_t{cache.sequences()} * kv_heads;
  const detail::workspace_parts parts(workspace, plan);
  const score_transform transform = score_transform::from(opt, head_dim);
  const host_view<float, 3> weights = find_output<token_weights>(outputs...).weights;

  const auto scratch_of = [&](int thread) {
    float* base = parts.thread_floats + std::int64_t{thread} * plan.scratch_floats;
    detail::thread_scratch s{};
    s.q = base;
    s.scores = s.q + std::int64_t{group} * k_stored;
    s.factors = s.scores + std::int64_t{group} * score_tile;
    s.select = s.factors + kv::round_up(group, 16);
    s.select_floats = plan.select_scratch_floats;
    return s;
  };
  // The group's query rows, `stride` floats apart, zero past head_dim.
  const auto load_query = [&](float* to, std::int64_t stride, std::int32_t s, std::int32_t h) {
    for (std::int32_t g = 0; g < group; ++g) {
      float* row = to + g * stride;
      for (std::int32_t d = 0; d < head_dim; ++d) row[d] = q(s, h * group + g, d);
      for (std::int64_t d = head_dim; d < stride; ++d) row[d] = 0.0f;
    }
  };

  // Range and partial-slot offsets: bounds from the lengths, known before any select().
  parts.range_offsets[0] = 0;
  parts.chunk_offsets[0] = 0;
  for (std::int64_t u = 0; u < units; ++u) {
    const auto s = static_cast<std::int32_t>(u / kv_heads);
    const std::int64_t length = cache.length(s);
    sparse::query_context c{};
    c.sequence = s;
    c.kv_head = static_cast<std::int32_t>(u % kv_heads);
    c.length = length;
    c.query_begin = length - 1;
    c.query_end = length;
    c.new_begin = length;
    c.group = group;
    c.head_dim = head_dim;
    c.page_size = f.slots;
    c.kv_heads = kv_heads;
    parts.range_offsets[u + 1] =
        parts.range_offsets[u] + std::max<std::int64_t>(0, Sparsity::max_ranges(sparsity, c));
    parts.chunk_offsets[u + 1] =
        parts.chunk_offsets[u] + (length + split_tokens - 1) / split_tokens;
  }

  // 1. select.
  const auto select_units = [&](int thread, std::int64_t begin, std::int64_t end) {
    const detail::thread_scratch scratch = scratch_of(thread);
    for (std::int64_t u = begin; u < end; ++u) {
      const auto s = static_cast<std::int32_t>(u / kv_heads);
      const auto h = static_cast<std::int32_t>(u % kv_heads);
      const std::int64_t length = cache.length(s);
      load_query(scratch.q, head_dim, s, h);
      sparse::query_context c = decode_query_context(cache, s, h, group, transform.scale, &s);
      c.q = scratch.q;
      c.scratch = scratch.select;
      c.scratch_floats = scratch.select_floats;
      sparse::token_range* ranges = parts.ranges + parts.range_offsets[u];
      const std::int64_t room = parts.range_offsets[u + 1] - parts.range_offsets[u];
      const std::int64_t count =
          length == 0 || room == 0 ? 0 : Sparsity::select(sparsity, c, ranges);
      parts.range_counts[u] =
          detail::sanitize_ranges(ranges, std::clamp<std::int64_t>(count, 0, room), length);
      if constexpr (want_weights) {
        for (std::int32_t g = 0; g < group; ++g) {
          std::fill_n(&weights(s, h * group + g, 0), weights.extent(2), 0.0f);
        }
      }
    }
  };
  // A policy that ranks pages does real work per unit: spread it over the threads. The others
  // write a few ranges, cheaper than waking a thread.
  if constexpr (infuse::attention::detail::scratch_floats_per_page<Sparsity>() > 0) {
    exec.parallel_for_ranges(units, select_units);
  } else {
    select_units(0, 0, units);
  }
  parts.item_offsets[0] = 0;
  for (std::int64_t u = 0; u < units; ++u) {
    const std::int64_t selected =
        detail::selected_tokens(parts.ranges + parts.range_offsets[u], parts.range_counts[u]);
    parts.item_offsets[u + 1] =
        parts.item_offsets[u] + (selected + split_tokens - 1) / split_tokens;
  }
  const std::int64_t items = parts.item_offsets[units];
  const std::int64_t group_floats = std::int64_t{group} * plan.partial_floats;

  // 3. merges the chunks of unit u, normalises, and turns stored scores into weights: run by the
  // thread that finishes the unit's last chunk.
  const int v_stored = f.v.stored_dim();
  const auto merge_unit = [&](std::int64_t u) {
    const auto s = static_cast<std::int32_t>(u / kv_heads);
    const auto h = static_cast<std::int32_t>(u % kv_heads);
    const std::int64_t chunks = parts.item_offsets[u + 1] - parts.item_offsets[u];
    float* first = parts.partials + parts.chunk_offsets[u] * group_floats;
    for (std::int32_t g = 0; g < group; ++g) {
      float* acc = first + g * plan.partial_floats;
      softmax_state<log_base::two> state{acc[v_stored], acc[v_stored + 1]};
      if (chunks == 0) state = {};
      for (std::int64_t c = 1; c < chunks; ++c) {
        const float* other = acc + c * group_floats;
        const softmax_rescale factors = state.merge({other[v_stored], other[v_stored + 1]});
        if (factors.incoming == 0.0f) {
          if (factors.previous != 1.0f)
            detail::scale_add<VStored>(acc, factors.previous, 0.0f, acc, v_stored);
          continue;
        }
        detail::scale_add<VStored>(acc, factors.previous, factors.incoming, other, v_stored);
      }
      const float inverse = state.inverse_sum();
      const std::int32_t q_head = h * group + g;
      for (std::int32_t d = 0; d < f.v.head_dim; ++d) {
        out(s, q_head, d) = chunks == 0 ? 0.0f : acc[d] * inverse;
      }
      if constexpr (want_lse)
        find_output<lse_output>(outputs...).lse(s, q_head) = state.natural_lse();
      if constexpr (want_weights) {
        const float lse2 = state.lse();
        float* row = &weights(s, q_head, 0);
        detail::for_each_span(parts.ranges + parts.range_offsets[u], parts.range_counts[u], 0,
                              cache.length(s), [&](std::int64_t t0, std::int64_t t1) {
                                for (std::int64_t t = t0; t < t1; ++t) {
                                  row[t] = fast_exp2(row[t] - lse2);
                                }
                              });
      }
    }
  };

  // Units without a chunk (nothing selected) are done now.
  for (std::int64_t u = 0; u < units; ++u) {
    parts.chunks_done[u] = 0;
    if (parts.item_offsets[u + 1] == parts.item_offsets[u]) merge_unit(u);
  }

  // 2. attend, chunk by chunk; the last chunk of a unit to finish merges it (acquire-release:
  // it sees every other chunk's partial).
  exec.parallel_for_ranges(items, [&](int thread, std::int64_t begin, std::int64_t end) {
    const detail::thread_scratch scratch = scratch_of(thread);
    std::int64_t u = std::upper_bound(parts.item_offsets, parts.item_offsets + units + 1, begin) -
                     parts.item_offsets - 1;
    std::int64_t loaded = -1;
    for (std::int64_t item = begin; item < end; ++item) {
      while (item >= parts.item_offsets[u + 1]) ++u;
      const auto s = static_cast<std::int32_t>(u / kv_heads);
      const auto h = static_cast<std::int32_t>(u % kv_heads);
      if (loaded != u) {
        load_query(scratch.q, k_stored, s, h);
        loaded = u;
      }
      const std::int64_t chunk = item - parts.item_offsets[u];
      const sparse::token_range* ranges = parts.ranges + parts.range_offsets[u];
      const std::int64_t count = parts.range_counts[u];
      const std::int64_t selected = detail::selected_tokens(ranges, count);
      const detail::unit_context<cache_type, Sparsity> unit{cache, sparsity, transform,      s,
                                                            h,     group,    cache.length(s)};
      float* weights_row = nullptr;
      if constexpr (want_weights) weights_row = &weights(s, h * group, 0);
      detail::attend_chunk<KStored, VStored>(
          unit, ranges, count, chunk * split_tokens, std::min(selected, (chunk + 1) * split_tokens),
          scratch, parts.partials + (parts.chunk_offsets[u] + chunk) * group_floats,
          plan.partial_floats, weights_row, want_weights ? weights.stride(1) : 0);
      const std::int64_t chunks = parts.item_offsets[u + 1] - parts.item_offsets[u];
      if (std::atomic_ref<std::int64_t>(parts.chunks_done[u])
                  .fetch_add(1, std::memory_order_acq_rel) +
              1 ==
          chunks) {
        merge_unit(u);
      }
    }
  });

  // Sequences may share pages (a forked prefix): the mass is summed on one thread.
  if constexpr (want_mass) {
    for (std::int64_t u = 0; u < units; ++u) {
      const auto s = static_cast<std::int32_t>(u / kv_heads);
      const auto h = static_cast<std::int32_t>(u % kv_heads);
      detail::for_each_span(
          parts.ranges + parts.range_offsets[u], parts.range_counts[u], 0, cache.length(s),
          [&](std::int64_t t0, std::int64_t t1) {
            for (std::int64_t t = t0; t < t1; ++t) {
              const kv::token_location at = cache.table.locate(s, t);
              float sum = 0.0f;
              for (std::int32_t g = 0; g < group; ++g) sum += weights(s, h * group + g, t);
              cache.mass[(std::int64_t{at.page} * f.slots + at.slot) * kv_heads + h] += sum;
            }
          });
    }
  }
}

}  // namespace infuse::attention::cpu

namespace infuse::attention::detail {

template <>
struct decode_body<exec::cpu> {
  template <class Layout, class KQuant, class VQuant, class Sparsity, class... Optional>
  static void run(const exec::cpu& exec, host_view<const float, 3> q,
                  const kv::cache_view<Layout, KQuant, VQuant>& cache, host_view<float, 3> out,
                  const typename Sparsity::params& sparsity, const options& opt,
                  std::span<std::byte> workspace, const decode_workspace_layout& plan,
                  const Optional&... outputs) {
    const auto body = [&]<int Stored>() {
      cpu::decode<Stored, Stored, Layout, KQuant, VQuant, Sparsity>(
          exec, q, cache, out, sparsity, opt, workspace, plan, outputs...);
    };
    const int dim = cache.format.k.head_dim;
    if (dim != cache.format.v.head_dim) return body.template operator()<0>();
    switch (dim) {
      case 64:
        return body.template operator()<64>();
      case 96:
        return body.template operator()<96>();
      case 128:
        return body.template operator()<128>();
      case 256:
        return body.template operator()<256>();
      default:
        return body.template operator()<0>();
    }
  }
};

}  // namespace infuse::attention::detail
