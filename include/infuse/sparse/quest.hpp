// sparse::quest<TopKPages>: Quest's page selection. Each page of the cache keeps the per-channel
// minimum and maximum of its keys (cache_view::key_min / key_max); for a query q the largest
// q·k any key of the page can reach is at most
//   bound(page) = sum_d max(q_d * min_d, q_d * max_d),
// and for the group of query heads sharing a KV head the largest bound over the group. The query
// reads the `pages` pages of highest bound, the last page (which holds its own token) always
// among them. TopKPages is the default of params::pages. See docs/policies.md#sparsity-policies.
#pragma once

#include <cmath>
#include <cstdint>
#include <string_view>

#include "infuse/core/config.hpp"
#include "infuse/core/error.hpp"
#include "infuse/sparse/policy.hpp"
#if !defined(__CUDA_ARCH__)
#include "infuse/sparse/cpu/page_bound.hpp"
#endif

namespace infuse::sparse {

namespace detail {

// Pages of the sequence a query context describes.
INFUSE_HOST_DEVICE inline std::int64_t context_pages(const query_context& q) {
  return q.page_size > 0 ? (q.length + q.page_size - 1) / q.page_size : 0;
}

// The Quest bound of q·k (unscaled) over page i (0 <= i < pages) of the sequence: the largest over
// the group's query heads. A NaN bound (a NaN query) reads as +inf, so the page is kept. The CPU
// computes the same sum in the same order in registers (sparse/cpu/page_bound.hpp).
INFUSE_HOST_DEVICE inline float page_bound(const query_context& q, std::int64_t i) {
  std::int32_t page = q.pages[i];
#if defined(__CUDA_ARCH__)
  page = page < 0 ? 0 : page < q.pool_pages ? page : q.pool_pages - 1;
#endif
  const std::int64_t base = (std::int64_t{page} * q.kv_heads + q.kv_head) * q.head_dim;
  const half* lo = q.key_min + base;
  const half* hi = q.key_max + base;
#if !defined(__CUDA_ARCH__)
  return cpu::page_bound(q.q, q.group, q.head_dim, lo, hi);
#else
  // Sixteen partial sums, lane by lane: a loop compilers vectorize without reassociating a sum.
  constexpr int lanes = 16;
  float best = -INFINITY;
  for (std::int32_t g = 0; g < q.group; ++g) {
    const float* qg = q.q + std::int64_t{g} * q.head_dim;
    float part[lanes] = {};
    std::int32_t d = 0;
    for (; d + lanes <= q.head_dim; d += lanes) {
      for (int l = 0; l < lanes; ++l) {
        const float a = qg[d + l] * static_cast<float>(lo[d + l]);
        const float b = qg[d + l] * static_cast<float>(hi[d + l]);
        part[l] += a > b ? a : b;
      }
    }
    for (; d < q.head_dim; ++d) {
      part[0] += fmaxf(qg[d] * static_cast<float>(lo[d]), qg[d] * static_cast<float>(hi[d]));
    }
    float sum = 0.0f;
    for (int l = 0; l < lanes; ++l) sum += part[l];
    best = sum != sum ? INFINITY : fmaxf(best, sum);
  }
  return best;
#endif
}

#if !defined(__CUDA_ARCH__)
// Pages whose bounds the CPU requests before it reads them: the pages lie anywhere in the pool,
// so the hardware prefetchers cannot find the next page's bounds.
inline constexpr std::int64_t bounds_ahead = 4;

// Requests the key bounds of page i of the sequence.
inline void prefetch_bounds(const query_context& q, std::int64_t i) {
  const std::int64_t base = (std::int64_t{q.pages[i]} * q.kv_heads + q.kv_head) * q.head_dim;
  for (std::int32_t d = 0; d < q.head_dim; d += 32) {  // a 64-byte line of halves
    __builtin_prefetch(q.key_min + base + d);
    __builtin_prefetch(q.key_max + base + d);
  }
}
#endif

// The value of rank `k` (0 = largest) of values[0, n), reordering values: an in-place quickselect
// that a device can run too.
INFUSE_HOST_DEVICE inline float select_rank(float* values, std::int64_t n, std::int64_t k) {
  std::int64_t lo = 0;
  std::int64_t hi = n - 1;
  while (lo < hi) {
    const float pivot = values[lo + (hi - lo) / 2];
    std::int64_t i = lo;
    std::int64_t j = hi;
    while (i <= j) {
      while (values[i] > pivot) ++i;
      while (values[j] < pivot) --j;
      if (i <= j) {
        const float t = values[i];
        values[i++] = values[j];
        values[j--] = t;
      }
    }
    if (k <= j) {
      hi = j;
    } else if (k >= i) {
      lo = i;
    } else {
      break;
    }
  }
  return values[k];
}

// Writes the pages i with keep(i) (the last page always) as ascending token ranges, joining
// neighbours; returns the count.
template <class Keep>
INFUSE_HOST_DEVICE std::int64_t pages_to_ranges(const query_context& q, std::int64_t pages,
                                                Keep&& keep, token_range* out) {
  std::int64_t count = 0;
  for (std::int64_t i = 0; i < pages; ++i) {
    if (i != pages - 1 && !keep(i)) continue;
    const std::int64_t begin = i * q.page_size;
    const std::int64_t end = begin + q.page_size < q.length ? begin + q.page_size : q.length;
    if (count > 0 && out[count - 1].end == begin) {
      out[count - 1].end = end;
    } else {
      out[count++] = {begin, end};
    }
  }
  return count;
}

}  // namespace detail

template <int TopKPages>
struct quest {
  static_assert(TopKPages >= 1,
                "infuse: sparse::quest<TopKPages> reads at least one page; see "
                "docs/policies.md#sparsity-policies");
  using identifier = policy_identifier;
  static constexpr const char* name = "quest";
  // The kernel checks that the cache keeps key_min and key_max.
  static constexpr bool needs_key_bounds = true;
  // Floats of scratch select() needs per page of the sequence.
  static constexpr std::int64_t scratch_floats_per_page = 2;

  struct params {
    std::int64_t pages = TopKPages;  // pages read per query, the last page included
  };

  static void check(const params& p, std::string_view call) {
    require(p.pages >= 1, call, "sparsity.pages", p.pages, "at least 1 (the top-K page count)");
  }

  INFUSE_HOST_DEVICE static std::int64_t max_ranges(const params& p, const query_context& q) {
    const std::int64_t pages = detail::context_pages(q);
    return pages < p.pages ? pages : p.pages;
  }

  INFUSE_HOST_DEVICE static std::int64_t select(const params& p, const query_context& q,
                                                token_range* out) {
    const std::int64_t pages = detail::context_pages(q);
    if (pages == 0) return 0;
    const std::int64_t others = pages - 1;  // candidates beside the last page
    const std::int64_t wanted = p.pages - 1;
    if (wanted >= others || q.scratch_floats < 2 * pages) {
      out[0] = {0, q.length};  // every page fits in the budget (or no room to rank them)
      return 1;
    }
    float* bounds = q.scratch;
    float* ranked = q.scratch + pages;
    for (std::int64_t i = 0; i < others; ++i) {
#if !defined(__CUDA_ARCH__)
      if (i + detail::bounds_ahead < others) detail::prefetch_bounds(q, i + detail::bounds_ahead);
#endif
      ranked[i] = bounds[i] = detail::page_bound(q, i);
    }
    // With a budget of the last page alone no bound passes an infinite threshold. (One path for
    // both: an early return here crashes CUDA 13.0's device compiler.)
    const float threshold =
        wanted == 0 ? INFINITY : detail::select_rank(ranked, others, wanted - 1);
    // Pages above the threshold, then ties in page order until the budget is met.
    std::int64_t above = 0;
    for (std::int64_t i = 0; i < others; ++i) above += bounds[i] > threshold ? 1 : 0;
    std::int64_t ties = wanted - above;
    return detail::pages_to_ranges(
        q, pages,
        [&](std::int64_t i) {
          if (bounds[i] > threshold) return true;
          if (bounds[i] == threshold && ties > 0) {
            --ties;
            return true;
          }
          return false;
        },
        out);
  }

  INFUSE_HOST_DEVICE static bool visible(const params&, const mask_context& m) {
    return m.key_position <= m.query_position;
  }
};

static_assert(policy<quest<16>>,
              "infuse: sparse::quest must satisfy sparse::policy; see "
              "docs/policies.md#sparsity-policies");

}  // namespace infuse::sparse
