// The CPU body of attention::decode (attention/attention.hpp): OpenMP threads, Highway SIMD.
//
// Three passes over the units of work, one unit per (sequence, KV head):
//   1. select: the policy's select() writes the unit's token ranges (checked: clipped to the
//      sequence, ascending, disjoint); the selected tokens are cut into split-KV chunks of
//      attention::split_tokens;
//   2. attend: every chunk, on any thread, walks its ranges page by page in place. Per token it
//      dequantizes the K vector in registers (the same unpacking as the CPU gemv, bit-exact with
//      the scheme's value()) into a small buffer, scores it against every query head of the group
//      (each K and V vector is read once per group), and updates an online softmax per head a
//      tile of tokens at a time; then it adds the weighted V vector to each head's accumulator;
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

// a · b over n floats, n a multiple of 32.
template <int Stored>
INFUSE_FORCE_INLINE float dot(const float* a, const float* b, int n) {
  const float_tag d;
  const int lanes = static_cast<int>(hn::Lanes(d));
  auto s0 = hn::Zero(d);
  auto s1 = hn::Zero(d);
  for (int i = 0; i < dims_or<Stored>(n); i += 2 * lanes) {
    s0 = hn::MulAdd(hn::LoadU(d, a + i), hn::LoadU(d, b + i), s0);
    s1 = hn::MulAdd(hn::LoadU(d, a + i + lanes), hn::LoadU(d, b + i + lanes), s1);
  }
  return hn::GetLane(hn::SumOfLanes(d, hn::Add(s0, s1)));
}

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

// Asks for the cache lines of a record of `bytes` bytes.
INFUSE_FORCE_INLINE void prefetch_record(const std::uint8_t* record, std::int64_t bytes) {
  for (std::int64_t line = 0; line < bytes; line += 64) hwy::Prefetch(record + line);
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

// acc = acc * factor + sum_j weights[j] * v_j over the tile's n V vectors (v_stored apart),
// one register per chunk of acc across the tile.
template <int VStored>
INFUSE_FORCE_INLINE void accumulate_tile(float* acc, float factor, const float* weights,
                                         const float* v, std::int64_t n, int v_stored) {
  const float_tag d;
  const int lanes = static_cast<int>(hn::Lanes(d));
  const int dims = dims_or<VStored>(v_stored);
  for (int c = 0; c < dims; c += lanes) {
    auto a = hn::Mul(hn::Set(d, factor), hn::LoadU(d, acc + c));
    for (std::int64_t j = 0; j < n; ++j) {
      a = hn::MulAdd(hn::Set(d, weights[j]), hn::LoadU(d, v + j * dims + c), a);
    }
    hn::StoreU(a, d, acc + c);
  }
}

// What one thread's scratch holds (floats).
struct thread_scratch {
  float* q;        // (group, k.stored_dim): the group's query, zero past head_dim
  float* scores;   // (group, score_tile)
  float* k;        // (k.stored_dim)
  float* v;        // (score_tile, v.stored_dim): a tile of V vectors
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

// The online softmax of one split-KV chunk: selected tokens [first, last) of the unit, into its
// partial slot (group x (acc[v.stored_dim], max, sum)). Scores in base 2: log2(e) is folded in.
template <int KStored, int VStored, class Cache, class Sparsity>
void attend_chunk(const unit_context<Cache, Sparsity>& u, const sparse::token_range* ranges,
                  std::int64_t count, std::int64_t first, std::int64_t last,
                  const thread_scratch& scratch, float* partial, std::int64_t partial_floats,
                  float* weights, std::int64_t weights_head_stride) {
  const auto& f = u.cache.format;
  const int k_stored = dims_or<KStored>(f.k.stored_dim());
  const int v_stored = dims_or<VStored>(f.v.stored_dim());
  const std::int64_t query = u.length - 1;
  constexpr float log2e = std::numbers::log2e_v<float>;
  for (std::int32_t g = 0; g < u.group; ++g) {
    float* acc = partial + g * partial_floats;
    std::memset(acc, 0, sizeof(float) * static_cast<std::size_t>(v_stored));
    acc[v_stored] = -INFINITY;
    acc[v_stored + 1] = 0.0f;
  }
  const auto tile = [&](std::uint8_t* page, std::int32_t slot, std::int64_t t, std::int64_t n) {
    // The tile's records, requested at once: a head's vectors are a stride apart in nhd pages,
    // where the hardware prefetchers do not follow.
    for (std::int64_t j = 0; j < n; ++j) {
      const std::int32_t at = slot + static_cast<std::int32_t>(j);
      prefetch_record(f.k_codes(page, at, u.kv_head), f.k.code_bytes());
      prefetch_record(f.k_params(page, at, u.kv_head), f.k.param_bytes());
      prefetch_record(f.v_codes(page, at, u.kv_head), f.v.code_bytes());
      prefetch_record(f.v_params(page, at, u.kv_head), f.v.param_bytes());
    }
    // Scores of the tile, every head of the group against each K vector; -inf past n.
    for (std::int64_t j = 0; j < n; ++j) {
      const std::int32_t at = slot + static_cast<std::int32_t>(j);
      dequantize_vector<typename Cache::k_scheme, KStored>(
          f.k, f.k_codes(page, at, u.kv_head), f.k_params(page, at, u.kv_head), scratch.k);
      const bool seen =
          Sparsity::visible(u.sparsity, sparse::mask_context{u.sequence, query, t + j, u.length});
      for (std::int32_t g = 0; g < u.group; ++g) {
        const std::int32_t q_head = u.kv_head * u.group + g;
        const float raw = dot<KStored>(scratch.q + std::int64_t{g} * k_stored, scratch.k, k_stored);
        const float score = seen ? u.transform(raw, q_head, query, t + j) * log2e : -INFINITY;
        scratch.scores[g * score_tile + j] = score;
        if (weights != nullptr) weights[g * weights_head_stride + t + j] = score;
      }
    }
    for (std::int32_t g = 0; g < u.group; ++g) {
      for (std::int64_t j = n; j < score_tile; ++j) scratch.scores[g * score_tile + j] = -INFINITY;
    }
    // The tile's V vectors; a token no head weighs is zeros (its V is never read).
    bool any = false;
    float* factors = scratch.factors;
    for (std::int32_t g = 0; g < u.group; ++g) {
      float* acc = partial + g * partial_floats;
      softmax_state<log_base::two> state{acc[v_stored], acc[v_stored + 1]};
      factors[g] = state.merge({tile_max(scratch.scores + g * score_tile), 0.0f}).previous;
      state.sum += tile_weights(scratch.scores + g * score_tile, state.max);
      acc[v_stored] = state.max;
      acc[v_stored + 1] = state.sum;
      any = any || state.max != -INFINITY;
    }
    if (!any) return;
    for (std::int64_t j = 0; j < n; ++j) {
      const std::int32_t at = slot + static_cast<std::int32_t>(j);
      float* v = scratch.v + j * v_stored;
      bool needed = false;
      for (std::int32_t g = 0; g < u.group; ++g)
        needed |= scratch.scores[g * score_tile + j] != 0.0f;
      if (needed) {
        dequantize_vector<typename Cache::v_scheme, VStored>(f.v, f.v_codes(page, at, u.kv_head),
                                                             f.v_params(page, at, u.kv_head), v);
      } else {
        std::memset(v, 0, sizeof(float) * static_cast<std::size_t>(v_stored));
      }
    }
    for (std::int32_t g = 0; g < u.group; ++g) {
      accumulate_tile<VStored>(partial + g * partial_floats, factors[g],
                               scratch.scores + g * score_tile, scratch.v, n, v_stored);
    }
  };
  for_each_span(ranges, count, first, last, [&](std::int64_t t0, std::int64_t t1) {
    for (std::int64_t t = t0; t < t1;) {
      const kv::token_address at = u.cache.locate(u.sequence, t);
      const std::int64_t run = std::min<std::int64_t>(t1 - t, f.slots - at.slot);
      for (std::int64_t j = 0; j < run; j += score_tile) {
        tile(at.page, at.slot + static_cast<std::int32_t>(j), t + j,
             std::min<std::int64_t>(score_tile, run - j));
      }
      t += run;
    }
  });
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
    s.k = s.scores + std::int64_t{group} * score_tile;
    s.v = s.k + k_stored;
    s.factors = s.v + score_tile * f.v.stored_dim();
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
