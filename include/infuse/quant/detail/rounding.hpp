// Round to nearest, ties to even, the same on the host and on the device.
#pragma once

#include <cmath>

#include "infuse/core/config.hpp"

namespace infuse::quant::detail {

INFUSE_HOST_DEVICE INFUSE_FORCE_INLINE int round_to_int(float x) {
#if defined(INFUSE_DEVICE_PASS)
  return __float2int_rn(x);
#else
  return static_cast<int>(std::nearbyint(x));
#endif
}

INFUSE_HOST_DEVICE INFUSE_FORCE_INLINE int clamp_int(int x, int lo, int hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

}  // namespace infuse::quant::detail
