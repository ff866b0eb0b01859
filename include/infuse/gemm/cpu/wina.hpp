// The CPU body of gemm::wina_gemv (gemm/wina.hpp): the passing inputs listed once, then each
// thread takes a range of them and adds x(b, i) times the whole row i of W^T (dequantized in
// registers, read as one contiguous stream) into its own accumulators; the threads' sums are added
// and the epilogue applied at the end. Rows of inputs that do not pass are never touched.
#pragma once

#include <hwy/cache_control.h>
#include <hwy/highway.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <utility>

#include "infuse/exec/cpu.hpp"
#include "infuse/gemm/cpu/gemv.hpp"
#include "infuse/gemm/wina.hpp"

namespace infuse::gemm::cpu::detail {

// acc(b, :) += sum_r x[r][b] * W^T(rows[r], :), acc rows n apart. Several input rows per pass, so
// that each accumulator chunk is loaded and stored once for all of them.
template <class S, int Rows, int Batch>
INFUSE_FORCE_INLINE void wina_add_rows(const quant::matrix<S, host_memory>& w_t,
                                       const std::int64_t (&rows)[Rows],
                                       const float (&x)[Rows][Batch], float* acc) {
  using tag = float_tag<S>;
  const tag d;
  constexpr int lanes = static_cast<int>(hn::MaxLanes(tag()));
  const std::int64_t n = w_t.cols;
  for (std::int64_t j = 0; j < n; j += quant::block_size) {
    typename S::params p[Rows];
    const std::uint8_t* block[Rows];
    for (int r = 0; r < Rows; ++r) {
      p[r] = w_t.group_params(rows[r], j / w_t.group_size());
      block[r] = w_t.block(rows[r], j / quant::block_size);
    }
    for (int c = 0; c < quant::block_size; c += lanes) {
      hn::Vec<tag> weights[Rows];
      for (int r = 0; r < Rows; ++r) weights[r] = dequantize_chunk<S>(d, block[r], c, p[r]);
      for (int b = 0; b < Batch; ++b) {
        float* out = acc + b * n + j + c;
        auto sum = hn::LoadU(d, out);
        for (int r = 0; r < Rows; ++r) sum = hn::MulAdd(hn::Set(d, x[r][b]), weights[r], sum);
        hn::StoreU(sum, d, out);
      }
    }
  }
}

// Passing inputs [first, last) into acc (Batch rows from batch row b0 of `masked`), four input
// rows per pass.
template <class S, int Batch>
void wina_add_range(const quant::matrix<S, host_memory>& w_t, const std::int32_t* passing,
                    std::int64_t first, std::int64_t last, const float* masked, std::int64_t b0,
                    float* acc) {
  constexpr int group = 4;
  const std::int64_t k = w_t.rows;
  std::int64_t rows[group];
  float x[group][Batch];
  int held = 0;
  for (std::int64_t a = first; a < last; ++a) {
    const std::int64_t i = passing[a];
    bool any = false;
    for (int b = 0; b < Batch; ++b) {
      x[held][b] = masked[(b0 + b) * k + i];
      any = any || x[held][b] != 0.0f;
    }
    if (!any) continue;
    rows[held++] = i;
    if (held == group) {
      wina_add_rows<S, group, Batch>(w_t, rows, x, acc);
      held = 0;
    }
  }
  for (int r = 0; r < held; ++r) {
    const std::int64_t one_row[1] = {rows[r]};
    float one_x[1][Batch];
    for (int b = 0; b < Batch; ++b) one_x[0][b] = x[r][b];
    wina_add_rows<S, 1, Batch>(w_t, one_row, one_x, acc);
  }
}

}  // namespace infuse::gemm::cpu::detail

namespace infuse::gemm::detail {

template <>
struct wina_body<exec::cpu> {
  template <class S>
  static void run(const exec::cpu& exec, const quant::matrix<S, host_memory>& w_t,
                  std::span<const float> norms, host_view<const float, 2> x, host_view<float, 2> y,
                  float threshold, const gemv_options& options, std::span<std::byte> workspace) {
    const std::int64_t batch = x.extent(0);
    const std::int64_t k = w_t.rows;
    const std::int64_t n = w_t.cols;
    const wina_workspace_layout layout(workspace.data(), batch, k);
    std::int64_t count = 0;
    for (std::int64_t i = 0; i < k; ++i) {
      bool any = false;
      for (std::int64_t b = 0; b < batch; ++b) {
        // NaN passes: a bad input shows in y rather than vanishing.
        const bool pass = !(std::fabs(x(b, i)) * norms[static_cast<std::size_t>(i)] < threshold);
        layout.masked[b * k + i] = pass ? x(b, i) : 0.0f;
        any = any || pass;
      }
      if (any) layout.passing[count++] = static_cast<std::int32_t>(i);
    }
    const int threads = exec.threads();
    const std::int64_t tile_floats = std::int64_t{wina_batch_tile} * n;
    for (std::int64_t b0 = 0; b0 < batch; b0 += wina_batch_tile) {
      const int tile = static_cast<int>(std::min<std::int64_t>(wina_batch_tile, batch - b0));
      // Every thread's sums start at zero, also those of threads that get no range.
      std::fill(layout.accumulators, layout.accumulators + threads * tile_floats, 0.0f);
      exec.parallel_for_ranges(count, [&](int thread, std::int64_t first, std::int64_t last) {
        float* acc = layout.accumulators + thread * tile_floats;
        [&]<int... Batch>(std::integer_sequence<int, Batch...>) {
          ((tile == Batch + 1 ? cpu::detail::wina_add_range<S, Batch + 1>(
                                    w_t, layout.passing, first, last, layout.masked, b0, acc)
                              : void()),
           ...);
        }
        (std::make_integer_sequence<int, wina_batch_tile>());
      });
      const cpu::detail::epilogue e{options.bias,
                                    options.activation,
                                    false,
                                    act::none,
                                    options.residual,
                                    options.residual_stride == 0 ? n : options.residual_stride,
                                    y.data(),
                                    y.stride(0)};
      exec.parallel_for(tile, [&](std::int64_t b) {
        for (std::int64_t j = 0; j < n; ++j) {
          float sum = 0.0f;
          for (int t = 0; t < threads; ++t) sum += layout.accumulators[t * tile_floats + b * n + j];
          e.store(b0 + b, j, sum, 0.0f);
        }
      });
    }
  }
};

}  // namespace infuse::gemm::detail
