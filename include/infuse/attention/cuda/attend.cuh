// What the CUDA decode and prefill bodies share (attention/cuda/decode.cuh, prefill.cuh): the
// walk of one CTA over selected keys for a set of query rows, with an online softmax per row.
//
// A *row* is one (query, query head) pair: decode's rows are the query heads of a group, prefill's
// the (query, head) pairs of a query tile. A CTA holds up to Rows rows, their scaled queries in
// shared memory (zero past head_dim). Its warps take the selected keys 32 at a time, one key per
// lane (tile w, w + warps, ... of the CTA's span):
//   scores   the lane dequantizes its key block by block in registers (16-byte loads of the
//            codes) and multiplies each block into one dot product per row, the queries read
//            from shared memory as broadcasts; then the score transform, the policy's visible()
//            and log2(e) give base-2 scores, -inf where hidden;
//   softmax  a warp-wide maximum per row; the lane keeps its own partial sum;
//   values   the warp walks the tile's keys four at a time (their loads in flight together):
//            key j's weights come from lane j by shuffle, a key no row weighs is not read, and
//            lane l adds element l of each block of 32 of the value (one coalesced read of the
//            value per warp) into its accumulators.
// The warps' states then merge in shared memory, as softmax states, into one (acc, max, sum) per
// row: the caller stores it (decode: a split-KV partial; prefill: the normalised output).
//
// Bounds: KBound and VBound are compile-time upper bounds of the stored dims of K and V (head
// dims 64, 96, 128, 256 get their exact bound; other dims the next bound up, 1024 past 256, with
// run-time guards), so that every register array has a constant size.
#pragma once

#include "infuse/core/config.hpp"

#if !defined(INFUSE_CUDA_COMPILER)
#error "infuse/attention/cuda/attend.cuh is CUDA code: include it from a .cu file compiled by nvcc"
#endif

#include <cuda_runtime.h>

#include <cstdint>
#include <numbers>
#include <string>
#include <string_view>

#include "infuse/attention/options.hpp"
#include "infuse/core/error.hpp"
#include "infuse/core/math.hpp"
#include "infuse/core/memory.hpp"
#include "infuse/core/view.hpp"
#include "infuse/gemm/cuda/gemv.cuh"
#include "infuse/kv/cache_view.hpp"
#include "infuse/kv/format.hpp"
#include "infuse/quant/scheme.hpp"
#include "infuse/sparse/policy.hpp"

namespace infuse::attention::cuda {

inline constexpr int warps_per_cta = 4;
inline constexpr int threads_per_cta = 32 * warps_per_cta;

// Value vectors a warp loads before it adds any of them.
inline constexpr int values_in_flight = 4;

// The largest stored head dim a body takes (vector_format allows head dims up to 1024).
inline constexpr int max_stored_dim = 1024;

// Rows a CTA holds for a bound: the accumulators (Rows x Bound / 32 floats a lane) stay under 64
// registers.
template <int Bound>
inline constexpr int rows_for = Bound <= 256 ? 8 : 1;

// The bound of stored dims k_stored and v_stored: the smallest of 64, 96, 128, 256 and 1024 that
// holds both. Calls body.template operator()<Bound>().
template <class Body>
void dispatch_bound(int k_stored, int v_stored, Body&& body) {
  const int stored = k_stored > v_stored ? k_stored : v_stored;
  if (stored <= 64) return body.template operator()<64>();
  if (stored <= 96) return body.template operator()<96>();
  if (stored <= 128) return body.template operator()<128>();
  if (stored <= 256) return body.template operator()<256>();
  return body.template operator()<max_stored_dim>();
}

namespace detail {

constexpr float log2e = std::numbers::log2e_v<float>;

// Clips ranges to [0, length), drops empty ones and any that do not come after the previous one,
// as the CPU body does: what the walk reads is always inside the sequence. Returns the count.
INFUSE_DEVICE inline std::int64_t sanitize_ranges(sparse::token_range* ranges, std::int64_t count,
                                                  std::int64_t length) {
  std::int64_t kept = 0;
  std::int64_t floor = 0;
  for (std::int64_t i = 0; i < count; ++i) {
    const std::int64_t begin = ranges[i].begin > floor ? ranges[i].begin : floor;
    const std::int64_t end = ranges[i].end < length ? ranges[i].end : length;
    if (begin >= end) continue;
    ranges[kept++] = {begin, end};
    floor = end;
  }
  return kept;
}

INFUSE_DEVICE inline std::int64_t selected_tokens(const sparse::token_range* ranges,
                                                  std::int64_t count) {
  std::int64_t total = 0;
  for (std::int64_t i = 0; i < count; ++i) total += ranges[i].end - ranges[i].begin;
  return total;
}

// The position of selected token i (an index into the concatenation of the ranges).
INFUSE_DEVICE inline std::int64_t token_at(const sparse::token_range* ranges, std::int64_t count,
                                           std::int64_t i) {
  for (std::int64_t r = 0; r < count; ++r) {
    const std::int64_t length = ranges[r].end - ranges[r].begin;
    if (i < length) return ranges[r].begin + i;
    i -= length;
  }
  return 0;  // not reached for i below the selected count
}

// One row of a CTA: its query head, its query's position, and whether it exists.
struct row_info {
  std::int32_t q_head;
  std::int64_t position;
  bool active;
};

// The shared memory of a CTA: the rows' queries and the warps' states for the final merge.
template <int KBound, int VBound, int Rows>
struct shared_rows {
  float q[Rows][KBound];  // scaled queries, zero past head_dim
  row_info rows[Rows];
  float warp_max[warps_per_cta][Rows];
  float warp_sum[warps_per_cta][Rows];
  float warp_acc[warps_per_cta][Rows][VBound];
  sparse::token_range ranges[64];  // prefill's selection of the tile
};

// What a CTA's walk reads: the cache, the unit (sequence, KV head), its selection and the mask's
// context.
template <class Cache, class Sparsity>
struct walk_context {
  const Cache& cache;
  const typename Sparsity::params& sparsity;
  score_transform transform;  // scale 1: the queries are scaled already
  std::int32_t sequence;
  std::int32_t kv_head;
  std::int64_t new_begin;  // the mask's new_begin
  const sparse::token_range* ranges;
  std::int64_t range_count;
  // Decode's token_weights: each visited token's base-2 score per row goes to
  // weights(sequence, q_head, token), for the merge to turn into a weight; empty: none.
  view<float, 3, device_memory> weights;
};

// The merge of the warps' states (warp_max, warp_sum, warp_acc over the first v_stored dims of
// each warp) into warp 0's. Every thread of the CTA calls it after the states are written; it
// ends with a barrier.
template <int KBound, int VBound, int Rows>
INFUSE_DEVICE void merge_warps(shared_rows<KBound, VBound, Rows>& shared, int v_stored) {
  __syncthreads();
  for (int e = static_cast<int>(threadIdx.x); e < Rows * v_stored; e += threads_per_cta) {
    const int r = e / v_stored;
    const int d = e % v_stored;
    softmax_state<log_base::two> state{shared.warp_max[0][r], shared.warp_sum[0][r]};
    float merged = shared.warp_acc[0][r][d];
    for (int w = 1; w < warps_per_cta; ++w) {
      const softmax_rescale factors = state.merge({shared.warp_max[w][r], shared.warp_sum[w][r]});
      merged = merged * factors.previous + factors.incoming * shared.warp_acc[w][r][d];
    }
    shared.warp_acc[0][r][d] = merged;
  }
  __syncthreads();
  // The maxima and sums last: every thread above read warp 0's before they change.
  if (threadIdx.x < static_cast<unsigned>(Rows)) {
    const int r = static_cast<int>(threadIdx.x);
    softmax_state<log_base::two> state{shared.warp_max[0][r], shared.warp_sum[0][r]};
    for (int w = 1; w < warps_per_cta; ++w) {
      state.merge({shared.warp_max[w][r], shared.warp_sum[w][r]});
    }
    shared.warp_max[0][r] = state.max;
    shared.warp_sum[0][r] = state.sum;
  }
  __syncthreads();
}

// The CTA's walk over selected tokens [first, last): every warp's online softmax over its tiles,
// then the merge of the warps into shared.warp_acc[0], warp_max[0], warp_sum[0] (acc over the
// stored V dims). Every thread of the CTA calls it; it ends with a barrier.
template <int KBound, int VBound, int Rows, class Cache, class Sparsity>
INFUSE_DEVICE void walk(const walk_context<Cache, Sparsity>& c,
                        shared_rows<KBound, VBound, Rows>& shared, std::int64_t first,
                        std::int64_t last) {
  using KS = typename Cache::k_scheme;
  using VS = typename Cache::v_scheme;
  constexpr int k_blocks_bound = KBound / quant::block_size;
  constexpr int v_blocks_bound = VBound / quant::block_size;
  const auto& f = c.cache.format;
  const int k_blocks = f.k.blocks();
  const int v_blocks = f.v.blocks();
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;

  float row_max[Rows];
  float lane_sum[Rows];
  float acc[Rows][v_blocks_bound];
#pragma unroll
  for (int r = 0; r < Rows; ++r) {
    row_max[r] = -INFINITY;
    lane_sum[r] = 0.0f;
#pragma unroll
    for (int i = 0; i < v_blocks_bound; ++i) acc[r][i] = 0.0f;
  }

  for (std::int64_t tile = first + std::int64_t{warp} * 32; tile < last;
       tile += std::int64_t{warps_per_cta} * 32) {
    const std::int64_t i = tile + lane;
    const bool valid = i < last;
    const std::int64_t t = valid ? token_at(c.ranges, c.range_count, i) : 0;
    std::uint8_t* page = nullptr;
    std::int32_t slot = 0;
    float dot[Rows];
#pragma unroll
    for (int r = 0; r < Rows; ++r) dot[r] = 0.0f;
    if (valid) {
      const kv::token_address at = c.cache.locate(c.sequence, t);
      page = at.page;
      slot = at.slot;
      const std::uint8_t* codes = f.k_codes(page, slot, c.kv_head);
      const std::uint8_t* params = f.k_params(page, slot, c.kv_head);
#pragma unroll
      for (int b = 0; b < k_blocks_bound; ++b) {
        if (b >= k_blocks) break;
        gemm::cuda::detail::block_words<KS> words;
        words.load(codes + std::int64_t{b} * KS::block_bytes);
        const gemm::cuda::detail::dequantizer<KS> value(
            f.k.group_params(params, b * quant::block_size / f.k.group_dims()));
#pragma unroll
        for (int j = 0; j < quant::block_size; ++j) {
          const float k = value(words.bytes(), j);
#pragma unroll
          for (int r = 0; r < Rows; ++r) dot[r] += shared.q[r][b * quant::block_size + j] * k;
        }
      }
    }
    // Base-2 scores, the tile's maximum per row, the rescale of what came before.
    float weight[Rows];
#pragma unroll
    for (int r = 0; r < Rows; ++r) {
      const row_info row = shared.rows[r];
      const bool seen = valid && row.active &&
                        Sparsity::visible(c.sparsity, sparse::mask_context{c.sequence, row.position,
                                                                           t, c.new_begin});
      const float score =
          seen ? c.transform(dot[r], row.q_head, row.position, t) * log2e : -INFINITY;
      if (c.weights.data() != nullptr && valid && row.active)
        c.weights(c.sequence, row.q_head, t) = score;
      float tile_max = score;
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, offset));
      }
      softmax_state<log_base::two> state{row_max[r], 0.0f};
      const float previous = state.merge({tile_max, 0.0f}).previous;
      const float origin = state.max == -INFINITY ? 0.0f : state.max;
      weight[r] = score == -INFINITY ? 0.0f : fast_exp2(score - origin);
      row_max[r] = state.max;
      lane_sum[r] = lane_sum[r] * previous + weight[r];
#pragma unroll
      for (int v = 0; v < v_blocks_bound; ++v) acc[r][v] *= previous;
    }
    // The values, four keys at a time so that their loads are in flight together; a key no row
    // weighs is never read (its weights are all 0, and its value stays 0: no 0 * NaN).
    const int keys = last - tile < 32 ? static_cast<int>(last - tile) : 32;
    for (int j0 = 0; j0 < keys; j0 += values_in_flight) {
      float p[values_in_flight][Rows];
      float value[values_in_flight][v_blocks_bound];
#pragma unroll
      for (int u = 0; u < values_in_flight; ++u) {
        const int j = j0 + u;
        bool needed = false;
#pragma unroll
        for (int r = 0; r < Rows; ++r) {
          p[u][r] = __shfl_sync(0xffffffffu, weight[r], j % 32);
          if (j >= keys) p[u][r] = 0.0f;
          needed = needed || p[u][r] != 0.0f;
        }
        const auto page_bits =
            __shfl_sync(0xffffffffu, reinterpret_cast<std::uintptr_t>(page), j % 32);
        const std::int32_t key_slot = __shfl_sync(0xffffffffu, slot, j % 32);
        const auto* key_page = reinterpret_cast<const std::uint8_t*>(page_bits);
#pragma unroll
        for (int b = 0; b < v_blocks_bound; ++b) {
          value[u][b] = 0.0f;
          if (!needed || b >= v_blocks) continue;  // the same for every lane
          const std::uint8_t* params = f.v_params(key_page, key_slot, c.kv_head);
          const typename VS::params group =
              f.v.group_params(params, b * quant::block_size / f.v.group_dims());
          value[u][b] = quant::dequantize<VS>(
              f.v_codes(key_page, key_slot, c.kv_head) + std::int64_t{b} * VS::block_bytes, lane,
              group);
        }
      }
#pragma unroll
      for (int u = 0; u < values_in_flight; ++u) {
#pragma unroll
        for (int r = 0; r < Rows; ++r) {
#pragma unroll
          for (int b = 0; b < v_blocks_bound; ++b) acc[r][b] += p[u][r] * value[u][b];
        }
      }
    }
  }

  // Each warp's state into shared memory, then the merge of the warps, one (row, dim) a thread.
#pragma unroll
  for (int r = 0; r < Rows; ++r) {
    float sum = lane_sum[r];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    }
    if (lane == 0) {
      shared.warp_max[warp][r] = row_max[r];
      shared.warp_sum[warp][r] = sum;
    }
#pragma unroll
    for (int b = 0; b < v_blocks_bound; ++b) {
      shared.warp_acc[warp][r][b * quant::block_size + lane] = acc[r][b];
    }
  }
  merge_warps(shared, f.v.stored_dim());
}

// shared.q[r] = scale * the query row row_pointer(r) (head_dim floats), zeros past head_dim; all
// zeros where row_pointer(r) is null. Every thread of the CTA calls it; it ends with a barrier.
template <int KBound, int VBound, int Rows, class RowPointer>
INFUSE_DEVICE void load_rows(shared_rows<KBound, VBound, Rows>& shared, RowPointer&& row_pointer,
                             std::int32_t head_dim, float scale) {
  for (int e = static_cast<int>(threadIdx.x); e < Rows * KBound; e += threads_per_cta) {
    const int r = e / KBound;
    const int d = e % KBound;
    const float* row = row_pointer(r);
    shared.q[r][d] = row != nullptr && d < head_dim ? row[d] * scale : 0.0f;
  }
  __syncthreads();
}

}  // namespace detail

// Throws infuse::error unless `pointer` (when not null) points into memory the device reads:
// cudaMalloc'ed or managed. A host pointer given to a CUDA call would fault inside a kernel.
inline void require_device_pointer(const void* pointer, std::string_view call,
                                   std::string_view argument) {
  if (pointer == nullptr) return;
  cudaPointerAttributes attributes{};
  const cudaError_t status = cudaPointerGetAttributes(&attributes, pointer);
  if (status != cudaSuccess) (void)cudaGetLastError();  // not sticky: clear it for later calls
  require(status == cudaSuccess &&
              (attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged),
          call, argument, pointer, "a pointer to device memory (cudaMalloc or cudaMallocManaged)");
}

// Host checks of a cache view in device memory: what can be checked without reading it (its
// table and pages stay on the device: the kernels clamp what they read from them).
template <class Layout, class KQuant, class VQuant>
void require_device_cache_view(const kv::cache_view<Layout, KQuant, VQuant, device_memory>& cache,
                               std::string_view call) {
  cache.format.k.require_valid(call, "cache.format.k");
  cache.format.v.require_valid(call, "cache.format.v");
  require(cache.format.v.heads == cache.format.k.heads, call, "cache.format.v.heads",
          cache.format.v.heads, "cache.format.k.heads = " + std::to_string(cache.format.k.heads));
  require(cache.pool_pages >= 0, call, "cache.pool_pages", cache.pool_pages, "at least 0");
  require(cache.pool_pages == 0 || cache.pages != nullptr, call, "cache.pages", cache.pages,
          "a pointer to pool_pages pages");
  // Codes are read in vectors of up to 16 bytes: every region of a page is then aligned.
  require(reinterpret_cast<std::uintptr_t>(cache.pages) % 16 == 0, call, "cache.pages",
          static_cast<const void*>(cache.pages), "a pointer aligned to 16 bytes");
  require(cache.table.sequences >= 0, call, "cache.table.sequences", cache.table.sequences,
          "at least 0");
  if constexpr (Layout::is_paged) {
    require(cache.format.slots == Layout::page_size, call, "cache.format.slots", cache.format.slots,
            "the layout's page size " + std::to_string(Layout::page_size));
    require(cache.table.sequences == 0 ||
                (cache.table.indptr != nullptr && cache.table.last_page_len != nullptr),
            call, "cache.table", "a null pointer", "indptr, indices and last_page_len pointers");
  } else {
    require(cache.table.capacity == cache.format.slots, call, "cache.table.capacity",
            cache.table.capacity, "cache.format.slots, the slots of a sequence's run");
    require(cache.table.sequences == 0 || cache.table.lengths != nullptr, call,
            "cache.table.lengths", cache.table.lengths, "a pointer to one length per sequence");
  }
  require_device_pointer(cache.pages, call, "cache.pages");
  if constexpr (Layout::is_paged) {
    require_device_pointer(cache.table.indptr, call, "cache.table.indptr");
    require_device_pointer(cache.table.indices, call, "cache.table.indices");
    require_device_pointer(cache.table.last_page_len, call, "cache.table.last_page_len");
  } else {
    require_device_pointer(cache.table.lengths, call, "cache.table.lengths");
  }
  require_device_pointer(cache.key_min, call, "cache.key_min");
  require_device_pointer(cache.key_max, call, "cache.key_max");
  require_device_pointer(cache.mass, call, "cache.mass");
}

}  // namespace infuse::attention::cuda
