// The CUDA body of infuse::gemv (gemm/gemv.hpp): weight-only quantized GEMV, any quant::scheme.
//
// A block of 8 warps owns 16 consecutive rows of W, 2 per warp (gated_gemv: 8 rows, each warp row
// n of W_gate and row n of W_up, x read once for both). It walks the inputs in chunks of
// 1024 (32 blocks of 32 inputs): lane l takes block l of the chunk in each of its warp's rows, so
// one warp-wide load of each row's codes is contiguous (coalesced), and the lane issues the loads
// of both rows (16-byte vectors where the block layout allows) and of their group parameters
// before the chunk of x is staged in shared memory, so they are in flight meanwhile; for blocks
// of 32 bytes or less (int8 and narrower) the loads of the next chunk are issued before the
// current chunk is multiplied, so two chunks are in flight. The lane dequantizes its blocks in
// registers and multiplies them into one accumulator per (row, batch row); a warp-shuffle reduction
// ends the row, and the lane that stores an output applies the epilogue (bias, activation, gate,
// residual) first. Batch 1..8 is one launch that reads W once; 9..15 run in tiles of 8 batch rows
// (W read once per tile). Batches of tensor_core_min_batch rows or more go to the tensor-core body,
// gemm/cuda/gemm_tc.cuh, which rounds x and the weights to half.
//
// x in shared memory is stored as float4 vectors, vector q of block b at b * 8 + (q ^ (b % 8)):
// eight lanes that read vector q of eight consecutive blocks then hit eight different bank
// quadruples (unswizzled, they would all hit the same four banks).
//
// x may be float, half or bfloat16 (gemm/gemv.hpp): it is converted to float as it is staged,
// exactly, so everything after the staging is the same code for the three.
//
// With gemm::lut_activations (quant::bcq weights) the product takes the LUT-GEMV of
// gemm/cuda/lut.cuh instead, at every batch.
//
// A weight here equals quant::dequantize's bit for bit: integer codes become floats through the
// exponent of 2^23 (u + 2^23 is exact), and (u + 2^23) - (zero + 2^23) is u - zero exactly, the
// value the scheme's value() multiplies by the scale. Only the order of the sums differs from the
// CPU body.
#pragma once

#include "infuse/core/config.hpp"

#if !defined(INFUSE_CUDA_COMPILER)
#error "infuse/gemm/cuda/gemv.cuh is CUDA code: include it from a .cu file compiled by nvcc"
#endif

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string>
#include <type_traits>

#include "infuse/core/error.hpp"
#include "infuse/core/float_types.hpp"
#include "infuse/core/view.hpp"
#include "infuse/exec/cuda.cuh"
#include "infuse/gemm/gemv.hpp"
#include "infuse/quant/int.hpp"
#include "infuse/quant/matrix.hpp"
#include "infuse/quant/none.hpp"
#include "infuse/quant/scheme.hpp"

namespace infuse::gemm::cuda {

inline constexpr int warps_per_block = 8;
inline constexpr int threads_per_block = 32 * warps_per_block;
inline constexpr int slots_per_warp = 2;  // rows of W a warp computes at once
template <bool Gated>
inline constexpr int rows_per_block = warps_per_block * (Gated ? 1 : slots_per_warp);
inline constexpr int chunk_blocks = 32;  // one block of codes per lane and row
inline constexpr int chunk_inputs = chunk_blocks * quant::block_size;
inline constexpr int chunk_vectors = chunk_inputs / 4;  // float4 vectors of x per batch row
inline constexpr int max_batch_tile = 8;

// Bytes per code load: the widest of 16, 8, 4 that divides the block, so that with w.codes so
// aligned every block starts aligned. Every shipped scheme's block is a multiple of 4 bytes.
template <class S>
inline constexpr int load_bytes = std::gcd(S::block_bytes, 16);

namespace detail {

// The words of one block of codes, loaded in load_bytes<S> vectors through the read-only path.
template <class S>
struct block_words {
  static_assert(S::block_bytes % 4 == 0,
                "infuse: the CUDA gemv reads blocks of codes in 32-bit words: a scheme's "
                "block_bytes must be a multiple of 4; see docs/policies.md#quantization-schemes");
  std::uint32_t word[S::block_bytes / 4];

  __device__ INFUSE_FORCE_INLINE void load(const std::uint8_t* block) {
    constexpr int width = load_bytes<S>;
#pragma unroll
    for (int v = 0; v < S::block_bytes / width; ++v) {
      if constexpr (width == 16) {
        const uint4 q = __ldg(reinterpret_cast<const uint4*>(block) + v);
        word[4 * v] = q.x;
        word[4 * v + 1] = q.y;
        word[4 * v + 2] = q.z;
        word[4 * v + 3] = q.w;
      } else if constexpr (width == 8) {
        const uint2 q = __ldg(reinterpret_cast<const uint2*>(block) + v);
        word[2 * v] = q.x;
        word[2 * v + 1] = q.y;
      } else {
        word[v] = __ldg(reinterpret_cast<const unsigned int*>(block) + v);
      }
    }
  }
  __device__ INFUSE_FORCE_INLINE const std::uint8_t* bytes() const {
    return reinterpret_cast<const std::uint8_t*>(word);
  }
};

// A group's parameters as the inner loop uses them: for integer schemes the zero is moved by
// 2^23 so that one subtraction turns the biased code into u - zero.
template <class S>
struct dequantizer {
  typename S::params p;

  __device__ INFUSE_FORCE_INLINE explicit dequantizer(const typename S::params& params)
      : p(params) {
    if constexpr (quant::is_int<S>) p.zero += 8388608.0f;  // exact: zero is an integer below 256
  }
  // Weight j of the block in `bytes`, equal to quant::dequantize<S>(bytes, j, params).
  __device__ INFUSE_FORCE_INLINE float operator()(const std::uint8_t* bytes, int j) const {
    if constexpr (quant::is_int<S>) {
      const float biased = __uint_as_float(0x4B000000u | S::code(bytes, j));  // 2^23 + u
      return p.scale * (biased - p.zero);
    } else {
      return S::value(S::code(bytes, j), p);
    }
  }
};

// An activation as float, exactly: half through the hardware conversion, bfloat16 by its place
// as the top half of a float.
template <class X>
__device__ INFUSE_FORCE_INLINE float to_float(X value) {
  if constexpr (std::is_same_v<X, float>) {
    return value;
  } else if constexpr (std::is_same_v<X, infuse::half>) {
    return __half2float(__ushort_as_half(value.bits()));
  } else {
    static_assert(std::is_same_v<X, infuse::bfloat16>);
    return __uint_as_float(std::uint32_t{value.bits()} << 16);
  }
}

INFUSE_DEVICE INFUSE_FORCE_INLINE int swizzled_vector(int block, int q) {
  return block * 8 + (q ^ (block & 7));
}

// The epilogue of an output: y = act(product + bias) + residual, or with a gate,
// y = gate(product) * up + residual. Pointers are null when absent; residual points at the tile's
// first batch row.
struct epilogue {
  const float* bias;
  act activation;
  act gate;
  const float* residual;
  std::int64_t residual_stride;

  __device__ INFUSE_FORCE_INLINE float operator()(float product, float up, std::int64_t row, int b,
                                                  bool gated) const {
    float value = gated ? apply(gate, product) * up
                        : apply(activation, bias != nullptr ? product + bias[row] : product);
    if (residual != nullptr) value += residual[b * residual_stride + row];
    return value;
  }
};

// y(b, row) for the block's rows and batch rows b < batch <= Batch; x, y and the residual point
// at the tile's first batch row. Every index is checked against w's shape and `batch`: rows past
// the end and blocks past the row's end load nothing and store nothing. Gated: slot 0 of a warp
// is row n of w, slot 1 row n of w_up (same shape, checked on the host).
template <class S, class X, int Batch, bool Gated>
__global__ void __launch_bounds__(threads_per_block)
    gemv_kernel(quant::matrix<S, device_memory> w, quant::matrix<S, device_memory> w_up,
                const X* __restrict__ x, std::int64_t x_stride, float* y, std::int64_t y_stride,
                int batch, epilogue finish) {
  __shared__ float4 x_tile[Batch][chunk_vectors];  // (Batch, chunk_inputs / 4), swizzled
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const std::int64_t first_row = std::int64_t{blockIdx.x} * rows_per_block<Gated> +
                                 std::int64_t{warp} * (Gated ? 1 : slots_per_warp);
  const std::int64_t blocks_per_row = w.blocks_per_row();
  const std::int64_t group_size = w.group_size();
  const auto slot_row = [&](int slot) { return first_row + (Gated ? 0 : slot); };
  const auto slot_matrix = [&](int slot) -> const quant::matrix<S, device_memory>& {
    return Gated && slot == 1 ? w_up : w;
  };

  float sum[slots_per_warp][Batch];
#pragma unroll
  for (int r = 0; r < slots_per_warp; ++r) {
#pragma unroll
    for (int b = 0; b < Batch; ++b) sum[r][b] = 0.0f;
  }

  // A chunk's loads: each row's block of codes and its group's parameters, issued together so
  // that the parameters are not a second round trip after the codes.
  struct chunk_loads {
    bool active[slots_per_warp];
    block_words<S> codes[slots_per_warp];
    typename S::params params[slots_per_warp];
  };
  const auto load_chunk = [&](std::int64_t chunk, chunk_loads& loads) {
    const std::int64_t block = chunk + lane;
#pragma unroll
    for (int r = 0; r < slots_per_warp; ++r) {
      loads.active[r] = slot_row(r) < w.rows && block < blocks_per_row;
      if (loads.active[r]) {
        loads.codes[r].load(slot_matrix(r).block(slot_row(r), block));
        loads.params[r] =
            slot_matrix(r).group_params(slot_row(r), block * quant::block_size / group_size);
      }
    }
  };
  // Small blocks (int8 and below: 32 bytes a row or less) load the next chunk while the current
  // one is multiplied, so that two chunks' codes are in flight; wider blocks would spill the
  // registers that the second set takes.
  constexpr bool prefetch_next = S::block_bytes <= 32;
  chunk_loads next{};
  if constexpr (prefetch_next) load_chunk(0, next);

  for (std::int64_t chunk = 0; chunk < blocks_per_row; chunk += chunk_blocks) {
    chunk_loads current;
    if constexpr (prefetch_next) {
      current = next;
      if (chunk + chunk_blocks < blocks_per_row) load_chunk(chunk + chunk_blocks, next);
    } else {
      load_chunk(chunk, current);
    }

    __syncthreads();  // the previous chunk's x is no longer read
    // Consecutive threads read consecutive floats of x; inputs past k and batch rows past
    // `batch` are staged as zeros and never multiplied into a stored sum.
    float* tile = reinterpret_cast<float*>(&x_tile[0][0]);
    for (int i = static_cast<int>(threadIdx.x); i < Batch * chunk_inputs; i += threads_per_block) {
      const int b = i / chunk_inputs;
      const int input = i % chunk_inputs;
      const std::int64_t k = chunk * quant::block_size + input;
      const float value = b < batch && k < w.cols ? to_float(x[b * x_stride + k]) : 0.0f;
      tile[b * chunk_inputs + 4 * swizzled_vector(input / 32, (input % 32) / 4) + input % 4] =
          value;
    }
    __syncthreads();

#pragma unroll
    for (int r = 0; r < slots_per_warp; ++r) {
      if (!current.active[r]) continue;
      const dequantizer<S> weight(current.params[r]);
      const std::uint8_t* bytes = current.codes[r].bytes();
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        float4 xv[Batch];
#pragma unroll
        for (int b = 0; b < Batch; ++b) xv[b] = x_tile[b][swizzled_vector(lane, q)];
        const float w0 = weight(bytes, 4 * q);
        const float w1 = weight(bytes, 4 * q + 1);
        const float w2 = weight(bytes, 4 * q + 2);
        const float w3 = weight(bytes, 4 * q + 3);
#pragma unroll
        for (int b = 0; b < Batch; ++b) {
          sum[r][b] += w0 * xv[b].x + w1 * xv[b].y + w2 * xv[b].z + w3 * xv[b].w;
        }
      }
    }
  }

  // The butterfly leaves every lane with the totals; one lane per output stores it.
#pragma unroll
  for (int r = 0; r < slots_per_warp; ++r) {
#pragma unroll
    for (int b = 0; b < Batch; ++b) {
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {
        sum[r][b] += __shfl_xor_sync(0xffffffffu, sum[r][b], offset);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < (Gated ? 1 : slots_per_warp); ++r) {
#pragma unroll
    for (int b = 0; b < Batch; ++b) {
      const std::int64_t row = slot_row(r);
      if (lane == (r * Batch + b) % 32 && b < batch && row < w.rows) {
        y[b * y_stride + row] = finish(sum[r][b], Gated ? sum[1][b] : 0.0f, row, b, Gated);
      }
    }
  }
}

// One launch over `count` <= 8 batch rows, with the smallest instantiation that holds them.
template <bool Gated, class S, class X>
void launch_gemv_tile(const exec::cuda& exec, const quant::matrix<S, device_memory>& w,
                      const quant::matrix<S, device_memory>& w_up, const X* x,
                      std::int64_t x_stride, float* y, std::int64_t y_stride, int count,
                      const epilogue& finish) {
  const dim3 grid(
      static_cast<unsigned>((w.rows + rows_per_block<Gated> - 1) / rows_per_block<Gated>));
  const dim3 block(threads_per_block);
  const auto launch = [&](auto kernel) {
    exec.launch(kernel, grid, block, 0, w, w_up, x, x_stride, y, y_stride, count, finish);
  };
  if (count == 1) {
    launch(gemv_kernel<S, X, 1, Gated>);
  } else if (count == 2) {
    launch(gemv_kernel<S, X, 2, Gated>);
  } else if (count <= 4) {
    launch(gemv_kernel<S, X, 4, Gated>);
  } else {
    launch(gemv_kernel<S, X, 8, Gated>);
  }
}

// out(b, c) = x(b, order[c]) as float: x gathered through the inputs' order (GPTQ act-order) into
// the caller's float workspace, so that the product after it reads float x. An order entry
// outside [0, k) reads as 0: the host cannot check a device array.
template <class X>
__global__ void gather_inputs_kernel(const X* __restrict__ x, std::int64_t x_stride,
                                     const std::int32_t* __restrict__ order, float* out,
                                     std::int64_t batch, std::int64_t k) {
  const std::int64_t i = std::int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (i >= batch * k) return;
  const std::int64_t b = i / k;
  const std::int32_t input = order[i % k];
  out[i] = input >= 0 && input < k ? to_float(x[b * x_stride + input]) : 0.0f;
}

template <class X>
device_view<const float, 2> gather_inputs(const exec::cuda& exec, device_view<const X, 2> x,
                                          const gemv_options& options) {
  const std::int64_t batch = x.extent(0);
  const std::int64_t k = x.extent(1);
  const std::int64_t count = batch * k;
  exec.launch(gather_inputs_kernel<X>, dim3(static_cast<unsigned>((count + 255) / 256)), dim3(256),
              0, x.data(), x.stride(0), options.input_order, options.input_workspace, batch, k);
  return device_view<const float, 2>(options.input_workspace, {batch, k});
}

// Batches from this size multiply on tensor cores (gemm/cuda/gemm_tc.cuh), for schemes whose
// dequantized weights half holds; float and bfloat16 weights keep the GEMV's float products.
inline constexpr std::int64_t tensor_core_min_batch = 16;
template <class S>
inline constexpr bool tensor_core_scheme =
    !std::is_same_v<S, quant::none<float>> && !std::is_same_v<S, quant::none<bfloat16>>;

template <bool Gated, class S, class X>
void run_tensor_core(const exec::cuda& exec, const quant::matrix<S, device_memory>& w,
                     const quant::matrix<S, device_memory>& w_up, device_view<const X, 2> x,
                     device_view<float, 2> y, epilogue finish);

// The LUT-GEMV of quant::bcq weights (gemm/cuda/lut.cuh), every batch tile.
template <bool Gated, class S, class X>
void run_lut(const exec::cuda& exec, const quant::matrix<S, device_memory>& w,
             const quant::matrix<S, device_memory>& w_up, device_view<const X, 2> x,
             device_view<float, 2> y, epilogue finish);

// Every batch tile of a product, gated or not.
template <bool Gated, class S, class X>
void run_tiles(const exec::cuda& exec, const quant::matrix<S, device_memory>& w,
               const quant::matrix<S, device_memory>& w_up, device_view<const X, 2> x,
               device_view<float, 2> y, epilogue finish) {
  const std::int64_t batch = x.extent(0);
  if constexpr (tensor_core_scheme<S>) {
    if (batch >= tensor_core_min_batch) {
      run_tensor_core<Gated>(exec, w, w_up, x, y, finish);
      return;
    }
  }
  const float* residual = finish.residual;
  for (std::int64_t first = 0; first < batch; first += max_batch_tile) {
    const int count = static_cast<int>(std::min<std::int64_t>(max_batch_tile, batch - first));
    if (residual != nullptr) finish.residual = residual + first * finish.residual_stride;
    launch_gemv_tile<Gated>(exec, w, w_up, x.data() + first * x.stride(0), x.stride(0),
                            y.data() + first * y.stride(0), y.stride(0), count, finish);
  }
}

}  // namespace detail

// What this body asks beyond gemv's common checks; throws infuse::error naming the argument.
template <class S>
void check_cuda_gemv_arguments(const quant::matrix<S, device_memory>& w) {
  constexpr std::string_view call = "infuse::gemv";
  require(reinterpret_cast<std::uintptr_t>(w.codes) % load_bytes<S> == 0, call, "w.codes",
          static_cast<const void*>(w.codes),
          "a pointer aligned to " + std::to_string(load_bytes<S>) +
              " bytes (the CUDA body loads codes in vectors of that size; cudaMalloc aligns to "
              "256)");
  require(w.rows <= std::int64_t{rows_per_block<true>} * 2147483647, call, "n", w.rows,
          "at most 2^31 - 1 blocks of 8 rows");
}

}  // namespace infuse::gemm::cuda

namespace infuse::gemm::detail {

template <>
struct gemv_body<exec::cuda> {
  template <class S, class X>
  static void run(const exec::cuda& exec, const quant::matrix<S, device_memory>& w,
                  device_view<const X, 2> x, device_view<float, 2> y, const gemv_options&) {
    cuda::check_cuda_gemv_arguments(w);
    if (w.rows == 0) return;
    cuda::detail::run_tiles<false>(exec, w, w, x, y, {nullptr, act::none, act::none, nullptr, 0});
  }

  template <class S, class X, class Activations>
  static void run_fused(const exec::cuda& exec, const quant::matrix<S, device_memory>& w,
                        const quant::matrix<S, device_memory>* w_up, device_view<const X, 2> x,
                        device_view<float, 2> y, const gemv_options& options, act gate,
                        const Activations&) {
    static_assert(!std::is_same_v<Activations, int8_activations>,
                  "infuse: the CUDA gemv takes float or lut activations (gemm::float_activations, "
                  "gemm::lut_activations); int8 activations are CPU only; see "
                  "docs/policies.md#quantized-gemv");
    cuda::check_cuda_gemv_arguments(w);
    if (w_up != nullptr) cuda::check_cuda_gemv_arguments(*w_up);
    if (w.rows == 0) return;
    const cuda::detail::epilogue finish{
        options.bias, options.activation, gate, options.residual,
        options.residual_stride == 0 ? w.rows : options.residual_stride};
    const auto multiply = [&](auto inputs) {
      constexpr bool lut = std::is_same_v<Activations, lut_activations>;
      if (w_up != nullptr) {
        if constexpr (lut) {
          cuda::detail::run_lut<true>(exec, w, *w_up, inputs, y, finish);
        } else {
          cuda::detail::run_tiles<true>(exec, w, *w_up, inputs, y, finish);
        }
      } else if constexpr (lut) {
        cuda::detail::run_lut<false>(exec, w, w, inputs, y, finish);
      } else {
        cuda::detail::run_tiles<false>(exec, w, w, inputs, y, finish);
      }
    };
    if (options.input_order != nullptr) {
      multiply(cuda::detail::gather_inputs(exec, x, options));
    } else {
      multiply(x);
    }
  }
};

}  // namespace infuse::gemm::detail

#include "infuse/gemm/cuda/gemm_tc.cuh"  // the definition of run_tensor_core
#include "infuse/gemm/cuda/lut.cuh"      // the definition of run_lut
