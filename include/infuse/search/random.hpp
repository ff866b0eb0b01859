// Keyed randomness for decoding search: every random number a sampler, a verifier or a resampler
// uses is a pure function of (request seed, position, salt, index), so that a token depends
// neither on the batch around its row, nor on the row order, nor on the backend, and no host-side
// state advances per call (calls can be captured in a CUDA graph).
//
// The words come from Philox4x32-10 (core/rng.hpp) with
//   key = request seed, stream = position (the token's index in its sequence),
//   counter = (salt << 32) | (index / 4), word = index % 4,
// so one (seed, position, salt) names 2^34 independent uniforms: index 0 for a plain draw, the
// token id for per-token noise (Gumbel-max sampling over a vocabulary), the draft step for
// speculative verification.
#pragma once

#include <cstdint>

#include "infuse/core/config.hpp"
#include "infuse/core/rng.hpp"

namespace infuse::search {

// What a draw is for: different purposes at one position never share random numbers.
enum class salt : std::uint32_t {
  sample = 0,        // the uniform or the Gumbel noise that picks a token
  verify = 1,        // speculative verification: acceptance tests
  residual = 2,      // speculative verification: the resample at the first rejection
  resample = 3,      // particle resampling
};

struct draw_key {
  std::uint64_t seed;      // the request's seed
  std::uint64_t position;  // the position of the token being decided
  salt purpose;
};

// The index-th random 32-bit word of a draw.
INFUSE_HOST_DEVICE constexpr std::uint32_t random_word(const draw_key& key, std::uint64_t index) {
  const std::uint64_t counter = (std::uint64_t{static_cast<std::uint32_t>(key.purpose)} << 32) |
                                (index >> 2);
  return rng::philox(key.seed, key.position).bits(counter).word[index & 3u];
}

// The index-th uniform of a draw, in [0, 1) (24 bits, exact on every backend).
INFUSE_HOST_DEVICE constexpr float random_uniform(const draw_key& key, std::uint64_t index = 0) {
  return rng::uniform(random_word(key, index));
}

}  // namespace infuse::search
