// sparse::window: StreamingLLM's rule. A query sees the first `sink` tokens of its sequence and the
// `window` tokens ending at its own position (itself included); run-time lengths in params.
// See docs/policies.md#sparsity-policies.
#pragma once

#include <cstdint>
#include <string_view>

#include "infuse/core/config.hpp"
#include "infuse/core/error.hpp"
#include "infuse/sparse/policy.hpp"

namespace infuse::sparse {

struct window {
  using identifier = policy_identifier;
  static constexpr const char* name = "window";

  struct params {
    std::int64_t sink = 0;    // attention-sink tokens at the start, always seen
    std::int64_t window = 0;  // tokens up to and including the query's own; at least 1
  };

  static void check(const params& p, std::string_view call) {
    require(p.sink >= 0, call, "sparsity.sink", p.sink, "at least 0");
    require(p.window >= 1, call, "sparsity.window", p.window, "at least 1 (the query's own token)");
  }

  INFUSE_HOST_DEVICE static std::int64_t max_ranges(const params&, const query_context&) {
    return 2;
  }

  // The sink [0, sink) and the window of the last query of the context, each clipped to the
  // tokens the queries may see (up to query_end); joined when they touch. For a prefill tile,
  // visible() narrows this union to each query's own window.
  INFUSE_HOST_DEVICE static std::int64_t select(const params& p, const query_context& q,
                                                token_range* out) {
    const std::int64_t end = q.query_end < q.length ? q.query_end : q.length;
    if (end <= 0) return 0;
    const std::int64_t sink_end = p.sink < end ? p.sink : end;
    const std::int64_t first_query = q.query_begin < end ? q.query_begin : end - 1;
    std::int64_t window_begin = first_query - p.window + 1;
    if (window_begin < 0) window_begin = 0;
    if (window_begin <= sink_end) {
      out[0] = {0, end};
      return 1;
    }
    std::int64_t count = 0;
    if (sink_end > 0) out[count++] = {0, sink_end};
    out[count++] = {window_begin, end};
    return count;
  }

  INFUSE_HOST_DEVICE static bool visible(const params& p, const mask_context& m) {
    return m.key_position <= m.query_position &&
           (m.key_position < p.sink || m.query_position - m.key_position < p.window);
  }
};

static_assert(policy<window>,
              "infuse: sparse::window must satisfy sparse::policy; see "
              "docs/policies.md#sparsity-policies");

}  // namespace infuse::sparse
