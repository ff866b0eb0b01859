// Float64 reference of a Llama forward pass (examples/llama/model.hpp's float_weights): the logits
// after the last token of a prompt, written from the math with no shared code.
//
// Shortcuts keep it fast at thousands of tokens, all exact: the last layer is evaluated at the last
// position only (nothing reads its other outputs); products skip zero inputs; attention skips the
// value dims that are zero at every position (they add nothing, whatever the weights).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "llama/model.hpp"

namespace infuse::reference {

namespace llama_detail {

// A (rows, cols) row-major float matrix, held by input column: y = W x adds column k times x[k],
// skipping the zero entries of x.
class linear {
 public:
  linear(const std::vector<float>& w, std::int64_t rows, std::int64_t cols)
      : rows_(rows), columns_(static_cast<std::size_t>(rows * cols)) {
    for (std::int64_t n = 0; n < rows; ++n) {
      for (std::int64_t k = 0; k < cols; ++k) columns_[k * rows + n] = w[n * cols + k];
    }
  }
  std::vector<double> operator()(const std::vector<double>& x) const {
    std::vector<double> y(static_cast<std::size_t>(rows_), 0.0);
    for (std::size_t k = 0; k < x.size(); ++k) {
      if (x[k] == 0.0) continue;
      for (std::int64_t n = 0; n < rows_; ++n) y[n] += columns_[k * rows_ + n] * x[k];
    }
    return y;
  }

 private:
  std::int64_t rows_;
  std::vector<double> columns_;  // (cols, rows)
};

inline std::vector<double> rms_norm(const std::vector<double>& x, const std::vector<float>& weight,
                                    double eps) {
  double sum = 0.0;
  for (const double v : x) sum += v * v;
  const double inverse = 1.0 / std::sqrt(sum / double(x.size()) + eps);
  std::vector<double> out(x.size());
  for (std::size_t d = 0; d < x.size(); ++d) out[d] = x[d] * inverse * weight[d];
  return out;
}

// Rotate-half RoPE of every head of x at `position`.
inline void rope(std::vector<double>& x, int head_dim, std::int64_t position, double base) {
  const int half = head_dim / 2;
  for (int m = 0; m < half; ++m) {
    const double angle = double(position) * std::pow(base, -2.0 * m / head_dim);
    const double cos = std::cos(angle), sin = std::sin(angle);
    for (std::size_t head = 0; head < x.size() / head_dim; ++head) {
      double& a = x[head * head_dim + m];
      double& b = x[head * head_dim + m + half];
      const double x0 = a, x1 = b;
      a = x0 * cos - x1 * sin;
      b = x0 * sin + x1 * cos;
    }
  }
}

}  // namespace llama_detail

// The logits (vocab_size) after the last token of `tokens`.
inline std::vector<double> llama_last_logits(const infuse::llama::float_weights& w,
                                             const std::vector<std::int32_t>& tokens) {
  using namespace llama_detail;
  const auto& c = w.config;
  const std::int64_t n = static_cast<std::int64_t>(tokens.size()), dim = c.dim;
  const int hd = c.head_dim(), group = c.n_heads / c.n_kv_heads;
  const std::int64_t q_dim = std::int64_t{c.n_heads} * hd, kv_dim = c.kv_dim();
  std::vector<std::vector<double>> x(static_cast<std::size_t>(n));
  for (std::int64_t t = 0; t < n; ++t) {
    x[t].assign(w.embedding.begin() + tokens[t] * dim, w.embedding.begin() + (tokens[t] + 1) * dim);
  }
  for (int l = 0; l < c.n_layers; ++l) {
    const auto& layer = w.layers[l];
    const bool last_layer = l + 1 == c.n_layers;
    const linear wq(layer.wq, q_dim, dim), wk(layer.wk, kv_dim, dim), wv(layer.wv, kv_dim, dim);
    const linear wo(layer.wo, dim, q_dim), w_gate(layer.w_gate, c.hidden_dim, dim);
    const linear w_up(layer.w_up, c.hidden_dim, dim), w_down(layer.w_down, dim, c.hidden_dim);
    // Keys and values by dimension, (kv_dim, n): the score loops run along positions.
    std::vector<std::vector<double>> q(static_cast<std::size_t>(n));
    std::vector<std::vector<double>> keys(static_cast<std::size_t>(kv_dim), std::vector<double>(n));
    std::vector<std::vector<double>> values = keys;
    for (std::int64_t t = 0; t < n; ++t) {
      const auto normed = rms_norm(x[t], layer.attn_norm, c.rms_eps);
      if (!last_layer || t == n - 1) {
        q[t] = wq(normed);
        rope(q[t], hd, t, c.rope_base);
      }
      auto k = wk(normed);
      rope(k, hd, t, c.rope_base);
      const auto v = wv(normed);
      for (std::int64_t d = 0; d < kv_dim; ++d) {
        keys[d][t] = k[d];
        values[d][t] = v[d];
      }
    }
    // The value dims that are non-zero somewhere (a head with none adds nothing).
    std::vector<bool> live(static_cast<std::size_t>(kv_dim));
    for (std::int64_t d = 0; d < kv_dim; ++d) {
      live[d] = std::any_of(values[d].begin(), values[d].end(), [](double e) { return e != 0.0; });
    }
    for (std::int64_t t = last_layer ? n - 1 : 0; t < n; ++t) {
      std::vector<double> attended(static_cast<std::size_t>(q_dim), 0.0);
      for (int h = 0; h < c.n_heads; ++h) {
        const int kv = h / group * hd;  // the first dim of the head's KV head
        if (std::none_of(live.begin() + kv, live.begin() + kv + hd, [](bool e) { return e; }))
          continue;
        std::vector<double> scores(static_cast<std::size_t>(t + 1), 0.0);
        for (int d = 0; d < hd; ++d) {
          const double qd = q[t][h * hd + d] / std::sqrt(double(hd));
          if (qd == 0.0) continue;
          for (std::int64_t j = 0; j <= t; ++j) scores[j] += qd * keys[kv + d][j];
        }
        const double max_score = *std::max_element(scores.begin(), scores.end());
        double sum = 0.0;
        for (auto& score : scores) sum += score = std::exp(score - max_score);
        for (int d = 0; d < hd; ++d) {
          if (!live[kv + d]) continue;
          for (std::int64_t j = 0; j <= t; ++j)
            attended[h * hd + d] += scores[j] * values[kv + d][j];
        }
        for (int d = 0; d < hd; ++d) attended[h * hd + d] /= sum;
      }
      const auto projected = wo(attended);
      for (std::int64_t d = 0; d < dim; ++d) x[t][d] += projected[d];
      const auto normed = rms_norm(x[t], layer.ffn_norm, c.rms_eps);
      const auto gate = w_gate(normed);
      auto up = w_up(normed);
      for (std::size_t i = 0; i < up.size(); ++i) up[i] *= gate[i] / (1.0 + std::exp(-gate[i]));
      const auto down = w_down(up);
      for (std::int64_t d = 0; d < dim; ++d) x[t][d] += down[d];
    }
  }
  return linear(w.output, c.vocab_size, dim)(rms_norm(x[n - 1], w.output_norm, c.rms_eps));
}

}  // namespace infuse::reference
