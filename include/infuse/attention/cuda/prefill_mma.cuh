// The tensor-core body of the CUDA prefill (attention/cuda/prefill.cuh routes to it): causal or
// bidirectional attention of query tiles over K and V tiles in shared memory, with the matrix
// products on mma.sync.m16n8k16 (half or bfloat16 operands, float accumulation), in the manner of
// FlashAttention-2.
//
// A CTA holds one query head and mma_queries = 64 consecutive new queries of one sequence; warp w
// owns rows 16w..16w+15. Its queries are loaded once, rounded to the K operand type, as the A
// fragments of S = Q K^T. It walks the keys its policy selects in tiles of mma_keys = 64:
//   K and V tiles    brought into shared memory (pitch head_dim + 8: the eight rows of an 8x8
//                    ldmatrix fall in different banks) from the page table: f16 and bf16 codes
//                    by cp.async, 16 bytes at a time; other schemes dequantized to half in
//                    registers (the GEMV's dequantizer) and stored. V(j) is in flight during
//                    S(j), K(j + 1) during O += P V(j). Slots past the selection hold zeros.
//   S = Q K^T        B fragments by ldmatrix (K's rows are B's columns);
//   online softmax   on the accumulator fragments: the score transform, log2(e), the policy's
//                    mask (only on tiles that cross the diagonal or the end), the row maximum over
//                    the lane's values and its quad (shuffles), the rescale of O and of the sum;
//   O += P V         P rounded to V's operand type straight from S's accumulators (an m16n8
//                    accumulator pair is the A fragment of m16n8k16), V's B fragments by
//                    ldmatrix.trans.
// Then out = O / sum and the lse. The heaviest causal tiles (the last queries) start first.
//
// Taken (prefill_takes_tensor_cores): sparse::dense and sparse::causal; K and V each in
// quant::none<half>, quant::none<bfloat16> or a scheme the tensor-core GEMM dequantizes to half
// (int, fp8; not float, whose values half may not hold); k and v head dims equal, 64 or 128. The
// score transform (scale, soft-cap, ALiBi) is applied as in the CUDA-core body.
//
// Precision: queries, keys, values and the weights P are rounded to the operand type (half: 2^-11
// relative; bfloat16: 2^-8), products and sums in float.
#pragma once

#include "infuse/core/config.hpp"

#if !defined(INFUSE_CUDA_COMPILER)
#error "infuse/attention/cuda/prefill_mma.cuh is CUDA code: include it from a .cu file (nvcc)"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "infuse/attention/cuda/attend.cuh"
#include "infuse/attention/options.hpp"
#include "infuse/core/float_types.hpp"
#include "infuse/core/math.hpp"
#include "infuse/core/view.hpp"
#include "infuse/exec/cuda.cuh"
#include "infuse/gemm/cuda/gemv.cuh"
#include "infuse/kv/cache_view.hpp"
#include "infuse/quant/none.hpp"
#include "infuse/sparse/dense.hpp"

namespace infuse::attention::cuda {

namespace detail {

inline constexpr int mma_queries = 16 * warps_per_cta;  // query rows of a CTA
inline constexpr int mma_keys = 64;                     // keys of a K or V tile

// Schemes whose codes are the operand (copied as they are) and schemes dequantized to half.
template <class S>
inline constexpr bool mma_native_scheme =
    std::is_same_v<S, quant::none<half>> || std::is_same_v<S, quant::none<bfloat16>>;
template <class S>
inline constexpr bool mma_scheme = mma_native_scheme<S> ||
                                   (quant::scheme<S> && gemm::cuda::detail::tensor_core_scheme<S>);
// The operand type of a scheme's tile.
template <class S>
using mma_operand =
    std::conditional_t<std::is_same_v<S, quant::none<bfloat16>>, __nv_bfloat16, __half>;
// Policies that select a prefix of the keys and whose mask is monotone (a tile whose last key the
// first query sees is wholly visible).
template <class P>
inline constexpr bool mma_policy =
    std::is_same_v<P, sparse::dense> || std::is_same_v<P, sparse::causal>;

// The query tile of CTA `cta`: sequence b's tiles of `tile_queries` rows have the CTA indices
// q_indptr[b] / tile_queries + b onwards (never overlapping the next sequence's), so that a grid
// needs no host-side count of tiles.
struct query_tile {
  std::int32_t sequence;
  std::int64_t begin;      // the sequence's first row of q (at least 0)
  std::int64_t end;        // one past its last (at most q's rows)
  std::int64_t first_row;  // the tile's first row
  std::int64_t queries;    // the tile's rows; 0 for a CTA past its sequence's tiles
};

INFUSE_DEVICE inline query_tile tile_of_cta(const std::int32_t* q_indptr, std::int32_t batch,
                                            std::int64_t q_rows, std::int64_t cta,
                                            std::int64_t tile_queries) {
  // The sequence: the last whose first tile is at or before this CTA.
  std::int32_t b = 0;
  for (std::int32_t lo = 0, hi = batch - 1; lo <= hi;) {
    const std::int32_t mid = lo + (hi - lo) / 2;
    if (q_indptr[mid] / tile_queries + mid <= cta) {
      b = mid;
      lo = mid + 1;
    } else {
      hi = mid - 1;
    }
  }
  // Rows outside [0, q_rows) are never read, whatever q_indptr holds.
  const std::int64_t begin = q_indptr[b] > 0 ? q_indptr[b] : 0;
  query_tile tile{b, begin, q_indptr[b + 1] < q_rows ? q_indptr[b + 1] : q_rows, 0, 0};
  tile.first_row = tile.begin + (cta - (tile.begin / tile_queries + b)) * tile_queries;
  if (tile.first_row >= tile.begin && tile.first_row < tile.end) {
    tile.queries =
        tile.end - tile.first_row < tile_queries ? tile.end - tile.first_row : tile_queries;
  }
  return tile;
}

// Two floats as an operand pair: the first in the low 16 bits (the lower column of a fragment).
template <class T>
__device__ INFUSE_FORCE_INLINE std::uint32_t operand_pair(float low, float high) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 pair = __floats2half2_rn(low, high);
    return *reinterpret_cast<const std::uint32_t*>(&pair);
  } else {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
    return *reinterpret_cast<const std::uint32_t*>(&pair);
  }
}

// c += a b for one m16n8k16 tile: a (16x16, row-major) in 4 registers, b (16x8, column-major) in 2,
// c (16x8) in 4 floats, each in the PTX fragment layout.
template <class T>
__device__ INFUSE_FORCE_INLINE void mma_m16n8k16(float (&c)[4], const std::uint32_t (&a)[4],
                                                 std::uint32_t b0, std::uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ INFUSE_FORCE_INLINE std::uint32_t shared_address(const void* pointer) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(pointer));
}

// Four 8x8 matrices of 16-bit elements from shared memory: lane l gives the address of row l % 8
// of matrix l / 8 (16 bytes, aligned); register m holds, in lane l, row l / 4 elements
// 2 (l % 4), +1 of matrix m, or with Transposed column l / 4, rows 2 (l % 4), +1.
template <bool Transposed>
__device__ INFUSE_FORCE_INLINE void load_matrices(std::uint32_t (&r)[4], const void* row) {
  if constexpr (Transposed) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row))
                 : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row))
                 : "memory");
  }
}

__device__ INFUSE_FORCE_INLINE void copy_async_16(void* shared, const void* global) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(shared_address(shared)),
               "l"(global)
               : "memory");
}
__device__ INFUSE_FORCE_INLINE void commit_copies() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
__device__ INFUSE_FORCE_INLINE void wait_copies() {
  asm volatile("cp.async.wait_all;" ::: "memory");
}

// Halves (or bfloat16s) per shared row of a K or V tile.
template <int Dim>
inline constexpr int mma_pitch = Dim + 8;

// The keys' (Keys) or the values' vector format of a page format.
template <bool Keys, class Format>
INFUSE_DEVICE const auto& vectors_of(const Format& f) {
  if constexpr (Keys) {
    return f.k;
  } else {
    return f.v;
  }
}

// Keys [first, first + mma_keys) of sequence b, KV head h, into `tile` (mma_keys rows of
// mma_pitch<Dim> 16-bit elements): the keys' codes when Keys, else the values'. Keys at or past
// `end` become zeros. Every thread of the CTA calls it; native codes arrive by cp.async (the
// caller waits), others are stored before it returns.
template <bool Keys, int Dim, class Cache>
__device__ void stage_tile(std::uint16_t* tile, const Cache& cache, std::int32_t b, std::int32_t h,
                           std::int64_t first, std::int64_t end) {
  using S = std::conditional_t<Keys, typename Cache::k_scheme, typename Cache::v_scheme>;
  const auto& f = cache.format;
  const auto& vectors = vectors_of<Keys>(f);
  const auto record = [&](std::int64_t t, bool codes) {
    const kv::token_address at = cache.locate(b, t);
    if constexpr (Keys) {
      return codes ? f.k_codes(at.page, at.slot, h) : f.k_params(at.page, at.slot, h);
    } else {
      return codes ? f.v_codes(at.page, at.slot, h) : f.v_params(at.page, at.slot, h);
    }
  };
  const int thread = static_cast<int>(threadIdx.x);
  // A piece is 8 elements (native) or a quant block of 32 (dequantized) of one key; thread i
  // takes piece i % pieces_per_key of keys i / pieces_per_key, then every keys_per_pass keys on.
  constexpr int piece = mma_native_scheme<S> ? 8 : quant::block_size;
  constexpr int pieces_per_key = Dim / piece;
  constexpr int keys_per_pass = threads_per_cta / pieces_per_key;
  static_assert(threads_per_cta % pieces_per_key == 0 && mma_keys % keys_per_pass == 0);
  const int part = thread % pieces_per_key;
#pragma unroll
  for (int key = thread / pieces_per_key; key < mma_keys; key += keys_per_pass) {
    auto* destination = reinterpret_cast<uint4*>(tile + key * mma_pitch<Dim> + part * piece);
    const std::int64_t t = first + key;
    if (t >= end) {
#pragma unroll
      for (int v = 0; v < piece / 8; ++v) destination[v] = make_uint4(0, 0, 0, 0);
      continue;
    }
    if constexpr (mma_native_scheme<S>) {
      copy_async_16(destination, record(t, true) + part * 16);
    } else {
      gemm::cuda::detail::block_words<S> words;
      words.load(record(t, true) + std::int64_t{part} * S::block_bytes);
      const gemm::cuda::detail::dequantizer<S> value(
          vectors.group_params(record(t, false), part * quant::block_size / vectors.group_dims()));
      alignas(16) std::uint32_t pairs[quant::block_size / 2];
#pragma unroll
      for (int j = 0; j < quant::block_size / 2; ++j) {
        pairs[j] =
            operand_pair<__half>(value(words.bytes(), 2 * j), value(words.bytes(), 2 * j + 1));
      }
#pragma unroll
      for (int v = 0; v < quant::block_size / 8; ++v) {
        destination[v] = reinterpret_cast<const uint4*>(pairs)[v];
      }
    }
  }
}

// One tile of mma_queries queries of one sequence (blockIdx.x, reversed) and one query head
// (blockIdx.y); see the top of this file.
template <int Dim, class Layout, class K, class V, class Sparsity>
__global__ void __launch_bounds__(threads_per_cta)
    prefill_mma_kernel(kv::cache_view<Layout, K, V, device_memory> cache,
                       view<const float, 3, device_memory> q, const std::int32_t* q_indptr,
                       view<float, 3, device_memory> out, view<float, 2, device_memory> lse,
                       typename Sparsity::params sparsity, score_transform transform,
                       std::int32_t group) {
  using KT = mma_operand<K>;
  using VT = mma_operand<V>;
  constexpr int pitch = mma_pitch<Dim>;
  constexpr int key_tiles = mma_keys / 8;  // n-tiles of S
  constexpr int dim_tiles = Dim / 8;       // n-tiles of O
  __shared__ alignas(16) std::uint16_t k_tile[mma_keys * pitch];
  __shared__ alignas(16) std::uint16_t v_tile[mma_keys * pitch];

  const query_tile tile = tile_of_cta(q_indptr, cache.sequences(), q.extent(0),
                                      std::int64_t{gridDim.x} - 1 - blockIdx.x, mma_queries);
  if (tile.queries == 0) return;  // the whole CTA: no barrier left waiting
  const std::int32_t b = tile.sequence;
  const auto q_head = static_cast<std::int32_t>(blockIdx.y);
  const std::int32_t h = q_head / group;
  const std::int64_t length = cache.length(b);
  const std::int64_t new_begin = length - (tile.end - tile.begin);
  const std::int64_t query_begin = new_begin + (tile.first_row - tile.begin);  // row 0's position

  // The keys the policy selects for the tile: one range, clipped to the sequence.
  sparse::token_range selected[1];
  sparse::query_context context{};
  context.sequence = b;
  context.kv_head = h;
  context.length = length;
  context.query_begin = query_begin;
  context.query_end = query_begin + tile.queries;
  context.new_begin = new_begin;
  context.group = group;
  context.head_dim = Dim;
  context.scale = transform.scale;
  context.page_size = cache.format.slots;
  context.kv_heads = cache.format.k.heads;
  const std::int64_t ranges =
      sanitize_ranges(selected, Sparsity::select(sparsity, context, selected), length);
  const std::int64_t kv_begin = ranges > 0 ? selected[0].begin : 0;
  const std::int64_t kv_end = ranges > 0 ? selected[0].end : 0;

  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int g = lane / 4;  // the lane's rows g and g + 8 of the warp's 16, columns 2t, 2t + 1
  const int t = lane % 4;
  const int rows[2] = {warp * 16 + g, warp * 16 + g + 8};

  // Q's A fragments: k-step s holds dims 16 s + 2t, +1 (registers 0, 1) and +8, +9 (2, 3).
  std::uint32_t q_fragment[Dim / 16][4];
#pragma unroll
  for (int half_row = 0; half_row < 2; ++half_row) {
    const bool active = rows[half_row] < tile.queries;
    const std::int64_t row = tile.first_row + (active ? rows[half_row] : 0);
    const auto element = [&](int d) { return active ? q(row, q_head, d) : 0.0f; };
#pragma unroll
    for (int s = 0; s < Dim / 16; ++s) {
      const int d = 16 * s + 2 * t;
      q_fragment[s][half_row] = operand_pair<KT>(element(d), element(d + 1));
      q_fragment[s][half_row + 2] = operand_pair<KT>(element(d + 8), element(d + 9));
    }
  }

  float o[dim_tiles][4];
#pragma unroll
  for (int j = 0; j < dim_tiles; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[j][e] = 0.0f;
  }
  float row_max[2] = {-INFINITY, -INFINITY};  // base 2, rows g and g + 8
  float row_sum[2] = {0.0f, 0.0f};            // the lane's share of the sums
  const bool plain = transform.soft_cap <= 0.0f && transform.alibi_slopes == nullptr;
  const float scale_log2 = transform.scale * log2e;

  if (kv_begin < kv_end) {
    stage_tile<true, Dim>(k_tile, cache, b, h, kv_begin, kv_end);
    commit_copies();
  }
  for (std::int64_t first = kv_begin; first < kv_end; first += mma_keys) {
    wait_copies();
    __syncthreads();  // K(first) is in; every warp is done with the previous V tile
    stage_tile<false, Dim>(v_tile, cache, b, h, first, kv_end);
    commit_copies();

    // S = Q K^T. Matrices of one ldmatrix: keys 16 n + (0..7 | 8..15) by dims 16 s + (0..7 |
    // 8..15), in the order (keys low, dims low), (low, high), (high, low), (high, high): the
    // b0, b1 fragments of key tiles 2n and 2n + 1.
    float score[key_tiles][4];
#pragma unroll
    for (int j = 0; j < key_tiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) score[j][e] = 0.0f;
    }
#pragma unroll
    for (int s = 0; s < Dim / 16; ++s) {
#pragma unroll
      for (int n = 0; n < key_tiles / 2; ++n) {
        std::uint32_t k_fragment[4];
        load_matrices<false>(k_fragment, k_tile + (16 * n + lane / 16 * 8 + lane % 8) * pitch +
                                             16 * s + lane / 8 % 2 * 8);
        mma_m16n8k16<KT>(score[2 * n], q_fragment[s], k_fragment[0], k_fragment[1]);
        mma_m16n8k16<KT>(score[2 * n + 1], q_fragment[s], k_fragment[2], k_fragment[3]);
      }
    }

    // Base-2 scores; the mask only where the tile crosses the diagonal or the selection's end.
    const auto seen = [&](std::int64_t position, std::int64_t key) {
      return key < kv_end &&
             Sparsity::visible(sparsity, sparse::mask_context{b, position, key, new_begin});
    };
    const bool interior = first + mma_keys <= kv_end && seen(query_begin, first + mma_keys - 1);
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < key_tiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const std::int64_t position = query_begin + rows[e / 2];
        const std::int64_t key = first + 8 * j + 2 * t + e % 2;
        float s = plain ? score[j][e] * scale_log2
                        : transform(score[j][e], q_head, position, key) * log2e;
        if (!interior && !seen(position, key)) s = -INFINITY;
        score[j][e] = s;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], s);
      }
    }
    // The rows' maxima over the quad (the four lanes of a row), the rescale of what came before.
    float origin[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 1));
      tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 2));
      const float merged = fmaxf(row_max[i], tile_max[i]);
      origin[i] = merged == -INFINITY ? 0.0f : merged;  // no -inf - -inf
      const float previous = row_max[i] == merged ? 1.0f : fast_exp2(row_max[i] - origin[i]);
      row_max[i] = merged;
      row_sum[i] *= previous;
#pragma unroll
      for (int j = 0; j < dim_tiles; ++j) {
        o[j][2 * i] *= previous;
        o[j][2 * i + 1] *= previous;
      }
    }
    // P = 2^(s - max) as V-typed A fragments: key tiles 2 k and 2 k + 1 make k-step k.
    std::uint32_t p_fragment[mma_keys / 16][4];
#pragma unroll
    for (int j = 0; j < key_tiles; ++j) {
      float p[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        p[e] = fast_exp2(score[j][e] - origin[e / 2]);  // 0 for a masked score
        row_sum[e / 2] += p[e];
      }
      p_fragment[j / 2][j % 2 * 2] = operand_pair<VT>(p[0], p[1]);
      p_fragment[j / 2][j % 2 * 2 + 1] = operand_pair<VT>(p[2], p[3]);
    }

    wait_copies();
    __syncthreads();  // V(first) is in; every warp is done with K(first)
    if (first + mma_keys < kv_end) {
      stage_tile<true, Dim>(k_tile, cache, b, h, first + mma_keys, kv_end);
      commit_copies();
    }

    // O += P V. Matrices of one ldmatrix.trans: keys 16 k + (0..7 | 8..15) by dims 16 n +
    // (0..7 | 8..15), in the order (keys low, dims low), (high, low), (low, high), (high, high):
    // the b0, b1 fragments of dim tiles 2n and 2n + 1.
#pragma unroll
    for (int k = 0; k < mma_keys / 16; ++k) {
#pragma unroll
      for (int n = 0; n < dim_tiles / 2; ++n) {
        std::uint32_t v_fragment[4];
        load_matrices<true>(v_fragment, v_tile + (16 * k + lane / 8 % 2 * 8 + lane % 8) * pitch +
                                            16 * n + lane / 16 * 8);
        mma_m16n8k16<VT>(o[2 * n], p_fragment[k], v_fragment[0], v_fragment[1]);
        mma_m16n8k16<VT>(o[2 * n + 1], p_fragment[k], v_fragment[2], v_fragment[3]);
      }
    }
  }

  // out = O / sum, the lse; the quad's lanes hold a row's sum in shares.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float sum = row_sum[i];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    if (rows[i] >= tile.queries) continue;
    const softmax_state<log_base::two> state{row_max[i], sum};
    const float inverse = state.inverse_sum();
    const std::int64_t row = tile.first_row + rows[i];
#pragma unroll
    for (int j = 0; j < dim_tiles; ++j) {
      out(row, q_head, 8 * j + 2 * t) = o[j][2 * i] * inverse;
      out(row, q_head, 8 * j + 2 * t + 1) = o[j][2 * i + 1] * inverse;
    }
    if (t == 0 && lse.data() != nullptr) lse(row, q_head) = state.natural_lse();
  }
}

}  // namespace detail

// Whether prefill on the device takes the tensor-core body for these policies and head dims (see
// the top of this file); the others take the CUDA-core body.
template <class Sparsity, class KQuant, class VQuant>
constexpr bool prefill_takes_tensor_cores(std::int32_t k_head_dim, std::int32_t v_head_dim) {
  return detail::mma_policy<Sparsity> && detail::mma_scheme<KQuant> && detail::mma_scheme<VQuant> &&
         k_head_dim == v_head_dim && (k_head_dim == 64 || k_head_dim == 128);
}

namespace detail {

// The attention launch of the tensor-core body, after the store of the new K and V; the caller
// checked prefill_takes_tensor_cores.
template <class Sparsity, class Layout, class K, class V>
void launch_prefill_mma(const exec::cuda& exec, device_view<const float, 3> q,
                        device_view<const std::int32_t, 1> q_indptr,
                        const kv::cache_view<Layout, K, V, device_memory>& cache,
                        device_view<float, 3> out, const typename Sparsity::params& sparsity,
                        score_transform transform, device_view<float, 2> lse) {
  if constexpr (mma_policy<Sparsity> && mma_scheme<K> && mma_scheme<V>) {
    const std::int32_t group = static_cast<std::int32_t>(q.extent(1) / cache.format.k.heads);
    const dim3 grid(static_cast<unsigned>(q.extent(0) / mma_queries + cache.sequences()),
                    static_cast<unsigned>(q.extent(1)));
    const auto launch = [&]<int Dim>() {
      exec.launch(prefill_mma_kernel<Dim, Layout, K, V, Sparsity>, grid, dim3(threads_per_cta), 0,
                  cache, q, q_indptr.data(), out, lse, sparsity, transform, group);
    };
    if (cache.format.k.head_dim == 64) {
      launch.template operator()<64>();
    } else {
      launch.template operator()<128>();
    }
  }
}

}  // namespace detail

}  // namespace infuse::attention::cuda
