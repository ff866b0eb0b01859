// search::resample on the CPU: groups of particles split over the threads (search/particles.hpp).
#pragma once

#include <cstdint>

#include "infuse/core/concepts.hpp"
#include "infuse/core/error.hpp"
#include "infuse/core/view.hpp"
#include "infuse/exec/cpu.hpp"
#include "infuse/search/particles.hpp"

namespace infuse::search {

inline void resample(const exec::cpu& exec, resampling method,
                     host_view<const float, 2> log_weights, host_view<const std::uint64_t, 1> seeds,
                     host_view<const std::int64_t, 1> positions, host_view<std::int32_t, 2> parents,
                     host_view<particle_status, 1> status) {
  detail::require_resample(log_weights, seeds, positions, parents, status);
  exec.parallel_for(log_weights.extent(0), [&](std::int64_t g) {
    const draw_key key{seeds(g), static_cast<std::uint64_t>(positions(g)), salt::resample};
    status(g) = detail::resample_group(method, key, log_weights, parents, g);
  });
}

}  // namespace infuse::search
