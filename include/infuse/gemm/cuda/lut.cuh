// The CUDA LUT-GEMV for quant::bcq weights (Park et al., "LUT-GEMM", ICLR 2024), reached through
// gemm::gemv and gated_gemv with gemm::lut_activations (gemm/gemv.hpp; the CPU body is
// gemm/cpu/lut.hpp). No weight is dequantized: for every 8 inputs the block builds, in shared
// memory, the table of the 256 sums sum_j (+/-)x_j over the sign patterns, and each byte of a
// weight's bit plane indexes the partial sum of its 8 inputs:
//
//   sum_{j in block} w_j x_j = offset * sum_j x_j + sum_i alpha_i * sum_{bytes q} table_q[byte_iq]
//
// per quant block of 32 inputs (a block lies inside one group, whose alpha_i and offset it takes);
// sum_j x_j of a table is its entry 255 (every sign +).
//
// A block of 256 threads owns 64 rows of W (gated: row n of W_gate and of W_up) and walks the
// inputs in chunks of 128, 4 quant blocks: thread t takes quant block t % 4 of the chunk in row
// t / 4, so the 4 threads of a row read its chunk of codes contiguously. Per chunk the block first
// builds the chunk's 16 tables for each batch row of the tile (16 KB a batch row), then every
// thread looks up its block's Bits words; the codes and group parameters of the next chunk are
// loaded before the tables are built, so the loads are in flight meanwhile. The 4 sums of a row
// meet by warp shuffles and the GEMV's epilogue (gemm/cuda/gemv.cuh) stores the output.
//
// Batch tiles of at most 2 rows (32 KB of tables); each tile reads W once, so the tables pay at
// batch 1 and 2, and a larger batch is better served by float activations.
//
// A table entry is low + high, each a sum of 4 signed inputs: a few float roundings of
// sum_j |x_j|, so the error of y is float summation relative to sum_k (|offset| + sum_i |alpha_i|)
// |x_k| (the weights' own sums may cancel), as on the CPU.
//
// Included at the end of gemm/cuda/gemv.cuh, whose block_words, to_float and epilogue it uses.
#pragma once

#include <algorithm>
#include <cstdint>

#include "infuse/gemm/cuda/gemv.cuh"
#include "infuse/quant/bcq.hpp"

namespace infuse::gemm::cuda {

namespace detail {

inline constexpr int lut_inputs = 8;     // inputs per table
inline constexpr int lut_entries = 256;  // sign patterns of 8 inputs
inline constexpr int lut_chunk_blocks = 4;
inline constexpr int lut_chunk_tables = lut_chunk_blocks * quant::block_size / lut_inputs;
inline constexpr int lut_tables_per_block = quant::block_size / lut_inputs;
inline constexpr int lut_rows_per_block = threads_per_block / lut_chunk_blocks;
inline constexpr int lut_max_batch_tile = 2;
// Threads that build one table: each one low nibble and every other high nibble.
inline constexpr int lut_builders = 32;

// Table `table` of the chunk for one batch row: entry e = sum_j (bit j of e ? +x_j : -x_j) of the
// 8 inputs `in`. The builder handles low nibble l = builder % 16 and the high nibbles of parity
// builder / 16; a warp's 32 stores of one step then fall in 32 different banks (entry h * 16 + l:
// bank l for even h, 16 + l for odd h).
INFUSE_DEVICE INFUSE_FORCE_INLINE void build_table(const float (&in)[lut_inputs], int builder,
                                                   float* table) {
  const int l = builder % 16;
  const int parity = builder / 16;
  float low = 0.0f;
#pragma unroll
  for (int j = 0; j < 4; ++j) low += (l >> j) & 1 ? in[j] : -in[j];
#pragma unroll
  for (int step = 0; step < 8; ++step) {
    const int h = 2 * step + parity;
    float high = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) high += (h >> j) & 1 ? in[4 + j] : -in[4 + j];
    table[h * 16 + l] = low + high;
  }
}

// y(b, row) for the block's 64 rows and batch rows b < batch <= Batch; x, y and the residual point
// at the tile's first batch row. Rows past n and blocks past k load nothing and store nothing;
// inputs of batch rows past `batch` build tables of zeros, never stored.
template <class S, class X, int Batch, bool Gated>
__global__ void __launch_bounds__(threads_per_block)
    lut_gemv_kernel(quant::matrix<S, device_memory> w, quant::matrix<S, device_memory> w_up,
                    const X* __restrict__ x, std::int64_t x_stride, float* y, std::int64_t y_stride,
                    int batch, epilogue finish) {
  constexpr int matrices = Gated ? 2 : 1;
  constexpr int bits = S::bits;
  __shared__ float tables[Batch][lut_chunk_tables][lut_entries];
  const int thread = static_cast<int>(threadIdx.x);
  const int block_in_chunk = thread % lut_chunk_blocks;
  const std::int64_t row =
      std::int64_t{blockIdx.x} * lut_rows_per_block + thread / lut_chunk_blocks;
  const std::int64_t blocks_per_row = w.blocks_per_row();
  const std::int64_t group_size = w.group_size();

  struct chunk_loads {
    bool active;
    block_words<S> codes[matrices];
    typename S::params params[matrices];
  };
  const auto load_chunk = [&](std::int64_t chunk, chunk_loads& loads) {
    const std::int64_t block = chunk + block_in_chunk;
    loads.active = row < w.rows && block < blocks_per_row;
    if (!loads.active) return;
#pragma unroll
    for (int m = 0; m < matrices; ++m) {
      const quant::matrix<S, device_memory>& matrix = m == 0 ? w : w_up;
      loads.codes[m].load(matrix.block(row, block));
      loads.params[m] = matrix.group_params(row, block * quant::block_size / group_size);
    }
  };

  float sum[matrices][Batch];
#pragma unroll
  for (int m = 0; m < matrices; ++m) {
#pragma unroll
    for (int b = 0; b < Batch; ++b) sum[m][b] = 0.0f;
  }

  chunk_loads next{};
  load_chunk(0, next);
  for (std::int64_t chunk = 0; chunk < blocks_per_row; chunk += lut_chunk_blocks) {
    const chunk_loads current = next;
    if (chunk + lut_chunk_blocks < blocks_per_row) load_chunk(chunk + lut_chunk_blocks, next);

    __syncthreads();  // the previous chunk's tables are no longer read
    // k is a multiple of 32: a table's 8 inputs are all inside k or all past it (zeros).
    for (int task = thread; task < Batch * lut_chunk_tables * lut_builders;
         task += threads_per_block) {
      const int b = task / (lut_chunk_tables * lut_builders);
      const int table = task / lut_builders % lut_chunk_tables;
      const std::int64_t first = chunk * quant::block_size + table * lut_inputs;
      float in[lut_inputs];
#pragma unroll
      for (int j = 0; j < lut_inputs; ++j) {
        in[j] = b < batch && first < w.cols ? to_float(x[b * x_stride + first + j]) : 0.0f;
      }
      build_table(in, task % lut_builders, tables[b][table]);
    }
    __syncthreads();

    if (!current.active) continue;
    const int first_table = block_in_chunk * lut_tables_per_block;
#pragma unroll
    for (int b = 0; b < Batch; ++b) {
      const float(&row_tables)[lut_chunk_tables][lut_entries] = tables[b];
      const float x_sum = (row_tables[first_table][255] + row_tables[first_table + 1][255]) +
                          (row_tables[first_table + 2][255] + row_tables[first_table + 3][255]);
#pragma unroll
      for (int m = 0; m < matrices; ++m) {
        const typename S::params& p = current.params[m];
        float dot = p.offset * x_sum;
#pragma unroll
        for (int i = 0; i < bits; ++i) {
          const std::uint32_t word = current.codes[m].word[i];  // byte q: inputs 8q..8q+7
          const float plane = (row_tables[first_table][word & 255u] +
                               row_tables[first_table + 1][(word >> 8) & 255u]) +
                              (row_tables[first_table + 2][(word >> 16) & 255u] +
                               row_tables[first_table + 3][word >> 24]);
          dot += p.alpha[i] * plane;
        }
        sum[m][b] += dot;
      }
    }
  }

  // The 4 threads of a row are consecutive lanes; after the butterfly each holds the row's sums.
#pragma unroll
  for (int m = 0; m < matrices; ++m) {
#pragma unroll
    for (int b = 0; b < Batch; ++b) {
#pragma unroll
      for (int offset = 1; offset < lut_chunk_blocks; offset *= 2) {
        sum[m][b] += __shfl_xor_sync(0xffffffffu, sum[m][b], offset);
      }
    }
  }
#pragma unroll
  for (int b = 0; b < Batch; ++b) {
    if (block_in_chunk == b % lut_chunk_blocks && b < batch && row < w.rows) {
      y[b * y_stride + row] = finish(sum[0][b], Gated ? sum[matrices - 1][b] : 0.0f, row, b, Gated);
    }
  }
}

// Every batch tile, for quant::bcq weights (gemv's static_check_activations holds the others off).
template <bool Gated, class S, class X>
void run_lut(const exec::cuda& exec, const quant::matrix<S, device_memory>& w,
             const quant::matrix<S, device_memory>& w_up, device_view<const X, 2> x,
             device_view<float, 2> y, epilogue finish) {
  const std::int64_t batch = x.extent(0);
  const dim3 grid(static_cast<unsigned>((w.rows + lut_rows_per_block - 1) / lut_rows_per_block));
  const dim3 block(threads_per_block);
  const float* residual = finish.residual;
  for (std::int64_t first = 0; first < batch; first += lut_max_batch_tile) {
    const int count = static_cast<int>(std::min<std::int64_t>(lut_max_batch_tile, batch - first));
    if (residual != nullptr) finish.residual = residual + first * finish.residual_stride;
    const auto launch = [&](auto kernel) {
      exec.launch(kernel, grid, block, 0, w, w_up, x.data() + first * x.stride(0), x.stride(0),
                  y.data() + first * y.stride(0), y.stride(0), count, finish);
    };
    if (count == 1) {
      launch(lut_gemv_kernel<S, X, 1, Gated>);
    } else {
      launch(lut_gemv_kernel<S, X, 2, Gated>);
    }
  }
}

}  // namespace detail

}  // namespace infuse::gemm::cuda
