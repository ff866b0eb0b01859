// The CUDA body of decode attention, the same function as the CPU body
// (attention/cpu/decode.hpp) up to the order of float sums. Two entries:
//
//   attention<Layout, K, V, Sparsity>::decode(exec, q, cache, out, sparsity, opt, workspace,
//                                             outputs...)
//     the public call on exec::cuda (attention/attention.hpp): cache is an attention::device_cache,
//     checked on the host with its host table, which also gives the longest sequence; outputs
//     device_lse_output, device_token_weights and accumulate_mass, as on the CPU. This file
//     specializes its planner and body for exec::cuda.
//
//   attention::cuda::decode<Layout, K, V, Sparsity>(exec, q, cache, out, sparsity, opt, workspace,
//                                                   max_length, lse)
//     the device cache_view alone, for callers that keep no host table (a captured CUDA graph):
//     the caller gives max_length, at least the longest sequence of the batch (the workspace,
//     attention::cuda::decode_workspace_bytes(exec, q_heads, cache, sparsity, max_length) bytes,
//     is sized from it); tokens past max_length are not read. lse (batch, q_heads) is optional
//     (an empty view writes none).
//
// q, out, the outputs, the workspace, the cache and options.alibi_slopes are device memory.
//
// Three launches on the exec's stream:
//   1. select: one thread per unit (sequence, KV head) runs the policy's select() into the
//      workspace (the group's query rows and the policy's scratch beside it), clips the ranges
//      to the sequence as the CPU body does, and counts the selected tokens;
//   2. attend: a CTA per (unit, split-KV chunk of plan.split selected tokens, pass of up to
//      Rows heads of the group) walks its chunk: each key and value record is read once for all
//      the heads of the pass; the chunk's (acc, max, sum) per head goes to the workspace. Stored
//      dims up to 256 in schemes whose 16-byte slices hold whole dims (quant::none, fp8, 8- and
//      4-bit int_) take the sliced walk (attention/cuda/decode_walk.cuh: lanes over the head dim,
//      16-byte loads, 4 heads a pass for groups up to 4, else lane_map's rows, 2 to 8); every
//      other cache takes attend.cuh's walk, rows_for<Bound> heads a pass;
//   3. merge: a warp per (sequence, query head) merges the unit's chunks as softmax states and
//      writes out = acc / sum and the natural lse. No chunk (an empty selection): out 0, lse -inf.
// token_weights: the walk stores each visited token's base-2 score in the weights row, and the
// merge turns it into the weight 2^(score - lse) (0 for every token not selected), adding it to
// cache.mass when asked.
#pragma once

#include "infuse/core/config.hpp"

#if !defined(INFUSE_CUDA_COMPILER)
#error "infuse/attention/cuda/decode.cuh is CUDA code: include it from a .cu file compiled by nvcc"
#endif

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "infuse/attention/attention.hpp"
#include "infuse/attention/cuda/attend.cuh"
#include "infuse/attention/cuda/decode_walk.cuh"
#include "infuse/attention/options.hpp"
#include "infuse/core/error.hpp"
#include "infuse/core/math.hpp"
#include "infuse/core/view.hpp"
#include "infuse/exec/cuda.cuh"
#include "infuse/kv/cache_view.hpp"
#include "infuse/sparse/policy.hpp"

namespace infuse::attention::cuda {

// Selected tokens of one split-KV chunk, a CTA's work: split_tokens for a batch of at least
// split_full_units units, halved (down to min_split_tokens) while units * (split_tokens / split)
// stays below it: a small batch fills the device with shorter chunks, a large one spreads a CTA's
// fixed costs over more tokens. The units alone decide (below max_chunks * min_split_tokens
// tokens, where the chunks would pass the grid's limit), so that a longer max_length does not plan
// a smaller workspace.
inline constexpr std::int64_t split_tokens = 256;
inline constexpr std::int64_t min_split_tokens = 64;
inline constexpr std::int64_t split_full_units = 128;
inline constexpr std::int64_t max_chunks = 65535;  // a grid's y extent

// Where each part of the workspace lies (byte offsets from its 256-byte aligned start).
struct decode_plan {
  std::int64_t room = 0;    // token ranges per unit
  std::int64_t split = 0;   // selected tokens of a split-KV chunk
  std::int64_t chunks = 0;  // split-KV chunks per unit, at most
  std::int64_t group = 0;
  std::int64_t scratch_floats = 0;  // the policy's scratch per unit
  std::int64_t partial_floats = 0;  // v.stored_dim() + 2: acc, max, sum
  std::int64_t ranges_at = 0;       // token_range (units, room)
  std::int64_t counts_at = 0;       // int64 (units): ranges kept
  std::int64_t selected_at = 0;     // int64 (units): selected tokens
  std::int64_t queries_at = 0;      // float (units, group, head_dim): select()'s query rows
  std::int64_t scratch_at = 0;      // float (units, scratch_floats)
  std::int64_t partials_at = 0;     // float (units, chunks, group, partial_floats)
  std::int64_t bytes = 0;
};

template <class Layout, class KQuant, class VQuant, class Sparsity>
decode_plan plan_decode(std::int64_t q_heads,
                        const kv::cache_view<Layout, KQuant, VQuant, device_memory>& cache,
                        const typename Sparsity::params& sparsity, std::int64_t max_length) {
  const auto& f = cache.format;
  const std::int64_t units = std::int64_t{cache.sequences()} * f.k.heads;
  decode_plan p;
  p.group = q_heads / f.k.heads;
  // The policy's ranges for the longest sequence bound every shorter one's (the shipped
  // policies' max_ranges grow with the length).
  sparse::query_context longest{};
  longest.length = max_length;
  longest.query_begin = max_length - 1;
  longest.query_end = max_length;
  longest.new_begin = max_length;
  longest.group = static_cast<std::int32_t>(p.group);
  longest.head_dim = f.k.head_dim;
  longest.page_size = f.slots;
  longest.kv_heads = f.k.heads;
  p.room = std::max<std::int64_t>(1, Sparsity::max_ranges(sparsity, longest));
  const auto chunks_of = [&](std::int64_t split) {
    return std::max<std::int64_t>(1, (max_length + split - 1) / split);
  };
  p.split = split_tokens;
  while (p.split > min_split_tokens && units * (split_tokens / p.split) < split_full_units &&
         chunks_of(p.split / 2) <= max_chunks) {
    p.split /= 2;
  }
  p.chunks = chunks_of(p.split);
  const std::int64_t pages = (max_length + f.slots - 1) / f.slots;
  p.scratch_floats = infuse::attention::detail::scratch_floats_per_page<Sparsity>() * pages;
  p.partial_floats = f.v.stored_dim() + 2;
  const auto align = [](std::int64_t n) { return kv::round_up(n, 256); };
  p.ranges_at = 0;
  p.counts_at = align(p.ranges_at + units * p.room * std::int64_t{sizeof(sparse::token_range)});
  p.selected_at = align(p.counts_at + units * 8);
  p.queries_at = align(p.selected_at + units * 8);
  p.scratch_at = align(p.queries_at + units * p.group * f.k.head_dim * 4);
  p.partials_at = align(p.scratch_at + units * p.scratch_floats * 4);
  // 256 bytes of slack: the call aligns the start of the caller's buffer itself.
  p.bytes = p.partials_at + units * p.chunks * p.group * p.partial_floats * 4 + 256;
  return p;
}

namespace detail {

// The workspace's parts, typed.
struct decode_parts {
  sparse::token_range* ranges;
  std::int64_t* counts;
  std::int64_t* selected;
  float* queries;
  float* scratch;
  float* partials;

  decode_parts(std::span<std::byte> workspace, const decode_plan& plan) {
    auto* base = reinterpret_cast<std::byte*>(kv::round_up(
        static_cast<std::int64_t>(reinterpret_cast<std::uintptr_t>(workspace.data())), 256));
    ranges = reinterpret_cast<sparse::token_range*>(base + plan.ranges_at);
    counts = reinterpret_cast<std::int64_t*>(base + plan.counts_at);
    selected = reinterpret_cast<std::int64_t*>(base + plan.selected_at);
    queries = reinterpret_cast<float*>(base + plan.queries_at);
    scratch = reinterpret_cast<float*>(base + plan.scratch_at);
    partials = reinterpret_cast<float*>(base + plan.partials_at);
  }
};

// 1. The policy's selection of every unit, one thread each.
template <class Layout, class K, class V, class Sparsity>
__global__ void __launch_bounds__(threads_per_cta)
    decode_select_kernel(kv::cache_view<Layout, K, V, device_memory> cache,
                         view<const float, 3, device_memory> q, typename Sparsity::params sparsity,
                         float scale, decode_plan plan, decode_parts parts) {
  const std::int64_t unit = std::int64_t{blockIdx.x} * threads_per_cta + threadIdx.x;
  const std::int32_t kv_heads = cache.format.k.heads;
  if (unit >= std::int64_t{cache.sequences()} * kv_heads) return;
  const auto s = static_cast<std::int32_t>(unit / kv_heads);
  const auto h = static_cast<std::int32_t>(unit % kv_heads);
  const auto group = static_cast<std::int32_t>(plan.group);
  const std::int32_t head_dim = cache.format.k.head_dim;
  float* rows = parts.queries + unit * group * head_dim;
  for (std::int32_t g = 0; g < group; ++g) {
    for (std::int32_t d = 0; d < head_dim; ++d) rows[g * head_dim + d] = q(s, h * group + g, d);
  }
  const std::int64_t length = cache.length(s);
  const std::int32_t run = s;  // the contiguous layout's one "page" of the sequence
  sparse::query_context c{};
  c.sequence = s;
  c.kv_head = h;
  c.length = length;
  c.query_begin = length - 1;
  c.query_end = length;
  c.new_begin = length;
  c.q = rows;
  c.group = group;
  c.head_dim = head_dim;
  c.scale = scale;
  c.page_size = cache.format.slots;
  if constexpr (Layout::is_paged) {
    c.pages = cache.table.indices + cache.table.indptr[s];
  } else {
    c.pages = &run;
  }
  c.kv_heads = kv_heads;
  c.key_min = cache.key_min;
  c.key_max = cache.key_max;
  c.mass = cache.mass;
  c.pool_pages = cache.pool_pages;
  c.scratch = parts.scratch + unit * plan.scratch_floats;
  c.scratch_floats = plan.scratch_floats;
  sparse::token_range* ranges = parts.ranges + unit * plan.room;
  // A policy that could write more ranges than the plan made room for is not run (max_length
  // bounds every length): the unit then reads nothing.
  const bool fits = Sparsity::max_ranges(sparsity, c) <= plan.room;
  std::int64_t count = length == 0 || !fits ? 0 : Sparsity::select(sparsity, c, ranges);
  count = count < 0 ? 0 : count > plan.room ? plan.room : count;
  count = sanitize_ranges(ranges, count, length);
  parts.counts[unit] = count;
  parts.selected[unit] = selected_tokens(ranges, count);
}

// 2. One split-KV chunk of one unit, for one pass of up to Rows heads of the group; Sliced: the
// walk of attention/cuda/decode_walk.cuh, else attend.cuh's.
template <int Bound, int Rows, bool Sliced, class Layout, class K, class V, class Sparsity>
__global__ void __launch_bounds__(threads_per_cta)
    decode_attend_kernel(kv::cache_view<Layout, K, V, device_memory> cache,
                         view<const float, 3, device_memory> q, typename Sparsity::params sparsity,
                         score_transform transform, decode_plan plan, decode_parts parts,
                         view<float, 3, device_memory> weights) {
  constexpr int rows = Rows;
  __shared__ shared_rows<Bound, Bound, rows> shared;
  const std::int64_t unit = blockIdx.x;
  const std::int64_t chunk = blockIdx.y;
  const std::int32_t kv_heads = cache.format.k.heads;
  const auto s = static_cast<std::int32_t>(unit / kv_heads);
  const auto h = static_cast<std::int32_t>(unit % kv_heads);
  const std::int64_t selected = parts.selected[unit];
  const std::int64_t first = chunk * plan.split;
  if (first >= selected) return;  // the whole CTA: no barrier is left waiting
  const std::int64_t last = selected < first + plan.split ? selected : first + plan.split;
  const auto group = static_cast<std::int32_t>(plan.group);
  const std::int32_t first_head = static_cast<std::int32_t>(blockIdx.z) * rows;
  const std::int64_t query = cache.length(s) - 1;

  if (threadIdx.x < static_cast<unsigned>(rows)) {
    const std::int32_t g = first_head + static_cast<std::int32_t>(threadIdx.x);
    shared.rows[threadIdx.x] = {h * group + g, query, g < group};
  }
  const auto row_pointer = [&](int r) -> const float* {
    const std::int32_t g = first_head + r;
    return g < group ? &q(s, h * group + g, 0) : nullptr;
  };
  load_rows(shared, row_pointer, cache.format.k.head_dim, transform.scale);

  const walk_context<decltype(cache), Sparsity> c{
      cache,
      sparsity,
      {1.0f, transform.soft_cap, transform.alibi_slopes},
      s,
      h,
      query + 1,
      parts.ranges + unit * plan.room,
      parts.counts[unit],
      weights};
  if constexpr (Sliced) {
    const std::int32_t pass_rows = group - first_head;
    sliced_walk(c, shared, pass_rows < rows ? pass_rows : rows, first, last);
  } else {
    walk(c, shared, first, last);
  }

  const int v_stored = cache.format.v.stored_dim();
  float* partial = parts.partials + (unit * plan.chunks + chunk) * group * plan.partial_floats;
  for (int e = static_cast<int>(threadIdx.x); e < rows * (v_stored + 2); e += threads_per_cta) {
    const int r = e / (v_stored + 2);
    const int d = e % (v_stored + 2);
    const std::int32_t g = first_head + r;
    if (g >= group) continue;
    const float value = d < v_stored    ? shared.warp_acc[0][r][d]
                        : d == v_stored ? shared.warp_max[0][r]
                                        : shared.warp_sum[0][r];
    partial[g * plan.partial_floats + d] = value;
  }
}

// 3. The merge of a unit's chunks for one query head, a warp each.
template <class Layout, class K, class V>
__global__ void __launch_bounds__(threads_per_cta)
    decode_merge_kernel(kv::cache_view<Layout, K, V, device_memory> cache,
                        view<float, 3, device_memory> out, view<float, 2, device_memory> lse,
                        view<float, 3, device_memory> weights, bool accumulate_mass,
                        decode_plan plan, decode_parts parts) {
  const std::int64_t row =
      std::int64_t{blockIdx.x} * warps_per_cta + static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const std::int32_t kv_heads = cache.format.k.heads;
  if (row >= std::int64_t{cache.sequences()} * kv_heads * plan.group) return;
  const std::int64_t unit = row / plan.group;
  const auto g = static_cast<std::int32_t>(row % plan.group);
  const auto s = static_cast<std::int32_t>(unit / kv_heads);
  const std::int32_t q_head = static_cast<std::int32_t>(unit % kv_heads) * plan.group + g;
  const std::int64_t selected = parts.selected[unit];
  std::int64_t chunks = (selected + plan.split - 1) / plan.split;
  chunks = chunks < plan.chunks ? chunks : plan.chunks;
  const int v_stored = cache.format.v.stored_dim();
  const float* first = parts.partials + (unit * plan.chunks * plan.group + g) * plan.partial_floats;
  const std::int64_t chunk_stride = plan.group * plan.partial_floats;

  softmax_state<log_base::two> state;
  for (std::int64_t c = 0; c < chunks; ++c) {
    const float* partial = first + c * chunk_stride;
    state.merge({partial[v_stored], partial[v_stored + 1]});
  }
  const float inverse = state.inverse_sum();
  const float origin = state.max == -INFINITY ? 0.0f : state.max;
  for (std::int32_t d = lane; d < cache.format.v.head_dim; d += 32) {
    float value = 0.0f;
    for (std::int64_t c = 0; c < chunks; ++c) {
      const float* partial = first + c * chunk_stride;
      const float exponent = partial[v_stored] - origin;
      const float weight = exponent == 0.0f ? 1.0f : fast_exp2(exponent);
      if (weight != 0.0f) value += weight * partial[d];
    }
    out(s, q_head, d) = value * inverse;
  }
  if (lane == 0 && lse.data() != nullptr) lse(s, q_head) = state.natural_lse();
  if (weights.data() != nullptr) {
    // The scores the walk stored become weights; every other token of the row gets 0. The mass
    // is added atomically: sequences may share pages (a forked prefix).
    const sparse::token_range* ranges = parts.ranges + unit * plan.room;
    const std::int64_t count = parts.counts[unit];
    const float lse2 = state.lse();
    const std::int32_t h = static_cast<std::int32_t>(unit % kv_heads);
    std::int64_t r = 0;
    for (std::int64_t t = lane; t < weights.extent(2); t += 32) {
      while (r < count && ranges[r].end <= t) ++r;
      float weight = 0.0f;
      if (r < count && ranges[r].begin <= t) {
        const float score = weights(s, q_head, t);
        weight = score == -INFINITY ? 0.0f : fast_exp2(score - lse2);
        if (accumulate_mass && weight != 0.0f) {
          const kv::token_location at = cache.location(s, t);
          atomicAdd(
              &cache.mass[(std::int64_t{at.page} * cache.format.slots + at.slot) * kv_heads + h],
              weight);
        }
      }
      weights(s, q_head, t) = weight;
    }
  }
}

// The three launches of a checked call (see the top of this file); weights and accumulate_mass
// as the optional outputs of attention::decode.
template <class Layout, class K, class V, class Sparsity>
void launch_decode(const exec::cuda& exec, view<const float, 3, device_memory> q,
                   const kv::cache_view<Layout, K, V, device_memory>& cache,
                   view<float, 3, device_memory> out, const typename Sparsity::params& sparsity,
                   const options& opt, std::span<std::byte> workspace, const decode_plan& plan,
                   view<float, 2, device_memory> lse, view<float, 3, device_memory> weights,
                   bool accumulate_mass) {
  const auto& f = cache.format;
  const std::int64_t units = std::int64_t{cache.sequences()} * f.k.heads;
  if (units == 0) return;
  const decode_parts parts(workspace, plan);
  const score_transform transform = score_transform::from(opt, f.k.head_dim);
  exec.launch(decode_select_kernel<Layout, K, V, Sparsity>,
              dim3(static_cast<unsigned>((units + threads_per_cta - 1) / threads_per_cta)),
              dim3(threads_per_cta), 0, cache, q, sparsity, transform.scale, plan, parts);
  dispatch_bound(f.k.stored_dim(), f.v.stored_dim(), [&]<int Bound>() {
    const auto attend = [&]<int Rows, bool Sliced>() {
      const dim3 grid(static_cast<unsigned>(units), static_cast<unsigned>(plan.chunks),
                      static_cast<unsigned>((plan.group + Rows - 1) / Rows));
      exec.launch(decode_attend_kernel<Bound, Rows, Sliced, Layout, K, V, Sparsity>, grid,
                  dim3(threads_per_cta), 0, cache, q, sparsity, transform, plan, parts, weights);
    };
    if constexpr (sliced_walk_takes<K, V, Bound>) {
      // Groups of up to 4 heads (the common GQA shapes) in a kernel sized for 4 rows: fewer
      // registers, more CTAs an SM.
      constexpr int most = lane_map<K, V, Bound>::rows;
      constexpr int few = most < 4 ? most : 4;
      if (plan.group <= few) {
        attend.template operator()<few, true>();
      } else {
        attend.template operator()<most, true>();
      }
    } else {
      attend.template operator()<rows_for<Bound>, false>();
    }
  });
  exec.launch(decode_merge_kernel<Layout, K, V>,
              dim3(static_cast<unsigned>((units * plan.group + warps_per_cta - 1) / warps_per_cta)),
              dim3(threads_per_cta), 0, cache, out, lse, weights, accumulate_mass, plan, parts);
}

// The longest sequence a call may have: its split-KV chunks (of split_tokens at the longest) are
// a grid dimension.
inline void require_max_length(std::int64_t max_length, std::string_view call) {
  require(max_length >= 0 && (max_length + split_tokens - 1) / split_tokens <= max_chunks, call,
          "max_length", max_length,
          "at least the longest sequence, at most " + std::to_string(max_chunks * split_tokens));
}

}  // namespace detail

template <class Layout, class KQuant, class VQuant, class Sparsity>
std::int64_t decode_workspace_bytes(
    const exec::cuda&, std::int64_t q_heads,
    const kv::cache_view<Layout, KQuant, VQuant, device_memory>& cache,
    const typename Sparsity::params& sparsity, std::int64_t max_length) {
  constexpr std::string_view call = "infuse::attention::cuda::decode_workspace_bytes";
  require_device_cache_view(cache, call);
  require(q_heads >= 1 && q_heads % cache.format.k.heads == 0, call, "q_heads", q_heads,
          "a positive multiple of the cache's KV heads " + std::to_string(cache.format.k.heads));
  require(max_length >= 0, call, "max_length", max_length, "at least 0");
  Sparsity::check(sparsity, call);
  return plan_decode<Layout, KQuant, VQuant, Sparsity>(q_heads, cache, sparsity, max_length).bytes;
}

// Decode attention on the device (see the top of this file). Every argument is checked before
// anything is launched.
template <class Layout, class KQuant, class VQuant, class Sparsity>
void decode(const exec::cuda& exec, device_view<const float, 3> q,
            const kv::cache_view<Layout, KQuant, VQuant, device_memory>& cache,
            device_view<float, 3> out, const typename Sparsity::params& sparsity,
            const options& opt, std::span<std::byte> workspace, std::int64_t max_length,
            device_view<float, 2> lse = {}) {
  quant::static_check_scheme<KQuant>();
  quant::static_check_scheme<VQuant>();
  sparse::static_check_policy<Sparsity>();
  constexpr std::string_view call = "infuse::attention::cuda::decode";
  require_device_cache_view(cache, call);
  const auto& f = cache.format;
  const std::int64_t batch = q.extent(0);
  require(batch == cache.sequences(), call, "q.extent(0)", batch,
          "cache.sequences() = " + std::to_string(cache.sequences()) + " (the batch)");
  const std::int64_t q_heads = q.extent(1);
  require(q_heads >= 1 && q_heads % f.k.heads == 0, call, "q.extent(1)", q_heads,
          "a positive multiple of the cache's KV heads " + std::to_string(f.k.heads));
  require_view(q, call, "q", {any_extent, any_extent, {f.k.head_dim, "cache.format.k.head_dim"}});
  require_view(out, call, "out",
               {{batch, "batch"}, {q_heads, "q heads"}, {f.v.head_dim, "cache.format.v.head_dim"}});
  if (lse.data() != nullptr) {
    require_view(lse, call, "lse", {{batch, "batch"}, {q_heads, "q heads"}}, stride_rule::any);
  }
  Sparsity::check(sparsity, call);
  if constexpr (infuse::attention::detail::needs_key_bounds<Sparsity>()) {
    require(cache.key_min != nullptr, call, "cache.key_min", cache.key_min,
            std::string("per-page key minima, which sparse::") + Sparsity::name + " reads");
    require(cache.key_max != nullptr, call, "cache.key_max", cache.key_max,
            std::string("per-page key maxima, which sparse::") + Sparsity::name + " reads");
  }
  require_options(opt, call);
  detail::require_max_length(max_length, call);
  const decode_plan plan =
      plan_decode<Layout, KQuant, VQuant, Sparsity>(q_heads, cache, sparsity, max_length);
  require(static_cast<std::int64_t>(workspace.size()) >= plan.bytes, call, "workspace.size()",
          workspace.size(), "at least decode_workspace_bytes(...) = " + std::to_string(plan.bytes));
  require(workspace.data() != nullptr, call, "workspace.data()", workspace.data(), "a pointer");
  detail::launch_decode<Layout, KQuant, VQuant, Sparsity>(exec, q, cache, out, sparsity, opt,
                                                          workspace, plan, lse, {}, false);
}

}  // namespace infuse::attention::cuda

namespace infuse::attention::detail {

// attention::decode on exec::cuda: the plan from the longest sequence of the host table.
template <>
struct decode_planner<exec::cuda> {
  template <class Layout, class KQuant, class VQuant, class Sparsity, class LengthOf>
  static cuda::decode_plan plan(const exec::cuda&, std::int64_t q_heads,
                                const kv::cache_view<Layout, KQuant, VQuant, device_memory>& cache,
                                const typename Sparsity::params& sparsity, LengthOf /*length_of*/,
                                std::int64_t longest) {
    cuda::detail::require_max_length(longest, "infuse::attention::decode");
    return cuda::plan_decode<Layout, KQuant, VQuant, Sparsity>(q_heads, cache, sparsity, longest);
  }
};

// attention::decode's body on exec::cuda, after the host checks of attention::check: what only
// the device can say (every pointer in device memory), then the launches.
template <>
struct decode_body<exec::cuda> {
  template <class Layout, class KQuant, class VQuant, class Sparsity, class... Optional>
  static void run(const exec::cuda& exec, device_view<const float, 3> q,
                  const kv::cache_view<Layout, KQuant, VQuant, device_memory>& cache,
                  device_view<float, 3> out, const typename Sparsity::params& sparsity,
                  const options& opt, std::span<std::byte> workspace, const cuda::decode_plan& plan,
                  const Optional&... outputs) {
    constexpr std::string_view call = "infuse::attention::decode";
    const device_view<float, 2> lse = find_output<device_lse_output>(outputs...).lse;
    const device_view<float, 3> weights = find_output<device_token_weights>(outputs...).weights;
    cuda::require_device_cache_view(cache, call);
    cuda::require_device_pointer(q.data(), call, "q");
    cuda::require_device_pointer(out.data(), call, "out");
    cuda::require_device_pointer(workspace.data(), call, "workspace");
    cuda::require_device_pointer(lse.data(), call, "lse");
    cuda::require_device_pointer(weights.data(), call, "weights");
    cuda::require_device_pointer(opt.alibi_slopes, call, "options.alibi_slopes");
    cuda::detail::launch_decode<Layout, KQuant, VQuant, Sparsity>(
        exec, q, cache, out, sparsity, opt, workspace, plan, lse, weights,
        has_output<accumulate_mass, Optional...>);
  }
};

}  // namespace infuse::attention::detail
