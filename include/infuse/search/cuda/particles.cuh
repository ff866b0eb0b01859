// search::resample on CUDA: one thread per group of particles, running the same float64 walk as
// the CPU (search/particles.hpp). Particle counts are small (tens to thousands) and groups many,
// so a thread per group keeps the walk sequential and its keys identical to the CPU's.
#pragma once

#include "infuse/core/config.hpp"

#if !defined(INFUSE_CUDA_COMPILER)
#error "infuse/search/cuda/particles.cuh is CUDA code: include it from a .cu file compiled by nvcc"
#endif

#include <cstdint>

#include "infuse/core/view.hpp"
#include "infuse/exec/cuda.cuh"
#include "infuse/search/particles.hpp"

namespace infuse::search {

namespace detail {

inline constexpr int resample_block = 128;

__global__ void __launch_bounds__(resample_block)
    resample_kernel(resampling method, device_view<const float, 2> log_weights,
                    device_view<const std::uint64_t, 1> seeds,
                    device_view<const std::int64_t, 1> positions,
                    device_view<std::int32_t, 2> parents, device_view<particle_status, 1> status) {
  const std::int64_t g = blockIdx.x * std::int64_t{resample_block} + threadIdx.x;
  if (g >= log_weights.extent(0)) return;
  const draw_key key{seeds(g), static_cast<std::uint64_t>(positions(g)), salt::resample};
  status(g) = resample_group(method, key, log_weights, parents, g);
}

}  // namespace detail

// Resampling of every group (search/particles.hpp) on exec's stream, shapes checked on the host.
inline void resample(const exec::cuda& exec, resampling method,
                     device_view<const float, 2> log_weights,
                     device_view<const std::uint64_t, 1> seeds,
                     device_view<const std::int64_t, 1> positions,
                     device_view<std::int32_t, 2> parents, device_view<particle_status, 1> status) {
  detail::require_resample(log_weights, seeds, positions, parents, status);
  const std::int64_t groups = log_weights.extent(0);
  if (groups == 0) return;
  exec.launch(
      detail::resample_kernel,
      dim3(static_cast<unsigned>((groups + detail::resample_block - 1) / detail::resample_block)),
      dim3(detail::resample_block), 0, method, log_weights, seeds, positions, parents, status);
}

}  // namespace infuse::search
