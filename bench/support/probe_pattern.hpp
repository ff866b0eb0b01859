// The values both bandwidth probes stream, so their sums can be checked exactly.
#pragma once

#include <cstddef>
#include <cstdint>

#include "infuse/core/config.hpp"

namespace infuse::bench {

// Small integers 0..7 (Fibonacci hashing of the index, top three bits) that differ from block to
// block, so a kernel that reads the wrong part of an array or misses one gets a different sum;
// float sums of a few million of them are exact.
INFUSE_HOST_DEVICE inline std::uint32_t probe_integer(std::size_t index, std::uint32_t salt) {
  return (static_cast<std::uint32_t>(index) * 0x9E3779B1u + salt) >> 29;
}

INFUSE_HOST_DEVICE inline float probe_value(std::size_t index, std::uint32_t salt) {
  return static_cast<float>(probe_integer(index, salt));
}

}  // namespace infuse::bench
