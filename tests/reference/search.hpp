// Float64 references and statistics for the decoding-search tests: row statistics, the
// chi-square goodness-of-fit test, and the exact distributions the samplers must reproduce.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <span>
#include <vector>

namespace infuse::reference {

struct row_stats_ref {
  double entropy;
  double max_probability;
  double log_sum_exp;
  double margin;
  std::int64_t argmax;
};

// Two passes in float64: the maximum, then the normalised probabilities.
inline row_stats_ref row_stats(std::span<const float> logits) {
  double max = -INFINITY;
  double second = -INFINITY;
  std::int64_t argmax = -1;
  for (std::size_t x = 0; x < logits.size(); ++x) {
    const double value = logits[x];
    if (value > max) {
      second = max;
      max = value;
      argmax = static_cast<std::int64_t>(x);
    } else if (value > second) {
      second = value;
    }
  }
  double sum = 0.0;
  for (const float value : logits) sum += std::exp(value - max);
  double entropy = 0.0;
  for (const float value : logits) {
    const double p = std::exp(value - max) / sum;
    if (p > 0.0) entropy -= p * std::log(p);
  }
  return {entropy, 1.0 / sum, max + std::log(sum), max - second, argmax};
}

// Q(a, x) = Gamma(a, x) / Gamma(a), the regularized upper incomplete gamma function: the series of
// P(a, x) below x = a + 1, Lentz's continued fraction above it (the textbook split).
inline double upper_incomplete_gamma(double a, double x) {
  if (x <= 0.0) return 1.0;
  const double log_prefix = a * std::log(x) - x - std::lgamma(a);
  if (x < a + 1.0) {
    double term = 1.0 / a;
    double sum = term;
    for (int n = 1; n < 10000 && term > sum * 1e-16; ++n) {
      term *= x / (a + n);
      sum += term;
    }
    return 1.0 - sum * std::exp(log_prefix);
  }
  const double tiny = 1e-300;
  double b = x + 1.0 - a;
  double c = 1.0 / tiny;
  double d = 1.0 / b;
  double h = d;
  for (int i = 1; i < 10000; ++i) {
    const double an = -i * (i - a);
    b += 2.0;
    d = an * d + b;
    d = std::abs(d) < tiny ? tiny : d;
    c = b + an / c;
    c = std::abs(c) < tiny ? tiny : c;
    d = 1.0 / d;
    const double step = d * c;
    h *= step;
    if (std::abs(step - 1.0) < 1e-16) break;
  }
  return std::exp(log_prefix) * h;
}

struct chi_square_result {
  double statistic;
  int degrees_of_freedom;
  double p_value;  // the probability of a statistic at least this large under the hypothesis
};

// Pearson's chi-square test of observed counts against expected probabilities. Bins whose expected
// count is below 5 are pooled into one tail bin (the usual validity rule), so that tokens of tiny
// probability are still tested as a group.
inline chi_square_result chi_square(std::span<const std::int64_t> observed,
                                    std::span<const double> expected_probability) {
  REQUIRE(observed.size() == expected_probability.size());
  std::int64_t total = 0;
  for (const auto count : observed) total += count;
  double statistic = 0.0;
  int bins = 0;
  double tail_expected = 0.0;
  double tail_observed = 0.0;
  for (std::size_t i = 0; i < observed.size(); ++i) {
    const double expected = expected_probability[i] * static_cast<double>(total);
    if (expected < 5.0) {
      tail_expected += expected;
      tail_observed += static_cast<double>(observed[i]);
      continue;
    }
    const double diff = static_cast<double>(observed[i]) - expected;
    statistic += diff * diff / expected;
    ++bins;
  }
  if (tail_expected > 0.0 || tail_observed > 0.0) {
    // A tail of zero expectation with observations is an impossible outcome: p = 0.
    if (tail_expected == 0.0) return {INFINITY, bins, 0.0};
    const double diff = tail_observed - tail_expected;
    statistic += diff * diff / tail_expected;
    ++bins;
  }
  const int dof = std::max(bins - 1, 1);
  return {statistic, dof, upper_incomplete_gamma(dof / 2.0, statistic / 2.0)};
}

// Draws an index from a (not necessarily normalised) discrete distribution.
template <class Engine>
std::int32_t draw(std::span<const float> weights, Engine& engine) {
  double total = 0.0;
  for (const float w : weights) total += w;
  double target = std::uniform_real_distribution<double>(0.0, total)(engine);
  for (std::size_t i = 0; i < weights.size(); ++i) {
    target -= weights[i];
    if (target < 0.0) return static_cast<std::int32_t>(i);
  }
  return static_cast<std::int32_t>(weights.size() - 1);
}

// A random probability row of `vocab` entries, with a few tokens much likelier than the rest and
// some exact zeros, as a language model's rows look.
template <class Rng>
std::vector<float> random_probabilities(Rng& rng, std::size_t vocab, double spread = 2.0) {
  std::vector<double> weights(vocab);
  double total = 0.0;
  for (auto& w : weights) {
    w = rng.uniform() < 0.15 ? 0.0 : std::exp(rng.normal(0.0, spread));
    total += w;
  }
  if (total == 0.0) {
    weights[0] = 1.0;
    total = 1.0;
  }
  std::vector<float> row(vocab);
  for (std::size_t i = 0; i < vocab; ++i) row[i] = static_cast<float>(weights[i] / total);
  return row;
}

// Beam search as transformers' BeamSearchScorer runs it, in float64 over whole sequences: the
// reference for search::beam_step. A hypothesis is the generated tokens (without the EOS).
struct beam_hypothesis {
  double score;
  std::vector<std::int32_t> tokens;
};

struct beam_reference {
  int width;
  double length_penalty;
  int stopping;  // 0 heuristic (False), 1 exact (True), 2 never
  std::int32_t eos;
  std::int64_t max_generated_length;

  std::vector<std::vector<std::int32_t>> beams;  // the live sequences
  std::vector<double> beam_scores;
  std::vector<beam_hypothesis> pool;  // in transformers' list order
  double worst = 1e9;
  bool done = false;

  // transformers' BeamHypotheses.add: append, and past `width` delete the worst
  void add(double score, std::vector<std::int32_t> tokens) {
    if (static_cast<int>(pool.size()) < width || score > worst) {
      pool.push_back({score, std::move(tokens)});
      if (static_cast<int>(pool.size()) > width) {
        std::size_t worst_index = 0;
        for (std::size_t i = 1; i < pool.size(); ++i) {
          if (pool[i].score < pool[worst_index].score) worst_index = i;
        }
        pool.erase(pool.begin() + static_cast<std::ptrdiff_t>(worst_index));
        worst = pool[0].score;
        for (const auto& h : pool) worst = std::min(worst, h.score);
      } else {
        worst = std::min(score, worst);
      }
    }
  }

  // One step; `logits[b]` is beam b's row. generated_length counts this step's token.
  void step(const std::vector<std::vector<float>>& logits, std::int64_t generated_length) {
    if (done) return;
    struct candidate {
      double score;
      int beam;
      std::int32_t token;
    };
    std::vector<candidate> all;
    for (int b = 0; b < width; ++b) {
      double max = -INFINITY;
      for (const float l : logits[b]) max = std::max<double>(max, l);
      double sum = 0.0;
      for (const float l : logits[b]) sum += std::exp(l - max);
      const double lse = max + std::log(sum);
      for (std::size_t x = 0; x < logits[b].size(); ++x) {
        all.push_back({beam_scores[b] + logits[b][x] - lse, b, static_cast<std::int32_t>(x)});
      }
    }
    std::stable_sort(all.begin(), all.end(),
                     [](const candidate& a, const candidate& b) { return a.score > b.score; });
    all.resize(2 * static_cast<std::size_t>(width));
    std::vector<std::vector<std::int32_t>> next_beams;
    std::vector<double> next_scores;
    for (int rank = 0; rank < 2 * width && static_cast<int>(next_beams.size()) < width; ++rank) {
      const candidate& c = all[rank];
      if (c.token == eos) {
        if (rank >= width) continue;
        add(c.score / std::pow(static_cast<double>(generated_length), length_penalty),
            beams[c.beam]);
      } else {
        auto sequence = beams[c.beam];
        sequence.push_back(c.token);
        next_beams.push_back(std::move(sequence));
        next_scores.push_back(c.score);
      }
    }
    beams = std::move(next_beams);
    beam_scores = std::move(next_scores);
    if (static_cast<int>(pool.size()) < width) return;
    if (stopping == 1) {
      done = true;
      return;
    }
    const std::int64_t length =
        stopping == 2 && length_penalty > 0.0 ? max_generated_length : generated_length;
    done = worst >= all[0].score / std::pow(static_cast<double>(length), length_penalty);
  }
};

}  // namespace infuse::reference
