// Counter-based random numbers, identical on the host and the device.
//
// Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3",
// SC 2011) is a keyed bijection of 128-bit counters: the numbers a sampler draws are a pure
// function of (request seed, stream, counter), so a token does not depend on the batch position,
// the thread that draws it, or the backend. The bits are the same on the CPU and on CUDA; so are
// the uniform floats made from them (exact conversions). standard_normal_pair and gumbel go
// through logf, sinf and cosf, whose host and device implementations may differ in the last bit
// or two.
#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>

#include "infuse/core/config.hpp"

namespace infuse::rng {

// Four and two 32-bit words: plain aggregates, since std::array is awkward in device code.
struct u32x4 {
  std::uint32_t word[4];
  friend constexpr bool operator==(const u32x4&, const u32x4&) = default;
};

struct u32x2 {
  std::uint32_t word[2];
  friend constexpr bool operator==(const u32x2&, const u32x2&) = default;
};

namespace detail {

// The published Philox4x32 round multipliers and key increments (the Weyl sequence constants:
// the golden ratio and sqrt(3) - 1, as 32-bit fractions).
inline constexpr std::uint32_t philox_multiplier_0 = 0xD2511F53u;
inline constexpr std::uint32_t philox_multiplier_1 = 0xCD9E8D57u;
inline constexpr std::uint32_t philox_weyl_0 = 0x9E3779B9u;
inline constexpr std::uint32_t philox_weyl_1 = 0xBB67AE85u;

INFUSE_HOST_DEVICE constexpr std::uint32_t low_word(std::uint64_t value) {
  return static_cast<std::uint32_t>(value);
}
INFUSE_HOST_DEVICE constexpr std::uint32_t high_word(std::uint64_t value) {
  return static_cast<std::uint32_t>(value >> 32);
}

// The high word of the 64-bit product a * b. On the device, __umulhi: written as a 64-bit product,
// nvcc carries the words of later rounds in 64-bit registers and multiplies them as 64-bit numbers.
INFUSE_HOST_DEVICE constexpr std::uint32_t multiply_high(std::uint32_t a, std::uint32_t b) {
#if defined(INFUSE_DEVICE_PASS)
  if (!__builtin_is_constant_evaluated()) return __umulhi(a, b);
#endif
  return high_word(std::uint64_t{a} * b);
}

// One round: two 32 x 32 -> 64-bit products, their high words xored with the other words and the
// key, the words permuted.
INFUSE_HOST_DEVICE constexpr u32x4 philox_round(const u32x4& counter, const u32x2& key) {
  return {{multiply_high(philox_multiplier_1, counter.word[2]) ^ counter.word[1] ^ key.word[0],
           philox_multiplier_1 * counter.word[2],
           multiply_high(philox_multiplier_0, counter.word[0]) ^ counter.word[3] ^ key.word[1],
           philox_multiplier_0 * counter.word[0]}};
}

}  // namespace detail

// The raw Philox4x32-10 bijection: 10 rounds, the key bumped by the Weyl constants between rounds.
INFUSE_HOST_DEVICE constexpr u32x4 philox4x32_10(u32x4 counter, u32x2 key) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      key.word[0] += detail::philox_weyl_0;
      key.word[1] += detail::philox_weyl_1;
    }
    counter = detail::philox_round(counter, key);
  }
  return counter;
}

// A keyed stream of random words: key = the request seed; the counter's high 64 bits = stream
// (a position, a salt), its low 64 bits = the counter the caller advances. Exactly:
//   key     = { seed[31:0],    seed[63:32] }
//   counter = { counter[31:0], counter[63:32], stream[31:0], stream[63:32] }
// This is also cuRAND's curandStatePhilox4_32_10 after curand_init(seed, stream, 4 * counter):
// its curand4() returns bits(counter), for counters below 2^62.
class philox {
 public:
  INFUSE_HOST_DEVICE constexpr philox(std::uint64_t seed, std::uint64_t stream)
      : key_{{detail::low_word(seed), detail::high_word(seed)}},
        stream_{{detail::low_word(stream), detail::high_word(stream)}} {}

  // 128 random bits for one counter value.
  INFUSE_HOST_DEVICE constexpr u32x4 bits(std::uint64_t counter) const {
    return philox4x32_10(
        {{detail::low_word(counter), detail::high_word(counter), stream_.word[0], stream_.word[1]}},
        key_);
  }

 private:
  u32x2 key_;
  u32x2 stream_;
};

// Uniform floats from 32 random bits. Each takes the top 24 bits (23 for the open interval), so
// that every value is exactly representable: no rounding up to 1, identical on every backend.

// [0, 1): k / 2^24 for the top 24 bits k; never 1.
INFUSE_HOST_DEVICE constexpr float uniform(std::uint32_t bits) {
  return static_cast<float>(bits >> 8) * 0x1p-24f;
}

// (0, 1]: (k + 1) / 2^24; never 0, so its logarithm is finite (at least -24 ln 2).
INFUSE_HOST_DEVICE constexpr float uniform_positive(std::uint32_t bits) {
  return static_cast<float>((bits >> 8) + 1) * 0x1p-24f;
}

// (0, 1): (k + 1/2) / 2^23 for the top 23 bits k, from 2^-24 to 1 - 2^-24, symmetric about 1/2.
INFUSE_HOST_DEVICE constexpr float uniform_open(std::uint32_t bits) {
  return (static_cast<float>(bits >> 9) + 0.5f) * 0x1p-23f;
}

struct float_pair {
  float first;
  float second;
};

// Two independent standard normals from two words, by Box-Muller (1958):
//   r = sqrt(-2 ln u), u in (0, 1];  angle = 2 pi v, v in [0, 1).
// |value| <= sqrt(48 ln 2) ~ 5.77: the tail beyond it has probability below 1e-8.
INFUSE_HOST_DEVICE inline float_pair standard_normal_pair(std::uint32_t radius_bits,
                                                          std::uint32_t angle_bits) {
  const float radius = sqrtf(-2.0f * logf(uniform_positive(radius_bits)));
  const float angle = 2.0f * std::numbers::pi_v<float> * uniform(angle_bits);
  return {radius * cosf(angle), radius * sinf(angle)};
}

// Gumbel(0, 1) = -ln(-ln u), u in (0, 1) open at both ends so that both logarithms are finite:
// values lie in [-2.8, 16.6]; argmax_i(logit_i + gumbel_i) samples softmax(logits).
INFUSE_HOST_DEVICE inline float gumbel(std::uint32_t bits) {
  return -logf(-logf(uniform_open(bits)));
}

}  // namespace infuse::rng
