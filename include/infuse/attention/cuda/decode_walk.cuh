// The bandwidth-bound walk of CUDA decode (attention/cuda/decode.cuh): a CTA's online softmax over
// its selected tokens for the rows (query heads) of one KV head, every K and V byte read once with
// 16-byte vector loads.
//
// A stored vector (one token, one head) is cut into *slices* of 16 bytes of codes: 8 dims of f16,
// 4 of float, 16 of fp8 or int8, a whole block of 32 dims of int4. A token is read by `lanes`
// consecutive lanes of a warp (the slice count rounded up to a power of two, at most 32), lane
// `part` taking slices part, part + lanes, ...: so a warp reads 32 / lanes tokens with one load
// instruction, contiguous records in one coalesced request. Each *lane group* (the lanes of one
// token) loads lane_map::tokens tokens (4 for f16 and bf16, 2 where slices take more registers),
// K and V both, before it uses any of them: with f16 at dim 128 (2 tokens a load, 256 bytes of K
// and 256 of V a token) a warp keeps 4 KB in flight.
//
//   scores   the lane dequantizes its K slices in registers (gemm/cuda/gemv.cuh's dequantizer:
//            the scheme's own code and value) and multiplies them by its slices of the rows'
//            queries, held in registers; a butterfly over the group's lanes sums the dot product,
//            so every lane of the group holds the token's score per row (score transform,
//            visible() and log2(e) applied: base 2, -inf where hidden);
//   softmax  each lane group keeps its own online softmax per row: no exchange between groups
//            while walking;
//   values   the lane adds its V slices, weighed, into its accumulators (the dims of its slices);
//            a token no row weighs is not added (no 0 * NaN).
// At the end the groups of a warp merge by butterfly as softmax states, the warps through shared
// memory (merge_warps), into shared.warp_acc[0], warp_max[0], warp_sum[0], as the walk of
// attention/cuda/attend.cuh (which both share merge_warps from) leaves them.
//
// It takes the schemes whose 16 bytes of codes hold whole dims in order (sliced_walk_takes):
// quant::none, quant::fp8 and 8-bit quant::int_ (a slice is part of a block), and every scheme of
// 16-byte blocks (4-bit quant::int_: a slice is one block); stored dims up to 256. Every group of
// a scheme spans whole blocks, so a slice lies in one group: one parameter load per slice.
#pragma once

#include "infuse/core/config.hpp"

#if !defined(INFUSE_CUDA_COMPILER)
#error \
    "infuse/attention/cuda/decode_walk.cuh is CUDA code: include it from a .cu file compiled by nvcc"
#endif

#include <cuda_runtime.h>

#include <bit>
#include <cstdint>

#include "infuse/attention/cuda/attend.cuh"
#include "infuse/core/math.hpp"
#include "infuse/gemm/cuda/gemv.cuh"
#include "infuse/quant/fp8.hpp"
#include "infuse/quant/int.hpp"
#include "infuse/quant/none.hpp"
#include "infuse/quant/scheme.hpp"

namespace infuse::attention::cuda {

// Bytes of codes a lane loads at once.
inline constexpr int slice_bytes = 16;

// The largest stored dim the sliced walk takes.
inline constexpr int max_sliced_dim = 256;

// Floats of queries and accumulators a lane holds at most (rows x its dims of K and V).
inline constexpr int sliced_register_floats = 128;

namespace detail {

// Schemes whose code for dim j sits at byte j * block_bytes / 32 of its block, alone: any 16
// bytes of a block are whole dims, in order.
template <class S>
inline constexpr bool codes_in_dim_order = false;
template <class T>
inline constexpr bool codes_in_dim_order<quant::none<T>> = true;
template <class Format, int Group>
inline constexpr bool codes_in_dim_order<quant::fp8<Format, Group>> = true;
template <int Group, class Zero>
inline constexpr bool codes_in_dim_order<quant::int_<8, Group, Zero>> = true;

template <class S>
constexpr bool sliceable() {
  if constexpr (quant::scheme<S>) {
    return S::block_bytes == slice_bytes ||
           (S::block_bytes % slice_bytes == 0 && codes_in_dim_order<S>);
  } else {
    return false;  // kv::per_channel, kv::mixed: not a per-token scheme
  }
}

// Dims of one slice of scheme S.
template <class S>
inline constexpr int slice_dims = (quant::block_size * slice_bytes) / S::block_bytes;

// The lanes of a token and the registers of a lane for schemes K, V and stored dims up to Bound.
template <class K, class V, int Bound>
struct lane_map {
  static constexpr int k_slices = Bound / slice_dims<K>;
  static constexpr int v_slices = Bound / slice_dims<V>;
  static constexpr int most_slices = k_slices > v_slices ? k_slices : v_slices;
  static constexpr int lanes =
      most_slices >= 32 ? 32 : static_cast<int>(std::bit_ceil(static_cast<unsigned>(most_slices)));
  static constexpr int groups = 32 / lanes;  // tokens of one load instruction of a warp
  static constexpr int k_per_lane = (k_slices + lanes - 1) / lanes;
  static constexpr int v_per_lane = (v_slices + lanes - 1) / lanes;
  static constexpr int k_dims = k_per_lane * slice_dims<K>;  // a lane's K dims
  static constexpr int v_dims = v_per_lane * slice_dims<V>;
  // Tokens a lane group loads before it uses any: 4 where a lane takes one K and one V slice of
  // 16 dims together or fewer (f16, bf16, float up to dim 128), else 2, where the slices take
  // more registers (fp8 and int8: 16 dims a slice, int4: 32; two slices a lane).
  static constexpr int tokens = k_dims + v_dims <= 16 && k_per_lane + v_per_lane <= 2 ? 4 : 2;
  // Rows of a pass: the queries and accumulators stay within sliced_register_floats.
  static constexpr int rows_fitting = sliced_register_floats / (k_dims + v_dims);
  static constexpr int rows =
      rows_fitting >= 8 ? 8
                        : static_cast<int>(std::bit_floor(
                              static_cast<unsigned>(rows_fitting > 1 ? rows_fitting : 1)));
};

}  // namespace detail

// Whether decode reads K in KS and V in VS, stored dims up to Bound, with the sliced walk.
template <class KS, class VS, int Bound>
inline constexpr bool sliced_walk_takes =
    (Bound <= max_sliced_dim) && detail::sliceable<KS>() && detail::sliceable<VS>();

namespace detail {

// One slice of codes in registers.
struct slice_words {
  uint4 words;

  __device__ INFUSE_FORCE_INLINE void load(const std::uint8_t* slice) {
    words = __ldg(reinterpret_cast<const uint4*>(slice));
  }
  __device__ INFUSE_FORCE_INLINE const std::uint8_t* bytes() const {
    return reinterpret_cast<const std::uint8_t*>(&words);
  }
};

// One token's slices of a lane, K or V, with their groups' parameters.
template <class S, int PerLane>
struct token_slices {
  slice_words codes[PerLane];
  typename S::params params[PerLane];

  // Zeros, for a token past the end: added to nothing.
  __device__ INFUSE_FORCE_INLINE void clear() {
#pragma unroll
    for (int c = 0; c < PerLane; ++c) {
      codes[c].words = make_uint4(0u, 0u, 0u, 0u);
      params[c] = {};
    }
  }

  // Slices part, part + Lanes, ... below `slices` of the vector whose codes and parameter
  // records start at `record` and `record_params` (format f); zeros for the others.
  template <int Lanes, class Format>
  __device__ INFUSE_FORCE_INLINE void load(const Format& f, const std::uint8_t* record,
                                           const std::uint8_t* record_params, int part,
                                           int slices) {
    clear();
#pragma unroll
    for (int c = 0; c < PerLane; ++c) {
      const int slice = part + c * Lanes;
      if (slice < slices) {
        codes[c].load(record + std::int64_t{slice} * slice_bytes);
        params[c] = f.group_params(record_params, slice * slice_dims<S> / f.group_dims());
      }
    }
  }

  // Dim j of slice c, dequantized.
  __device__ INFUSE_FORCE_INLINE void dequantize(float (&out)[PerLane][slice_dims<S>]) const {
#pragma unroll
    for (int c = 0; c < PerLane; ++c) {
      const gemm::cuda::detail::dequantizer<S> value(params[c]);
#pragma unroll
      for (int j = 0; j < slice_dims<S>; ++j) out[c][j] = value(codes[c].bytes(), j);
    }
  }
};

// The CTA's walk over selected tokens [first, last) for rows 0 .. active_rows - 1 of shared
// (their queries loaded by load_rows; rows from active_rows on are not computed and end empty).
// Same results as walk() in attend.cuh, up to the order of float sums. Every thread of the CTA
// calls it; it ends with a barrier.
template <int Bound, int Rows, class Cache, class Sparsity>
INFUSE_DEVICE void sliced_walk(const walk_context<Cache, Sparsity>& c,
                               shared_rows<Bound, Bound, Rows>& shared, int active_rows,
                               std::int64_t first, std::int64_t last) {
  using KS = typename Cache::k_scheme;
  using VS = typename Cache::v_scheme;
  using map = lane_map<KS, VS, Bound>;
  static_assert(sliced_walk_takes<KS, VS, Bound>);
  constexpr int k_dims = slice_dims<KS>;
  constexpr int v_dims = slice_dims<VS>;
  constexpr int tokens_in_flight = map::tokens;
  constexpr int step = map::groups * tokens_in_flight;  // tokens of a warp's step
  const auto& f = c.cache.format;
  const int k_slices = static_cast<int>(f.k.code_bytes() / slice_bytes);
  const int v_slices = static_cast<int>(f.v.code_bytes() / slice_bytes);
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int part = lane % map::lanes;   // which slices of a token the lane reads
  const int group = lane / map::lanes;  // which token of a load the lane's group reads

  // The lane's slices of the queries (zeros past the stored dim).
  float q[Rows][map::k_per_lane][k_dims];
#pragma unroll
  for (int r = 0; r < Rows; ++r) {
#pragma unroll
    for (int s = 0; s < map::k_per_lane; ++s) {
      const int slice = part + s * map::lanes;
#pragma unroll
      for (int j = 0; j < k_dims; ++j) {
        q[r][s][j] = slice < k_slices ? shared.q[r][slice * k_dims + j] : 0.0f;
      }
    }
  }
  float row_max[Rows];
  float row_sum[Rows];
  float acc[Rows][map::v_per_lane][v_dims];
#pragma unroll
  for (int r = 0; r < Rows; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.0f;
#pragma unroll
    for (int s = 0; s < map::v_per_lane; ++s) {
#pragma unroll
      for (int j = 0; j < v_dims; ++j) acc[r][s][j] = 0.0f;
    }
  }

  for (std::int64_t base = first + std::int64_t{warp} * step; base < last;
       base += std::int64_t{warps_per_cta} * step) {
    // Every load of the step first: the group's tokens base + u * groups + group.
    std::int64_t position[tokens_in_flight];
    bool valid[tokens_in_flight];
    token_slices<KS, map::k_per_lane> keys[tokens_in_flight];
    token_slices<VS, map::v_per_lane> values[tokens_in_flight];
#pragma unroll
    for (int u = 0; u < tokens_in_flight; ++u) {
      const std::int64_t i = base + u * map::groups + group;
      valid[u] = i < last;
      position[u] = valid[u] ? token_at(c.ranges, c.range_count, i) : 0;
      if (valid[u]) {
        const kv::token_address at = c.cache.locate(c.sequence, position[u]);
        keys[u].template load<map::lanes>(f.k, f.k_codes(at.page, at.slot, c.kv_head),
                                          f.k_params(at.page, at.slot, c.kv_head), part, k_slices);
        values[u].template load<map::lanes>(f.v, f.v_codes(at.page, at.slot, c.kv_head),
                                            f.v_params(at.page, at.slot, c.kv_head), part,
                                            v_slices);
      } else {
        keys[u].clear();
        values[u].clear();
      }
    }

    // Scores, base 2: the same in every lane of the group.
    float score[tokens_in_flight][Rows];
#pragma unroll
    for (int u = 0; u < tokens_in_flight; ++u) {
      float key[map::k_per_lane][k_dims];
      keys[u].dequantize(key);
#pragma unroll
      for (int r = 0; r < Rows; ++r) {
        score[u][r] = -INFINITY;
        if (r >= active_rows) continue;  // the same in every lane
        float dot = 0.0f;
#pragma unroll
        for (int s = 0; s < map::k_per_lane; ++s) {
#pragma unroll
          for (int j = 0; j < k_dims; ++j) dot += q[r][s][j] * key[s][j];
        }
#pragma unroll
        for (int offset = map::lanes / 2; offset > 0; offset /= 2) {
          dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        }
        const row_info row = shared.rows[r];
        const bool seen =
            valid[u] && row.active &&
            Sparsity::visible(c.sparsity, sparse::mask_context{c.sequence, row.position,
                                                               position[u], c.new_begin});
        if (seen) score[u][r] = c.transform(dot, row.q_head, row.position, position[u]) * log2e;
        if (c.weights.data() != nullptr && part == 0 && valid[u] && row.active) {
          c.weights(c.sequence, row.q_head, position[u]) = score[u][r];
        }
      }
    }

    // The group's online softmax, then its values.
    float weight[tokens_in_flight][Rows];
#pragma unroll
    for (int r = 0; r < Rows; ++r) {
#pragma unroll
      for (int u = 0; u < tokens_in_flight; ++u) weight[u][r] = 0.0f;
      if (r >= active_rows) continue;
      float step_max = score[0][r];
#pragma unroll
      for (int u = 1; u < tokens_in_flight; ++u) step_max = fmaxf(step_max, score[u][r]);
      softmax_state<log_base::two> state{row_max[r], 0.0f};
      const float previous = state.merge({step_max, 0.0f}).previous;
      const float origin = state.max == -INFINITY ? 0.0f : state.max;
      row_max[r] = state.max;
      row_sum[r] *= previous;
#pragma unroll
      for (int u = 0; u < tokens_in_flight; ++u) {
        weight[u][r] = score[u][r] == -INFINITY ? 0.0f : fast_exp2(score[u][r] - origin);
        row_sum[r] += weight[u][r];
      }
#pragma unroll
      for (int s = 0; s < map::v_per_lane; ++s) {
#pragma unroll
        for (int j = 0; j < v_dims; ++j) acc[r][s][j] *= previous;
      }
    }
#pragma unroll
    for (int u = 0; u < tokens_in_flight; ++u) {
      bool needed = false;
#pragma unroll
      for (int r = 0; r < Rows; ++r) needed = needed || weight[u][r] != 0.0f;
      if (!needed) continue;  // the same in the lanes of the group; no shuffle below
      float value[map::v_per_lane][v_dims];
      values[u].dequantize(value);
#pragma unroll
      for (int r = 0; r < Rows; ++r) {
        if (r >= active_rows) continue;
#pragma unroll
        for (int s = 0; s < map::v_per_lane; ++s) {
#pragma unroll
          for (int j = 0; j < v_dims; ++j) acc[r][s][j] += weight[u][r] * value[s][j];
        }
      }
    }
  }

  // The groups of the warp merge by butterfly (lanes part, part + lanes, ... hold the same
  // slices), then group 0 writes the warp's state.
#pragma unroll
  for (int offset = map::lanes; offset < 32; offset *= 2) {
#pragma unroll
    for (int r = 0; r < Rows; ++r) {
      softmax_state<log_base::two> state{row_max[r], row_sum[r]};
      const softmax_rescale factors =
          state.merge({__shfl_xor_sync(0xffffffffu, row_max[r], offset),
                       __shfl_xor_sync(0xffffffffu, row_sum[r], offset)});
#pragma unroll
      for (int s = 0; s < map::v_per_lane; ++s) {
#pragma unroll
        for (int j = 0; j < v_dims; ++j) {
          const float other = __shfl_xor_sync(0xffffffffu, acc[r][s][j], offset);
          acc[r][s][j] = acc[r][s][j] * factors.previous + other * factors.incoming;
        }
      }
      row_max[r] = state.max;
      row_sum[r] = state.sum;
    }
  }
  if (group == 0) {
#pragma unroll
    for (int r = 0; r < Rows; ++r) {
      if (lane == 0) {
        shared.warp_max[warp][r] = row_max[r];
        shared.warp_sum[warp][r] = row_sum[r];
      }
#pragma unroll
      for (int s = 0; s < map::v_per_lane; ++s) {
        const int slice = part + s * map::lanes;
        if (slice >= v_slices) continue;
#pragma unroll
        for (int j = 0; j < v_dims; ++j)
          shared.warp_acc[warp][r][slice * v_dims + j] = acc[r][s][j];
      }
    }
  }
  merge_warps(shared, f.v.stored_dim());
}

}  // namespace detail

}  // namespace infuse::attention::cuda
