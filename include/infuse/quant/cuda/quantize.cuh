// quant::quantize<Scheme>(exec::cuda, w, codes, scales, zeros): round-to-nearest quantization of a
// float matrix in device memory, for the integer schemes (quant::int_), into buffers the caller
// owns. See docs/policies.md#quantization-schemes.
//
//   auto q = infuse::quant::quantize<quant::int_<4, 128>>(exec, w, codes, scales, zeros);
//   infuse::gemv(exec, q, x, y);   // q: quant::matrix<int_<4, 128>, device_memory>
//
// Bit-identical to the host's quant::quantize with rounding::nearest: the group's range is a
// min/max reduction (the same whatever the order), and the fit, the codes and the packing are
// the scheme's own INFUSE_HOST_DEVICE fit_range, group_params, encode and pack.
#pragma once

#include "infuse/core/config.hpp"

#if !defined(INFUSE_CUDA_COMPILER)
#error "infuse/quant/cuda/quantize.cuh is CUDA code: include it from a .cu file compiled by nvcc"
#endif

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "infuse/core/error.hpp"
#include "infuse/core/view.hpp"
#include "infuse/exec/cuda.cuh"
#include "infuse/quant/int.hpp"
#include "infuse/quant/matrix.hpp"
#include "infuse/quant/scheme.hpp"

namespace infuse::quant {

namespace detail {

inline constexpr int quantize_warps = 8;

// One warp per group: the lanes reduce the group's range, every lane fits it alike, lane 0
// stores the parameters, and each lane encodes and packs whole blocks of the group.
template <class S>
__global__ void __launch_bounds__(32 * quantize_warps)
    quantize_kernel(view<const float, 2, device_memory> w, std::uint8_t* codes, float* scales,
                    std::uint8_t* zeros) {
  const matrix<S, device_memory> shape{codes, scales, zeros, w.extent(0), w.extent(1)};
  const std::int64_t group =
      std::int64_t{blockIdx.x} * quantize_warps + static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  if (group >= shape.group_count()) return;  // a whole warp leaves: no shuffle is left waiting
  const std::int64_t row = group / shape.groups_per_row();
  const std::int64_t first_input = (group % shape.groups_per_row()) * shape.group_size();
  const float* values = w.data() + row * w.stride(0) + first_input;

  float lo = 0.0f;
  float hi = 0.0f;
  for (std::int64_t i = lane; i < shape.group_size(); i += 32) {
    lo = fminf(lo, values[i]);
    hi = fmaxf(hi, values[i]);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, offset));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, offset));
  }
  const stored_group<S> stored = S::fit_range(lo, hi, 1.0f);
  if (lane == 0) {
    scales[group] = stored.scales[0];
    if constexpr (S::has_zero) zeros[group] = stored.zero;
  }

  const auto p = S::group_params(stored.scales, stored.zero);
  const std::int64_t blocks = shape.group_size() / block_size;
  const std::int64_t first_block = first_input / block_size;
  for (std::int64_t b = lane; b < blocks; b += 32) {
    std::uint32_t block_codes[block_size];
#pragma unroll
    for (int j = 0; j < block_size; ++j) {
      block_codes[j] = S::encode(values[b * block_size + j], p);
    }
    std::uint8_t packed[S::block_bytes];
    S::pack(block_codes, packed);
    std::uint8_t* out = codes + (row * shape.blocks_per_row() + first_block + b) * S::block_bytes;
#pragma unroll
    for (int i = 0; i < S::block_bytes; ++i) out[i] = packed[i];
  }
}

}  // namespace detail

// Quantizes w (rows, cols; unit inner stride, any row stride) into codes (rows * cols / 32 *
// S::block_bytes bytes), scales (one float per group) and, with a zero point, zeros (one byte per
// group; ignored otherwise), all device memory the caller owns. Asynchronous on exec's stream;
// returns the view of the result. Throws infuse::error before launching for a shape the scheme
// cannot hold ("k"), a buffer of the wrong size, or options other than rounding::nearest.
template <class S>
matrix<S, device_memory> quantize(const exec::cuda& exec, device_view<const float, 2> w,
                                  device_view<std::uint8_t, 1> codes, device_view<float, 1> scales,
                                  device_view<std::uint8_t, 1> zeros,
                                  const quantize_options& options = {}) {
  static_check_scheme<S>();
  static_assert(is_int<S>,
                "infuse: quant::quantize on CUDA handles the integer schemes (quant::int_); "
                "quantize other schemes on the host; see docs/policies.md#quantization-schemes");
  constexpr std::string_view call = "infuse::quant::quantize";
  require_view(w, call, "w", {any_extent, any_extent}, stride_rule::unit_inner);
  require_shape<S>(call, w.extent(0), w.extent(1));
  require(options.method == rounding::nearest, call, "options.method",
          static_cast<int>(options.method), "rounding::nearest (the CUDA quantization's only one)");
  const matrix<S, device_memory> shape{nullptr, nullptr, nullptr, w.extent(0), w.extent(1)};
  const std::int64_t code_bytes = shape.rows * shape.blocks_per_row() * S::block_bytes;
  require_view(codes, call, "codes", {{code_bytes, "rows * cols / 32 * block_bytes"}});
  require_view(scales, call, "scales", {{shape.group_count(), "the group count"}});
  if constexpr (S::has_zero) {
    require_view(zeros, call, "zeros", {{shape.group_count(), "the group count"}});
  }
  const matrix<S, device_memory> out{
      codes.data(), scales.data(), S::has_zero ? zeros.data() : nullptr, w.extent(0), w.extent(1)};
  if (shape.rows == 0) return out;
  const std::int64_t blocks =
      (shape.group_count() + detail::quantize_warps - 1) / detail::quantize_warps;
  require(blocks <= 2147483647, call, "w", shape.group_count(), "at most 2^34 groups");
  exec.launch(detail::quantize_kernel<S>, dim3(static_cast<unsigned>(blocks)),
              dim3(32 * detail::quantize_warps), 0, view<const float, 2, device_memory>(w),
              codes.data(), scales.data(), S::has_zero ? zeros.data() : nullptr);
  return out;
}

}  // namespace infuse::quant
