// The narrow storage floats: half (IEEE 754 binary16), bfloat16, fp8_e4m3 and fp8_e5m2 (OCP 8-bit
// Floating Point Specification, v1.0). They are storage, not arithmetic types: a value converts
// to float to compute and back to store, and both conversions give the same bits as CUDA's own
// (__float2half_rn, __float2bfloat16_rn, __nv_cvt_float_to_fp8, and back), on the host and in
// kernels alike.
//
// One rounding routine serves the four formats: it is generic over a format's layout (exponent
// and significand widths, how the top exponent encodes Inf and NaN); the overflow rule is an
// argument.
#pragma once

#include <cstdint>
#include <type_traits>

#include "infuse/core/config.hpp"

namespace infuse {

// What a conversion to a narrower format gives for ±Inf and values beyond its largest finite one:
//   finite: the largest finite value of that sign (CUDA's __NV_SATFINITE);
//   none:   ±Inf, or NaN in a format without Inf (CUDA's __NV_NOSAT; __float2half always does).
enum class saturation { finite, none };

// A storage format's layout and limits; specialized for half, bfloat16, fp8_e4m3 and fp8_e5m2.
template <class T>
struct float_format;

namespace detail {

// How a format uses its top exponent field.
enum class special_values {
  ieee,      // all ones: Inf (zero significand) or NaN (half, bfloat16, E5M2)
  nan_only,  // no Inf; only S.1111.111 is NaN, the rest of the top binade is finite (E4M3)
};

INFUSE_HOST_DEVICE constexpr std::uint32_t float_as_bits(float value) {
  return __builtin_bit_cast(std::uint32_t, value);
}
INFUSE_HOST_DEVICE constexpr float bits_as_float(std::uint32_t bits) {
  return __builtin_bit_cast(float, bits);
}

inline constexpr int float_significand_bits = 23;
inline constexpr int float_exponent_bias = 127;
inline constexpr std::uint32_t float_infinity_bits = 0x7F800000u;
// What CUDA returns for a NaN, whatever its sign and payload: a positive NaN with every bit set.
inline constexpr std::uint32_t float_canonical_nan_bits = 0x7FFFFFFFu;

// A sign bit, ExponentBits of exponent (IEEE bias), SignificandBits without the implicit one.
template <class Storage, int ExponentBits, int SignificandBits, special_values Specials>
struct float_layout {
  using storage_type = Storage;
  static constexpr int exponent_bits = ExponentBits;
  static constexpr int significand_bits = SignificandBits;  // stored: without the implicit 1
  static constexpr int digits = SignificandBits + 1;        // with it, as numeric_limits counts
  static constexpr int exponent_bias = (1 << (ExponentBits - 1)) - 1;
  static constexpr special_values specials = Specials;

  static constexpr std::uint32_t sign_mask = 1u << (ExponentBits + SignificandBits);
  static constexpr std::uint32_t magnitude_mask = sign_mask - 1u;
  static constexpr std::uint32_t infinity_bits =  // meaningful for special_values::ieee only
      ((1u << ExponentBits) - 1u) << SignificandBits;
  static constexpr std::uint32_t max_finite_bits =
      Specials == special_values::ieee ? infinity_bits - 1u : magnitude_mask - 1u;
  static constexpr std::uint32_t min_normal_bits = 1u << SignificandBits;
  // CUDA's NaN in every one of these formats: positive, all other bits set (0x7FFF, 0x7F).
  static constexpr std::uint32_t canonical_nan_bits = magnitude_mask;

  static_assert(sizeof(Storage) * 8 == 1 + ExponentBits + SignificandBits,
                "infuse: a storage float fills its storage exactly");
  static_assert(ExponentBits <= 8 && SignificandBits < float_significand_bits,
                "infuse: a storage float must be narrower than float");
  static_assert(ExponentBits < 8 || exponent_bias == float_exponent_bias,
                "infuse: a format with float's exponent width has float's bias");
  static_assert(exponent_bias > SignificandBits, "infuse: epsilon must be a normal number");

  INFUSE_HOST_DEVICE static constexpr bool is_nan(std::uint32_t magnitude) {
    return Specials == special_values::ieee ? magnitude > infinity_bits
                                            : magnitude == magnitude_mask;
  }
};

// float -> format bits, rounding the exact value to nearest, ties to even. Bit-exact with CUDA.
template <class Layout>
INFUSE_HOST_DEVICE constexpr typename Layout::storage_type encode(float value, saturation mode) {
  constexpr int significand_bits = Layout::significand_bits;
  const std::uint32_t bits = float_as_bits(value);
  const std::uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > float_infinity_bits) {
    return static_cast<typename Layout::storage_type>(Layout::canonical_nan_bits);
  }
  const std::uint32_t sign = (bits >> 31) * Layout::sign_mask;

  // The value is significand * 2^(float_exponent - 127 - 23); float subnormals have exponent 1 and
  // no implicit bit. Inf passes through as a huge number, and overflows below.
  const std::uint32_t float_exponent = magnitude >> float_significand_bits;
  const std::uint32_t implicit_bit = float_exponent != 0 ? 1u << float_significand_bits : 0u;
  const std::uint32_t significand = (magnitude & 0x7FFFFFu) | implicit_bit;
  const int exponent = static_cast<int>(float_exponent != 0 ? float_exponent : 1u) -
                       float_exponent_bias + Layout::exponent_bias;  // biased, in the format

  // Drop the significand bits the format lacks, and one more per binade below its normal range.
  int dropped = float_significand_bits - significand_bits + (exponent < 1 ? 1 - exponent : 0);
  // Past 25 every float significand (< 2^24) is below half of the last kept bit: it rounds to 0.
  dropped = dropped < 25 ? dropped : 25;
  // In the normal range the implicit bit lands on the exponent field's lowest bit, hence the
  // (exponent - 1); a carry out of the significand, in rounding too, moves to the next binade.
  std::uint32_t result =
      (exponent > 0 ? static_cast<std::uint32_t>(exponent - 1) << significand_bits : 0u) +
      (significand >> dropped);
  const std::uint32_t remainder = significand & ((1u << dropped) - 1u);
  const std::uint32_t halfway = 1u << (dropped - 1);
  if (remainder > halfway || (remainder == halfway && (result & 1u) != 0u)) ++result;

  if (result > Layout::max_finite_bits) {
    result = mode == saturation::finite                 ? Layout::max_finite_bits
             : Layout::specials == special_values::ieee ? Layout::infinity_bits
                                                        : Layout::canonical_nan_bits;
  }
  return static_cast<typename Layout::storage_type>(sign | result);
}

// format bits -> float, exactly. A NaN gives CUDA's canonical float NaN (bfloat16: see below).
template <class Layout>
INFUSE_HOST_DEVICE constexpr float decode(std::uint32_t bits) {
  constexpr int significand_shift = float_significand_bits - Layout::significand_bits;
  if constexpr (Layout::exponent_bits == 8) {
    // The format is float's top bits: widening is a shift, keeping NaN payloads as CUDA does.
    return bits_as_float(bits << significand_shift);
  } else {
    const std::uint32_t sign = (bits & Layout::sign_mask) != 0u ? 0x80000000u : 0u;
    const std::uint32_t magnitude = bits & Layout::magnitude_mask;
    if (Layout::is_nan(magnitude)) return bits_as_float(float_canonical_nan_bits);
    if (Layout::specials == special_values::ieee && magnitude == Layout::infinity_bits) {
      return bits_as_float(sign | float_infinity_bits);
    }
    if (magnitude < Layout::min_normal_bits) {
      // magnitude * 2^(1 - bias - significand_bits): converting the integer is exact, and lowering
      // its exponent field divides by the power of two (float's range holds the whole format).
      constexpr std::uint32_t scale_bits =
          static_cast<std::uint32_t>(Layout::exponent_bias + Layout::significand_bits - 1)
          << float_significand_bits;
      const std::uint32_t scaled =
          magnitude == 0u ? 0u : float_as_bits(static_cast<float>(magnitude)) - scale_bits;
      return bits_as_float(sign | scaled);
    }
    constexpr std::uint32_t rebias =
        static_cast<std::uint32_t>(float_exponent_bias - Layout::exponent_bias)
        << Layout::significand_bits;
    return bits_as_float(sign | ((magnitude + rebias) << significand_shift));
  }
}

// float_format<T>: the layout plus the limits that quantization code needs, as floats.
template <class Layout, saturation DefaultSaturation>
struct format_traits : Layout {
  // What T(float) does on overflow: CUDA's __float2half and __float2bfloat16 overflow to Inf,
  // its __nv_fp8_e4m3(float) and __nv_fp8_e5m2(float) constructors saturate.
  static constexpr saturation default_saturation = DefaultSaturation;
  static constexpr float max_finite = decode<Layout>(Layout::max_finite_bits);
  static constexpr float lowest = -max_finite;
  static constexpr float min_normal = decode<Layout>(Layout::min_normal_bits);
  static constexpr float min_subnormal = decode<Layout>(1u);
  static constexpr float epsilon =  // 2^-significand_bits: the gap above 1
      decode<Layout>(static_cast<std::uint32_t>(Layout::exponent_bias - Layout::significand_bits)
                     << Layout::significand_bits);
};

// The members all four types share: bits in, bits out, and conversions through float.
template <class Derived>
class storage_float_base {
 public:
  using format = float_format<Derived>;
  using storage_type = typename format::storage_type;

  constexpr storage_float_base() = default;  // zero
  // Rounds to nearest even; on overflow does what CUDA's constructor for the type does.
  INFUSE_HOST_DEVICE constexpr explicit storage_float_base(float value)
      : bits_(encode<format>(value, format::default_saturation)) {}

  INFUSE_HOST_DEVICE static constexpr Derived from_float(float value, saturation mode) {
    return from_bits(encode<format>(value, mode));
  }
  INFUSE_HOST_DEVICE static constexpr Derived from_bits(storage_type bits) {
    Derived result;
    static_cast<storage_float_base&>(result).bits_ = bits;
    return result;
  }

  INFUSE_HOST_DEVICE constexpr storage_type bits() const { return bits_; }
  INFUSE_HOST_DEVICE constexpr explicit operator float() const { return decode<format>(bits_); }

 private:
  storage_type bits_ = 0;
};

}  // namespace detail

struct half;
struct bfloat16;
struct fp8_e4m3;
struct fp8_e5m2;

template <>
struct float_format<half>
    : detail::format_traits<
          detail::float_layout<std::uint16_t, 5, 10, detail::special_values::ieee>,
          saturation::none> {};
template <>
struct float_format<bfloat16>
    : detail::format_traits<detail::float_layout<std::uint16_t, 8, 7, detail::special_values::ieee>,
                            saturation::none> {};
template <>
struct float_format<fp8_e4m3>
    : detail::format_traits<
          detail::float_layout<std::uint8_t, 4, 3, detail::special_values::nan_only>,
          saturation::finite> {};
template <>
struct float_format<fp8_e5m2>
    : detail::format_traits<detail::float_layout<std::uint8_t, 5, 2, detail::special_values::ieee>,
                            saturation::finite> {};

// IEEE 754 binary16: 5 exponent bits, 10 significand bits, max 65504.
struct half : detail::storage_float_base<half> {
  using storage_float_base::storage_float_base;
};
// bfloat16: the top half of a float; 8 exponent bits, 7 significand bits.
struct bfloat16 : detail::storage_float_base<bfloat16> {
  using storage_float_base::storage_float_base;
};
// OCP FP8 E4M3: 4 exponent bits, 3 significand bits, max 448, no Inf, NaN = S.1111.111.
struct fp8_e4m3 : detail::storage_float_base<fp8_e4m3> {
  using storage_float_base::storage_float_base;
};
// OCP FP8 E5M2: IEEE-like with 5 exponent bits and 2 significand bits, max 57344.
struct fp8_e5m2 : detail::storage_float_base<fp8_e5m2> {
  using storage_float_base::storage_float_base;
};

template <class T>
inline constexpr bool is_storage_float_v =
    std::is_same_v<std::remove_cv_t<T>, half> || std::is_same_v<std::remove_cv_t<T>, bfloat16> ||
    std::is_same_v<std::remove_cv_t<T>, fp8_e4m3> || std::is_same_v<std::remove_cv_t<T>, fp8_e5m2>;
template <class T>
concept storage_float = is_storage_float_v<T>;

template <class T>
inline constexpr bool is_fp8_v =
    std::is_same_v<std::remove_cv_t<T>, fp8_e4m3> || std::is_same_v<std::remove_cv_t<T>, fp8_e5m2>;

template <class T>
concept fp8_float = is_fp8_v<T>;

template <class T>
using storage_type_t = typename float_format<std::remove_cv_t<T>>::storage_type;

// The conversions on raw bits, for kernels that keep storage in plain integers.
template <storage_float T>
INFUSE_HOST_DEVICE constexpr storage_type_t<T> float_to_bits(
    float value, saturation mode = float_format<std::remove_cv_t<T>>::default_saturation) {
  return detail::encode<float_format<std::remove_cv_t<T>>>(value, mode);
}
template <storage_float T>
INFUSE_HOST_DEVICE constexpr float bits_to_float(storage_type_t<T> bits) {
  return detail::decode<float_format<std::remove_cv_t<T>>>(bits);
}

INFUSE_HOST_DEVICE constexpr std::uint16_t float_to_half_bits(float value) {
  return float_to_bits<half>(value);
}
INFUSE_HOST_DEVICE constexpr float half_bits_to_float(std::uint16_t bits) {
  return bits_to_float<half>(bits);
}
INFUSE_HOST_DEVICE constexpr std::uint16_t float_to_bfloat16_bits(float value) {
  return float_to_bits<bfloat16>(value);
}
INFUSE_HOST_DEVICE constexpr float bfloat16_bits_to_float(std::uint16_t bits) {
  return bits_to_float<bfloat16>(bits);
}

// The largest half not above value, and the smallest not below it (NaN stays NaN): rounding that
// keeps a lower or upper bound one, exactly as round-toward-minus- or plus-infinity would.
INFUSE_HOST_DEVICE constexpr half half_at_most(float value) {
  const half nearest(value);
  if (!(static_cast<float>(nearest) > value)) return nearest;  // equal, below, or NaN
  // One step toward -inf: away from zero below it, toward zero above it, +0 to the least negative.
  const unsigned bits = nearest.bits();
  return half::from_bits(static_cast<std::uint16_t>((bits & 0x8000u) != 0 ? bits + 1
                                                    : bits == 0           ? 0x8001u
                                                                          : bits - 1));
}
INFUSE_HOST_DEVICE constexpr half half_at_least(float value) {
  const half nearest(value);
  if (!(static_cast<float>(nearest) < value)) return nearest;
  const unsigned bits = nearest.bits();
  return half::from_bits(static_cast<std::uint16_t>((bits & 0x8000u) == 0 ? bits + 1
                                                    : bits == 0x8000u     ? 0x0001u
                                                                          : bits - 1));
}

template <fp8_float T>
INFUSE_HOST_DEVICE constexpr std::uint8_t float_to_fp8_bits(float value,
                                                            saturation mode = saturation::finite) {
  return float_to_bits<T>(value, mode);
}
template <fp8_float T>
INFUSE_HOST_DEVICE constexpr float fp8_bits_to_float(std::uint8_t bits) {
  return bits_to_float<T>(bits);
}

}  // namespace infuse
