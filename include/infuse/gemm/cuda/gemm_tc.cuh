// The tensor-core body of infuse::gemv on CUDA for batches of at least tensor_core_min_batch rows
// (gemm/cuda/gemv.cuh routes them here): y^T = W x^T as a matrix product on half operands with
// float accumulation (nvcuda::wmma 16x16x16).
//
// A block of 4 warps owns a tile of 64 outputs (rows of W) by 32 batch rows and walks the inputs
// in chunks of 128 (4 quant blocks). Per chunk each thread dequantizes 2 blocks of codes (4 with
// a gate: row n of W_gate and of W_up) with the GEMV's dequantizer into half in shared memory,
// and the block converts its 32 rows of x to half beside them; then warp w multiplies rows
// 16w..16w+15 of the W tile by both 16-row halves of the x tile. The codes and group parameters
// of the chunks up to tc_depth ahead (at most 4) and the x of the next chunk are loaded into
// registers before the multiplications, so their loads are in flight meanwhile. The accumulators go
// through shared memory to the epilogue (the GEMV's: bias, activation, gate, residual), which
// stores y coalesced and checks every edge: rows past n and batch rows past the batch are computed
// on zeros and never stored.
//
// Precision: x and the dequantized weights are rounded to half (11 significant bits, relative
// rounding 2^-11 each, magnitudes up to 65504), so |y - W x| <= sum_k |W(n,k) x(b,k)| * 2^-10
// plus float accumulation. Half x is taken as it is (no rounding: the bound halves to 2^-11);
// bfloat16 x (8 significant bits) is exact in half between 2^-14 and 65504. Schemes whose
// dequantized weights need more than half holds (float and bfloat16 weights) stay on the GEMV path
// at every batch.
//
// Included at the end of gemm/cuda/gemv.cuh, whose dequantizer, block_words and epilogue it uses.
#pragma once

#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "infuse/gemm/cuda/gemv.cuh"
#include "infuse/quant/none.hpp"

namespace infuse::gemm::cuda {

namespace detail {

inline constexpr int tc_tile_rows = 64;      // outputs per block: 16 per warp
inline constexpr int tc_tile_batch = 32;     // batch rows per block: two 16-column fragments
inline constexpr int tc_chunk_inputs = 128;  // inputs per stage
inline constexpr int tc_chunk_blocks = tc_chunk_inputs / quant::block_size;
inline constexpr int tc_warps = tc_tile_rows / 16;
inline constexpr int tc_threads = 32 * tc_warps;
// Quant blocks each thread dequantizes per chunk and matrix.
inline constexpr int tc_slots = tc_tile_rows * tc_chunk_blocks / tc_threads;
static_assert(tc_tile_rows * tc_chunk_blocks % tc_threads == 0);
// Halves per shared row of the W and x tiles: 8 of padding move consecutive rows 4 banks apart,
// and 16 rows stay a multiple of the 32 bytes wmma needs a fragment's start aligned to.
inline constexpr int tc_pitch = tc_chunk_inputs + 8;
// Floats per shared row of the finished tile (one row per batch row), padded the same way.
inline constexpr int tc_out_pitch = tc_tile_rows + 4;
// Most batch rows one launch covers: the grid's second dimension is at most 65535.
inline constexpr std::int64_t tc_launch_batch = std::int64_t{65535} * tc_tile_batch;

// x pairs each thread converts per chunk.
inline constexpr int tc_x_pairs = tc_tile_batch * tc_chunk_inputs / 2 / tc_threads;
static_assert(tc_threads % (tc_chunk_inputs / 2) == 0);
// W tiles per block: W_gate and W_up with a gate.
constexpr int tc_matrices(bool gated) {
  return gated ? 2 : 1;
}
// The stage (W tiles, then the x tile, in half) and, after the last chunk, the finished tiles
// (float) share one buffer.
constexpr int tc_shared_bytes(bool gated) {
  const int stage = (tc_matrices(gated) * tc_tile_rows + tc_tile_batch) * tc_pitch * 2;
  const int finished = tc_matrices(gated) * tc_tile_batch * tc_out_pitch * 4;
  return std::max(stage, finished);
}
static_assert(tc_shared_bytes(true) <= 48 * 1024, "the tiles must fit static shared memory");
// Chunks of W whose loads are in flight at once: as many as about 32 registers of codes hold
// (4 for int4 without a gate), so that each row has 16 quant blocks or fewer in flight.
template <class S>
constexpr int tc_depth(bool gated) {
  return std::clamp(32 / (S::block_bytes / 4 * tc_slots * tc_matrices(gated)), 1, 4);
}

// The codes and parameters of one quant block a thread dequantizes next.
template <class S>
struct staged_block {
  block_words<S> codes;
  typename S::params params;
  bool active;  // inside w: rows past n and blocks past k stage zeros
};

// y(b, row) for the block's 64 rows and 32 batch rows, b < batch; x, y and the residual point at
// the launch's first batch row. Gated: tile 0 is W_gate, tile 1 W_up (same shape).
template <class S, class X, bool Gated>
__global__ void __launch_bounds__(tc_threads)
    gemm_tc_kernel(quant::matrix<S, device_memory> w, quant::matrix<S, device_memory> w_up,
                   const X* __restrict__ x, std::int64_t x_stride, float* y, std::int64_t y_stride,
                   int batch, epilogue finish) {
  namespace wmma = nvcuda::wmma;
  constexpr int matrices = tc_matrices(Gated);
  __shared__ alignas(128) unsigned char shared[tc_shared_bytes(Gated)];
  __half* const w_tile = reinterpret_cast<__half*>(shared);            // (matrices, 64, pitch)
  __half* const x_tile = w_tile + matrices * tc_tile_rows * tc_pitch;  // (32, pitch)
  float* const out_tile = reinterpret_cast<float*>(shared);            // (matrices, 32, out_pitch)

  const int thread = static_cast<int>(threadIdx.x);
  const int warp = thread / 32;
  const std::int64_t first_row = std::int64_t{blockIdx.x} * tc_tile_rows;
  const int first_batch = static_cast<int>(blockIdx.y) * tc_tile_batch;
  const std::int64_t blocks_per_row = w.blocks_per_row();
  const std::int64_t group_size = w.group_size();

  // The W blocks of the next `depth` chunks and the x pairs of the next chunk, in registers.
  constexpr int depth = tc_depth<S>(Gated);
  staged_block<S> staged[depth][matrices][tc_slots];
  float2 staged_x[tc_x_pairs];
  // Slot s of the thread is tile block thread + s * tc_threads: row / tc_chunk_blocks of the
  // tile, block % tc_chunk_blocks of the chunk.
  const auto load_weights = [&](staged_block<S>(&next)[matrices][tc_slots], std::int64_t chunk) {
#pragma unroll
    for (int m = 0; m < matrices; ++m) {
      const quant::matrix<S, device_memory>& matrix = m == 0 ? w : w_up;
#pragma unroll
      for (int s = 0; s < tc_slots; ++s) {
        const int tile_block = thread + s * tc_threads;
        const std::int64_t row = first_row + tile_block / tc_chunk_blocks;
        const std::int64_t block = chunk + tile_block % tc_chunk_blocks;
        next[m][s].active = row < w.rows && block < blocks_per_row;
        if (next[m][s].active) {
          next[m][s].codes.load(matrix.block(row, block));
          next[m][s].params = matrix.group_params(row, block * quant::block_size / group_size);
        }
      }
    }
  };
  // Pair p of the thread is inputs 2 (thread % 64), +1 of tile row thread / 64 + 2 p: consecutive
  // threads read consecutive floats of a row. k is a multiple of 32, so a pair is inside k or
  // wholly past it; pairs past k or the batch stage zeros.
  constexpr int pairs_per_row = tc_chunk_inputs / 2;
  const int pair_input = 2 * (thread % pairs_per_row);
  const auto pair_row = [&](int p) {
    return thread / pairs_per_row + p * (tc_threads / pairs_per_row);
  };
  const auto load_inputs = [&](std::int64_t chunk) {
    const std::int64_t k = chunk * quant::block_size + pair_input;
#pragma unroll
    for (int p = 0; p < tc_x_pairs; ++p) {
      const int b = first_batch + pair_row(p);
      staged_x[p] = make_float2(0.0f, 0.0f);
      if (b < batch && k < w.cols) {
        const X* pair = x + std::int64_t{b} * x_stride + k;
        staged_x[p] = make_float2(to_float(pair[0]), to_float(pair[1]));
      }
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> sum[matrices][2];
#pragma unroll
  for (int m = 0; m < matrices; ++m) {
    wmma::fill_fragment(sum[m][0], 0.0f);
    wmma::fill_fragment(sum[m][1], 0.0f);
  }

#pragma unroll
  for (int d = 0; d < depth; ++d) load_weights(staged[d], d * tc_chunk_blocks);
  load_inputs(0);
  constexpr std::int64_t round_blocks = std::int64_t{depth} * tc_chunk_blocks;
  for (std::int64_t round = 0; round < blocks_per_row; round += round_blocks) {
    // Chunk d of the round comes from staged[d]: a compile-time index, so it stays in registers.
#pragma unroll
    for (int d = 0; d < depth; ++d) {
      const std::int64_t chunk = round + std::int64_t{d} * tc_chunk_blocks;
      if (chunk >= blocks_per_row) break;  // the same for every thread of the block
      __syncthreads();                     // the previous chunk's tiles are no longer read
#pragma unroll
      for (int p = 0; p < tc_x_pairs; ++p) {
        *reinterpret_cast<__half2*>(x_tile + pair_row(p) * tc_pitch + pair_input) =
            __floats2half2_rn(staged_x[p].x, staged_x[p].y);
      }
#pragma unroll
      for (int m = 0; m < matrices; ++m) {
#pragma unroll
        for (int s = 0; s < tc_slots; ++s) {
          const int tile_block = thread + s * tc_threads;
          const staged_block<S>& block = staged[d][m][s];
          alignas(16) __half2 pairs[quant::block_size / 2];
          if (block.active) {
            const dequantizer<S> weight(block.params);
            const std::uint8_t* bytes = block.codes.bytes();
#pragma unroll
            for (int j = 0; j < quant::block_size / 2; ++j) {
              pairs[j] = __floats2half2_rn(weight(bytes, 2 * j), weight(bytes, 2 * j + 1));
            }
          } else {
#pragma unroll
            for (int j = 0; j < quant::block_size / 2; ++j) pairs[j] = __float2half2_rn(0.0f);
          }
          // 64 bytes at a 16-byte aligned offset (pitch and block are multiples of 8 halves).
          uint4* destination = reinterpret_cast<uint4*>(
              w_tile + (m * tc_tile_rows + tile_block / tc_chunk_blocks) * tc_pitch +
              (tile_block % tc_chunk_blocks) * quant::block_size);
          const uint4* source = reinterpret_cast<const uint4*>(pairs);
#pragma unroll
          for (int v = 0; v < 4; ++v) destination[v] = source[v];
        }
      }
      // The registers just stored take the loads of `depth` chunks ahead (and x of the next), in
      // flight during the products.
      if (chunk + round_blocks < blocks_per_row) load_weights(staged[d], chunk + round_blocks);
      if (chunk + tc_chunk_blocks < blocks_per_row) load_inputs(chunk + tc_chunk_blocks);
      __syncthreads();

#pragma unroll
      for (int step = 0; step < tc_chunk_inputs; step += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> weights[matrices];
#pragma unroll
        for (int m = 0; m < matrices; ++m) {
          wmma::load_matrix_sync(
              weights[m], w_tile + (m * tc_tile_rows + warp * 16) * tc_pitch + step, tc_pitch);
        }
#pragma unroll
        for (int f = 0; f < 2; ++f) {
          // x^T (inputs, batch rows) is x's tile read column-major.
          wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> inputs;
          wmma::load_matrix_sync(inputs, x_tile + f * 16 * tc_pitch + step, tc_pitch);
#pragma unroll
          for (int m = 0; m < matrices; ++m) {
            wmma::mma_sync(sum[m][f], weights[m], inputs, sum[m][f]);
          }
        }
      }
    }
  }

  __syncthreads();  // the finished tiles overwrite the stage
#pragma unroll
  for (int m = 0; m < matrices; ++m) {
#pragma unroll
    for (int f = 0; f < 2; ++f) {
      // Column-major (rows, batch rows): out_tile[m][b][row], rows contiguous.
      wmma::store_matrix_sync(out_tile + (m * tc_tile_batch + f * 16) * tc_out_pitch + warp * 16,
                              sum[m][f], tc_out_pitch, wmma::mem_col_major);
    }
  }
  __syncthreads();
  for (int i = thread; i < tc_tile_batch * tc_tile_rows; i += tc_threads) {
    const int b = first_batch + i / tc_tile_rows;
    const int tile_row = i % tc_tile_rows;
    const std::int64_t row = first_row + tile_row;
    if (b >= batch || row >= w.rows) continue;
    const float* finished = out_tile + (i / tc_tile_rows) * tc_out_pitch + tile_row;
    const float up = Gated ? finished[tc_tile_batch * tc_out_pitch] : 0.0f;
    y[b * y_stride + row] = finish(finished[0], up, row, b, Gated);
  }
}

// Every product of tensor_core_min_batch or more batch rows, gated or not, for a scheme with
// tensor_core_scheme<S> (declared in gemv.cuh).
template <bool Gated, class S, class X>
void run_tensor_core(const exec::cuda& exec, const quant::matrix<S, device_memory>& w,
                     const quant::matrix<S, device_memory>& w_up, device_view<const X, 2> x,
                     device_view<float, 2> y, epilogue finish) {
  const std::int64_t batch = x.extent(0);
  const float* residual = finish.residual;
  const auto row_tiles = static_cast<unsigned>((w.rows + tc_tile_rows - 1) / tc_tile_rows);
  for (std::int64_t first = 0; first < batch; first += tc_launch_batch) {
    const int count = static_cast<int>(std::min(tc_launch_batch, batch - first));
    if (residual != nullptr) finish.residual = residual + first * finish.residual_stride;
    exec.launch(gemm_tc_kernel<S, X, Gated>,
                dim3(row_tiles, static_cast<unsigned>((count + tc_tile_batch - 1) / tc_tile_batch)),
                dim3(tc_threads), 0, w, w_up, x.data() + first * x.stride(0), x.stride(0),
                y.data() + first * y.stride(0), y.stride(0), count, finish);
  }
}

}  // namespace detail

}  // namespace infuse::gemm::cuda
