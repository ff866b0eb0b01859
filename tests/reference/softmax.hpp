// Float64 references for softmax, log-sum-exp and softmax-weighted sums (attention over one query).
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <numbers>
#include <span>
#include <type_traits>
#include <vector>

#include "infuse/core/math.hpp"

namespace infuse::reference {

// log(sum_i exp(scale * scores[i])) in float64: -inf for no scores or only -inf. Pass
// scale = ln 2 for scores in base 2.
template <class T>
double log_sum_exp(std::span<const T> scores, double scale = 1.0) {
  double max = -INFINITY;
  for (const T score : scores) max = std::max(max, scale * static_cast<double>(score));
  if (max == -INFINITY) return -INFINITY;
  double sum = 0.0;
  for (const T score : scores) sum += std::exp(scale * static_cast<double>(score) - max);
  return max + std::log(sum);
}

// out[d] = sum_i softmax(scale * scores)_i * values[i * dim + d] for d < dim, in float64; all
// zeros when there is no finite score.
template <class T>
std::vector<double> softmax_weighted_sum(std::span<const T> scores, std::span<const T> values,
                                         std::size_t dim, double scale = 1.0) {
  std::vector<double> out(dim, 0.0);
  const double lse = log_sum_exp(scores, scale);
  if (lse == -INFINITY) return out;
  for (std::size_t i = 0; i < scores.size(); ++i) {
    const double probability = std::exp(scale * static_cast<double>(scores[i]) - lse);
    for (std::size_t d = 0; d < dim; ++d) {
      out[d] += probability * static_cast<double>(values[i * dim + d]);
    }
  }
  return out;
}

// The tests of infuse's online softmax run once per base: base_tag is a base as a doctest type
// parameter, and ln_base the scale that the references above take for scores in that base.
template <log_base Base>
using base_tag = std::integral_constant<log_base, Base>;

template <log_base Base>
constexpr double ln_base = Base == log_base::e ? 1.0 : std::numbers::ln2;

}  // namespace infuse::reference

TYPE_TO_STRING_AS("base e", infuse::reference::base_tag<infuse::log_base::e>);
TYPE_TO_STRING_AS("base 2", infuse::reference::base_tag<infuse::log_base::two>);
