// quant::bcq<Bits, Group>: binary-coded quantization as LUT-GEMM defines it (Park et al.,
// "LUT-GEMM: Quantized Matrix Multiplication based on LUTs for Efficient Inference in Large-Scale
// Generative Language Models", ICLR 2024): each weight is a sum of Bits sign planes, each with its
// own scale per group, plus an offset per group. See docs/policies.md#quantization-schemes.
//
//   w = offset + sum_i alpha_i * b_i,   b_i in {-1, +1}
// Packed block: Bits little-endian 32-bit words, plane i in bytes 4i..4i+3, whose bit j is b_i of
// input j (1 = +1, 0 = -1). Scales: Bits + 1 floats per group, alpha_0 .. alpha_{Bits-1}, offset.
// The code of one weight (code()) gathers its signs: bit i = b_i.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "infuse/core/config.hpp"
#include "infuse/quant/detail/name.hpp"
#include "infuse/quant/scheme.hpp"

namespace infuse::quant {

template <int Bits, int Group>
struct bcq {
  static_assert(Bits >= 1 && Bits <= 8,
                "infuse: quant::bcq takes 1 to 8 bit planes; see "
                "docs/policies.md#quantization-schemes");
  static_assert(detail::valid_group<Group> && Group != per_tensor,
                "infuse: quant::bcq takes a Group of 32, 64, 128 (any multiple of 32) or "
                "quant::per_channel; see docs/policies.md#quantization-schemes");

  using identifier = scheme_identifier;
  static constexpr int bits = Bits;
  static constexpr int group = Group;
  static constexpr bool has_zero = false;
  static constexpr int block_bytes = 4 * Bits;
  static constexpr int scales_per_group = Bits + 1;

 private:
  static constexpr auto name_storage = detail::scheme_name<24>("bcq", Bits, Group, "");

 public:
  static constexpr const char* name = name_storage.c_str();

  struct params {
    float alpha[Bits];
    float offset;
  };

  INFUSE_HOST_DEVICE static INFUSE_FORCE_INLINE params group_params(const float* scales,
                                                                    std::uint8_t) {
    params p;
    for (int i = 0; i < Bits; ++i) p.alpha[i] = scales[i];
    p.offset = scales[Bits];
    return p;
  }
  INFUSE_HOST_DEVICE static INFUSE_FORCE_INLINE std::uint32_t code(const std::uint8_t* block,
                                                                   int j) {
    std::uint32_t signs = 0;
    for (int i = 0; i < Bits; ++i) signs |= ((block[4 * i + (j >> 3)] >> (j & 7)) & 1u) << i;
    return signs;
  }
  INFUSE_HOST_DEVICE static INFUSE_FORCE_INLINE float value(std::uint32_t signs, const params& p) {
    float w = p.offset;
    for (int i = 0; i < Bits; ++i) w += ((signs >> i) & 1u) != 0u ? p.alpha[i] : -p.alpha[i];
    return w;
  }

  // LUT-GEMM's greedy fit: the offset is the group's mean; plane i takes the signs of the residual
  // and alpha_i = mean |residual|, the scale that minimizes the squared error for those signs, so
  // each plane lowers the error. `clip` shrinks the alphas (values 1 and below; 1 is the fit).
  static stored_group<bcq> fit(const float* values, std::int64_t count, float clip) {
    double mean = 0.0;
    for (std::int64_t i = 0; i < count; ++i) mean += values[i];
    mean = count > 0 ? mean / static_cast<double>(count) : 0.0;
    std::vector<double> residual(static_cast<std::size_t>(count));
    for (std::int64_t i = 0; i < count; ++i) residual[i] = values[i] - mean;
    stored_group<bcq> stored{};
    for (int plane = 0; plane < Bits; ++plane) {
      double magnitude = 0.0;
      for (const double r : residual) magnitude += std::fabs(r);
      const double alpha = count > 0 ? magnitude / static_cast<double>(count) : 0.0;
      for (double& r : residual) r -= r >= 0.0 ? alpha : -alpha;
      stored.scales[plane] = clip * static_cast<float>(alpha);
    }
    stored.scales[Bits] = static_cast<float>(mean);
    return stored;
  }

  // The same greedy choice of signs, with the group's stored alphas.
  INFUSE_HOST_DEVICE static std::uint32_t encode(float w, const params& p) {
    float residual = w - p.offset;
    std::uint32_t signs = 0;
    for (int i = 0; i < Bits; ++i) {
      const bool positive = residual >= 0.0f;
      signs |= (positive ? 1u : 0u) << i;
      residual -= positive ? p.alpha[i] : -p.alpha[i];
    }
    return signs;
  }

  static void pack(const std::uint32_t (&codes)[block_size], std::uint8_t* block) {
    for (int b = 0; b < block_bytes; ++b) block[b] = 0;
    for (int j = 0; j < block_size; ++j) {
      for (int i = 0; i < Bits; ++i) {
        block[4 * i + (j >> 3)] |= static_cast<std::uint8_t>(((codes[j] >> i) & 1u) << (j & 7));
      }
    }
  }
};

static_assert(scheme<bcq<3, 128>>);

// Whether S is a bcq scheme.
template <class S>
inline constexpr bool is_bcq = false;
template <int Bits, int Group>
inline constexpr bool is_bcq<bcq<Bits, Group>> = true;

}  // namespace infuse::quant
