// The run-time options every attention kernel takes, and the score transform they define, shared
// by the decode and prefill bodies on both backends. See docs/policies.md#attention.
#pragma once

#include <cmath>
#include <cstdint>
#include <string_view>

#include "infuse/core/config.hpp"
#include "infuse/core/error.hpp"

namespace infuse::attention {

struct options {
  // Softmax scale applied to q·k; 0 means 1/sqrt(head_dim).
  float scale = 0.0f;
  // Logit soft-cap (Gemma 2, Grok): score = cap * tanh(score / cap); 0 means none.
  float soft_cap = 0.0f;
  // ALiBi: (q_heads) slopes, score += slope[h] * (key_position - query_position); null means none.
  const float* alibi_slopes = nullptr;
  // Decode with integer keys (quant::int_) on a CPU with AVX-512 VNNI: round each query head to
  // int8 once per call (one scale per block of 32 channels, amax / 127) and take q·k as integer
  // dot products with the key codes, the key's scale and zero applied once per block. Faster; it
  // adds the query's rounding to each score: at most scale * sum over blocks of
  // (block scale / 2) * sum |k| over the block. Elsewhere (other keys, other backends, prefill)
  // the query stays float.
  bool int8_query = false;
  // Decode with int8, int4 or int2 values (quant::int_<8, 4 or 2, G>, head dims a multiple of 64)
  // on a CPU with AVX-512 VNNI: round each head's softmax weights over a tile of up to 16 tokens,
  // times each value's scale, to int8 (scale: their largest / 127) and take the weighted sum of the
  // value codes as integer dot products. Faster; it moves each token's weight by at most 1/254 of
  // the largest in its tile, so an output channel by at most sum over tokens of (that bound) *
  // |value| (normalised weights). Elsewhere the weights stay float.
  bool int8_weights = false;
};

// The host checks of the options, shared by every attention call.
inline void require_options(const options& o, std::string_view call) {
  require(std::isfinite(o.scale) && o.scale >= 0.0f, call, "options.scale", o.scale,
          "0 (1/sqrt(head_dim)) or a positive finite scale");
  require(std::isfinite(o.soft_cap) && o.soft_cap >= 0.0f, call, "options.soft_cap", o.soft_cap,
          "0 (none) or a positive finite cap");
}

// The softmax logit of one (query head, key) pair from the raw dot product q·k.
struct score_transform {
  float scale;
  float soft_cap;
  const float* alibi_slopes;

  INFUSE_HOST_DEVICE static score_transform from(const options& o, std::int32_t head_dim) {
    return {o.scale != 0.0f ? o.scale : 1.0f / std::sqrt(static_cast<float>(head_dim)), o.soft_cap,
            o.alibi_slopes};
  }

  INFUSE_HOST_DEVICE float operator()(float dot, std::int32_t q_head, std::int64_t query_position,
                                      std::int64_t key_position) const {
    float s = dot * scale;
    if (soft_cap > 0.0f) s = soft_cap * std::tanh(s / soft_cap);
    if (alibi_slopes != nullptr)
      s += alibi_slopes[q_head] * static_cast<float>(key_position - query_position);
    return s;
  }
};

}  // namespace infuse::attention
