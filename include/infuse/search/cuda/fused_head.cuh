// search::sample_from_head and search::greedy_from_head on exec::cuda (declared in
// search/fused_head.hpp): the CUDA gemv into the workspace (batch 1: 4 bytes a token, which stays
// in L2 for the next kernel), then search::sample or search::greedy on it, on the same stream. The
// result is that of gemv followed by sample on CUDA, by construction, and the sampling kernels
// check the parameters in device memory as sample does (status invalid_parameter).
//
// The per-tile summaries of the CPU body need the CUDA gemv's per-row dot products as a device
// function that a summary kernel can call; until gemm/cuda/gemv.cuh offers one, every call takes
// this path. Float activations (gemm::float_activations) only.
#pragma once

#include "infuse/core/config.hpp"

#if !defined(INFUSE_CUDA_COMPILER)
#error "infuse/search/cuda/fused_head.cuh is CUDA code: include it from a .cu file compiled by nvcc"
#endif

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "infuse/exec/cuda.cuh"
#include "infuse/gemm/cuda/gemv.cuh"
#include "infuse/search/cuda/sample.cuh"
#include "infuse/search/fused_head.hpp"

namespace infuse::search::detail {

template <>
struct head_body<exec::cuda> {
  template <class Set>
  static std::int64_t workspace_bytes(const exec::cuda& exec, std::int64_t rows,
                                      std::int64_t vocab) {
    return rows > 0 ? 64 + through_logits_bytes<Set>(exec, rows, vocab) : 0;
  }

  // Greedy when params is null; arguments already checked on the host.
  template <class Set, class S, class Activations>
  static void sample(const exec::cuda& exec, const quant::matrix<S, device_memory>& w,
                     device_view<const float, 2> hidden, const sample_rows<device_memory>& rows,
                     const sample_params<device_memory, Set>* params,
                     const sample_outputs<device_memory>& out,
                     const view<std::byte, 1, device_memory>& workspace,
                     const Activations& activations) {
    static_assert(std::is_same_v<Activations, gemm::float_activations>,
                  "infuse: search::sample_from_head on CUDA takes float activations "
                  "(gemm::float_activations); see docs/policies.md#quantized-gemv");
    sample_through_logits<Set>(exec, w, hidden, rows, params, out, aligned_base(workspace.data()),
                               activations);
  }
};

}  // namespace infuse::search::detail
