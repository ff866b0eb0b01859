// sparse::coverage<MassPercent>: ZipVL's rule, the smallest set of pages whose attention mass
// reaches a share of the whole. The mass is not known before the scores are, so it is estimated
// from the Quest bound b(page) of q·k (sparse::quest): every token of the page is taken to score
// its page's bound, so
//   mass(page) ~ tokens(page) * exp(scale * b(page)),  normalised over the sequence's pages,
// an upper-bound-weighted softmax over the pages. The pages are taken from the largest estimate
// down until their share reaches params::share; the last page (the query's own token) is always
// read. MassPercent is the default share in percent. See docs/policies.md#sparsity-policies.
#pragma once

#include <cmath>
#include <cstdint>
#include <string_view>

#include "infuse/core/config.hpp"
#include "infuse/core/error.hpp"
#include "infuse/sparse/policy.hpp"
#include "infuse/sparse/quest.hpp"

namespace infuse::sparse {

template <int MassPercent>
struct coverage {
  static_assert(MassPercent >= 1 && MassPercent <= 100,
                "infuse: sparse::coverage<MassPercent> takes a share from 1 to 100 percent; see "
                "docs/policies.md#sparsity-policies");
  using identifier = policy_identifier;
  static constexpr const char* name = "coverage";
  static constexpr bool needs_key_bounds = true;
  static constexpr std::int64_t scratch_floats_per_page = 1;

  struct params {
    float share = static_cast<float>(MassPercent) / 100.0f;  // (0, 1]
  };

  static void check(const params& p, std::string_view call) {
    require(p.share > 0.0f && p.share <= 1.0f, call, "sparsity.share", p.share,
            "a share of the attention mass in (0, 1]");
  }

  INFUSE_HOST_DEVICE static std::int64_t max_ranges(const params&, const query_context& q) {
    return detail::context_pages(q);
  }

  INFUSE_HOST_DEVICE static std::int64_t select(const params& p, const query_context& q,
                                                token_range* out) {
    const std::int64_t pages = detail::context_pages(q);
    if (pages == 0) return 0;
    if (q.scratch_floats < pages) {
      out[0] = {0, q.length};
      return 1;
    }
    float* mass = q.scratch;
    float top = -INFINITY;
    for (std::int64_t i = 0; i < pages; ++i) {
      mass[i] = q.scale * detail::page_bound(q, i);
      top = fmaxf(top, mass[i]);
    }
    if (!(top < INFINITY)) {  // an unbounded page: no estimate ranks the others
      out[0] = {0, q.length};
      return 1;
    }
    float total = 0.0f;
    for (std::int64_t i = 0; i < pages; ++i) {
      const std::int64_t begin = i * q.page_size;
      const std::int64_t tokens = (begin + q.page_size < q.length ? q.page_size : q.length - begin);
      mass[i] = static_cast<float>(tokens) * expf(mass[i] - top);
      total += mass[i];
    }
    // The largest threshold t whose pages {mass >= t} hold the share: the mass above t falls as
    // t grows, so bisect between 0 and the largest page mass.
    const float goal = p.share * total;
    float lo = 0.0f;
    float hi = 0.0f;
    for (std::int64_t i = 0; i < pages; ++i) hi = fmaxf(hi, mass[i]);
    for (int step = 0; step < 48 && lo < hi; ++step) {
      const float mid = 0.5f * (lo + hi);
      float held = 0.0f;
      for (std::int64_t i = 0; i < pages; ++i) held += mass[i] >= mid ? mass[i] : 0.0f;
      if (held >= goal) {
        lo = mid;
      } else {
        hi = mid;
      }
      if (mid == lo && mid == hi) break;
    }
    return detail::pages_to_ranges(
        q, pages, [&](std::int64_t i) { return mass[i] >= lo; }, out);
  }

  INFUSE_HOST_DEVICE static bool visible(const params&, const mask_context& m) {
    return m.key_position <= m.query_position;
  }
};

static_assert(policy<coverage<90>>,
              "infuse: sparse::coverage must satisfy sparse::policy; see "
              "docs/policies.md#sparsity-policies");

}  // namespace infuse::sparse
