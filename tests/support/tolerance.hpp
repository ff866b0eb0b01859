// Tolerances per element type, in one place. `relative` bounds ||out - ref|| / ||ref|| against a
// float64 reference; the values are a few units of each type's rounding (2^-p for p bits of
// significand) times the error growth of a short accumulation.
#pragma once

#include "infuse/core/float_types.hpp"

namespace infuse::test {

template <class T>
struct tolerance;

template <>
struct tolerance<double> {
  static constexpr double relative = 1e-12;
};
template <>
struct tolerance<float> {
  static constexpr double relative = 1e-5;  // 2^-24 per operation, accumulations of up to ~1e4 terms
};
template <>
struct tolerance<half> {
  static constexpr double relative = 2e-3;  // 2^-11 rounding of inputs and outputs
};
template <>
struct tolerance<bfloat16> {
  static constexpr double relative = 1.6e-2;  // 2^-8 rounding of inputs and outputs
};
template <>
struct tolerance<fp8_e4m3> {
  static constexpr double relative = 1.3e-1;  // 2^-4
};
template <>
struct tolerance<fp8_e5m2> {
  static constexpr double relative = 2.5e-1;  // 2^-3
};

}  // namespace infuse::test
