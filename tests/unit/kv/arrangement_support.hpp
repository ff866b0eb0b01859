// What the tests of the KIVI (kv::per_channel keys) and ZipVL (kv::mixed records) arrangements
// share: the error bound of an integer scheme over a group, random rows, and appending them.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "infuse/core/view.hpp"
#include "infuse/exec/cpu.hpp"
#include "infuse/kv/kv.hpp"
#include "infuse/quant/quant.hpp"
#include "support/random.hpp"

namespace infuse::test {

// How far a value of a group of `count` floats may be stored from it by quant::int_ scheme S,
// from the scheme's math: half a step for symmetric codes; a whole step with a zero point (the
// rounded zero can push the group's end one code past the top, which clamps). The group's range
// always holds 0 (padding and the fit's convention).
template <class S>
double int_bound(const float* group, std::int64_t count) {
  double lo = 0.0, hi = 0.0;
  for (std::int64_t i = 0; i < count; ++i) {
    lo = std::min(lo, double(group[i]));
    hi = std::max(hi, double(group[i]));
  }
  const double amax = std::max(hi, -lo);
  const double step = S::has_zero ? (hi - lo) / S::max_code : amax / (S::midpoint - 1) * 0.5;
  return step * (1 + 1e-5) + 1e-6 * amax;
}

// The bound of element d of a vector of head_dim floats stored per token by S (groups along it).
template <class S>
double vector_bound(const float* vector, int head_dim, int d) {
  const int group = S::group > 0 ? S::group : head_dim;
  const int first = d / group * group;
  return int_bound<S>(vector + first, std::min(group, head_dim - first));
}

// Rows of fresh normal keys and values for `rows` tokens, with an outlier channel in the keys as
// real keys have (the case per-channel grouping is for).
struct rows_data {
  std::vector<float> k;  // (rows, k.heads, k.head_dim)
  std::vector<float> v;  // (rows, v.heads, v.head_dim)
};

template <class Format>
rows_data random_rows(seeded_rng& rng, const Format& format, std::int64_t rows) {
  rows_data data;
  data.k = rng.normals(static_cast<std::size_t>(rows * format.k.heads * format.k.head_dim));
  data.v = rng.normals(static_cast<std::size_t>(rows * format.v.heads * format.v.head_dim), 2.0);
  for (std::int64_t r = 0; r < rows * format.k.heads; ++r) {
    data.k[static_cast<std::size_t>(r * format.k.head_dim)] *= 16.0f;
  }
  return data;
}

template <class Format>
host_view<const float, 3> k_rows(const rows_data& data, const Format& format) {
  const auto rows = static_cast<std::int64_t>(data.k.size()) / (format.k.heads * format.k.head_dim);
  return host_view<const float, 3>(data.k.data(), {rows, format.k.heads, format.k.head_dim});
}
template <class Format>
host_view<const float, 3> v_rows(const rows_data& data, const Format& format) {
  const auto rows = static_cast<std::int64_t>(data.v.size()) / (format.v.heads * format.v.head_dim);
  return host_view<const float, 3>(data.v.data(), {rows, format.v.heads, format.v.head_dim});
}

}  // namespace infuse::test
