// The Llama decoder on infuse's kernels: RMSNorm, RoPE (rotate-half pairs), grouped-query attention
// over a quantized paged KV cache, SwiGLU MLP, LM head, greedy or sampled tokens.
//
// A model *configuration* is one type naming every policy of a run:
//
//   struct int4_quest {
//     static constexpr const char* name = "int4 quest";
//     using weights = quant::int_<4, 128>;          // the matrices (embedding stays float)
//     using k = quant::int_<8, quant::per_channel>;  // stored keys
//     using v = quant::int_<4, 32>;                  // stored values
//     using layout = kv::paged<16>;
//     using sparsity = sparse::quest<...>;           // what a decode step attends to
//   };
//
// llama::model<Config> holds the weights quantized to Config::weights; llama::session<Config> is
// one sequence over it: a KV cache per layer and the activations of one chunk of tokens. A prompt
// runs through prefill() in chunks (the projections as GEMMs over the chunk's tokens, attention
// causal over everything before), every later token through decode(), whose attention reads what
// Config::sparsity selects. Speculative decoding (speculative.hpp) scores draft tokens with
// score(), a prefill that returns the logits after every token, and drops rejected ones with
// truncate().
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "checkpoint.hpp"
#include "infuse/attention/attention.hpp"
#include "infuse/attention/cpu/decode.hpp"
#include "infuse/attention/cpu/prefill.hpp"
#include "infuse/attention/prefill.hpp"
#include "infuse/core/error.hpp"
#include "infuse/core/view.hpp"
#include "infuse/exec/cpu.hpp"
#include "infuse/gemm/cpu/gemv.hpp"
#include "infuse/gemm/gemv.hpp"
#include "infuse/kv/cache_view.hpp"
#include "infuse/kv/format.hpp"
#include "infuse/kv/page_pool.hpp"
#include "infuse/quant/quant.hpp"
#include "infuse/search/cpu/sample.hpp"
#include "infuse/search/sample.hpp"
#include "infuse/sparse/dense.hpp"

namespace infuse::llama {

// ---- float weights ------------------------------------------------------------------------------

// One layer's float weights. Matrices are (outputs, inputs), row-major, as quant::quantize takes
// them; the rows of wq and wk are ordered for rotate-half RoPE pairs (m, m + head_dim / 2).
struct float_layer {
  std::vector<float> attn_norm;  // (dim)
  std::vector<float> wq;         // (n_heads * head_dim, dim)
  std::vector<float> wk;         // (n_kv_heads * head_dim, dim)
  std::vector<float> wv;         // (n_kv_heads * head_dim, dim)
  std::vector<float> wo;         // (dim, n_heads * head_dim)
  std::vector<float> ffn_norm;   // (dim)
  std::vector<float> w_gate;     // (hidden_dim, dim)
  std::vector<float> w_up;       // (hidden_dim, dim)
  std::vector<float> w_down;     // (dim, hidden_dim)
};

struct float_weights {
  model_config config;
  std::vector<float> embedding;  // (vocab_size, dim)
  std::vector<float_layer> layers;
  std::vector<float> output_norm;  // (dim)
  std::vector<float> output;       // (vocab_size, dim)
};

// Checks a configuration and the sizes of every weight; throws infuse::error naming the first
// wrong one.
inline void require_weights(const float_weights& w) {
  constexpr std::string_view call = "infuse::llama::model";
  const model_config& c = w.config;
  require(c.dim > 0 && c.n_heads > 0 && c.n_kv_heads > 0 && c.n_layers > 0 && c.hidden_dim > 0 &&
              c.vocab_size > 0,
          call, "config", c.dim, "positive dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab");
  require(c.dim % c.n_heads == 0, call, "config.n_heads", c.n_heads, "a divisor of dim");
  require(c.n_heads % c.n_kv_heads == 0, call, "config.n_kv_heads", c.n_kv_heads,
          "a divisor of n_heads " + std::to_string(c.n_heads));
  require(c.head_dim() % 2 == 0 && c.head_dim() <= 1024, call, "config.head_dim", c.head_dim(),
          "an even head dim up to 1024 (dim / n_heads)");
  require(c.rope_base > 1.0f && c.rms_eps > 0.0f, call, "config.rope_base", c.rope_base,
          "rope_base > 1 and rms_eps > 0");
  const auto size = [&](const std::vector<float>& v, std::int64_t rows, std::int64_t cols,
                        const std::string& name) {
    require(static_cast<std::int64_t>(v.size()) == rows * cols, call, name, v.size(),
            std::to_string(rows) + " x " + std::to_string(cols) + " values");
  };
  const std::int64_t dim = c.dim, q_dim = std::int64_t{c.n_heads} * c.head_dim();
  const std::int64_t kv_dim = c.kv_dim(), hidden = c.hidden_dim, vocab = c.vocab_size;
  size(w.embedding, vocab, dim, "embedding");
  size(w.output_norm, 1, dim, "output_norm");
  size(w.output, vocab, dim, "output");
  require(static_cast<int>(w.layers.size()) == c.n_layers, call, "layers", w.layers.size(),
          "config.n_layers = " + std::to_string(c.n_layers));
  for (std::size_t l = 0; l < w.layers.size(); ++l) {
    const float_layer& layer = w.layers[l];
    const std::string at = "layers[" + std::to_string(l) + "].";
    size(layer.attn_norm, 1, dim, at + "attn_norm");
    size(layer.wq, q_dim, dim, at + "wq");
    size(layer.wk, kv_dim, dim, at + "wk");
    size(layer.wv, kv_dim, dim, at + "wv");
    size(layer.wo, dim, q_dim, at + "wo");
    size(layer.ffn_norm, 1, dim, at + "ffn_norm");
    size(layer.w_gate, hidden, dim, at + "w_gate");
    size(layer.w_up, hidden, dim, at + "w_up");
    size(layer.w_down, dim, hidden, at + "w_down");
  }
}

// The float weights of a loaded checkpoint (llama2.c or GGUF), wq and wk reordered for rotate-half
// RoPE. The checkpoint keeps owning its file.
inline float_weights load_weights(checkpoint& file) {
  use_rope_pairing(file, rope_pairing::rotate_half);
  float_weights w;
  w.config = file.config;
  w.embedding = to_float(file.token_embedding);
  for (const layer_weights& layer : file.layers) {
    w.layers.push_back({to_float(layer.attn_norm), to_float(layer.wq), to_float(layer.wk),
                        to_float(layer.wv), to_float(layer.wo), to_float(layer.ffn_norm),
                        to_float(layer.w_gate), to_float(layer.w_up), to_float(layer.w_down)});
  }
  w.output_norm = to_float(file.output_norm);
  w.output = file.tied_output ? w.embedding : to_float(file.output);
  require_weights(w);
  return w;
}

// ---- configurations -----------------------------------------------------------------------------

// What a configuration names (see the top of this file).
template <class C>
concept names_policies = requires {
  { C::name } -> std::convertible_to<const char*>;
  typename C::weights;
  typename C::k;
  typename C::v;
  typename C::layout;
  typename C::sparsity;
};

template <class C>
concept model_configuration =
    names_policies<C> && quant::scheme<typename C::weights> && quant::scheme<typename C::k> &&
    quant::scheme<typename C::v> && C::layout::is_paged && sparse::policy<typename C::sparsity>;

// The activation policy of a configuration's products: Config::activations when it names one
// (gemm::int8_activations: x quantized per block of 32 to int8, integer dot products), else float.
template <class C>
struct activations_of {
  using type = gemm::float_activations;
};
template <class C>
requires requires {
  typename C::activations;
}
struct activations_of<C> {
  using type = typename C::activations;
};

// ---- the model ----------------------------------------------------------------------------------

template <class Config>
class model {
  static_assert(model_configuration<Config>,
                "infuse::llama::model takes a configuration: a struct with `name`, `weights`, `k` "
                "and `v` (quantization schemes), `layout` (kv::paged<...>) and `sparsity` (a "
                "sparse::policy); see docs/policies.md#quantization-schemes");

 public:
  using scheme = typename Config::weights;
  using matrix = quant::quantized<scheme>;

  struct layer {
    std::vector<float> attn_norm;  // (dim)
    matrix wqkv;                   // (q_dim + 2 kv_dim, dim): one product for Q, K and V
    matrix wo;                     // (dim, q_dim)
    std::vector<float> ffn_norm;   // (dim)
    matrix w_gate;                 // (hidden, dim)
    matrix w_up;                   // (hidden, dim)
    matrix w_down;                 // (dim, hidden)
  };

  explicit model(const float_weights& w) : config_(w.config) {
    require_weights(w);
    const std::int64_t dim = config_.dim;
    embedding_ = w.embedding;
    for (const float_layer& source : w.layers) {
      std::vector<float> qkv = source.wq;
      qkv.insert(qkv.end(), source.wk.begin(), source.wk.end());
      qkv.insert(qkv.end(), source.wv.begin(), source.wv.end());
      layers_.push_back({source.attn_norm, quantize(qkv, dim), quantize(source.wo, q_dim()),
                         source.ffn_norm, quantize(source.w_gate, dim), quantize(source.w_up, dim),
                         quantize(source.w_down, config_.hidden_dim)});
    }
    output_norm_ = w.output_norm;
    output_ = quantize(w.output, dim);
  }

  // Random weights at the shapes of `c`, for speed runs: codes and scales drawn directly in the
  // scheme's storage (no float copy of the matrices), a random embedding, unit norms.
  model(const model_config& c, std::uint64_t seed) : config_(c) {
    std::uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
    const auto next = [&state] {  // splitmix64
      std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      return z ^ (z >> 31);
    };
    const auto random_matrix = [&](std::int64_t rows, std::int64_t cols) {
      matrix q;
      q.rows = rows;
      q.cols = cols;
      const quant::matrix<scheme> shape{nullptr, nullptr, nullptr, rows, cols};
      q.codes.resize(static_cast<std::size_t>(rows * shape.blocks_per_row() * scheme::block_bytes));
      for (std::size_t i = 0; i < q.codes.size(); i += 8) {
        const std::uint64_t bits = next();
        for (std::size_t j = 0; j < 8 && i + j < q.codes.size(); ++j) {
          q.codes[i + j] = static_cast<std::uint8_t>(bits >> (8 * j));
        }
      }
      // Scales that keep activations of order one through the layers.
      const float scale = 1.0f / (8.0f * std::sqrt(static_cast<float>(cols)));
      q.scales.assign(static_cast<std::size_t>(shape.group_count() * scheme::scales_per_group),
                      scale);
      if constexpr (scheme::has_zero) {
        q.zeros.assign(static_cast<std::size_t>(shape.group_count()), 1u << (scheme::bits - 1));
      }
      return q;
    };
    const std::int64_t dim = c.dim;
    embedding_.resize(static_cast<std::size_t>(std::int64_t{c.vocab_size} * dim));
    for (float& e : embedding_) e = static_cast<float>(next() >> 40) * 0x1p-24f - 0.5f;
    for (int l = 0; l < c.n_layers; ++l) {
      layers_.push_back({std::vector<float>(static_cast<std::size_t>(dim), 1.0f),
                         random_matrix(q_dim() + 2 * c.kv_dim(), dim), random_matrix(dim, q_dim()),
                         std::vector<float>(static_cast<std::size_t>(dim), 1.0f),
                         random_matrix(c.hidden_dim, dim), random_matrix(c.hidden_dim, dim),
                         random_matrix(dim, c.hidden_dim)});
    }
    output_norm_.assign(static_cast<std::size_t>(dim), 1.0f);
    output_ = random_matrix(c.vocab_size, dim);
  }

  [[nodiscard]] const model_config& config() const { return config_; }
  [[nodiscard]] std::int64_t q_dim() const {
    return std::int64_t{config_.n_heads} * config_.head_dim();
  }
  [[nodiscard]] const std::vector<layer>& layers() const { return layers_; }
  [[nodiscard]] std::span<const float> embedding() const { return embedding_; }
  [[nodiscard]] std::span<const float> output_norm() const { return output_norm_; }
  [[nodiscard]] const matrix& output() const { return output_; }

  // Bytes of every weight as stored: the quantized matrices (quant::storage_bytes), the float
  // embedding table and norms.
  [[nodiscard]] std::int64_t weight_bytes() const {
    std::int64_t bytes =
        output_.bytes() + static_cast<std::int64_t>((embedding_.size() + output_norm_.size()) * 4);
    for (const layer& l : layers_) {
      bytes += l.wqkv.bytes() + l.wo.bytes() + l.w_gate.bytes() + l.w_up.bytes() +
               l.w_down.bytes() +
               static_cast<std::int64_t>(l.attn_norm.size() + l.ffn_norm.size()) * 4;
    }
    return bytes;
  }

 private:
  static matrix quantize(const std::vector<float>& values, std::int64_t cols) {
    const std::int64_t rows = static_cast<std::int64_t>(values.size()) / cols;
    return quant::quantize<scheme>(host_view<const float, 2>(values.data(), {rows, cols}));
  }

  model_config config_;
  std::vector<float> embedding_;
  std::vector<layer> layers_;
  std::vector<float> output_norm_;
  matrix output_;
};

// ---- the pieces of the forward pass -------------------------------------------------------------

namespace detail {

// out(t, :) = x(t, :) / sqrt(mean(x(t, :)^2) + eps) * weight, per token.
inline void rms_norm(const exec::cpu& exec, host_view<const float, 2> x,
                     std::span<const float> weight, float eps, host_view<float, 2> out) {
  const std::int64_t dim = x.extent(1);
  exec.parallel_for(x.extent(0), [&](std::int64_t t) {
    double sum = 0.0;
    for (std::int64_t d = 0; d < dim; ++d) sum += double(x(t, d)) * x(t, d);
    const float inverse = static_cast<float>(1.0 / std::sqrt(sum / double(dim) + eps));
    for (std::int64_t d = 0; d < dim; ++d) out(t, d) = x(t, d) * inverse * weight[d];
  });
}

// cos and sin of RoPE's angles for `rows` rows at positions first_position + row: pair m turns
// by position * base^(-2m / head_dim), computed in double (position * theta reaches 1e5
// radians). Row t of the table is head_dim / 2 cosines, then head_dim / 2 sines; every layer
// and both Q and K rotate by the same table.
inline void rope_angles(const exec::cpu& exec, std::int64_t rows, std::int64_t head_dim,
                        std::int64_t first_position, double base, std::vector<float>& table) {
  const std::int64_t half = head_dim / 2;
  table.resize(static_cast<std::size_t>(rows * head_dim));
  exec.parallel_for(rows, [&](std::int64_t t) {
    const double position = static_cast<double>(first_position + t);
    float* row = table.data() + t * head_dim;
    for (std::int64_t m = 0; m < half; ++m) {
      const double angle = position * std::pow(base, -2.0 * double(m) / double(head_dim));
      row[m] = static_cast<float>(std::cos(angle));
      row[half + m] = static_cast<float>(std::sin(angle));
    }
  });
}

// Rotates `heads` heads of head_dim values, starting at column `first_column` of every row of x,
// by the angles of rope_angles' table (a row per row of x): pair m = (m, m + head_dim / 2).
inline void rope(const exec::cpu& exec, host_view<float, 2> x, std::int64_t first_column,
                 std::int64_t heads, std::int64_t head_dim, const std::vector<float>& table) {
  const std::int64_t half = head_dim / 2;
  exec.parallel_for(x.extent(0), [&](std::int64_t t) {
    const float* cosines = table.data() + t * head_dim;
    const float* sines = cosines + half;
    for (std::int64_t h = 0; h < heads; ++h) {
      float* a = &x(t, first_column + h * head_dim);
      float* b = a + half;
      for (std::int64_t m = 0; m < half; ++m) {
        const float x0 = a[m], x1 = b[m];
        a[m] = x0 * cosines[m] - x1 * sines[m];
        b[m] = x0 * sines[m] + x1 * cosines[m];
      }
    }
  });
}

// RoPE at positions first_position + row, for one product's rows: rope_angles, then rope.
inline void rope(const exec::cpu& exec, host_view<float, 2> x, std::int64_t first_column,
                 std::int64_t heads, std::int64_t head_dim, std::int64_t first_position,
                 double base) {
  std::vector<float> table;
  rope_angles(exec, x.extent(0), head_dim, first_position, base, table);
  rope(exec, x, first_column, heads, head_dim, table);
}

}  // namespace detail

// ---- one sequence -------------------------------------------------------------------------------

template <class Config>
class session {
 public:
  using layout = typename Config::layout;
  using k_scheme = typename Config::k;
  using v_scheme = typename Config::v;
  using sparsity = typename Config::sparsity;
  using cache_type = kv::cache<layout, k_scheme, v_scheme>;
  using activations = typename activations_of<Config>::type;
  static constexpr int page_size = layout::page_size;

  // A sequence of up to `capacity` tokens over `m` (which must outlive it); prompts run in chunks
  // of up to `chunk` tokens; decode steps attend to what `sparsity_params` selects.
  session(const model<Config>& m, const exec::cpu& exec, std::int64_t capacity,
          typename sparsity::params sparsity_params = {}, std::int64_t chunk = 512)
      : model_(m), exec_(exec), capacity_(capacity), chunk_(chunk), sparsity_(sparsity_params) {
    constexpr std::string_view call = "infuse::llama::session";
    require(capacity >= 1 && capacity <= (std::int64_t{1} << 30), call, "capacity", capacity,
            "1 to 2^30 tokens");
    require(chunk >= 1, call, "chunk", chunk, "at least 1 token");
    sparsity::check(sparsity_params, call);
    const model_config& c = m.config();
    const auto pages = static_cast<std::int32_t>((capacity + page_size - 1) / page_size);
    for (int l = 0; l < c.n_layers; ++l) {
      caches_.emplace_back(pages, kv::vector_format<k_scheme>{c.n_kv_heads, c.head_dim()},
                           kv::vector_format<v_scheme>{c.n_kv_heads, c.head_dim()});
      sequences_.push_back(caches_.back().create());
    }
    const std::int64_t rows = std::min(chunk, capacity);
    const std::int64_t qkv = m.q_dim() + 2 * c.kv_dim();
    residual_.resize(static_cast<std::size_t>(rows * c.dim));
    normed_.resize(static_cast<std::size_t>(rows * c.dim));
    qkv_.resize(static_cast<std::size_t>(rows * qkv));
    attended_.resize(static_cast<std::size_t>(rows * m.q_dim()));
    hidden_.resize(static_cast<std::size_t>(rows * c.hidden_dim));
    logits_.resize(static_cast<std::size_t>(c.vocab_size));
    if constexpr (std::is_same_v<activations, gemm::int8_activations>) {
      const std::int64_t widest = std::max<std::int64_t>({c.dim, c.hidden_dim, m.q_dim()});
      activation_workspace_.resize(
          static_cast<std::size_t>(gemm::int8_workspace_bytes(std::max(rows, chunk_), widest)));
    }
  }

  [[nodiscard]] std::int64_t length() const { return length_; }
  [[nodiscard]] std::int64_t capacity() const { return capacity_; }
  // Bytes of KV cache one token takes over every layer: K and V records, codes and parameters.
  [[nodiscard]] std::int64_t kv_bytes_per_token() const {
    return std::int64_t{model_.config().n_layers} * caches_.front().bytes_per_token();
  }
  // The logits after the last token that went in (vocab_size).
  [[nodiscard]] std::span<const float> logits() const { return logits_; }

  // Appends a prompt (causal attention over everything before) and returns the logits after its
  // last token. Throws infuse::error, before any work, for an empty prompt, a token outside the
  // vocabulary or a prompt that does not fit the capacity.
  std::span<const float> prefill(std::span<const std::int32_t> tokens) {
    require_tokens(tokens, "infuse::llama::session::prefill");
    for (std::size_t first = 0; first < tokens.size(); first += static_cast<std::size_t>(chunk_)) {
      const std::size_t count =
          std::min<std::size_t>(static_cast<std::size_t>(chunk_), tokens.size() - first);
      forward(tokens.subspan(first, count),
              first + count == tokens.size() ? head_rows::last : head_rows::none,
              attention_kind::causal);
    }
    return logits_;
  }

  // Appends `tokens` as prefill does and returns the logits after each of them: row i (vocab) is
  // the next-token distribution after tokens[i]. One pass scores a run of speculative draft
  // tokens. Throws infuse::error as prefill does.
  host_view<const float, 2> score(std::span<const std::int32_t> tokens) {
    require_tokens(tokens, "infuse::llama::session::score");
    const std::int64_t vocab = model_.config().vocab_size;
    const auto n = static_cast<std::int64_t>(tokens.size());
    scores_.resize(static_cast<std::size_t>(n * vocab));
    for (std::int64_t first = 0; first < n; first += chunk_) {
      const std::int64_t count = std::min(chunk_, n - first);
      forward(tokens.subspan(static_cast<std::size_t>(first), static_cast<std::size_t>(count)),
              head_rows::every, attention_kind::causal, &scores_[std::size_t(first * vocab)]);
    }
    return host_view<const float, 2>(scores_.data(), {n, vocab});
  }

  // Removes the last `tokens` tokens from every layer's KV cache (rejected speculative tokens):
  // the next token goes in at position length() - tokens. logits() keeps its values. Throws
  // infuse::error unless 0 <= tokens <= length().
  void truncate(std::int64_t tokens) {
    require(tokens >= 0 && tokens <= length_, "infuse::llama::session::truncate", "tokens", tokens,
            "0 to the session's length " + std::to_string(length_));
    for (std::size_t l = 0; l < caches_.size(); ++l) caches_[l].truncate(sequences_[l], tokens);
    length_ -= tokens;
  }

  // Appends one token, attending to what Config::sparsity selects, and returns the next logits.
  std::span<const float> decode(std::int32_t token) {
    const std::int32_t one[1] = {token};
    require_tokens(one, "infuse::llama::session::decode");
    forward(one, head_rows::last, attention_kind::sparse);
    return logits_;
  }

  // The most likely next token under the current logits (search::greedy).
  [[nodiscard]] std::int32_t greedy() const {
    return pick("infuse::llama::session::greedy",
                [&](const search::sample_outputs<host_memory>& out) {
                  search::greedy(exec_, logits_view(), out);
                });
  }

  // A token drawn from the current logits at `temperature` (0: greedy), keeping the smallest set
  // of most likely tokens that holds `top_p` of the mass (search::sample). The draw is keyed by
  // (seed, the token's position): the same seed repeats a generation exactly.
  [[nodiscard]] std::int32_t sample(float temperature, float top_p, std::uint64_t seed) {
    using filters = search::filters<search::filter::temperature, search::filter::top_p>;
    const std::int32_t request = 0;
    const std::int64_t position = length_;
    search::sample_params<host_memory, filters> params;
    params.seed = {&seed, {1}};
    params.temperature = {&temperature, {1}};
    params.top_p = {&top_p, {1}};
    sample_workspace_.resize(static_cast<std::size_t>(
        search::sample_workspace_bytes<filters>(exec_, 1, model_.config().vocab_size)));
    return pick("infuse::llama::session::sample",
                [&](const search::sample_outputs<host_memory>& out) {
                  search::sample<filters>(
                      exec_, logits_view(), {{&request, {1}}, {&position, {1}}}, params, out,
                      {sample_workspace_.data(), {std::int64_t(sample_workspace_.size())}});
                });
  }

 private:
  enum class attention_kind { causal, sparse };
  enum class head_rows { none, last, every };  // which tokens of a forward pass get logits

  void require_tokens(std::span<const std::int32_t> tokens, std::string_view call) const {
    require(!tokens.empty(), call, "tokens.size()", 0, "at least 1 token");
    require(
        length_ + static_cast<std::int64_t>(tokens.size()) <= capacity_, call, "tokens.size()",
        tokens.size(),
        "at most the free capacity " + std::to_string(capacity_ - length_) + " of the KV cache");
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      require(tokens[i] >= 0 && tokens[i] < model_.config().vocab_size, call,
              "tokens[" + std::to_string(i) + "]", tokens[i],
              "a token of the vocabulary, 0 to " + std::to_string(model_.config().vocab_size - 1));
    }
  }

  [[nodiscard]] host_view<const float, 2> logits_view() const {
    return host_view<const float, 2>(logits_.data(), {1, std::int64_t(logits_.size())});
  }

  // The token that `choose` writes into one row of outputs; an error unless its status is ok.
  template <class Choose>
  static std::int32_t pick(std::string_view call, Choose&& choose) {
    std::int32_t token = 0;
    float logprob = 0.0f;
    search::row_status status = search::row_status::ok;
    choose(search::sample_outputs<host_memory>{
        {&token, {1}}, {&logprob, {1}}, {&status, {1}}, {}, {}});
    require(status == search::row_status::ok, call, "logits", static_cast<int>(status),
            "finite logits (row_status::ok)");
    return token;
  }

  static host_view<float, 2> rows_of(std::vector<float>& data, std::int64_t rows,
                                     std::int64_t cols) {
    return host_view<float, 2>(data.data(), {rows, cols});
  }

  // Runs `tokens` (positions length_ ...) through every layer; the logits of the last one into
  // logits_ (head_rows::last), or of every one into `every_logits` (tokens.size(), vocab) and of
  // the last also into logits_ (head_rows::every).
  void forward(std::span<const std::int32_t> tokens, head_rows head, attention_kind kind,
               float* every_logits = nullptr) {
    const model_config& c = model_.config();
    const auto n = static_cast<std::int64_t>(tokens.size());
    const std::int64_t dim = c.dim, q_dim = model_.q_dim(), kv_dim = c.kv_dim();
    const std::int64_t qkv_cols = q_dim + 2 * kv_dim;
    const auto x = rows_of(residual_, n, dim);
    const auto normed = rows_of(normed_, n, dim);
    const auto qkv = rows_of(qkv_, n, qkv_cols);
    const auto attended = rows_of(attended_, n, q_dim);
    const auto hidden = rows_of(hidden_, n, c.hidden_dim);
    const std::span<const float> embedding = model_.embedding();
    exec_.parallel_for(n, [&](std::int64_t t) {
      std::copy_n(embedding.begin() + tokens[t] * dim, dim, &x(t, 0));
    });
    detail::rope_angles(exec_, n, c.head_dim(), length_, c.rope_base, rope_table_);
    for (int l = 0; l < c.n_layers; ++l) {
      const auto& layer = model_.layers()[l];
      detail::rms_norm(exec_, x, layer.attn_norm, c.rms_eps, normed);
      gemv(exec_, layer.wqkv.view(), normed, qkv, {}, products());
      detail::rope(exec_, qkv, 0, c.n_heads, c.head_dim(), rope_table_);
      detail::rope(exec_, qkv, q_dim, c.n_kv_heads, c.head_dim(), rope_table_);
      attend(l, qkv, attended, kind);
      gemv(exec_, layer.wo.view(), attended, x, {.residual = x.data()}, products());
      detail::rms_norm(exec_, x, layer.ffn_norm, c.rms_eps, normed);
      gated_gemv(exec_, layer.w_gate.view(), layer.w_up.view(), normed, hidden, gemm::act::silu, {},
                 products());
      gemv(exec_, layer.w_down.view(), hidden, x, {.residual = x.data()}, products());
    }
    length_ += n;
    if (head == head_rows::none) return;
    const std::int64_t first = head == head_rows::every ? 0 : n - 1;
    const host_view<const float, 2> final_rows(&x(first, 0), {n - first, dim});
    const host_view<float, 2> final_normed(normed.data(), {n - first, dim});
    float* const out = head == head_rows::every ? every_logits : logits_.data();
    detail::rms_norm(exec_, final_rows, model_.output_norm(), c.rms_eps, final_normed);
    gemv(exec_, model_.output().view(), final_normed,
         host_view<float, 2>(out, {n - first, c.vocab_size}), {}, products());
    if (out != logits_.data()) {
      std::copy_n(out + (n - 1) * c.vocab_size, c.vocab_size, logits_.data());
    }
  }

  // The activation policy of every product, with its workspace.
  activations products() {
    if constexpr (std::is_same_v<activations, gemm::int8_activations>) {
      return {activation_workspace_.data(), std::ssize(activation_workspace_)};
    } else {
      return {};
    }
  }

  // Attention of layer l for the rows of qkv (Q, K and V of the tokens at positions length_ ...,
  // after RoPE), into `out`. A prompt chunk: infuse's causal prefill, which stores the chunk's K
  // and V in the slots reserved for them. A decode step: K and V appended (quantized) first, then
  // infuse's decode attention over what Config::sparsity selects.
  void attend(int l, host_view<const float, 2> qkv, host_view<float, 2> out, attention_kind kind) {
    const model_config& c = model_.config();
    const std::int64_t n = qkv.extent(0), q_dim = model_.q_dim(), kv_dim = c.kv_dim();
    const std::int64_t hd = c.head_dim(), stride = qkv.stride(0);
    const host_view<const float, 3> q(qkv.data(), {n, c.n_heads, hd}, {stride, hd, 1});
    const host_view<const float, 3> k(qkv.data() + q_dim, {n, c.n_kv_heads, hd}, {stride, hd, 1});
    const host_view<const float, 3> v(qkv.data() + q_dim + kv_dim, {n, c.n_kv_heads, hd},
                                      {stride, hd, 1});
    const host_view<float, 3> attended(out.data(), {n, c.n_heads, hd});
    cache_type& cache = caches_[static_cast<std::size_t>(l)];
    const kv::sequence_id batch[1] = {sequences_[static_cast<std::size_t>(l)]};
    if (kind == attention_kind::causal) {
      cache.append(batch[0], n);
      const std::int32_t q_indptr[2] = {0, static_cast<std::int32_t>(n)};
      attention::prefill<layout, k_scheme, v_scheme, sparse::causal>(
          exec_, q, k, v, host_view<const std::int32_t, 1>(q_indptr, {2}), cache.view(batch).view(),
          attended, {});
      return;
    }
    const std::int64_t counts[1] = {n};
    cache.append(exec_, batch, counts, k, v);
    const auto view = cache.view(batch);
    using decode = attention::attention<layout, k_scheme, v_scheme, sparsity>;
    workspace_.resize(static_cast<std::size_t>(
        decode::decode_workspace_bytes(exec_, c.n_heads, view.view(), sparsity_)));
    decode::decode(exec_, q, view.view(), attended, sparsity_, {}, workspace_);
  }

  const model<Config>& model_;
  exec::cpu exec_;
  std::int64_t capacity_;
  std::int64_t chunk_;
  typename sparsity::params sparsity_;
  std::vector<cache_type> caches_;  // one a layer
  std::vector<kv::sequence_id> sequences_;
  std::int64_t length_ = 0;
  std::vector<float> residual_, normed_, qkv_, attended_, hidden_;  // (chunk, ...) activations
  std::vector<float> rope_table_;                                   // (chunk, head_dim)
  std::vector<float> logits_;                                       // (vocab)
  std::vector<float> scores_;                                       // (tokens, vocab): score()
  std::vector<std::byte> workspace_;                                // decode attention's
  std::vector<std::byte> sample_workspace_;                         // search::sample's
  std::vector<std::byte> activation_workspace_;                     // int8 activations'
};

}  // namespace infuse::llama
