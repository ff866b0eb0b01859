// quant::none<T>: weights stored unquantized as T = float, half or bfloat16, no scale.
// See docs/policies.md#quantization-schemes.
//
// Packed block: 32 values of T in input order, native byte order (32 * sizeof(T) bytes).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "infuse/core/config.hpp"
#include "infuse/core/float_types.hpp"
#include "infuse/quant/scheme.hpp"

namespace infuse::quant {

template <class T>
struct none {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, half> || std::is_same_v<T, bfloat16>,
                "infuse: quant::none takes T = float, half or bfloat16; see "
                "docs/policies.md#quantization-schemes");

  using identifier = scheme_identifier;
  using storage = std::conditional_t<std::is_same_v<T, float>, std::uint32_t, std::uint16_t>;
  static constexpr int group = per_tensor;
  static constexpr bool has_zero = false;
  static constexpr int block_bytes = block_size * static_cast<int>(sizeof(T));
  static constexpr int scales_per_group = 0;
  static constexpr const char* name = std::is_same_v<T, float>  ? "f32"
                                      : std::is_same_v<T, half> ? "f16"
                                                                : "bf16";

  struct params {};

  INFUSE_HOST_DEVICE static INFUSE_FORCE_INLINE params group_params(const float*, std::uint8_t) {
    return {};
  }
  // Blocks start at multiples of block_bytes from the codes' start, so an aligned buffer
  // (any allocator's) keeps every element aligned.
  INFUSE_HOST_DEVICE static INFUSE_FORCE_INLINE std::uint32_t code(const std::uint8_t* block,
                                                                   int j) {
    return reinterpret_cast<const storage*>(block)[j];
  }
  INFUSE_HOST_DEVICE static INFUSE_FORCE_INLINE float value(std::uint32_t code, const params&) {
    if constexpr (std::is_same_v<T, float>) {
      return __builtin_bit_cast(float, code);
    } else {
      return bits_to_float<T>(static_cast<storage>(code));
    }
  }

  INFUSE_HOST_DEVICE static stored_group<none> fit(const float*, std::int64_t, float) { return {}; }

  // Round to nearest; values beyond half's range become Inf, as CUDA's conversion does.
  INFUSE_HOST_DEVICE static std::uint32_t encode(float w, const params&) {
    if constexpr (std::is_same_v<T, float>) {
      return __builtin_bit_cast(std::uint32_t, w);
    } else {
      return float_to_bits<T>(w);
    }
  }

  INFUSE_HOST_DEVICE static void pack(const std::uint32_t (&codes)[block_size],
                                      std::uint8_t* block) {
    for (int j = 0; j < block_size; ++j) {
      const auto bits = static_cast<storage>(codes[j]);
      std::memcpy(block + j * sizeof(storage), &bits, sizeof(storage));
    }
  }
};

static_assert(scheme<none<float>>);
static_assert(scheme<none<bfloat16>>);

// Whether S is a none scheme (values stored as they are).
template <class S>
inline constexpr bool is_none = false;
template <class T>
inline constexpr bool is_none<none<T>> = true;

}  // namespace infuse::quant
