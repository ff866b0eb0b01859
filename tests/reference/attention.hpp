// Float64 reference attention with an arbitrary mask: queries (tokens, q_heads, dim) against keys
// and values (keys, kv_heads, dim), query head h reading KV head h / (q_heads / kv_heads). The
// score of query i and key j is transform(q_i · k_j) when visible(i, j), else the pair is skipped.
// Shared by the decode and prefill tests.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace infuse::reference {

struct attention_result {
  std::vector<double> out;      // (tokens, q_heads, v_dim); 0 where no key is visible
  std::vector<double> lse;      // (tokens, q_heads), natural log; -inf where no key is visible
  std::vector<double> weights;  // (tokens, q_heads, keys): softmax weights, 0 where masked
};

struct attention_shape {
  std::int64_t tokens;
  std::int64_t keys;
  std::int64_t q_heads;
  std::int64_t kv_heads;
  std::int64_t k_dim;
  std::int64_t v_dim;
};

// q (tokens, q_heads, k_dim), k (keys, kv_heads, k_dim), v (keys, kv_heads, v_dim), all row-major.
// transform(dot, query, q_head, key) -> score (the softmax scale, soft-cap and ALiBi of the kernel
// under test); visible(query, key) -> bool. T: float or double.
template <class T, class Transform, class Visible>
attention_result attention(const attention_shape& shape, const std::vector<T>& q,
                           const std::vector<T>& k, const std::vector<T>& v,
                           Transform&& transform, Visible&& visible) {
  const auto [tokens, keys, q_heads, kv_heads, k_dim, v_dim] = shape;
  const std::int64_t group = q_heads / kv_heads;
  attention_result r;
  r.out.assign(static_cast<std::size_t>(tokens * q_heads * v_dim), 0.0);
  r.lse.assign(static_cast<std::size_t>(tokens * q_heads), -INFINITY);
  r.weights.assign(static_cast<std::size_t>(tokens * q_heads * keys), 0.0);
  std::vector<double> scores(static_cast<std::size_t>(keys));
  for (std::int64_t i = 0; i < tokens; ++i) {
    for (std::int64_t h = 0; h < q_heads; ++h) {
      const std::int64_t kh = h / group;
      double max = -INFINITY;
      for (std::int64_t j = 0; j < keys; ++j) {
        scores[j] = -INFINITY;
        if (!visible(i, j)) continue;
        double dot = 0.0;
        for (std::int64_t d = 0; d < k_dim; ++d) {
          dot +=
              double(q[(i * q_heads + h) * k_dim + d]) * double(k[(j * kv_heads + kh) * k_dim + d]);
        }
        scores[j] = transform(dot, i, h, j);
        max = std::max(max, scores[j]);
      }
      if (max == -INFINITY) continue;
      double sum = 0.0;
      for (std::int64_t j = 0; j < keys; ++j) sum += std::exp(scores[j] - max);
      r.lse[i * q_heads + h] = max + std::log(sum);
      double* out = &r.out[(i * q_heads + h) * v_dim];
      for (std::int64_t j = 0; j < keys; ++j) {
        const double p = std::exp(scores[j] - max) / sum;
        r.weights[(i * q_heads + h) * keys + j] = p;
        if (p == 0.0) continue;
        for (std::int64_t d = 0; d < v_dim; ++d)
          out[d] += p * double(v[(j * kv_heads + kh) * v_dim + d]);
      }
    }
  }
  return r;
}

}  // namespace infuse::reference
