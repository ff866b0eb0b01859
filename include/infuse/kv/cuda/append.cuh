// The CUDA bodies of the KV cache's append (kv/cuda/cache.cuh launches them): quantize rows of K
// and V into their slots, fold stored keys into the per-page key bounds, zero attention mass.
//
// Bit-identical to the host cache (kv/page_pool.hpp, kv/format.hpp's vector_format::encode and
// kv/metadata.hpp's fold_key_bounds) by construction: a group's range is a min/max (the same in
// any order, with the host's comparisons, so NaN is skipped alike), the fit, the codes and the
// packing are the scheme's own INFUSE_HOST_DEVICE fit_range, group_params, encode and pack, and
// each channel's bounds fold the slots in the host's order with the host's comparisons.
#pragma once

#include "infuse/core/config.hpp"

#if !defined(INFUSE_CUDA_COMPILER)
#error "infuse/kv/cuda/append.cuh is CUDA code: include it from a .cu file compiled by nvcc"
#endif

#include <cuda_runtime.h>

#include <cstdint>

#include "infuse/core/memory.hpp"
#include "infuse/core/view.hpp"
#include "infuse/kv/format.hpp"
#include "infuse/kv/page_pool.hpp"
#include "infuse/quant/int.hpp"
#include "infuse/quant/none.hpp"
#include "infuse/quant/scheme.hpp"

namespace infuse::kv::detail {

// Schemes the device append encodes: the unquantized ones and the integer ones.
template <class S>
inline constexpr bool device_encodable = quant::is_none<S> || quant::is_int<S>;

inline constexpr unsigned full_warp = 0xffffffffu;
inline constexpr int append_threads = 256;
// Enough blocks of append_threads to fill any device; more vectors loop.
inline constexpr std::int64_t most_append_blocks = 1 << 16;

// The stored parameters of a group whose range is [lo, hi] (lo <= 0 <= hi).
template <class S>
__device__ quant::stored_group<S> fit_group(float lo, float hi) {
  if constexpr (quant::is_none<S>) {
    return {};
  } else {
    return S::fit_range(lo, hi, 1.0f);
  }
}

// Writes a block's 32 codes as the scheme's pack does (none: the raw 16- or 32-bit words).
template <class S>
__device__ void store_block(const std::uint32_t (&codes)[quant::block_size], std::uint8_t* out) {
  if constexpr (quant::is_none<S>) {
    using storage = typename S::storage;
    auto* words = reinterpret_cast<storage*>(out);
#pragma unroll
    for (int j = 0; j < quant::block_size; ++j) words[j] = static_cast<storage>(codes[j]);
  } else {
    // Block bytes are a multiple of 4 and every block starts 4-byte aligned.
    std::uint32_t packed[S::block_bytes / 4];
    S::pack(codes, reinterpret_cast<std::uint8_t*>(packed));
    auto* words = reinterpret_cast<std::uint32_t*>(out);
#pragma unroll
    for (int i = 0; i < S::block_bytes / 4; ++i) words[i] = packed[i];
  }
}

// One warp quantizes one vector (head_dim floats or halves at x, read as floats) into its code
// and parameter records:
// lane b holds block b (dims 32b .. 32b + 31, zeros past head_dim) and a group's lanes share its
// range by shuffles. Every lane of the warp calls it.
template <class S, class Row>
__device__ void encode_vector(const vector_format<S>& format, const Row* x, std::uint8_t* codes,
                              std::uint8_t* params, int lane) {
  const int blocks = format.blocks();
  const bool active = lane < blocks;
  float values[quant::block_size];
  float lo = 0.0f;
  float hi = 0.0f;
#pragma unroll
  for (int j = 0; j < quant::block_size; ++j) {
    const int d = lane * quant::block_size + j;
    values[j] = active && d < format.head_dim ? static_cast<float>(x[d]) : 0.0f;
    lo = values[j] < lo ? values[j] : lo;  // the host fit's comparisons: NaN never wins
    hi = values[j] > hi ? values[j] : hi;
  }
  const int lanes_per_group = format.group_dims() / quant::block_size;
  const int group = lane / lanes_per_group;
  const int first_lane = group * lanes_per_group;
  float group_lo = 0.0f;
  float group_hi = 0.0f;
  for (int i = 0; i < lanes_per_group; ++i) {  // the same count on every lane
    // Lanes past the last block read wrapped lanes; their range is never used.
    const float other_lo = __shfl_sync(full_warp, lo, first_lane + i);
    const float other_hi = __shfl_sync(full_warp, hi, first_lane + i);
    group_lo = other_lo < group_lo ? other_lo : group_lo;
    group_hi = other_hi > group_hi ? other_hi : group_hi;
  }
  const quant::stored_group<S> stored = fit_group<S>(group_lo, group_hi);

  // The parameter record: scales, then a zero point per group, then zero padding (the host
  // clears the record first).
  const int groups = format.groups();
  if constexpr (S::scales_per_group > 0) {
    if (active && lane == first_lane) {
      auto* scales = reinterpret_cast<float*>(params) + group * S::scales_per_group;
#pragma unroll
      for (int i = 0; i < S::scales_per_group; ++i) scales[i] = stored.scales[i];
    }
  }
  const int zero_offset = groups * S::scales_per_group * 4;
  const int tail = static_cast<int>(format.param_bytes()) - zero_offset;
  const int zero = __shfl_sync(full_warp, static_cast<int>(stored.zero),
                               (lane < groups ? lane : groups - 1) * lanes_per_group);
  if (lane < tail) {
    params[zero_offset + lane] = S::has_zero && lane < groups ? static_cast<std::uint8_t>(zero) : 0;
  }
  if (lane + 32 < tail) params[zero_offset + lane + 32] = 0;  // groups <= 32: padding only

  if (active) {
    const typename S::params p = S::group_params(stored.scales, stored.zero);
    std::uint32_t block_codes[quant::block_size];
#pragma unroll
    for (int j = 0; j < quant::block_size; ++j) block_codes[j] = S::encode(values[j], p);
    store_block<S>(block_codes, codes + std::int64_t{lane} * S::block_bytes);
  }
}

// One warp per (row, head) vector of k then v, striding over the grid's warps. runs (ascending
// rows) say where row r goes: the last run whose first row is at or before r.
template <class Format, class Row>
__global__ void __launch_bounds__(append_threads)
    encode_rows_kernel(Format format, const page_run* runs, std::int32_t run_count,
                       view<const Row, 3, device_memory> k, view<const Row, 3, device_memory> v,
                       std::uint8_t* pages) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const std::int32_t heads = format.k.heads + format.v.heads;
  const std::int64_t vectors = k.extent(0) * heads;
  const std::int64_t grid_warps = std::int64_t{gridDim.x} * (append_threads / 32);
  // The loop's bounds are the same on every lane of a warp: the shuffles see the whole warp.
  for (std::int64_t warp = (std::int64_t{blockIdx.x} * append_threads + threadIdx.x) / 32;
       warp < vectors; warp += grid_warps) {
    const std::int64_t row = warp / heads;
    const auto head = static_cast<std::int32_t>(warp % heads);
    std::int32_t low = 0;
    std::int32_t high = run_count - 1;
    while (low < high) {
      const std::int32_t middle = (low + high + 1) / 2;
      if (runs[middle].row <= row) {
        low = middle;
      } else {
        high = middle - 1;
      }
    }
    const page_run run = runs[low];
    const auto slot = static_cast<std::int32_t>(run.slot_begin + (row - run.row));
    std::uint8_t* page = pages + run.page * format.page_bytes();
    if (head < format.k.heads) {
      encode_vector(format.k, k.data() + row * k.stride(0) + head * k.stride(1),
                    format.k_codes(page, slot, head), format.k_params(page, slot, head), lane);
    } else {
      const std::int32_t h = head - format.k.heads;
      encode_vector(format.v, v.data() + row * v.stride(0) + h * v.stride(1),
                    format.v_codes(page, slot, h), format.v_params(page, slot, h), lane);
    }
  }
}

// One block per run (runs[blockIdx.x], or `single` when runs is null): each thread folds the
// run's stored keys of its channels into the page's bounds, slot after slot as the host does,
// and stores them rounded outward to half (the rounding of a running minimum is the running
// minimum of the roundings: the host's fold_key gives the same bits); a run from slot 0 starts
// the bounds afresh.
template <class Format>
__global__ void __launch_bounds__(append_threads)
    fold_bounds_kernel(Format format, const page_run* runs, page_run single,
                       const std::uint8_t* pages, half* key_min, half* key_max) {
  const page_run run = runs == nullptr ? single : runs[blockIdx.x];
  const std::int32_t head_dim = format.k.head_dim;
  const std::int64_t channels = std::int64_t{format.k.heads} * head_dim;
  const std::uint8_t* page = pages + run.page * format.page_bytes();
  half* page_min = key_min + run.page * channels;
  half* page_max = key_max + run.page * channels;
  for (std::int64_t c = threadIdx.x; c < channels; c += append_threads) {
    const auto head = static_cast<std::int32_t>(c / head_dim);
    const auto d = static_cast<int>(c % head_dim);
    const float infinity = __int_as_float(0x7f800000);
    float lo = run.slot_begin == 0 ? infinity : static_cast<float>(page_min[c]);
    float hi = run.slot_begin == 0 ? -infinity : static_cast<float>(page_max[c]);
    for (std::int32_t slot = run.slot_begin; slot < run.slot_end; ++slot) {
      const float key =
          format.k.value(format.k_codes(page, slot, head), format.k_params(page, slot, head), d);
      lo = key < lo ? key : lo;  // std::min(lo, key)
      hi = hi < key ? key : hi;  // std::max(hi, key)
    }
    page_min[c] = half_at_most(lo);
    page_max[c] = half_at_least(hi);
  }
}

// One block per run: zeroes the attention mass of its slots ((pages, slots, k.heads) floats).
template <class Format>
__global__ void __launch_bounds__(append_threads)
    clear_mass_kernel(Format format, const page_run* runs, float* mass) {
  const page_run run = runs[blockIdx.x];
  const std::int32_t heads = format.k.heads;
  float* first = mass + (std::int64_t{run.page} * format.slots + run.slot_begin) * heads;
  const std::int64_t count = std::int64_t{run.slot_end - run.slot_begin} * heads;
  for (std::int64_t i = threadIdx.x; i < count; i += append_threads) first[i] = 0.0f;
}

}  // namespace infuse::kv::detail
