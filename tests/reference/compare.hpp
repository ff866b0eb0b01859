// Float64 comparison helpers shared by every test: a kernel's output is compared with a float64
// reference by the relative norm of the difference, and NaN never passes.
#pragma once

#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <span>
#include <vector>

namespace infuse::reference {

// ||out - ref||_2 / ||ref||_2 (the absolute norm when ref is all zeros); NaN or Inf in out gives +Inf.
template <class T>
double relative_error(std::span<const T> out, std::span<const double> ref) {
  REQUIRE(out.size() == ref.size());
  double diff = 0.0;
  double norm = 0.0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    const double value = static_cast<double>(out[i]);
    if (!std::isfinite(value) && std::isfinite(ref[i])) return INFINITY;
    diff += (value - ref[i]) * (value - ref[i]);
    norm += ref[i] * ref[i];
  }
  return norm > 0.0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

template <class T>
double relative_error(const std::vector<T>& out, const std::vector<double>& ref) {
  return relative_error(std::span<const T>(out), std::span<const double>(ref));
}

}  // namespace infuse::reference
