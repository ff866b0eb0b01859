// Quickstart: one attention query over a long KV sequence, built from infuse's core pieces.
//
// The sequence is split into one chunk per task; each chunk runs an online softmax over its keys
// (infuse::softmax_state) on exec::cpu's threads, and the normalised partial outputs merge exactly
// by log-sum-exp (infuse::merge_partials): the split-KV decode that infuse's attention kernels
// fuse. The KV element type is a template parameter, so the same code reads float, half,
// bfloat16 or fp8 storage. Inputs come from the keyed Philox generator, so every run and every
// backend sees the same numbers. The result is checked against a float64 two-pass softmax.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <infuse/infuse.hpp>
#include <vector>

namespace {

constexpr std::int64_t sequence = 16384;  // keys
constexpr std::int64_t head_dim = 128;

template <class KV>
using matrix = infuse::host_view<const KV, 2>;  // (sequence, head_dim)

// The normalised softmax-weighted sum of values over keys [begin, end) into out, and its lse.
template <class KV>
float attend_chunk(const float* q, matrix<KV> keys, matrix<KV> values, std::int64_t begin,
                   std::int64_t end, float scale, float* out) {
  infuse::softmax_state<infuse::log_base::e> state;
  for (std::int64_t d = 0; d < head_dim; ++d) out[d] = 0.0f;
  for (std::int64_t t = begin; t < end; ++t) {
    float score = 0.0f;
    for (std::int64_t d = 0; d < head_dim; ++d) score += q[d] * static_cast<float>(keys(t, d));
    const infuse::softmax_rescale step = state.add(score * scale);
    for (std::int64_t d = 0; d < head_dim; ++d) {
      out[d] = out[d] * step.previous + step.incoming * static_cast<float>(values(t, d));
    }
  }
  for (std::int64_t d = 0; d < head_dim; ++d) out[d] *= state.inverse_sum();
  return state.natural_lse();
}

// Draws n standard normals from the request's keyed stream, stored as T.
template <class T>
std::vector<T> normals(std::uint64_t seed, std::uint64_t stream, std::int64_t n) {
  const infuse::rng::philox generator(seed, stream);
  std::vector<T> values(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; i += 4) {
    const infuse::rng::u32x4 bits = generator.bits(static_cast<std::uint64_t>(i / 4));
    const auto [a, b] = infuse::rng::standard_normal_pair(bits.word[0], bits.word[1]);
    const auto [c, e] = infuse::rng::standard_normal_pair(bits.word[2], bits.word[3]);
    const float drawn[4] = {a, b, c, e};
    for (std::int64_t j = 0; j < 4 && i + j < n; ++j) values[i + j] = T(drawn[j]);
  }
  return values;
}

template <class KV>
bool run(const char* name, const infuse::exec::cpu& exec) {
  const std::uint64_t seed = 2026;
  const std::vector<float> q = normals<float>(seed, 0, head_dim);
  const std::vector<KV> key_data = normals<KV>(seed, 1, sequence * head_dim);
  const std::vector<KV> value_data = normals<KV>(seed, 2, sequence * head_dim);
  const matrix<KV> keys(key_data.data(), {sequence, head_dim});
  const matrix<KV> values(value_data.data(), {sequence, head_dim});
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));

  const std::int64_t chunks = exec.threads() * 4;
  std::vector<float> partials(static_cast<std::size_t>(chunks * head_dim));
  std::vector<float> lses(static_cast<std::size_t>(chunks));
  std::vector<float> out(static_cast<std::size_t>(head_dim));

  const auto start = std::chrono::steady_clock::now();
  exec.parallel_for(chunks, [&](std::int64_t c) {
    lses[c] = attend_chunk(q.data(), keys, values, c * sequence / chunks,
                           (c + 1) * sequence / chunks, scale, &partials[c * head_dim]);
  });
  const float lse =
      infuse::merge_partials(partials.data(), head_dim, lses.data(), chunks, out.data(), head_dim);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  // float64 reference over the same stored values: two passes, max first.
  std::vector<double> scores(sequence);
  double max_score = -INFINITY;
  for (std::int64_t t = 0; t < sequence; ++t) {
    double dot = 0.0;
    for (std::int64_t d = 0; d < head_dim; ++d) dot += double(q[d]) * double(float(keys(t, d)));
    scores[t] = dot * scale;
    max_score = std::max(max_score, scores[t]);
  }
  double sum = 0.0;
  std::vector<double> expected(head_dim, 0.0);
  for (std::int64_t t = 0; t < sequence; ++t) {
    const double weight = std::exp(scores[t] - max_score);
    sum += weight;
    for (std::int64_t d = 0; d < head_dim; ++d) expected[d] += weight * double(float(values(t, d)));
  }
  double error = 0.0, norm = 0.0;
  for (std::int64_t d = 0; d < head_dim; ++d) {
    error += std::pow(out[d] - expected[d] / sum, 2);
    norm += std::pow(expected[d] / sum, 2);
  }
  const double relative = std::sqrt(error / norm);
  const double lse_error = std::abs(lse - (max_score + std::log(sum)));
  const double kv_bytes = 2.0 * sequence * head_dim * sizeof(KV);
  const bool ok = relative < 1e-4 && lse_error < 1e-3;
  std::printf("%-9s %zu-byte KV %6.2f MB  %7.2f ms  relative error %.1e  lse %.4f  %s\n", name,
              sizeof(KV), kv_bytes / 1e6, seconds * 1e3, relative, lse, ok ? "ok" : "WRONG");
  return ok;
}

}  // namespace

int main() {
  const infuse::exec::cpu exec;  // all of OpenMP's threads
  std::printf(
      "infuse %d.%d.%d quickstart: one query, %lld keys of dimension %lld, %lld chunks on "
      "%d threads,\nmerged by log-sum-exp and checked against a float64 softmax\n",
      INFUSE_VERSION_MAJOR, INFUSE_VERSION_MINOR, INFUSE_VERSION_PATCH,
      static_cast<long long>(sequence), static_cast<long long>(head_dim),
      static_cast<long long>(exec.threads() * 4), exec.threads());
  bool ok = run<float>("float", exec);
  ok &= run<infuse::half>("half", exec);
  ok &= run<infuse::bfloat16>("bfloat16", exec);
  ok &= run<infuse::fp8_e4m3>("fp8 e4m3", exec);
  ok &= run<infuse::fp8_e5m2>("fp8 e5m2", exec);
  return ok ? 0 : 1;
}
