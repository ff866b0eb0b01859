#include "infuse/core/float_types.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "reference/float_formats.hpp"
#include "support/random.hpp"

namespace {

using infuse::bfloat16;
using infuse::float_format;
using infuse::fp8_e4m3;
using infuse::fp8_e5m2;
using infuse::saturation;
namespace reference = infuse::reference;

#define INFUSE_STORAGE_FLOATS infuse::half, bfloat16, fp8_e4m3, fp8_e5m2

template <class T>
const reference::encoder& reference_encoder() {
  static const reference::encoder encoder(reference::spec_of(reference::format_of<T>::value));
  return encoder;
}

std::string hex(std::uint32_t bits) {
  char text[16];
  std::snprintf(text, sizeof text, "0x%X", static_cast<unsigned>(bits));
  return text;
}

std::string describe(float x) {
  char text[64];
  std::snprintf(text, sizeof text, "%a (bits %s)", static_cast<double>(x),
                hex(std::bit_cast<std::uint32_t>(x)).c_str());
  return text;
}

// Counts the cases that disagree and keeps the first few, so that a loop over a million inputs
// ends in one check that shows what went wrong.
class mismatches {
 public:
  void add(const std::string& what) {
    if (count_++ < 8) text_ += what + "\n";
  }
  [[nodiscard]] int count() const { return count_; }
  [[nodiscard]] const std::string& text() const { return text_; }

 private:
  int count_ = 0;
  std::string text_;
};

#define CHECK_NO_MISMATCHES(log) \
  CHECK_MESSAGE((log).count() == 0, (log).count() << " mismatches:\n" << (log).text())

// Bit-exact float comparison for results that should be identical, NaNs included.
bool same_bits(float a, float b) {
  return std::bit_cast<std::uint32_t>(a) == std::bit_cast<std::uint32_t>(b);
}

}  // namespace

TEST_CASE("storage floats are small, trivially copyable, explicit and start at zero") {
  static_assert(sizeof(infuse::half) == 2 && sizeof(bfloat16) == 2);
  static_assert(sizeof(fp8_e4m3) == 1 && sizeof(fp8_e5m2) == 1);
  static_assert(std::is_trivially_copyable_v<infuse::half> &&
                std::is_trivially_copyable_v<fp8_e4m3>);
  static_assert(std::is_standard_layout_v<bfloat16> && std::is_standard_layout_v<fp8_e5m2>);
  static_assert(!std::is_convertible_v<float, infuse::half> &&
                !std::is_convertible_v<infuse::half, float>);
  static_assert(std::is_same_v<infuse::storage_type_t<infuse::half>, std::uint16_t>);
  static_assert(std::is_same_v<infuse::storage_type_t<const fp8_e4m3>, std::uint8_t>);

  static_assert(infuse::storage_float<infuse::half> && infuse::storage_float<bfloat16>);
  static_assert(infuse::storage_float<fp8_e4m3> && infuse::storage_float<const fp8_e5m2>);
  static_assert(!infuse::storage_float<float> && !infuse::storage_float<std::uint16_t>);
  static_assert(!infuse::is_storage_float_v<double> && !infuse::is_storage_float_v<infuse::half*>);
  static_assert(infuse::is_fp8_v<fp8_e4m3> && !infuse::is_fp8_v<bfloat16>);

  static_assert(infuse::half{}.bits() == 0 && bfloat16{}.bits() == 0);
  static_assert(fp8_e4m3{}.bits() == 0 && fp8_e5m2{}.bits() == 0);
  infuse::half values[4];
  for (const infuse::half value : values) CHECK(value.bits() == 0);
}

// Conversions are constant expressions, and give the published values.
// IEEE 754 binary16: 1/3 = 0x3555, max 65504 = 0x7BFF, smallest subnormal 2^-24.
static_assert(infuse::half(1.0f / 3.0f).bits() == 0x3555);
static_assert(infuse::half(65504.0f).bits() == 0x7BFF && infuse::half(-2.0f).bits() == 0xC000);
static_assert(float(infuse::half::from_bits(0x0001)) == 0x1p-24f);
// bfloat16: pi = 0x4049, the top half of float.
static_assert(bfloat16(3.14159265f).bits() == 0x4049 && float(bfloat16::from_bits(0x3F80)) == 1.0f);
// OCP FP8: E4M3 max S.1111.110 = 448, E5M2 max S.11110.11 = 57344, Inf S.11111.00.
static_assert(float(fp8_e4m3::from_bits(0x7E)) == 448.0f &&
              float(fp8_e4m3::from_bits(0x01)) == 0x1p-9f);
static_assert(float(fp8_e5m2::from_bits(0x7B)) == 57344.0f &&
              float(fp8_e5m2::from_bits(0x01)) == 0x1p-16f);
static_assert(float(fp8_e5m2::from_bits(0xFC)) == -INFINITY);

static_assert(float_format<infuse::half>::max_finite == 65504.0f);
static_assert(float_format<infuse::half>::min_normal == 0x1p-14f);
static_assert(float_format<infuse::half>::min_subnormal == 0x1p-24f);
static_assert(float_format<infuse::half>::epsilon == 0x1p-10f);
static_assert(float_format<bfloat16>::max_finite == 0x1.FEp127f);
static_assert(float_format<bfloat16>::min_normal == 0x1p-126f);
static_assert(float_format<bfloat16>::min_subnormal == 0x1p-133f);
static_assert(float_format<bfloat16>::epsilon == 0x1p-7f);
static_assert(float_format<fp8_e4m3>::max_finite == 448.0f &&
              float_format<fp8_e4m3>::lowest == -448.0f);
static_assert(float_format<fp8_e4m3>::min_normal == 0x1p-6f);
static_assert(float_format<fp8_e4m3>::min_subnormal == 0x1p-9f);
static_assert(float_format<fp8_e4m3>::epsilon == 0x1p-3f);
static_assert(float_format<fp8_e5m2>::max_finite == 57344.0f);
static_assert(float_format<fp8_e5m2>::min_normal == 0x1p-14f);
static_assert(float_format<fp8_e5m2>::min_subnormal == 0x1p-16f);
static_assert(float_format<fp8_e5m2>::epsilon == 0x1p-2f);
static_assert(float_format<infuse::half>::exponent_bits == 5 &&
              float_format<infuse::half>::significand_bits == 10);
static_assert(float_format<bfloat16>::digits == 8 && float_format<fp8_e4m3>::exponent_bias == 7);
static_assert(float_format<fp8_e5m2>::exponent_bias == 15 &&
              float_format<fp8_e5m2>::significand_bits == 2);

TEST_CASE("CUDA's rules at the edges: overflow, saturation, NaN, underflow") {
  using infuse::float_to_fp8_bits;
  // half overflows to Inf from 65520: 65504 + half an ulp, a tie that leaves the odd 0x7BFF.
  CHECK(infuse::float_to_half_bits(65520.0f) == 0x7C00);
  CHECK(infuse::float_to_half_bits(std::nextafter(65520.0f, 0.0f)) == 0x7BFF);
  CHECK(infuse::float_to_half_bits(-INFINITY) == 0xFC00);
  CHECK(infuse::float_to_half_bits(-NAN) == 0x7FFF);  // canonical, sign dropped
  CHECK(infuse::float_to_half_bits(-0.0f) == 0x8000);
  CHECK(infuse::float_to_half_bits(0x1p-25f) == 0x0000);  // half the smallest subnormal: tie to 0
  CHECK(infuse::float_to_half_bits(std::nextafter(0x1p-25f, 1.0f)) == 0x0001);
  CHECK(infuse::float_to_bfloat16_bits(NAN) == 0x7FFF);
  CHECK(infuse::float_to_bfloat16_bits(0x1.FFp127f) == 0x7F80);  // rounds up past max: Inf
  CHECK(infuse::float_to_bfloat16_bits(std::numeric_limits<float>::denorm_min()) == 0x0000);

  // E4M3: |x| > 464 saturates to 448 (0x7E) or becomes NaN (0x7F, sign kept); 464 itself is a tie
  // that goes to the even 448.
  CHECK(float_to_fp8_bits<fp8_e4m3>(464.0f) == 0x7E);
  CHECK(float_to_fp8_bits<fp8_e4m3>(464.0f, saturation::none) == 0x7E);
  CHECK(float_to_fp8_bits<fp8_e4m3>(std::nextafter(464.0f, 1e9f)) == 0x7E);
  CHECK(float_to_fp8_bits<fp8_e4m3>(std::nextafter(464.0f, 1e9f), saturation::none) == 0x7F);
  CHECK(float_to_fp8_bits<fp8_e4m3>(-1e30f, saturation::none) == 0xFF);
  CHECK(float_to_fp8_bits<fp8_e4m3>(-INFINITY) == 0xFE);
  CHECK(float_to_fp8_bits<fp8_e4m3>(-INFINITY, saturation::none) == 0xFF);
  CHECK(float_to_fp8_bits<fp8_e4m3>(-NAN) == 0x7F);
  CHECK(float_to_fp8_bits<fp8_e4m3>(0x1p-10f) == 0x00);
  CHECK(float_to_fp8_bits<fp8_e4m3>(-0x1p-10f) == 0x80);
  CHECK(float_to_fp8_bits<fp8_e4m3>(std::nextafter(0x1p-10f, 1.0f)) == 0x01);
  // E5M2: |x| >= 61440 saturates to 57344 (0x7B) or becomes Inf (0x7C).
  CHECK(float_to_fp8_bits<fp8_e5m2>(61440.0f) == 0x7B);
  CHECK(float_to_fp8_bits<fp8_e5m2>(61440.0f, saturation::none) == 0x7C);
  CHECK(float_to_fp8_bits<fp8_e5m2>(std::nextafter(61440.0f, 0.0f), saturation::none) == 0x7B);
  CHECK(float_to_fp8_bits<fp8_e5m2>(-INFINITY) == 0xFB);
  CHECK(float_to_fp8_bits<fp8_e5m2>(-INFINITY, saturation::none) == 0xFC);
  CHECK(float_to_fp8_bits<fp8_e5m2>(-NAN) == 0x7F);
  CHECK(float_to_fp8_bits<fp8_e5m2>(0x1p-17f) == 0x00);
  CHECK(float_to_fp8_bits<fp8_e5m2>(std::nextafter(0x1p-17f, 1.0f)) == 0x01);
  // The constructors follow CUDA's: half and bfloat16 overflow to Inf, fp8 saturates.
  CHECK(infuse::half(1e6f).bits() == 0x7C00);
  CHECK(fp8_e4m3(1e6f).bits() == 0x7E);
  CHECK(fp8_e5m2(-1e6f).bits() == 0xFB);
  CHECK(infuse::half::from_float(1e6f, saturation::finite).bits() == 0x7BFF);
}

TEST_CASE_TEMPLATE("decoding every bit pattern gives the format's value", T,
                   INFUSE_STORAGE_FLOATS) {
  const reference::float_spec& spec = reference_encoder<T>().spec();
  mismatches log;
  for (std::uint32_t bits = 0; bits < spec.pattern_count(); ++bits) {
    const auto storage = static_cast<infuse::storage_type_t<T>>(bits);
    const float value = static_cast<float>(T::from_bits(storage));
    const double expected = reference::decode(spec, bits);
    bool right = same_bits(value, infuse::bits_to_float<T>(storage));
    if constexpr (std::is_same_v<T, infuse::half>) {
      right = right && same_bits(value, infuse::half_bits_to_float(storage));
    } else if constexpr (std::is_same_v<T, bfloat16>) {
      right = right && same_bits(value, infuse::bfloat16_bits_to_float(storage));
    } else {
      right = right && same_bits(value, infuse::fp8_bits_to_float<T>(storage));
    }
    if (std::isnan(expected)) {
      // CUDA's NaN: bfloat16 widens by a shift (payload and sign kept), the others canonicalize.
      const std::uint32_t nan_bits =
          spec.exponent_bits == 8 ? bits << 16 : infuse::detail::float_canonical_nan_bits;
      right = right && std::isnan(value) && std::bit_cast<std::uint32_t>(value) == nan_bits;
    } else {
      right = right && static_cast<double>(value) == expected &&
              std::signbit(value) == std::signbit(expected);
    }
    if (!right) log.add(hex(bits) + " decodes to " + describe(value));
  }
  CHECK_NO_MISMATCHES(log);
}

TEST_CASE_TEMPLATE("encoding every value, tie and near-tie rounds to nearest even", T,
                   INFUSE_STORAGE_FLOATS) {
  INFUSE_RANDOM(rng);
  const reference::encoder& encoder = reference_encoder<T>();
  const std::vector<float> probes = reference::probe_floats(encoder, rng.engine(), 1 << 20);
  for (const saturation mode : {saturation::finite, saturation::none}) {
    CAPTURE(static_cast<int>(mode));
    mismatches log;
    for (const float x : probes) {
      const std::uint32_t expected = encoder.encode(x, mode == saturation::finite);
      const std::uint32_t bits = T::from_float(x, mode).bits();
      bool right = bits == expected && infuse::float_to_bits<T>(x, mode) == bits;
      if (mode == float_format<T>::default_saturation) {
        right = right && T(x).bits() == bits && infuse::float_to_bits<T>(x) == bits;
        if constexpr (std::is_same_v<T, infuse::half>) {
          right = right && infuse::float_to_half_bits(x) == bits;
        }
        if constexpr (std::is_same_v<T, bfloat16>) {
          right = right && infuse::float_to_bfloat16_bits(x) == bits;
        }
      }
      if constexpr (infuse::is_fp8_v<T>) {
        right = right && infuse::float_to_fp8_bits<T>(x, mode) == bits;
      }
      if (!right) log.add(describe(x) + " encodes to " + hex(bits) + ", expected " + hex(expected));
    }
    CHECK_NO_MISMATCHES(log);
  }
}

TEST_CASE_TEMPLATE("every value survives a round trip through float", T, INFUSE_STORAGE_FLOATS) {
  const reference::float_spec& spec = reference_encoder<T>().spec();
  mismatches log;
  for (std::uint32_t bits = 0; bits < spec.pattern_count(); ++bits) {
    const auto storage = static_cast<infuse::storage_type_t<T>>(bits);
    const float value = static_cast<float>(T::from_bits(storage));
    const bool is_infinity = std::isinf(value);
    for (const saturation mode : {saturation::finite, saturation::none}) {
      // Saturation turns ±Inf into ±max; NaNs come back canonical.
      const std::uint32_t expected = spec.is_nan(bits) ? spec.canonical_nan_bits()
                                     : is_infinity && mode == saturation::finite
                                         ? (bits & spec.sign_bit()) | spec.max_finite_bits()
                                         : bits;
      const std::uint32_t round_trip = T::from_float(value, mode).bits();
      if (mode == float_format<T>::default_saturation && T(value).bits() != round_trip) {
        log.add(hex(bits) + " differs through the constructor");
      }
      if (round_trip != expected) log.add(hex(bits) + " comes back as " + hex(round_trip));
    }
  }
  CHECK_NO_MISMATCHES(log);
}

TEST_CASE("half_at_most and half_at_least give the nearest half on each side") {
  INFUSE_RANDOM(rng);
  const reference::encoder& encoder = reference_encoder<infuse::half>();
  // Every half value in increasing order, the infinities included (the encoder lists the
  // non-negative finite ones, then one past the largest).
  const std::vector<double>& positive = encoder.values();
  std::vector<double> values{-INFINITY};
  for (std::size_t i = positive.size() - 1; i-- > 1;) values.push_back(-positive[i]);
  values.insert(values.end(), positive.begin(), positive.end() - 1);
  values.push_back(INFINITY);
  std::vector<float> probes = reference::probe_floats(encoder, rng.engine(), 1 << 18);
  for (const float edge : {0.0f, -0.0f, 65504.0f, 65505.0f, 65520.0f, 1e9f, INFINITY, 6e-8f, 1e-10f,
                           std::numeric_limits<float>::denorm_min(), NAN}) {
    probes.push_back(edge);
    probes.push_back(-edge);
  }
  mismatches log;
  for (const float x : probes) {
    const auto at_most = static_cast<double>(static_cast<float>(infuse::half_at_most(x)));
    const auto at_least = static_cast<double>(static_cast<float>(infuse::half_at_least(x)));
    if (std::isnan(x)) {
      if (!std::isnan(at_most) || !std::isnan(at_least)) log.add(describe(x) + " is not NaN");
      continue;
    }
    // The largest value <= x and the smallest >= x.
    const double below_x = *(std::upper_bound(values.begin(), values.end(), double{x}) - 1);
    const double above_x = *std::lower_bound(values.begin(), values.end(), double{x});
    if (at_most != below_x || at_least != above_x) {
      log.add(describe(x) + " gives " + std::to_string(at_most) + " and " +
              std::to_string(at_least));
    }
  }
  CHECK_NO_MISMATCHES(log);
}

#if defined(INFUSE_TEST_CUDA_HEADERS)
TEST_CASE_TEMPLATE("CUDA's host conversions give the same bits", T, INFUSE_STORAGE_FLOATS) {
  INFUSE_RANDOM(rng);
  using cuda = reference::cuda_conversion<reference::format_of<T>::value>;
  const reference::encoder& encoder = reference_encoder<T>();
  mismatches log;
  for (std::uint32_t bits = 0; bits < encoder.spec().pattern_count(); ++bits) {
    const float value = infuse::bits_to_float<T>(static_cast<infuse::storage_type_t<T>>(bits));
    const float expected = cuda::decode(bits);
    if (!same_bits(value, expected)) {
      log.add(hex(bits) + " decodes to " + describe(value) + ", CUDA " + describe(expected));
    }
  }
  for (const float x : reference::probe_floats(encoder, rng.engine(), 1 << 20)) {
    for (const saturation mode : {saturation::finite, saturation::none}) {
      if (!cuda::saturates && mode == saturation::finite) continue;  // CUDA has no such conversion
      const std::uint32_t bits = infuse::float_to_bits<T>(x, mode);
      const std::uint32_t expected = cuda::encode(x, mode == saturation::finite);
      if (bits != expected) {
        log.add(describe(x) + " encodes to " + hex(bits) + ", CUDA " + hex(expected) +
                (mode == saturation::finite ? " (satfinite)" : " (nosat)"));
      }
    }
  }
  CHECK_NO_MISMATCHES(log);
}
#endif
