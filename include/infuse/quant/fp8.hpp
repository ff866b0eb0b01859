// quant::fp8<Format, Granularity>: OCP FP8 codes (fp8_e4m3 or fp8_e5m2) times a float scale per
// tensor, per channel (row) or per group of inputs. See docs/policies.md#quantization-schemes.
//
//   w = scale * float(code)
// Packed block: 32 bytes, byte j = the FP8 bits of input j. Scales are float: one (per tensor),
// (rows) per channel, or (rows, groups per row).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "infuse/core/config.hpp"
#include "infuse/core/float_types.hpp"
#include "infuse/quant/detail/name.hpp"
#include "infuse/quant/scheme.hpp"

namespace infuse::quant {

template <class Format, int Granularity = per_tensor>
struct fp8 {
  static_assert(is_fp8_v<Format>,
                "infuse: quant::fp8 takes Format = fp8_e4m3 or fp8_e5m2; see "
                "docs/policies.md#quantization-schemes");
  static_assert(detail::valid_group<Granularity>,
                "infuse: quant::fp8 takes a granularity of quant::per_tensor, quant::per_channel "
                "or a group of 32, 64, 128 inputs; see docs/policies.md#quantization-schemes");

  using identifier = scheme_identifier;
  using format = Format;
  static constexpr int group = Granularity;
  static constexpr bool has_zero = false;
  static constexpr int block_bytes = block_size;
  static constexpr int scales_per_group = 1;

 private:
  static constexpr auto name_storage = detail::scheme_name<24>(
      std::is_same_v<Format, fp8_e4m3> ? "fp8_e4m3" : "fp8_e5m2", -1, Granularity, "");

 public:
  static constexpr const char* name = name_storage.c_str();

  struct params {
    float scale;
  };

  INFUSE_HOST_DEVICE static INFUSE_FORCE_INLINE params group_params(const float* scales,
                                                                    std::uint8_t) {
    return {scales[0]};
  }
  INFUSE_HOST_DEVICE static INFUSE_FORCE_INLINE std::uint32_t code(const std::uint8_t* block,
                                                                   int j) {
    return block[j];
  }
  INFUSE_HOST_DEVICE static INFUSE_FORCE_INLINE float value(std::uint32_t code, const params& p) {
    return p.scale * bits_to_float<Format>(static_cast<std::uint8_t>(code));
  }

  // The largest magnitude, times clip, lands on the format's largest finite value.
  INFUSE_HOST_DEVICE static stored_group<fp8> fit(const float* values, std::int64_t count,
                                                  float clip) {
    float amax = 0.0f;
    for (std::int64_t i = 0; i < count; ++i) amax = std::fmax(amax, std::fabs(values[i]));
    return {{clip * amax / float_format<Format>::max_finite}, 0};
  }

  // Round to nearest FP8, saturating at the largest finite value.
  INFUSE_HOST_DEVICE static std::uint32_t encode(float w, const params& p) {
    const float scaled = p.scale > 0.0f ? w / p.scale : 0.0f;
    return float_to_bits<Format>(scaled, saturation::finite);
  }

  INFUSE_HOST_DEVICE static void pack(const std::uint32_t (&codes)[block_size],
                                      std::uint8_t* block) {
    for (int j = 0; j < block_size; ++j) block[j] = static_cast<std::uint8_t>(codes[j]);
  }
};

static_assert(scheme<fp8<fp8_e4m3>>);
static_assert(scheme<fp8<fp8_e5m2, 128>>);

// Whether S is an fp8 scheme.
template <class S>
inline constexpr bool is_fp8 = false;
template <class F, int Group>
inline constexpr bool is_fp8<fp8<F, Group>> = true;

}  // namespace infuse::quant
