// quant::int_<Bits, Group, Zero>: integer codes with a float scale per group, and optionally a
// uint8 zero point per group. See docs/policies.md#quantization-schemes.
//
// Code u of a weight is unsigned, in [0, 2^Bits):
//   symmetric:  w = scale * (u - 2^(Bits-1))
//   zero_point: w = scale * (u - zero)
// Scales are float (rows, groups per row); zero points uint8 (rows, groups per row).
//
// Packed block of 32 consecutive inputs of a row (value j = the code of input j of the block):
//   int8: 32 bytes, byte j = value j;
//   int4: 16 bytes, byte j (0..15): low nibble = value j, high nibble = value j + 16;
//   int2:  8 bytes, byte j (0..7):  bits 2i..2i+1 = value j + 8i (i = 0..3);
//   int3: 12 bytes: the low two bits of each value in the int2 layout (8 bytes), then one
//         little-endian 32-bit word whose bit j is bit 2 of value j.
// The split layouts unpack with shifts and masks alone: SIMD lanes 0..L-1 of one shift are
// values c..c+L-1, no shuffle.
//
// GPTQ and AWQ checkpoints (4-bit, group G) are int_<4, G, zero_point> after repacking codes and
// zeros, with nothing re-quantized: quant/import.hpp (from_gptq, from_awq) has their orders.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "infuse/core/config.hpp"
#include "infuse/quant/detail/name.hpp"
#include "infuse/quant/detail/rounding.hpp"
#include "infuse/quant/scheme.hpp"

namespace infuse::quant {

namespace detail {

template <class Zero>
inline constexpr bool is_zero_convention =
    std::is_same_v<Zero, symmetric> || std::is_same_v<Zero, zero_point>;

// Where bit planes of the split layouts live: code(block, j) and pack() share it.
template <int Bits>
struct int_layout {
  static constexpr int block_bytes = Bits * block_size / 8;

  INFUSE_HOST_DEVICE static INFUSE_FORCE_INLINE std::uint32_t code(const std::uint8_t* block,
                                                                   int j) {
    if constexpr (Bits == 8) {
      return block[j];
    } else if constexpr (Bits == 4) {
      return (block[j & 15] >> (4 * (j >> 4))) & 15u;
    } else {
      const std::uint32_t low = (block[j & 7] >> (2 * (j >> 3))) & 3u;
      if constexpr (Bits == 2) {
        return low;
      } else {
        return low | (((block[8 + (j >> 3)] >> (j & 7)) & 1u) << 2);
      }
    }
  }

  INFUSE_HOST_DEVICE static void pack(const std::uint32_t (&codes)[block_size],
                                      std::uint8_t* block) {
    for (int b = 0; b < block_bytes; ++b) block[b] = 0;
    for (int j = 0; j < block_size; ++j) {
      const std::uint32_t u = codes[j];
      if constexpr (Bits == 8) {
        block[j] = static_cast<std::uint8_t>(u);
      } else if constexpr (Bits == 4) {
        block[j & 15] |= static_cast<std::uint8_t>((u & 15u) << (4 * (j >> 4)));
      } else {
        block[j & 7] |= static_cast<std::uint8_t>((u & 3u) << (2 * (j >> 3)));
        if constexpr (Bits == 3) {
          block[8 + (j >> 3)] |= static_cast<std::uint8_t>(((u >> 2) & 1u) << (j & 7));
        }
      }
    }
  }
};

}  // namespace detail

template <int Bits, int Group, class Zero = symmetric>
struct int_ {
  static_assert(Bits == 8 || Bits == 4 || Bits == 3 || Bits == 2,
                "infuse: quant::int_ takes Bits 8, 4, 3 or 2; see "
                "docs/policies.md#quantization-schemes");
  static_assert(detail::valid_group<Group> && Group != per_tensor,
                "infuse: quant::int_ takes a Group of 32, 64, 128 (any multiple of 32) or "
                "quant::per_channel; see docs/policies.md#quantization-schemes");
  static_assert(detail::is_zero_convention<Zero>,
                "infuse: quant::int_ takes Zero = quant::symmetric or quant::zero_point; see "
                "docs/policies.md#quantization-schemes");

  using identifier = scheme_identifier;
  static constexpr int bits = Bits;
  static constexpr int group = Group;
  static constexpr bool has_zero = std::is_same_v<Zero, zero_point>;
  static constexpr int block_bytes = detail::int_layout<Bits>::block_bytes;
  static constexpr int scales_per_group = 1;
  static constexpr std::uint32_t max_code = (1u << Bits) - 1u;
  static constexpr int midpoint = 1 << (Bits - 1);  // the implied zero of symmetric codes

 private:
  static constexpr auto name_storage =
      detail::scheme_name<24>("int", Bits, Group, has_zero ? "_zp" : "");

 public:
  static constexpr const char* name = name_storage.c_str();

  // The zero is kept as a float so that (u - zero) is one exact float subtraction.
  struct params {
    float scale;
    float zero;
  };

  INFUSE_HOST_DEVICE static INFUSE_FORCE_INLINE params group_params(const float* scales,
                                                                    std::uint8_t zero) {
    return {scales[0], has_zero ? static_cast<float>(zero) : static_cast<float>(midpoint)};
  }
  INFUSE_HOST_DEVICE static INFUSE_FORCE_INLINE std::uint32_t code(const std::uint8_t* block,
                                                                   int j) {
    return detail::int_layout<Bits>::code(block, j);
  }
  INFUSE_HOST_DEVICE static INFUSE_FORCE_INLINE float value(std::uint32_t u, const params& p) {
    return p.scale * (static_cast<float>(u) - p.zero);
  }

  // Symmetric: scale = clip * max|w| / (2^(Bits-1) - 1), so both signs fit without clamping
  // (the code 0 = -2^(Bits-1) stays unused, as in GPTQ's symmetric mode). Zero point: the range
  // [min(w, 0), max(w, 0)] times clip over 2^Bits - 1 steps, the zero rounded into [0, 2^Bits).
  INFUSE_HOST_DEVICE static stored_group<int_> fit(const float* values, std::int64_t count,
                                                   float clip) {
    float lo = 0.0f;
    float hi = 0.0f;
    // Plain comparisons (NaN skipped, as fmin/fmax do) vectorize; fmin/fmax are library calls.
    for (std::int64_t i = 0; i < count; ++i) {
      lo = values[i] < lo ? values[i] : lo;
      hi = values[i] > hi ? values[i] : hi;
    }
    return fit_range(lo, hi, clip);
  }

  // The fit from the group's range (lo = min(w, 0), hi = max(w, 0)), shared with the device
  // quantization (quant/cuda/quantize.cuh), which reduces the range in parallel: min and max do
  // not depend on the order, so both give the same bits.
  INFUSE_HOST_DEVICE static stored_group<int_> fit_range(float lo, float hi, float clip) {
    stored_group<int_> stored{};
    if constexpr (has_zero) {
      lo *= clip;
      hi *= clip;
      const float scale = (hi - lo) / static_cast<float>(max_code);
      stored.scales[0] = scale;
      stored.zero = static_cast<std::uint8_t>(
          scale > 0.0f ? detail::clamp_int(detail::round_to_int(-lo / scale), 0, int(max_code))
                       : 0);
    } else {
      // + 0 makes the scale of an all-zero group +0 on every backend: fmax(+0, -0) may give
      // either zero (x86's maxss gives -0, CUDA's fmaxf +0), and the stored bits must agree.
      stored.scales[0] = clip * (std::fmax(hi, -lo) + 0.0f) / static_cast<float>(midpoint - 1);
      stored.zero = 0;
    }
    return stored;
  }

  INFUSE_HOST_DEVICE static std::uint32_t encode(float w, const params& p) {
    if (!(p.scale > 0.0f)) return static_cast<std::uint32_t>(p.zero);
    const int u = detail::round_to_int(w / p.scale + p.zero);
    return static_cast<std::uint32_t>(detail::clamp_int(u, 0, int(max_code)));
  }

  INFUSE_HOST_DEVICE static void pack(const std::uint32_t (&codes)[block_size],
                                      std::uint8_t* block) {
    detail::int_layout<Bits>::pack(codes, block);
  }
};

static_assert(scheme<int_<4, 128>>);
static_assert(scheme<int_<3, per_channel, zero_point>>);

// Whether S is an int_ scheme: the bodies that unpack integer codes select on it.
template <class S>
inline constexpr bool is_int = false;
template <int Bits, int Group, class Zero>
inline constexpr bool is_int<int_<Bits, Group, Zero>> = true;

}  // namespace infuse::quant
