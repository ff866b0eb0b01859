// The CUDA body of prefill attention over a cache in device memory, the same function as the CPU
// body (attention/cpu/prefill.hpp) up to the order of float sums. Two entries:
//
//   attention::prefill<Layout, K, V, Sparsity>(exec, q, k, v, q_indptr, cache, out, sparsity,
//                                              opt, lse)
//     the public call on exec::cuda (attention/prefill.hpp), cache an attention::device_cache
//     checked on the host with its host table; this file specializes its body for exec::cuda;
//   attention::cuda::prefill<Layout, K, V, Sparsity>(exec, q, k, v, q_indptr, cache, out,
//                                                    sparsity, opt, lse)
//     the device cache_view alone, for callers that keep no host table.
//
// Shapes and meaning as attention::prefill; every pointer is device memory (q_indptr too: the
// host never reads it, the kernels clamp what they derive from it). Neither needs workspace.
//
// Three launches on the exec's stream:
//   1. store: a thread per (new token, KV head) encodes its K and V vectors into their slots with
//      the formats' own encode (the same bits as the CPU body's);
//   2. bounds (when the cache keeps key_min / key_max): a CTA per (sequence, KV head) recomputes
//      the bounds of the pages that received keys, over their stored keys;
//   3. attend, on tensor cores where prefill_takes_tensor_cores says so (dense or causal, head
//      dim 64 or 128, K and V in f16, bf16 or a scheme dequantized to half: the body of
//      attention/cuda/prefill_mma.cuh), else on CUDA cores: a CTA per (query tile, KV head, pass
//      over the group's heads) holds rows (query, head) in shared memory, runs the policy's
//      select() for its queries, and walks the selection (attention/cuda/attend.cuh) with the
//      policy's visible() per (row, key); each key and value is read once for all the CTA's rows.
//      The CTA writes out = acc / sum and the lse.
//
// Query tiles: a CUDA-core CTA holds rows_for<Bound> rows, heads of one query before the next
// query; both bodies number the tiles of sequence b from q_indptr[b] / tile_queries + b on
// (tile_of_cta), so the grid needs no host-side count of tiles.
//
// Policies whose select() needs scratch (sparse::quest, sparse::coverage) are not taken yet.
#pragma once

#include "infuse/core/config.hpp"

#if !defined(INFUSE_CUDA_COMPILER)
#error "infuse/attention/cuda/prefill.cuh is CUDA code: include it from a .cu file compiled by nvcc"
#endif

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <string_view>

#include "infuse/attention/attention.hpp"
#include "infuse/attention/cuda/attend.cuh"
#include "infuse/attention/cuda/prefill_mma.cuh"
#include "infuse/attention/options.hpp"
#include "infuse/core/error.hpp"
#include "infuse/core/math.hpp"
#include "infuse/core/view.hpp"
#include "infuse/exec/cuda.cuh"
#include "infuse/kv/cache_view.hpp"
#include "infuse/sparse/policy.hpp"

namespace infuse::attention::cuda {

namespace detail {

// The sequence that new token `token` (0 <= token < q_indptr[batch]) belongs to.
INFUSE_DEVICE inline std::int32_t sequence_of(const std::int32_t* q_indptr, std::int32_t batch,
                                              std::int64_t token) {
  std::int32_t lo = 0;
  std::int32_t hi = batch - 1;
  while (lo < hi) {
    const std::int32_t mid = lo + (hi - lo + 1) / 2;
    if (q_indptr[mid] <= token) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// 1. K and V of every new token into its slot.
template <class Layout, class K, class V>
__global__ void __launch_bounds__(threads_per_cta)
    prefill_store_kernel(kv::cache_view<Layout, K, V, device_memory> cache,
                         view<const float, 3, device_memory> k,
                         view<const float, 3, device_memory> v, const std::int32_t* q_indptr) {
  const std::int32_t heads = cache.format.k.heads;
  const std::int64_t index = std::int64_t{blockIdx.x} * threads_per_cta + threadIdx.x;
  const std::int64_t token = index / heads;
  const auto h = static_cast<std::int32_t>(index % heads);
  if (token >= k.extent(0)) return;
  const std::int32_t b = sequence_of(q_indptr, cache.sequences(), token);
  const std::int64_t position = cache.length(b) - (q_indptr[b + 1] - token);
  if (position < 0 || position >= cache.length(b)) return;  // q_indptr disagrees with the table
  const kv::token_address at = cache.locate(b, position);
  const auto& f = cache.format;
  f.k.encode(&k(token, h, 0), f.k_codes(at.page, at.slot, h), f.k_params(at.page, at.slot, h));
  f.v.encode(&v(token, h, 0), f.v_codes(at.page, at.slot, h), f.v_params(at.page, at.slot, h));
}

// 2. key_min and key_max of the pages that received new keys of sequence blockIdx.x, KV head
// blockIdx.y, one channel a thread, rounded outward to half as the host's bounds are.
template <class Layout, class K, class V>
__global__ void __launch_bounds__(threads_per_cta)
    prefill_bounds_kernel(kv::cache_view<Layout, K, V, device_memory> cache,
                          const std::int32_t* q_indptr) {
  const auto b = static_cast<std::int32_t>(blockIdx.x);
  const auto h = static_cast<std::int32_t>(blockIdx.y);
  const auto& f = cache.format;
  const std::int32_t slots = f.slots;
  const std::int64_t length = cache.length(b);
  const std::int64_t fresh = q_indptr[b + 1] - q_indptr[b];
  if (fresh <= 0 || fresh > length) return;
  for (std::int64_t page = (length - fresh) / slots; page * slots < length; ++page) {
    const std::int64_t left = length - page * slots;
    const auto filled = static_cast<std::int32_t>(left < slots ? left : slots);
    const kv::token_address at = cache.locate(b, page * slots);
    const std::int64_t index = (at.page - cache.pages) / f.page_bytes();
    half* lo = cache.key_min + (index * f.k.heads + h) * f.k.head_dim;
    half* hi = cache.key_max + (index * f.k.heads + h) * f.k.head_dim;
    for (std::int32_t d = static_cast<std::int32_t>(threadIdx.x); d < f.k.head_dim;
         d += threads_per_cta) {
      float low = INFINITY;
      float high = -INFINITY;
      for (std::int32_t slot = 0; slot < filled; ++slot) {
        const float value = f.k.value(f.k_codes(at.page, slot, h), f.k_params(at.page, slot, h), d);
        low = fminf(low, value);
        high = fmaxf(high, value);
      }
      lo[d] = half_at_most(low);
      hi[d] = half_at_least(high);
    }
  }
}

// How the rows of a CTA are shared out: heads of one query, then the next query.
struct tile_shape {
  std::int32_t group;
  std::int32_t heads;    // heads of the group a CTA holds
  std::int32_t queries;  // queries a CTA holds
};

// 3. One query tile of one sequence, one KV head, one pass over the group's heads.
template <int Bound, class Layout, class K, class V, class Sparsity>
__global__ void __launch_bounds__(threads_per_cta)
    prefill_attend_kernel(kv::cache_view<Layout, K, V, device_memory> cache,
                          view<const float, 3, device_memory> q, const std::int32_t* q_indptr,
                          view<float, 3, device_memory> out, view<float, 2, device_memory> lse,
                          typename Sparsity::params sparsity, score_transform transform,
                          tile_shape tile) {
  constexpr int rows = rows_for<Bound>;
  constexpr std::int64_t range_capacity =
      sizeof(shared_rows<Bound, Bound, rows>::ranges) / sizeof(sparse::token_range);
  __shared__ shared_rows<Bound, Bound, rows> shared;
  __shared__ std::int64_t range_count;
  const query_tile rows_of =
      tile_of_cta(q_indptr, cache.sequences(), q.extent(0), blockIdx.x, tile.queries);
  if (rows_of.queries == 0) return;  // the whole CTA: no barrier left waiting
  const std::int32_t b = rows_of.sequence;
  const std::int64_t first_row = rows_of.first_row;
  const std::int64_t queries = rows_of.queries;
  const std::int64_t length = cache.length(b);
  const std::int64_t new_begin = length - (rows_of.end - rows_of.begin);
  const std::int64_t query_begin = new_begin + (first_row - rows_of.begin);
  const auto h = static_cast<std::int32_t>(blockIdx.y);
  const std::int32_t first_head = static_cast<std::int32_t>(blockIdx.z) * tile.heads;

  // Row r: query r / tile.heads of the tile, head first_head + r % tile.heads of the group.
  const auto row_active = [&](int r) {
    return r / tile.heads < queries && r < tile.heads * tile.queries &&
           first_head + r % tile.heads < tile.group;
  };
  const auto row_pointer = [&](int r) -> const float* {
    return row_active(r)
               ? &q(first_row + r / tile.heads, h * tile.group + first_head + r % tile.heads, 0)
               : nullptr;
  };
  if (threadIdx.x < static_cast<unsigned>(rows)) {
    const int r = static_cast<int>(threadIdx.x);
    shared.rows[r] = {h * tile.group + first_head + r % tile.heads, query_begin + r / tile.heads,
                      row_active(r)};
  }
  if (threadIdx.x == 0) {
    sparse::query_context c{};
    c.sequence = b;
    c.kv_head = h;
    c.length = length;
    c.query_begin = query_begin;
    c.query_end = query_begin + queries;
    c.new_begin = new_begin;
    c.q = &q(first_row, h * tile.group, 0);
    c.group = tile.group;
    c.head_dim = cache.format.k.head_dim;
    c.scale = transform.scale;
    c.page_size = cache.format.slots;
    const std::int32_t run = b;
    if constexpr (Layout::is_paged) {
      c.pages = cache.table.indices + cache.table.indptr[b];
    } else {
      c.pages = &run;
    }
    c.kv_heads = cache.format.k.heads;
    c.key_min = cache.key_min;
    c.key_max = cache.key_max;
    c.mass = cache.mass;
    c.pool_pages = cache.pool_pages;
    // A policy that could write more ranges than shared memory holds is not run: the tile then
    // reads nothing (no shipped policy without scratch writes more than 2).
    const bool fits = Sparsity::max_ranges(sparsity, c) <= range_capacity;
    std::int64_t count = fits ? Sparsity::select(sparsity, c, shared.ranges) : 0;
    count = count < 0 ? 0 : count > range_capacity ? range_capacity : count;
    range_count = sanitize_ranges(shared.ranges, count, length);
  }
  load_rows(shared, row_pointer, cache.format.k.head_dim, transform.scale);  // ends with a barrier

  const walk_context<decltype(cache), Sparsity> c{
      cache,
      sparsity,
      {1.0f, transform.soft_cap, transform.alibi_slopes},
      b,
      h,
      new_begin,
      shared.ranges,
      range_count,
      {}};
  walk(c, shared, 0, selected_tokens(shared.ranges, range_count));

  const std::int32_t v_dim = cache.format.v.head_dim;
  for (int e = static_cast<int>(threadIdx.x); e < rows * v_dim; e += threads_per_cta) {
    const int r = e / v_dim;
    const int d = e % v_dim;
    const row_info row = shared.rows[r];
    if (!row.active) continue;
    const softmax_state<log_base::two> state{shared.warp_max[0][r], shared.warp_sum[0][r]};
    const std::int64_t token = first_row + r / tile.heads;
    out(token, row.q_head, d) = shared.warp_acc[0][r][d] * state.inverse_sum();
    if (d == 0 && lse.data() != nullptr) lse(token, row.q_head) = state.natural_lse();
  }
}

// The launches of a checked call (see the top of this file).
template <class Sparsity, class Layout, class KQuant, class VQuant>
void launch_prefill(const exec::cuda& exec, device_view<const float, 3> q,
                    device_view<const float, 3> k, device_view<const float, 3> v,
                    device_view<const std::int32_t, 1> q_indptr,
                    const kv::cache_view<Layout, KQuant, VQuant, device_memory>& cache,
                    device_view<float, 3> out, const typename Sparsity::params& sparsity,
                    const options& opt, device_view<float, 2> lse) {
  const auto& f = cache.format;
  const std::int64_t new_total = q.extent(0);
  const std::int32_t batch = cache.sequences();
  const std::int32_t kv_heads = f.k.heads;
  if (new_total == 0 || batch == 0) return;

  const std::int32_t group = static_cast<std::int32_t>(q.extent(1) / kv_heads);
  const score_transform transform = score_transform::from(opt, f.k.head_dim);
  exec.launch(
      prefill_store_kernel<Layout, KQuant, VQuant>,
      dim3(static_cast<unsigned>((new_total * kv_heads + threads_per_cta - 1) / threads_per_cta)),
      dim3(threads_per_cta), 0, cache, k, v, q_indptr.data());
  if (cache.key_min != nullptr) {
    exec.launch(prefill_bounds_kernel<Layout, KQuant, VQuant>,
                dim3(static_cast<unsigned>(batch), static_cast<unsigned>(kv_heads)),
                dim3(threads_per_cta), 0, cache, q_indptr.data());
  }
  if (prefill_takes_tensor_cores<Sparsity, KQuant, VQuant>(f.k.head_dim, f.v.head_dim)) {
    launch_prefill_mma<Sparsity>(exec, q, q_indptr, cache, out, sparsity, transform, lse);
    return;
  }
  dispatch_bound(f.k.stored_dim(), f.v.stored_dim(), [&]<int Bound>() {
    constexpr int rows = rows_for<Bound>;
    tile_shape tile{group, group < rows ? group : rows, 1};
    tile.queries = rows / tile.heads;
    const dim3 grid(static_cast<unsigned>(new_total / tile.queries + batch),
                    static_cast<unsigned>(kv_heads),
                    static_cast<unsigned>((group + tile.heads - 1) / tile.heads));
    exec.launch(prefill_attend_kernel<Bound, Layout, KQuant, VQuant, Sparsity>, grid,
                dim3(threads_per_cta), 0, cache, q, q_indptr.data(), out, lse, sparsity, transform,
                tile);
  });
}

}  // namespace detail

// Prefill attention on the device (see the top of this file). Every argument the host can see is
// checked before anything is launched.
template <class Layout, class KQuant, class VQuant, class Sparsity>
void prefill(const exec::cuda& exec, device_view<const float, 3> q, device_view<const float, 3> k,
             device_view<const float, 3> v, device_view<const std::int32_t, 1> q_indptr,
             const kv::cache_view<Layout, KQuant, VQuant, device_memory>& cache,
             device_view<float, 3> out, const typename Sparsity::params& sparsity,
             const options& opt = {}, device_view<float, 2> lse = {}) {
  quant::static_check_scheme<KQuant>();
  quant::static_check_scheme<VQuant>();
  sparse::static_check_policy<Sparsity>();
  static_assert(infuse::attention::detail::scratch_floats_per_page<Sparsity>() == 0,
                "infuse: the CUDA prefill takes no policy whose select() needs scratch "
                "(sparse::quest, sparse::coverage) yet; see docs/policies.md#prefill-attention");
  constexpr std::string_view call = "infuse::attention::cuda::prefill";
  require_device_cache_view(cache, call);
  const auto& f = cache.format;
  const std::int64_t new_total = q.extent(0);
  const std::int64_t q_heads = q.extent(1);
  const std::int32_t kv_heads = f.k.heads;
  require(q_heads >= 1 && q_heads % kv_heads == 0, call, "q.extent(1)", q_heads,
          "a multiple of the KV heads " + std::to_string(kv_heads) + " (query heads are grouped)");
  require_view(q, call, "q", {any_extent, any_extent, {f.k.head_dim, "k head_dim"}});
  require_view(k, call, "k",
               {{new_total, "new_total, the rows of q"},
                {kv_heads, "k heads"},
                {f.k.head_dim, "k head_dim"}});
  require_view(v, call, "v",
               {{new_total, "new_total, the rows of q"},
                {kv_heads, "v heads"},
                {f.v.head_dim, "v head_dim"}});
  require_view(out, call, "out",
               {{new_total, "new_total, the rows of q"},
                {q_heads, "q heads"},
                {f.v.head_dim, "v head_dim"}});
  if (lse.data() != nullptr) {
    require_view(lse, call, "lse", {{new_total, "new_total, the rows of q"}, {q_heads, "q heads"}},
                 stride_rule::any);
  }
  const std::int32_t batch = cache.sequences();
  require_view(q_indptr, call, "q_indptr", {{std::int64_t{batch} + 1, "batch + 1"}},
               stride_rule::contiguous);
  require((cache.key_min == nullptr) == (cache.key_max == nullptr), call, "cache.key_max",
          static_cast<const void*>(cache.key_max), "set exactly when cache.key_min is");
  Sparsity::check(sparsity, call);
  if constexpr (infuse::attention::detail::needs_key_bounds<Sparsity>()) {
    require(cache.key_min != nullptr, call, "cache.key_min",
            static_cast<const void*>(cache.key_min),
            std::string("per-page key bounds, which sparse::") + Sparsity::name + " reads");
  }
  require_options(opt, call);
  detail::launch_prefill<Sparsity>(exec, q, k, v, q_indptr, cache, out, sparsity, opt, lse);
}

}  // namespace infuse::attention::cuda

namespace infuse::attention::detail {

// attention::prefill's body on exec::cuda, after the host checks of check_prefill_arguments:
// what only the device can say (every pointer in device memory), then the launches.
template <>
struct prefill_body<exec::cuda> {
  template <class Sparsity, class Layout, class K, class V>
  static void run(const exec::cuda& exec, device_view<const float, 3> q,
                  device_view<const float, 3> k, device_view<const float, 3> v,
                  device_view<const std::int32_t, 1> q_indptr,
                  const kv::cache_view<Layout, K, V, device_memory>& cache,
                  device_view<float, 3> out, const typename Sparsity::params& sparsity,
                  const options& opt, device_view<float, 2> lse) {
    static_assert(scratch_floats_per_page<Sparsity>() == 0,
                  "infuse: the CUDA prefill takes no policy whose select() needs scratch "
                  "(sparse::quest, sparse::coverage) yet; see docs/policies.md#prefill-attention");
    constexpr std::string_view call = "infuse::attention::prefill";
    cuda::require_device_cache_view(cache, call);
    cuda::require_device_pointer(q.data(), call, "q");
    cuda::require_device_pointer(k.data(), call, "k");
    cuda::require_device_pointer(v.data(), call, "v");
    cuda::require_device_pointer(q_indptr.data(), call, "q_indptr");
    cuda::require_device_pointer(out.data(), call, "out");
    cuda::require_device_pointer(lse.data(), call, "lse");
    cuda::require_device_pointer(opt.alibi_slopes, call, "options.alibi_slopes");
    cuda::detail::launch_prefill<Sparsity>(exec, q, k, v, q_indptr, cache, out, sparsity, opt, lse);
  }
};

}  // namespace infuse::attention::detail
