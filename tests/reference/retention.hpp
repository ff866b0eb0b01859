// Float64 references of the KV retention rules, written from their published definitions: the
// kept positions (ascending) of StreamingLLM, H2O and SnapKV, and Elastic Cache / D2O's merge.
// Ranking: the higher score first, the lower position among equal scores, NaN last.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace infuse::reference {

// The `count` best positions of `candidates` by score[p], returned ascending. A full sort.
inline std::vector<std::int32_t> best_positions(std::vector<std::int32_t> candidates,
                                                const std::vector<double>& score,
                                                std::int64_t count) {
  const auto value = [&](std::int32_t p) {
    return std::isnan(score[static_cast<std::size_t>(p)]) ? -INFINITY
                                                          : score[static_cast<std::size_t>(p)];
  };
  std::sort(candidates.begin(), candidates.end(), [&](std::int32_t a, std::int32_t b) {
    return value(a) != value(b) ? value(a) > value(b) : a < b;
  });
  candidates.resize(static_cast<std::size_t>(count));
  std::sort(candidates.begin(), candidates.end());
  return candidates;
}

// StreamingLLM: the attention sinks and the recent window.
inline std::vector<std::int32_t> streaming(std::int64_t length, std::int64_t sink,
                                           std::int64_t window) {
  std::vector<std::int32_t> kept;
  for (std::int64_t p = 0; p < length; ++p) {
    if (p < sink || p >= length - window) kept.push_back(static_cast<std::int32_t>(p));
  }
  return kept;
}

// H2O: mass (length x heads, row-major) summed over heads; the `recent` last tokens, then the
// heaviest of the others up to `budget`.
inline std::vector<std::int32_t> heavy_hitter(const std::vector<float>& mass, std::int64_t length,
                                              std::int64_t heads, std::int64_t budget,
                                              std::int64_t recent) {
  std::vector<double> score(static_cast<std::size_t>(length), 0.0);
  for (std::int64_t t = 0; t < length; ++t) {
    for (std::int64_t h = 0; h < heads; ++h)
      score[t] += mass[static_cast<std::size_t>(t * heads + h)];
  }
  std::vector<std::int32_t> older;
  for (std::int64_t p = 0; p < length - recent; ++p) older.push_back(static_cast<std::int32_t>(p));
  std::vector<std::int32_t> kept = best_positions(older, score, budget - recent);
  for (std::int64_t p = length - recent; p < length; ++p)
    kept.push_back(static_cast<std::int32_t>(p));
  return kept;
}

// SnapKV: observation (window x heads x prefix, row-major) summed over queries and heads, pooled
// over `pool` positions [i - pool/2, i - pool/2 + pool) (max, or sum / pool), the best
// budget - window prefix positions and the window.
inline std::vector<std::int32_t> snapkv(const std::vector<float>& observation, std::int64_t window,
                                        std::int64_t heads, std::int64_t prefix,
                                        std::int64_t budget, std::int64_t pool, bool max_pool) {
  std::vector<double> summed(static_cast<std::size_t>(prefix), 0.0);
  for (std::int64_t i = 0; i < prefix; ++i) {
    for (std::int64_t q = 0; q < window; ++q) {
      for (std::int64_t h = 0; h < heads; ++h) {
        summed[i] += observation[static_cast<std::size_t>((q * heads + h) * prefix + i)];
      }
    }
  }
  std::vector<double> pooled(static_cast<std::size_t>(prefix));
  std::vector<std::int32_t> candidates;
  for (std::int64_t i = 0; i < prefix; ++i) {
    double best = -INFINITY;
    double sum = 0.0;
    for (std::int64_t j = i - pool / 2; j < i - pool / 2 + pool; ++j) {
      if (j < 0 || j >= prefix) continue;
      best = std::max(best, summed[j]);
      sum += summed[j];
    }
    pooled[i] = max_pool ? best : sum / static_cast<double>(pool);
    candidates.push_back(static_cast<std::int32_t>(i));
  }
  std::vector<std::int32_t> kept = best_positions(candidates, pooled, budget - window);
  for (std::int64_t p = prefix; p < prefix + window; ++p)
    kept.push_back(static_cast<std::int32_t>(p));
  return kept;
}

struct merged_tokens {
  std::vector<double> keys;                        // (kept, key_dims) the kept tokens after merging
  std::vector<double> values;                      // (kept, value_dims)
  std::vector<std::int32_t> counts;                // (kept)
  std::vector<std::vector<std::int32_t>> members;  // (kept) the evicted positions folded in
};

// Elastic Cache / D2O: each evicted token goes to the kept token of highest cosine similarity of
// keys (the first among equals; 0 for a zero key) when it is at least `threshold`; a receiving
// kept token becomes the count-weighted mean. keys (length, key_dims), values (length,
// value_dims), counts (length).
inline merged_tokens merge(const std::vector<float>& keys, const std::vector<float>& values,
                           const std::vector<std::int32_t>& counts, std::int64_t key_dims,
                           std::int64_t value_dims, const std::vector<std::int32_t>& kept,
                           double threshold) {
  const auto length = static_cast<std::int64_t>(counts.size());
  const auto m = static_cast<std::int64_t>(kept.size());
  const auto dot = [&](std::int64_t a, std::int64_t b) {
    double sum = 0.0;
    for (std::int64_t d = 0; d < key_dims; ++d)
      sum += double{keys[a * key_dims + d]} * keys[b * key_dims + d];
    return sum;
  };
  merged_tokens out;
  out.keys.assign(static_cast<std::size_t>(m * key_dims), 0.0);
  out.values.assign(static_cast<std::size_t>(m * value_dims), 0.0);
  out.counts.assign(static_cast<std::size_t>(m), 0);
  out.members.resize(static_cast<std::size_t>(m));
  std::vector<double> weight(static_cast<std::size_t>(m), 0.0);
  const auto add = [&](std::int64_t j, std::int64_t t) {
    for (std::int64_t d = 0; d < key_dims; ++d)
      out.keys[j * key_dims + d] += counts[t] * double{keys[t * key_dims + d]};
    for (std::int64_t d = 0; d < value_dims; ++d) {
      out.values[j * value_dims + d] += counts[t] * double{values[t * value_dims + d]};
    }
    weight[j] += counts[t];
  };
  for (std::int64_t j = 0; j < m; ++j) add(j, kept[j]);
  for (std::int64_t t = 0; t < length; ++t) {
    if (std::find(kept.begin(), kept.end(), t) != kept.end()) continue;
    double best = -INFINITY;
    std::int64_t best_j = -1;
    for (std::int64_t j = 0; j < m; ++j) {
      const double tt = dot(t, t);
      const double kk = dot(kept[j], kept[j]);
      const double similarity =
          tt > 0.0 && kk > 0.0 ? dot(t, kept[j]) / (std::sqrt(tt) * std::sqrt(kk)) : 0.0;
      if (similarity > best) {
        best = similarity;
        best_j = j;
      }
    }
    if (best >= threshold) {
      add(best_j, t);
      out.members[best_j].push_back(static_cast<std::int32_t>(t));
    }
  }
  for (std::int64_t j = 0; j < m; ++j) {
    for (std::int64_t d = 0; d < key_dims; ++d) out.keys[j * key_dims + d] /= weight[j];
    for (std::int64_t d = 0; d < value_dims; ++d) out.values[j * value_dims + d] /= weight[j];
    out.counts[j] = static_cast<std::int32_t>(weight[j]);
  }
  return out;
}

}  // namespace infuse::reference
