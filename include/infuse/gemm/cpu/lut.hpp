// The LUT-GEMV kernel for quant::bcq weights on the CPU (Park et al., "LUT-GEMM", ICLR 2024): x is
// turned once into lookup tables, one per 8 inputs, of the 256 sums sum_j (+/-)x_j over the sign
// patterns; a byte of a weight's bit plane then indexes the partial sum of its 8 inputs, so the
// product is Bits lookups and adds per 8 weights, and no weight is dequantized:
//
//   sum_j w_j x_j = offset * sum_j x_j + sum_i alpha_i * sum_bytes table[byte of plane i]
//
// per group. Reached through gemm::gemv with gemm::lut_activations (gemm/gemv.hpp).
#pragma once

#include <cstdint>
#include <cstring>

#include "infuse/core/config.hpp"
#include "infuse/quant/bcq.hpp"
#include "infuse/quant/matrix.hpp"

namespace infuse::gemm::cpu::detail {

inline constexpr int lut_inputs = 8;     // inputs per table
inline constexpr int lut_entries = 256;  // sign patterns of 8 inputs

// Where one batch row's tables sit in the workspace: (k / 8) tables of 256 floats, then the sum
// of x over each block of 32 inputs (the offset's term).
struct lut_x_layout {
  std::int64_t k;
  float* base;

  static lut_x_layout of(void* workspace, std::int64_t k) {
    auto address = reinterpret_cast<std::uintptr_t>(workspace);
    address = (address + 63) / 64 * 64;
    return {k, reinterpret_cast<float*>(address)};
  }
  std::int64_t row_floats() const { return k / lut_inputs * lut_entries + k / quant::block_size; }
  float* tables(std::int64_t b) const { return base + b * row_floats(); }
  float* block_sums(std::int64_t b) const { return tables(b) + k / lut_inputs * lut_entries; }
};

// The tables of one row of x: entry s of table t is sum_j (bit j of s ? +1 : -1) x_{8t + j}. Each
// table is the sum of a low-nibble table and a high-nibble one (16 entries each), so an entry is
// at most three roundings from its exact value.
inline void build_lut_tables(const float* x, const lut_x_layout& layout, std::int64_t b) {
  float* tables = layout.tables(b);
  for (std::int64_t t = 0; t < layout.k / lut_inputs; ++t) {
    const float* in = x + t * lut_inputs;
    float low[16];
    float high[16];
    for (int s = 0; s < 16; ++s) {
      low[s] = ((s & 1) ? in[0] : -in[0]) + ((s & 2) ? in[1] : -in[1]) +
               ((s & 4) ? in[2] : -in[2]) + ((s & 8) ? in[3] : -in[3]);
      high[s] = ((s & 1) ? in[4] : -in[4]) + ((s & 2) ? in[5] : -in[5]) +
                ((s & 4) ? in[6] : -in[6]) + ((s & 8) ? in[7] : -in[7]);
    }
    float* table = tables + t * lut_entries;
    for (int h = 0; h < 16; ++h) {
      for (int l = 0; l < 16; ++l) table[h * 16 + l] = low[l] + high[h];
    }
  }
  float* sums = layout.block_sums(b);
  for (std::int64_t block = 0; block < layout.k / quant::block_size; ++block) {
    float sum = 0.0f;
    for (int j = 0; j < quant::block_size; ++j) sum += x[block * quant::block_size + j];
    sums[block] = sum;
  }
}

// The dot products of Rows rows of W with Batch rows of x, by table lookups. Rows share each
// table while it is in L1: the loop runs over blocks outside and rows inside.
template <class S, int Batch>
struct lut_rows {
  static constexpr int rows = 4;
  const float* tables[Batch];
  const float* block_sums[Batch];

  template <int Rows>
  void operator()(const quant::matrix<S, host_memory>& w, std::int64_t row,
                  float (&out)[Rows][Batch]) const {
    constexpr int bits = S::bits;
    const std::int64_t blocks = w.blocks_per_row();
    const std::int64_t blocks_per_group = w.group_size() / quant::block_size;
    for (int r = 0; r < Rows; ++r) {
      for (int b = 0; b < Batch; ++b) out[r][b] = 0.0f;
    }
    for (std::int64_t g0 = 0; g0 < blocks; g0 += blocks_per_group) {
      // Per row and batch row: each plane's sum of table entries over the group, and sum x.
      float planes[Rows][Batch][bits] = {};
      float x_sum[Batch] = {};
      for (std::int64_t block = g0; block < g0 + blocks_per_group; ++block) {
        for (int b = 0; b < Batch; ++b) x_sum[b] += block_sums[b][block];
        for (int r = 0; r < Rows; ++r) {
          const std::uint8_t* codes = w.block(row + r, block);
          for (int i = 0; i < bits; ++i) {
            std::uint32_t word;
            std::memcpy(&word, codes + 4 * i, sizeof(word));  // little-endian, as bcq stores it
            for (int b = 0; b < Batch; ++b) {
              const float* table = tables[b] + block * 4 * lut_entries;
              planes[r][b][i] += (table[word & 255u] + table[lut_entries + ((word >> 8) & 255u)]) +
                                 (table[2 * lut_entries + ((word >> 16) & 255u)] +
                                  table[3 * lut_entries + (word >> 24)]);
            }
          }
        }
      }
      for (int r = 0; r < Rows; ++r) {
        const typename S::params p = w.group_params(row + r, g0 / blocks_per_group);
        for (int b = 0; b < Batch; ++b) {
          float dot = p.offset * x_sum[b];
          for (int i = 0; i < bits; ++i) dot += p.alpha[i] * planes[r][b][i];
          out[r][b] += dot;
        }
      }
    }
  }
};

}  // namespace infuse::gemm::cpu::detail
