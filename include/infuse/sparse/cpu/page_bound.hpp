// The CPU body of the Quest page bound (sparse/quest.hpp, detail::page_bound): the same sum in
// the same order, the key bounds widened from half a vector at a time. A query-aware selection
// reads every page's bounds, so this loop runs at memory speed only when it converts and
// multiplies in registers (the portable loop converts each half in software).
#pragma once

#include <hwy/highway.h>

#include <cmath>
#include <cstdint>

#include "infuse/core/config.hpp"
#include "infuse/core/float_types.hpp"

namespace infuse::sparse::cpu {

namespace hn = hwy::HWY_NAMESPACE;

// Sixteen partial sums: part[l] adds max(q_d * lo_d, q_d * hi_d) over d = l, l + 16, ... in
// order, and the rest of the dims (head_dim % 16) go to part[0]; the bound of a row is
// part[0] + ... + part[15] in order. The largest over the group's rows; a NaN row reads as +inf.
inline float page_bound(const float* q, std::int32_t group, std::int32_t head_dim, const half* lo,
                        const half* hi) {
  constexpr int lanes = 16;
  const hn::CappedTag<float, lanes> d;
  const hn::Rebind<hwy::float16_t, decltype(d)> dh;
  constexpr int n = static_cast<int>(hn::MaxLanes(d));
  static_assert(lanes % n == 0, "whole vectors per sixteen lanes");
  const auto* low = reinterpret_cast<const hwy::float16_t*>(lo);
  const auto* high = reinterpret_cast<const hwy::float16_t*>(hi);
  float best = -INFINITY;
  for (std::int32_t g = 0; g < group; ++g) {
    const float* qg = q + std::int64_t{g} * head_dim;
    hn::Vec<decltype(d)> part[lanes / n];
    for (auto& p : part) p = hn::Zero(d);
    std::int32_t at = 0;
    for (; at + lanes <= head_dim; at += lanes) {
      for (int v = 0; v < lanes / n; ++v) {
        const int e = at + v * n;
        const auto query = hn::LoadU(d, qg + e);
        const auto a = hn::Mul(query, hn::PromoteTo(d, hn::LoadU(dh, low + e)));
        const auto b = hn::Mul(query, hn::PromoteTo(d, hn::LoadU(dh, high + e)));
        // max(a, b) as a > b ? a : b: a NaN product gives b, as the portable loop does.
        part[v] = hn::Add(part[v], hn::IfThenElse(hn::Gt(a, b), a, b));
      }
    }
    alignas(64) float sums[lanes];
    for (int v = 0; v < lanes / n; ++v) hn::Store(part[v], d, sums + v * n);
    for (; at < head_dim; ++at) {
      sums[0] += fmaxf(qg[at] * static_cast<float>(lo[at]), qg[at] * static_cast<float>(hi[at]));
    }
    float sum = 0.0f;
    for (float s : sums) sum += s;
    best = sum != sum ? INFINITY : fmaxf(best, sum);
  }
  return best;
}

}  // namespace infuse::sparse::cpu
