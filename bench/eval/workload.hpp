// The attention workloads of the policy evaluation: one sequence's keys and values and the queries
// it is asked, built from random numbers with a planted structure, or captured from the retrieval
// model (retrieval.hpp).
//
// The prompt is tokens [0, length - 1). Its last `observed` positions each ask one query (the
// observation queries, at positions length - 1 - observed .. length - 2: what retention rules score
// the prompt by, and what sparse::recycled records from); then token length - 1 arrives and asks
// `steps` queries over the whole sequence (the evaluation queries).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <random>
#include <span>
#include <string>
#include <vector>

namespace infuse::eval {

struct workload {
  std::string name;
  std::string about;
  std::int32_t q_heads = 32;
  std::int32_t kv_heads = 8;
  std::int32_t head_dim = 128;
  std::int64_t length = 0;
  std::int64_t observed = 0;
  std::int64_t steps = 0;
  std::vector<float> keys, values;  // (length, kv_heads, head_dim)
  std::vector<float> queries;       // (observed + steps, q_heads, head_dim)
  // A token every evaluation query weighs most in every head (the needle, the passkey), checked
  // against dense attention; -1 when none.
  std::int64_t focus = -1;

  [[nodiscard]] std::int64_t prompt_length() const { return length - 1; }
  [[nodiscard]] std::int32_t group() const { return q_heads / kv_heads; }
  [[nodiscard]] std::int64_t token_floats() const { return std::int64_t{kv_heads} * head_dim; }
  [[nodiscard]] std::int64_t query_floats() const { return std::int64_t{q_heads} * head_dim; }
  // Observation query i (0 .. observed - 1) and evaluation query i (0 .. steps - 1).
  [[nodiscard]] const float* observation_query(std::int64_t i) const {
    return queries.data() + i * query_floats();
  }
  [[nodiscard]] const float* evaluation_query(std::int64_t i) const {
    return queries.data() + (observed + i) * query_floats();
  }
};

// The size of a synthetic workload.
struct synthetic_shape {
  std::int64_t length = 4096;
  std::int64_t observed = 32;
  std::int64_t steps = 8;
};

namespace detail {

class normal_source {
 public:
  explicit normal_source(std::uint64_t seed) : engine_(seed) {}

  void fill(std::span<float> out) {
    for (float& x : out) x = normal_(engine_);
  }
  double uniform(double lo, double hi) {
    return std::uniform_real_distribution<double>(lo, hi)(engine_);
  }
  // `count` orthonormal random directions of `dim` entries (Gram-Schmidt), one after another.
  std::vector<float> directions(int count, std::int32_t dim) {
    std::vector<float> d(static_cast<std::size_t>(count) * dim);
    for (int i = 0; i < count; ++i) {
      float* u = d.data() + std::int64_t{i} * dim;
      fill({u, static_cast<std::size_t>(dim)});
      for (int j = 0; j < i; ++j) {
        const float* w = d.data() + std::int64_t{j} * dim;
        double dot = 0.0;
        for (std::int32_t x = 0; x < dim; ++x) dot += double{u[x]} * w[x];
        for (std::int32_t x = 0; x < dim; ++x) u[x] -= static_cast<float>(dot) * w[x];
      }
      double norm = 0.0;
      for (std::int32_t x = 0; x < dim; ++x) norm += double{u[x]} * u[x];
      for (std::int32_t x = 0; x < dim; ++x) u[x] /= static_cast<float>(std::sqrt(norm));
    }
    return d;
  }

 private:
  std::mt19937_64 engine_;
  std::normal_distribution<float> normal_;
};

// x += scale * direction.
inline void add(float* x, const float* direction, std::int32_t dim, double scale) {
  for (std::int32_t d = 0; d < dim; ++d) x[d] += static_cast<float>(scale) * direction[d];
}

// A workload of standard normal keys, values and queries: the background every synthetic workload
// plants its structure in.
inline workload background(const std::string& name, const std::string& about,
                           const synthetic_shape& shape, normal_source& source) {
  workload w;
  w.name = name;
  w.about = about;
  w.length = shape.length;
  w.observed = shape.observed;
  w.steps = shape.steps;
  w.keys.resize(static_cast<std::size_t>(w.length * w.token_floats()));
  w.values.resize(w.keys.size());
  w.queries.resize(static_cast<std::size_t>((w.observed + w.steps) * w.query_floats()));
  source.fill(w.keys);
  source.fill(w.values);
  source.fill(w.queries);
  return w;
}

// Adds `scale * direction(kv head)` to every query head of each KV head's group, for query i.
template <class Direction>
void steer_queries(workload& w, std::int64_t i, Direction&& direction, double scale) {
  for (std::int32_t h = 0; h < w.q_heads; ++h) {
    add(w.queries.data() + i * w.query_floats() + std::int64_t{h} * w.head_dim,
        direction(h / w.group()), w.head_dim, scale);
  }
}

inline float* key(workload& w, std::int64_t t, std::int32_t kv_head) {
  return w.keys.data() + t * w.token_floats() + std::int64_t{kv_head} * w.head_dim;
}

}  // namespace detail

// Random queries over random keys: logits of standard deviation 1, the mass spread thin.
inline workload diffuse(const synthetic_shape& shape, std::uint64_t seed) {
  detail::normal_source source(seed);
  return detail::background("diffuse", "random q and k: the mass spread over every token", shape,
                            source);
}

// One key per KV head aligned with every query of its group (logit about 13 above the rest, most
// of the mass), at a random depth in the middle of the prompt; the observation queries ask for it
// too (the question is in the prompt).
inline workload needle(const synthetic_shape& shape, std::uint64_t seed) {
  detail::normal_source source(seed);
  workload w = detail::background(
      "needle", "one key per head aligned with the queries, at a random depth", shape, source);
  const std::vector<float> u = source.directions(w.kv_heads, w.head_dim);
  const auto direction = [&](std::int32_t h) { return u.data() + std::int64_t{h} * w.head_dim; };
  const auto at = static_cast<std::int64_t>(source.uniform(0.125, 0.875) * double(w.length - 1));
  constexpr double strength = 12.0;
  for (std::int32_t h = 0; h < w.kv_heads; ++h)
    detail::add(detail::key(w, at, h), direction(h), w.head_dim, strength);
  for (std::int64_t i = 0; i < w.observed + w.steps; ++i)
    detail::steer_queries(w, i, direction, strength);
  w.focus = at;
  return w;
}

// The first 4 keys and the last few dozen (a decay of 16 tokens) aligned with the queries: the
// mass on the attention sinks and the local window, as StreamingLLM observed it.
inline workload sink_local(const synthetic_shape& shape, std::uint64_t seed) {
  detail::normal_source source(seed);
  workload w = detail::background(
      "sink_local", "the first 4 keys and the most recent ones aligned with the queries", shape,
      source);
  const std::vector<float> u = source.directions(w.kv_heads, w.head_dim);
  const auto direction = [&](std::int32_t h) { return u.data() + std::int64_t{h} * w.head_dim; };
  constexpr double strength = 11.0;
  constexpr std::int64_t sinks = 4;
  constexpr double decay = 16.0;
  for (std::int64_t t = 0; t < w.length; ++t) {
    const double recency = std::exp(-double(w.length - 1 - t) / decay);
    const double scale = t < sinks ? strength : strength * recency;
    if (scale < 1e-3) continue;
    for (std::int32_t h = 0; h < w.kv_heads; ++h)
      detail::add(detail::key(w, t, h), direction(h), w.head_dim, scale);
  }
  for (std::int64_t i = 0; i < w.observed + w.steps; ++i)
    detail::steer_queries(w, i, direction, strength);
  return w;
}

// A topic per KV head: 1 key in 16 carries a direction at a random angle in the plane of two
// unit vectors u, v; the queries turn in that plane at a steady rate, from u (the first
// observation query) to v (the last evaluation query), so the keys they favour change from step
// to step and a selection made from earlier queries goes stale. The observation queries are
// consecutive steps; the evaluation queries every `stride`-th step after them.
inline workload drifting(const synthetic_shape& shape, std::uint64_t seed) {
  detail::normal_source source(seed);
  workload w = detail::background(
      "drifting", "queries turn slowly; each favours the keys at its own angle", shape, source);
  const std::vector<float> basis = source.directions(2 * w.kv_heads, w.head_dim);
  std::vector<float> turned(static_cast<std::size_t>(w.head_dim));
  // cos(angle) u_h + sin(angle) v_h, in `turned`.
  const auto at_angle = [&](std::int32_t h, double angle) {
    const float* u = basis.data() + std::int64_t{2 * h} * w.head_dim;
    const float* v = u + w.head_dim;
    for (std::int32_t d = 0; d < w.head_dim; ++d)
      turned[d] = static_cast<float>(std::cos(angle) * u[d] + std::sin(angle) * v[d]);
    return turned.data();
  };
  constexpr double strength = 10.0;
  constexpr double quarter_turn = std::numbers::pi / 2.0;
  for (std::int64_t t = 0; t < w.length; ++t) {
    if (source.uniform(0.0, 1.0) >= 1.0 / 16.0) continue;
    const double angle = source.uniform(0.0, quarter_turn);
    for (std::int32_t h = 0; h < w.kv_heads; ++h)
      detail::add(detail::key(w, t, h), at_angle(h, angle), w.head_dim, strength);
  }
  constexpr std::int64_t stride = 8;
  const auto step_of = [&](std::int64_t i) {
    return i < w.observed ? i : w.observed - 1 + (i - w.observed + 1) * stride;
  };
  const std::int64_t last = std::max<std::int64_t>(1, step_of(w.observed + w.steps - 1));
  for (std::int64_t i = 0; i < w.observed + w.steps; ++i) {
    const double angle = quarter_turn * double(step_of(i)) / double(last);
    detail::steer_queries(
        w, i, [&](std::int32_t h) { return at_angle(h, angle); }, strength);
  }
  return w;
}

}  // namespace infuse::eval
