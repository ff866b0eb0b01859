// search::row_stats on CUDA: one block per row, each thread a strided part of the row, the parts
// merged by a CUB block reduction of detail::row_stats_state (search/row_stats.hpp).
#pragma once

#include "infuse/core/config.hpp"

#if !defined(INFUSE_CUDA_COMPILER)
#error "infuse/search/cuda/row_stats.cuh is CUDA code: include it from a .cu file compiled by nvcc"
#endif

#include <cstdint>
#include <cub/block/block_reduce.cuh>

#include "infuse/core/view.hpp"
#include "infuse/exec/cuda.cuh"
#include "infuse/search/row_stats.hpp"

namespace infuse::search {

namespace detail {

inline constexpr int row_stats_block = 256;

template <class Logits, class Stats>
__global__ void __launch_bounds__(row_stats_block) row_stats_kernel(Logits logits, Stats stats) {
  using reduce = cub::BlockReduce<row_stats_state, row_stats_block>;
  __shared__ typename reduce::TempStorage storage;
  const std::int64_t row = blockIdx.x;
  const std::int64_t vocab = logits.extent(1);
  const float* values = logits.data() + row * logits.stride(0);
  row_stats_state state;
  for (std::int64_t x = threadIdx.x; x < vocab; x += row_stats_block) {
    state.add(values[x], static_cast<std::int32_t>(x));
  }
  const row_stats_state merged =
      reduce(storage).Reduce(state, [](row_stats_state a, const row_stats_state& b) {
        a.merge(b);
        return a;
      });
  if (threadIdx.x == 0) stats(row) = merged.finish();
}

}  // namespace detail

// logits (rows,vocab) with any row stride, stats (rows), both in device memory. Asynchronous on
// exec's stream.
template <class Logits, class Stats>
void row_stats(const exec::cuda& exec, Logits logits, Stats stats) {
  detail::require_row_stats<exec::cuda>(logits, stats);
  if (logits.extent(0) == 0) return;
  exec.launch(detail::row_stats_kernel<view<const float, 2, device_memory>,
                                       view<row_statistics, 1, device_memory>>,
              dim3(static_cast<unsigned>(logits.extent(0))), dim3(detail::row_stats_block), 0,
              view<const float, 2, device_memory>(logits),
              view<row_statistics, 1, device_memory>(stats));
}

}  // namespace infuse::search
