// The passkey-retrieval task of the retrieval model (retrieval_model.hpp): a haystack of random
// tokens 1..255, the marker KEY then the passkey v at a random depth, and KEY as the last token;
// the right next token is v. Every draw comes from the keyed Philox generator, keyed by
// (seed, length, trial), so a run repeats exactly and trials at different lengths differ.
#pragma once

#include <cstdint>
#include <vector>

#include "infuse/core/error.hpp"
#include "infuse/core/rng.hpp"
#include "retrieval_model.hpp"

namespace infuse::llama {

struct passkey_prompt {
  std::vector<std::int32_t> tokens;  // (length)
  std::int32_t answer = 0;           // the passkey v
  std::int64_t depth = 0;            // the position of the first KEY
};

inline passkey_prompt make_passkey_prompt(std::int64_t length, std::uint64_t seed,
                                          std::uint64_t trial) {
  require(length >= 3, "infuse::llama::make_passkey_prompt", "length", length,
          "at least 3 tokens (KEY, the passkey and the final KEY)");
  const rng::philox generator(seed, (static_cast<std::uint64_t>(length) << 20) ^ trial);
  // A token of 1..255 from 32 random bits (the tiny bias of a modulo is irrelevant here).
  const auto token = [](std::uint32_t bits) {
    return static_cast<std::int32_t>(1 + bits % (retrieval::vocab - 1));
  };
  passkey_prompt prompt;
  prompt.tokens.resize(static_cast<std::size_t>(length));
  for (std::int64_t i = 0; i < length; i += 4) {
    const rng::u32x4 bits = generator.bits(static_cast<std::uint64_t>(i / 4));
    for (std::int64_t j = 0; j < 4 && i + j < length; ++j) {
      prompt.tokens[static_cast<std::size_t>(i + j)] = token(bits.word[j]);
    }
  }
  // The last counter draws the depth and the passkey: the haystack used counters below length/4+1.
  const rng::u32x4 bits = generator.bits(static_cast<std::uint64_t>(length));
  prompt.depth = static_cast<std::int64_t>(bits.word[0] % static_cast<std::uint64_t>(length - 2));
  prompt.answer = token(bits.word[1]);
  prompt.tokens[static_cast<std::size_t>(prompt.depth)] = retrieval::key_token;
  prompt.tokens[static_cast<std::size_t>(prompt.depth + 1)] = prompt.answer;
  prompt.tokens.back() = retrieval::key_token;
  return prompt;
}

}  // namespace infuse::llama
