// A Llama model whose weights are written down, built in code, that retrieves a passkey exactly.
//
// The task (passkey.hpp): a haystack of random tokens 1..255, at some depth the marker KEY
// (token 0) followed by the value v, and KEY again as the last token; the next token must be v.
// A standard Llama forward pass with these weights does it at any context length:
//
//   residual dims  1..255 one-hot of the token, BIAS (1 for every token), IS_KEY (1 for KEY),
//                  PREV_IS_KEY (written by layer 1); every embedding row has two unit entries, so
//                  the first RMSNorm scales every token by sqrt(512 / 2) = 16.
//   layer 1        head 0 attends to the previous token: its query is constant, its key the
//                  same vector turned back one RoPE step, so the score peaks at j = i - 1 (eight
//                  high-frequency pairs make the runner-up ~20 lower); it copies IS_KEY of the
//                  previous token into PREV_IS_KEY.
//   layer 2        all 8 heads: the query of KEY meets the key of the token after the first KEY
//                  (PREV_IS_KEY) on pair 31, whose RoPE frequency barely turns over 16k tokens;
//                  head h carries one-hot dims 32h .. 32h + 31 of that token back, times 4.
//   LM head        logit t reads one-hot dim t, KEY's logit reads IS_KEY: v wins by ~16.
//
// Every weight matrix has at most one non-zero per row, so every quantization scheme with a scale
// per row or per group stores it exactly (the non-zero is its group's maximum).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "model.hpp"

namespace infuse::llama::retrieval {

inline constexpr int vocab = 256;
inline constexpr std::int32_t key_token = 0;
inline constexpr int dim = 512;
inline constexpr int heads = 8;
inline constexpr int head_dim = 64;
inline constexpr int hidden_dim = 1024;  // the MLP is zero: any width
inline constexpr float rope_base = 1e6f;

// Residual-stream dimensions (1..255 are the one-hot of the token).
inline constexpr int bias_dim = 256;
inline constexpr int is_key_dim = 257;
inline constexpr int prev_is_key_dim = 258;

// The query and key gain: after the norm, q and k hold 14.2 in their live dims.
inline constexpr double gain = 14.2;
inline constexpr int previous_token_pairs = 8;  // RoPE pairs 0..7, the highest frequencies
inline constexpr int lookup_pair = 31;          // the lowest frequency
inline constexpr double lookup_output = 4.0;

inline model_config config() {
  model_config c;
  c.dim = dim;
  c.hidden_dim = hidden_dim;
  c.n_layers = 2;
  c.n_heads = heads;
  c.n_kv_heads = heads;
  c.vocab_size = vocab;
  c.context_length = 1 << 20;
  c.rope_base = rope_base;
  c.rms_eps = 1e-5f;
  return c;
}

inline float_weights weights() {
  const double norm_one = std::sqrt(dim / 2.0);    // the norm's factor on a two-entry row
  const double norm_three = std::sqrt(dim / 3.0);  // after PREV_IS_KEY is written: three entries
  const std::int64_t q_dim = std::int64_t{heads} * head_dim;
  float_weights w;
  w.config = config();
  const auto zeros = [](std::int64_t rows, std::int64_t cols) {
    return std::vector<float>(static_cast<std::size_t>(rows * cols), 0.0f);
  };
  const auto set = [](std::vector<float>& m, std::int64_t cols, std::int64_t row, std::int64_t col,
                      double value) {
    m[static_cast<std::size_t>(row * cols + col)] = float(value);
  };

  w.embedding = zeros(vocab, dim);
  for (int t = 0; t < vocab; ++t) {
    set(w.embedding, dim, t, t == key_token ? is_key_dim : t, 1.0);
    set(w.embedding, dim, t, bias_dim, 1.0);
  }
  for (int l = 0; l < 2; ++l) {
    float_layer layer{std::vector<float>(dim, 1.0f),
                      zeros(q_dim, dim),
                      zeros(q_dim, dim),
                      zeros(q_dim, dim),
                      zeros(dim, q_dim),
                      std::vector<float>(dim, 1.0f),
                      zeros(hidden_dim, dim),
                      zeros(hidden_dim, dim),
                      zeros(dim, hidden_dim)};
    if (l == 0) {  // head 0: the previous-token head
      for (int m = 0; m < previous_token_pairs; ++m) {
        const double theta = std::pow(double(rope_base), -2.0 * m / head_dim);
        set(layer.wq, dim, m, bias_dim, gain / norm_one);
        set(layer.wk, dim, m, bias_dim, gain / norm_one * std::cos(theta));
        set(layer.wk, dim, m + head_dim / 2, bias_dim, gain / norm_one * std::sin(theta));
      }
      set(layer.wv, dim, 0, is_key_dim, 1.0 / norm_one);
      set(layer.wo, q_dim, prev_is_key_dim, 0, 1.0);
    } else {  // every head: the lookup head for its 32 one-hot dims
      for (int h = 0; h < heads; ++h) {
        const std::int64_t row = std::int64_t{h} * head_dim;
        set(layer.wq, dim, row + lookup_pair, is_key_dim, gain / norm_one);
        set(layer.wk, dim, row + lookup_pair, prev_is_key_dim, gain / norm_three);
        for (int t = 0; t < head_dim / 2; ++t) {
          set(layer.wv, dim, row + t, 32 * h + t, 1.0 / norm_three);
          set(layer.wo, q_dim, 32 * h + t, row + t, lookup_output);
        }
      }
    }
    w.layers.push_back(std::move(layer));
  }
  w.output_norm = std::vector<float>(dim, 1.0f);
  w.output = zeros(vocab, dim);
  for (int t = 0; t < vocab; ++t) set(w.output, dim, t, t == key_token ? is_key_dim : t, 1.0);
  return w;
}

}  // namespace infuse::llama::retrieval
