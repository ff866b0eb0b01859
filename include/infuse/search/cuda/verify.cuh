// search::verify_chain and search::verify_tree on CUDA: one block per request. Every thread of the
// block runs the walk of search/verify.hpp; the passes over a row (a residual's sum, the
// inverse-CDF pick, the argmax) are block-wide, and their results are broadcast through shared
// memory, so that the whole block takes the same branches. Thread 0 writes the outputs.
#pragma once

#include "infuse/core/config.hpp"

#if !defined(INFUSE_CUDA_COMPILER)
#error "infuse/search/cuda/verify.cuh is CUDA code: include it from a .cu file compiled by nvcc"
#endif

#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "infuse/core/view.hpp"
#include "infuse/exec/cuda.cuh"
#include "infuse/search/verify.hpp"

namespace infuse::search {

namespace detail {

inline constexpr int verify_block = 256;

struct block_row_ops_storage {
  union {
    typename cub::BlockReduce<double, verify_block>::TempStorage sum;
    typename cub::BlockScan<double, verify_block>::TempStorage scan;
    typename cub::BlockReduce<std::int64_t, verify_block>::TempStorage index;
  } cub;
  double broadcast_sum;
  std::int32_t broadcast_token;
};

// The passes of verify_walk over one row, by a whole block (see sequential_row_ops).
struct block_row_ops {
  std::int64_t vocab;
  block_row_ops_storage* shared;

  __device__ double residual_sum(const float* p, const float* q, double a) const {
    double sum = 0.0;
    for (std::int64_t x = threadIdx.x; x < vocab; x += verify_block) {
      const bool valid = p[x] >= 0.0f && (a == 0.0 || q[x] >= 0.0f);
      sum += valid ? residual_weight(p[x], q, x, a) : NAN;
    }
    const double total = cub::BlockReduce<double, verify_block>(shared->cub.sum).Sum(sum);
    if (threadIdx.x == 0) shared->broadcast_sum = total;
    __syncthreads();
    const double result = shared->broadcast_sum;
    __syncthreads();
    return result;
  }

  // Each thread takes a contiguous chunk, so that an exclusive scan of the chunk sums orders the
  // running sum by token id, as the sequential walk does.
  __device__ std::int32_t residual_pick(const float* p, const float* q, double a,
                                        double target) const {
    const std::int64_t chunk = (vocab + verify_block - 1) / verify_block;
    const std::int64_t begin = threadIdx.x * chunk;
    const std::int64_t end = begin + chunk < vocab ? begin + chunk : vocab;
    double chunk_sum = 0.0;
    std::int64_t last_positive = -1;
    for (std::int64_t x = begin; x < end; ++x) {
      const double weight = residual_weight(p[x], q, x, a);
      if (weight > 0.0) {
        chunk_sum += weight;
        last_positive = x;
      }
    }
    double before = 0.0;
    cub::BlockScan<double, verify_block>(shared->cub.scan).ExclusiveSum(chunk_sum, before);
    if (threadIdx.x == 0) shared->broadcast_token = -1;
    __syncthreads();
    if (chunk_sum > 0.0 && before <= target && target < before + chunk_sum) {
      double running = before;
      for (std::int64_t x = begin; x < end; ++x) {
        const double weight = residual_weight(p[x], q, x, a);
        if (weight <= 0.0) continue;
        running += weight;
        last_positive = x;
        if (running > target) break;
      }
      shared->broadcast_token = static_cast<std::int32_t>(last_positive);
    }
    __syncthreads();
    std::int32_t token = shared->broadcast_token;
    if (token < 0) {  // rounding put the target past every running sum: the last positive token
      const std::int64_t last =
          cub::BlockReduce<std::int64_t, verify_block>(shared->cub.index)
              .Reduce(last_positive, [](std::int64_t a, std::int64_t b) { return a > b ? a : b; });
      if (threadIdx.x == 0) {
        shared->broadcast_token = last < 0 ? 0 : static_cast<std::int32_t>(last);
      }
      __syncthreads();
      token = shared->broadcast_token;
    }
    __syncthreads();
    return token;
  }

  // The lowest id of the largest probability, as (value bits, inverted id) packed in 64 bits: the
  // probabilities are nonnegative, so their bits order as the values do.
  __device__ std::int32_t argmax(const float* p) const {
    std::int64_t best = -1;
    bool invalid = false;
    for (std::int64_t x = threadIdx.x; x < vocab; x += verify_block) {
      if (!(p[x] >= 0.0f)) invalid = true;
      const std::int64_t packed = (static_cast<std::int64_t>(__float_as_uint(p[x])) << 32) |
                                  (0xFFFFFFFFu - static_cast<std::uint32_t>(x));
      if (packed > best) best = packed;
    }
    constexpr std::int64_t poisoned = -2;  // a NaN or a negative value was read
    const std::int64_t merged =
        cub::BlockReduce<std::int64_t, verify_block>(shared->cub.index)
            .Reduce(invalid ? poisoned : best, [](std::int64_t a, std::int64_t b) {
              return a == poisoned || b == poisoned ? poisoned : (a > b ? a : b);
            });
    if (threadIdx.x == 0) {
      shared->broadcast_token =
          merged < 0 ? -1
                     : static_cast<std::int32_t>(0xFFFFFFFFu - static_cast<std::uint32_t>(merged));
    }
    __syncthreads();
    const std::int32_t token = shared->broadcast_token;
    __syncthreads();
    return token;
  }
};

template <acceptance Rule, class Children, class Rows>
__device__ void verify_block_request(const Children& children, const Rows& rows, std::int64_t vocab,
                                     std::uint64_t seed, std::int64_t position,
                                     const verify_result<device_memory>& out,
                                     std::int64_t request) {
  __shared__ block_row_ops_storage shared;
  if (threadIdx.x == 0) clear_emitted(out, request);
  const emit_into<device_memory> emit{&out, request, threadIdx.x == 0};
  const verify_outcome outcome =
      verify_walk<Rule == acceptance::greedy>(children, rows, block_row_ops{vocab, &shared}, vocab,
                                              seed, static_cast<std::uint64_t>(position), emit);
  if (threadIdx.x == 0) store_outcome(out, request, outcome);
}

template <acceptance Rule>
__global__ void __launch_bounds__(verify_block)
    verify_chain_kernel(chain_drafts<device_memory> in, verify_result<device_memory> out) {
  const std::int64_t request = blockIdx.x;
  verify_block_request<Rule>(chain_children{in.tokens.extent(1)},
                             chain_rows<device_memory>{&in, request}, in.target_probs.extent(2),
                             in.seeds(request), in.positions(request), out, request);
}

template <acceptance Rule>
__global__ void __launch_bounds__(verify_block)
    verify_tree_kernel(tree_drafts<device_memory> in, verify_result<device_memory> out) {
  const std::int64_t request = blockIdx.x;
  verify_block_request<Rule>(tree_children{&in.parents(request, 0), in.parents.extent(1)},
                             tree_rows<device_memory>{&in, request}, in.target_probs.extent(2),
                             in.seeds(request), in.positions(request), out, request);
}

}  // namespace detail

// Chain verification (search/verify.hpp) on exec's stream; shapes are checked on the host before
// the launch. Same decisions as the CPU for the same inputs and seeds.
template <acceptance Rule = acceptance::sampled>
void verify_chain(const exec::cuda& exec, const chain_drafts<device_memory>& in,
                  const verify_result<device_memory>& out) {
  const detail::verify_shape shape = detail::require_chain<Rule>(in, out);
  if (shape.batch == 0) return;
  exec.launch(detail::verify_chain_kernel<Rule>, dim3(static_cast<unsigned>(shape.batch)),
              dim3(detail::verify_block), 0, in, out);
}

// Tree verification. The parent indices live in device memory and are not checked: a parent that
// is not in [0, v) makes node v unreachable (children are searched after their parent), never an
// out-of-bounds read.
template <acceptance Rule = acceptance::sampled>
void verify_tree(const exec::cuda& exec, const tree_drafts<device_memory>& in,
                 const verify_result<device_memory>& out) {
  const detail::verify_shape shape = detail::require_tree<Rule>(in, out);
  if (shape.batch == 0) return;
  exec.launch(detail::verify_tree_kernel<Rule>, dim3(static_cast<unsigned>(shape.batch)),
              dim3(detail::verify_block), 0, in, out);
}

}  // namespace infuse::search
