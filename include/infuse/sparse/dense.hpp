// sparse::dense (every token: bidirectional attention, and decode's default) and sparse::causal
// (every token up to the query's own position). See docs/policies.md#sparsity-policies.
#pragma once

#include <cstdint>
#include <string_view>

#include "infuse/core/config.hpp"
#include "infuse/sparse/policy.hpp"

namespace infuse::sparse {

namespace detail {

// Selects tokens [0, end) for every query: the shared part of dense and causal.
struct prefix_selection {
  using identifier = policy_identifier;
  struct params {};
  static void check(const params&, std::string_view) {}
  INFUSE_HOST_DEVICE static std::int64_t max_ranges(const params&, const query_context&) {
    return 1;
  }
};

}  // namespace detail

struct dense : detail::prefix_selection {
  static constexpr const char* name = "dense";
  INFUSE_HOST_DEVICE static std::int64_t select(const params&, const query_context& q,
                                                token_range* out) {
    if (q.length == 0) return 0;
    out[0] = {0, q.length};
    return 1;
  }
  INFUSE_HOST_DEVICE static bool visible(const params&, const mask_context&) { return true; }
};

struct causal : detail::prefix_selection {
  static constexpr const char* name = "causal";
  INFUSE_HOST_DEVICE static std::int64_t select(const params&, const query_context& q,
                                                token_range* out) {
    const std::int64_t end = q.query_end < q.length ? q.query_end : q.length;
    if (end <= 0) return 0;
    out[0] = {0, end};
    return 1;
  }
  INFUSE_HOST_DEVICE static bool visible(const params&, const mask_context& m) {
    return m.key_position <= m.query_position;
  }
};

static_assert(policy<dense>);
static_assert(policy<causal>);

}  // namespace infuse::sparse
