// A float64 reference for the narrow storage formats, written from their specifications and
// independent of infuse's own conversions: decoding evaluates the format's formula in double, and
// encoding looks a value up in the sorted table of the format's finite values instead of shifting
// bits. Formats: IEEE 754-2008 binary16; bfloat16 (float's top 16 bits); OCP 8-bit Floating Point
// Specification (OFP8) v1.0, E4M3 and E5M2.
//
// NaN, overflow and saturation follow CUDA (cuda_fp16.h, cuda_bf16.h, cuda_fp8.h):
//   - a NaN gives the positive NaN with every other bit set (0x7FFF; 0x7F in both FP8 formats);
//   - past the largest finite value (after rounding): that value when saturating (__NV_SATFINITE),
//     otherwise Inf, or NaN in E4M3, which has no Inf (__NV_NOSAT; half and bfloat16 always so).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "infuse/core/float_types.hpp"

#if defined(__CUDACC__) || defined(INFUSE_TEST_CUDA_HEADERS)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#endif

namespace infuse::reference {

struct float_spec {
  int exponent_bits;
  int significand_bits;  // stored fraction bits
  bool has_infinity;     // IEEE top exponent (Inf and NaNs); false: only S.1...1 (all ones) is NaN

  [[nodiscard]] int bias() const { return (1 << (exponent_bits - 1)) - 1; }
  [[nodiscard]] std::uint32_t sign_bit() const { return 1u << (exponent_bits + significand_bits); }
  [[nodiscard]] std::uint32_t magnitude_mask() const { return sign_bit() - 1u; }
  [[nodiscard]] std::uint32_t pattern_count() const { return sign_bit() << 1; }
  [[nodiscard]] std::uint32_t top_exponent_field() const {
    return ((1u << exponent_bits) - 1u) << significand_bits;
  }
  [[nodiscard]] bool is_nan(std::uint32_t bits) const {
    const std::uint32_t magnitude = bits & magnitude_mask();
    return has_infinity ? magnitude > top_exponent_field() : magnitude == magnitude_mask();
  }
  [[nodiscard]] std::uint32_t max_finite_bits() const {
    return has_infinity ? top_exponent_field() - 1u : magnitude_mask() - 1u;
  }
  [[nodiscard]] std::uint32_t canonical_nan_bits() const { return magnitude_mask(); }
};

enum class format { binary16, bfloat16, e4m3, e5m2 };

constexpr float_spec spec_of(format f) {
  switch (f) {
    case format::binary16:
      return {5, 10, true};
    case format::bfloat16:
      return {8, 7, true};
    case format::e4m3:
      return {4, 3, false};
    case format::e5m2:
      return {5, 2, true};
  }
  return {};
}

// The format each of infuse's storage types claims to be (only their names are used here).
template <class T>
struct format_of;
template <>
struct format_of<half> : std::integral_constant<format, format::binary16> {};
template <>
struct format_of<bfloat16> : std::integral_constant<format, format::bfloat16> {};
template <>
struct format_of<fp8_e4m3> : std::integral_constant<format, format::e4m3> {};
template <>
struct format_of<fp8_e5m2> : std::integral_constant<format, format::e5m2> {};

// The value a bit pattern stands for: (-1)^s * 2^(e - bias) * (1 + m / 2^M), or
// (-1)^s * 2^(1 - bias) * (m / 2^M) when e = 0; Inf, NaN as the spec says.
inline double decode(const float_spec& spec, std::uint32_t bits) {
  const double sign = (bits & spec.sign_bit()) != 0u ? -1.0 : 1.0;
  if (spec.is_nan(bits)) return std::numeric_limits<double>::quiet_NaN();
  const std::uint32_t magnitude = bits & spec.magnitude_mask();
  if (spec.has_infinity && magnitude == spec.top_exponent_field()) {
    return sign * std::numeric_limits<double>::infinity();
  }
  const int exponent = static_cast<int>(magnitude >> spec.significand_bits);
  const double fraction =
      std::ldexp(static_cast<double>(magnitude & ((1u << spec.significand_bits) - 1u)),
                 -spec.significand_bits);
  if (exponent == 0) return sign * std::ldexp(fraction, 1 - spec.bias());
  return sign * std::ldexp(1.0 + fraction, exponent - spec.bias());
}

// Nearest-value encoding by search over the format's finite values.
class encoder {
 public:
  explicit encoder(const float_spec& spec) : spec_(spec) {
    // The non-negative finite patterns 0 .. max, in increasing order of value.
    for (std::uint32_t bits = 0; bits <= spec.max_finite_bits(); ++bits) {
      values_.push_back(decode(spec, bits));
    }
    // One step past the largest value, where the next pattern would be: overflow is rounding to it.
    const std::size_t last = values_.size() - 1;
    values_.push_back(values_[last] + (values_[last] - values_[last - 1]));
  }

  [[nodiscard]] const float_spec& spec() const { return spec_; }
  // The finite non-negative values, then the one past the largest.
  [[nodiscard]] const std::vector<double>& values() const { return values_; }

  [[nodiscard]] std::uint32_t encode(double x, bool saturate_finite) const {
    if (std::isnan(x)) return spec_.canonical_nan_bits();
    const std::uint32_t sign = std::signbit(x) ? spec_.sign_bit() : 0u;
    const double magnitude = std::fabs(x);
    const std::uint32_t overflow =
        saturate_finite
            ? spec_.max_finite_bits()
            : (spec_.has_infinity ? spec_.top_exponent_field() : spec_.canonical_nan_bits());
    if (magnitude >= values_.back()) return sign | overflow;
    // values_[above - 1] <= magnitude < values_[above]
    const auto above = static_cast<std::uint32_t>(
        std::upper_bound(values_.begin(), values_.end(), magnitude) - values_.begin());
    const std::uint32_t below = above - 1u;
    const double gap_below = magnitude - values_[below];
    const double gap_above = values_[above] - magnitude;
    const std::uint32_t nearest =
        gap_below < gap_above || (gap_below == gap_above && below % 2u == 0u) ? below : above;
    return sign | (nearest > spec_.max_finite_bits() ? overflow : nearest);
  }

 private:
  float_spec spec_;
  std::vector<double> values_;
};

// Floats that probe every rounding decision of a format: every finite value of both signs, every
// midpoint between neighbours (the ties, including the overflow threshold and half the smallest
// subnormal), the floats next to each of them, specials, and `random_count` random floats, half
// uniform bit patterns and half spread over the format's range.
inline std::vector<float> probe_floats(const encoder& format, std::mt19937_64& rng,
                                       std::size_t random_count) {
  std::vector<float> probes;
  const auto add_signed = [&probes](float x) {
    probes.push_back(x);
    probes.push_back(-x);
  };
  const std::vector<double>& values = format.values();
  for (std::size_t i = 0; i + 1 < values.size(); ++i) {
    add_signed(static_cast<float>(values[i]));
    const double midpoint = (values[i] + values[i + 1]) / 2.0;
    const auto tie = static_cast<float>(midpoint);
    if (static_cast<double>(tie) != midpoint) {
      throw std::logic_error("probe_floats: a midpoint of the format is not a float");
    }
    add_signed(tie);
    add_signed(std::nextafter(tie, 0.0f));
    add_signed(std::nextafter(tie, INFINITY));
  }
  add_signed(static_cast<float>(values.back()));

  constexpr float inf = std::numeric_limits<float>::infinity();
  constexpr float float_max = std::numeric_limits<float>::max();
  constexpr float float_min = std::numeric_limits<float>::min();
  constexpr float float_denorm = std::numeric_limits<float>::denorm_min();
  for (const float x : {0.0f, inf, float_max, std::nextafter(inf, 0.0f), float_min,
                        std::nextafter(float_min, 0.0f), float_denorm, 2.0f * float_denorm, 1.0f,
                        std::nextafter(1.0f, 0.0f), std::nextafter(1.0f, 2.0f)}) {
    add_signed(x);
  }
  for (const std::uint32_t nan_bits : {0x7FC00000u, 0x7F800001u, 0x7FFFFFFFu, 0x7FA00000u,
                                       0x7F800100u, 0x7FE00000u, 0x7FD00000u, 0x7FB00000u}) {
    float nan = 0.0f;
    std::memcpy(&nan, &nan_bits, sizeof nan);
    add_signed(nan);
  }

  // Biased float exponents from 3 binades below the smallest subnormal to 3 above the largest
  // value, within float's finite ones (0 gives float subnormals).
  std::uniform_int_distribution<int> biased_exponent(
      std::max(std::ilogb(values[1]) - 3 + 127, 0),
      std::min(std::ilogb(values.back()) + 3 + 127, 254));
  std::uniform_int_distribution<std::uint32_t> any_bits;
  for (std::size_t i = 0; i < random_count; ++i) {
    std::uint32_t bits = any_bits(rng);
    if (i % 2 == 1) {  // keep the random sign and significand, move into the format's range
      bits = (bits & 0x807FFFFFu) | (static_cast<std::uint32_t>(biased_exponent(rng)) << 23);
    }
    float x = 0.0f;
    std::memcpy(&x, &bits, sizeof x);
    probes.push_back(x);
  }
  return probes;
}

#if defined(__CUDACC__) || defined(INFUSE_TEST_CUDA_HEADERS)
// CUDA's own conversions, the second reference, to be equalled bit for bit: their host fallbacks
// under g++ and in host code, the hardware instructions in a kernel. CUDA converts float to half
// and bfloat16 only without saturation, so those ignore `saturate_finite`.
template <format F>
struct cuda_conversion;

template <>
struct cuda_conversion<format::binary16> {
  static constexpr bool saturates = false;
  INFUSE_HOST_DEVICE static std::uint32_t encode(float x, bool /*saturate_finite*/) {
    return __half_as_ushort(__float2half_rn(x));
  }
  INFUSE_HOST_DEVICE static float decode(std::uint32_t bits) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  }
};

template <>
struct cuda_conversion<format::bfloat16> {
  static constexpr bool saturates = false;
  INFUSE_HOST_DEVICE static std::uint32_t encode(float x, bool /*saturate_finite*/) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
  INFUSE_HOST_DEVICE static float decode(std::uint32_t bits) {
    return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(bits)));
  }
};

template <__nv_fp8_interpretation_t Interpretation>
struct cuda_fp8_conversion {
  static constexpr bool saturates = true;
  static constexpr __nv_fp8_interpretation_t interpretation = Interpretation;
  INFUSE_HOST_DEVICE static std::uint32_t encode(float x, bool saturate_finite) {
    return __nv_cvt_float_to_fp8(x, saturate_finite ? __NV_SATFINITE : __NV_NOSAT, interpretation);
  }
  INFUSE_HOST_DEVICE static float decode(std::uint32_t bits) {
    const __half as_half =
        __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(bits), interpretation);
    return __half2float(as_half);
  }
};

template <>
struct cuda_conversion<format::e4m3> : cuda_fp8_conversion<__NV_E4M3> {};
template <>
struct cuda_conversion<format::e5m2> : cuda_fp8_conversion<__NV_E5M2> {};
#endif

}  // namespace infuse::reference
