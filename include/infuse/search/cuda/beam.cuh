// search::beam_step on CUDA: one block per request. For each beam the threads take strided parts
// of the row (a log-sum-exp and a top 2 Width each); a CUB reduction merges the log-sum-exps and
// 2 Width rounds of a block-wide maximum pop the beam's best candidates; thread 0 then runs the
// merge of search/beam.hpp, so both backends take the same decisions from the same candidates.
// Scores agree with the CPU's to float rounding (the device's exp2 is ex2.approx), so only
// candidates within that of each other can be ordered differently.
#pragma once

#include "infuse/core/config.hpp"

#if !defined(INFUSE_CUDA_COMPILER)
#error "infuse/search/cuda/beam.cuh is CUDA code: include it from a .cu file compiled by nvcc"
#endif

#include <cstdint>
#include <cub/block/block_reduce.cuh>

#include "infuse/core/view.hpp"
#include "infuse/exec/cuda.cuh"
#include "infuse/search/beam.hpp"

namespace infuse::search {

namespace detail {

inline constexpr int beam_block = 256;

struct beam_lse_part {
  softmax_state<log_base::e> softmax;
  bool invalid;
};

template <int Width>
__global__ void __launch_bounds__(beam_block)
    beam_step_kernel(beam_inputs<device_memory> in, beam_params params,
                     beam_pool<device_memory> pool, beam_outputs<device_memory> out) {
  constexpr int candidates = 2 * Width;
  union storage {
    typename cub::BlockReduce<beam_lse_part, beam_block>::TempStorage lse;
    typename cub::BlockReduce<beam_candidate, beam_block>::TempStorage top;
  };
  __shared__ storage reduce_storage;
  __shared__ beam_candidate winner;
  __shared__ float beam_base;
  __shared__ bool any_invalid;
  const std::int64_t request = blockIdx.x;
  const std::int64_t vocab = in.logits.extent(2);
  top_candidates<candidates> merged;  // thread 0's
  if (threadIdx.x == 0) any_invalid = false;
  for (int b = 0; b < Width; ++b) {
    beam_row_state<candidates> row;
    const float* logits = &in.logits(request, b, 0);
    for (std::int64_t x = threadIdx.x; x < vocab; x += beam_block) {
      row.add(logits[x], b, static_cast<std::int32_t>(x));
    }
    const beam_lse_part part = cub::BlockReduce<beam_lse_part, beam_block>(reduce_storage.lse)
                                   .Reduce(beam_lse_part{row.softmax, row.invalid},
                                           [](beam_lse_part a, const beam_lse_part& b) {
                                             a.softmax.merge(b.softmax);
                                             a.invalid = a.invalid || b.invalid;
                                             return a;
                                           });
    if (threadIdx.x == 0) {
      beam_base = in.beam_scores(request, b) - part.softmax.lse();
      any_invalid = any_invalid || part.invalid;
    }
    __syncthreads();
    int head = 0;  // this thread's best candidate not yet taken
    for (int round = 0; round < candidates; ++round) {
      const beam_candidate mine =
          head < candidates ? row.top.best[head] : beam_candidate{-INFINITY, 0x7fffffff, -1};
      const beam_candidate best =
          cub::BlockReduce<beam_candidate, beam_block>(reduce_storage.top)
              .Reduce(mine, [](const beam_candidate& a, const beam_candidate& b) {
                return better(a, b) ? a : b;
              });
      if (threadIdx.x == 0) winner = best;
      __syncthreads();
      const beam_candidate taken = winner;
      __syncthreads();
      if (taken.token < 0) break;  // the row has fewer tokens than 2 Width
      if (mine.token == taken.token && mine.beam == taken.beam && head < candidates) ++head;
      if (threadIdx.x == 0) merged.add({beam_base + taken.score, taken.beam, taken.token});
    }
  }
  if (threadIdx.x != 0) return;
  const beam_request_outputs<device_memory> request_out{&out, request};
  if (any_invalid) {
    beam_invalid<Width>(params, request_out);
    out.status(request) = beam_status::invalid_logits;
    return;
  }
  beam_merge<Width>(merged, params, beam_request_pool<device_memory>{&pool, request}, request_out);
  out.status(request) = beam_status::ok;
}

}  // namespace detail

// One beam-search step (search/beam.hpp) on exec's stream; shapes and parameters are checked on
// the host before the launch.
template <int Width>
void beam_step(const exec::cuda& exec, const beam_inputs<device_memory>& in,
               const beam_params& params, const beam_pool<device_memory>& pool,
               const beam_outputs<device_memory>& out) {
  static_assert(Width >= 1, "infuse: beam_step needs a Width of at least one beam");
  detail::require_beam_step<Width>(in, params, pool, out);
  if (in.logits.extent(0) == 0) return;
  exec.launch(detail::beam_step_kernel<Width>, dim3(static_cast<unsigned>(in.logits.extent(0))),
              dim3(detail::beam_block), 0, in, params, pool, out);
}

}  // namespace infuse::search
