// sparse::recycled<TopK, Period>: Recycled Attention. Every Period steps a full step reads every
// token; the caller then records, per (sequence, KV head), the TopK tokens of highest attention
// weight (summed over the query heads of the group) with record(). The steps in between read only
// the recorded tokens and the tokens appended since the recording.
//
// The caller keeps one recycled::state per (sequence, KV head), index sequence * kv_heads +
// kv_head, and passes them with the step number in params. A full step (step % Period == 0, or a
// state with nothing recorded) is a dense step; after it the caller runs record() on the per-token
// attention weights the kernel wrote (attention::token_weights). See
// docs/policies.md#sparsity-policies.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string_view>
#include <vector>

#include "infuse/core/config.hpp"
#include "infuse/core/error.hpp"
#include "infuse/core/view.hpp"
#include "infuse/sparse/policy.hpp"

namespace infuse::sparse {

template <int TopK, int Period>
struct recycled {
  static_assert(TopK >= 1 && Period >= 1,
                "infuse: sparse::recycled<TopK, Period> needs TopK >= 1 and Period >= 1; see "
                "docs/policies.md#sparsity-policies");
  using identifier = policy_identifier;
  static constexpr const char* name = "recycled";

  // The recorded set of one (sequence, KV head): `count` tokens, ascending, all below
  // recorded_length, the sequence's length at the recording.
  struct state {
    std::int64_t recorded_length = 0;
    std::int32_t count = 0;
    std::int64_t tokens[TopK] = {};
  };

  struct params {
    std::int64_t step = 0;    // the decode step; a multiple of Period is a full step
    state* states = nullptr;  // (sequences * kv_heads)
  };

  static void check(const params& p, std::string_view call) {
    require(p.step >= 0, call, "sparsity.step", p.step, "at least 0");
    require(p.states != nullptr, call, "sparsity.states", p.states,
            "a pointer to one recycled::state per (sequence, KV head)");
  }

  INFUSE_HOST_DEVICE static bool full_step(const params& p, const state& s) {
    return p.step % Period == 0 || s.count == 0;
  }

  INFUSE_HOST_DEVICE static std::int64_t max_ranges(const params&, const query_context&) {
    return TopK + 1;
  }

  INFUSE_HOST_DEVICE static std::int64_t select(const params& p, const query_context& q,
                                                token_range* out) {
    const std::int64_t end = q.query_end < q.length ? q.query_end : q.length;
    if (end <= 0) return 0;
    const state& s = p.states[std::int64_t{q.sequence} * q.kv_heads + q.kv_head];
    if (full_step(p, s)) {
      out[0] = {0, end};
      return 1;
    }
    const std::int64_t fresh = s.recorded_length < end ? s.recorded_length : end;
    std::int64_t count = 0;
    const std::int32_t recorded = s.count < TopK ? s.count : TopK;
    for (std::int32_t i = 0; i < recorded; ++i) {
      const std::int64_t t = s.tokens[i];
      if (t < 0 || t >= fresh || (count > 0 && t < out[count - 1].end)) continue;
      if (count > 0 && out[count - 1].end == t) {
        out[count - 1].end = t + 1;
      } else {
        out[count++] = {t, t + 1};
      }
    }
    if (fresh < end) {
      if (count > 0 && out[count - 1].end == fresh) {
        out[count - 1].end = end;
      } else {
        out[count++] = {fresh, end};
      }
    }
    return count;
  }

  INFUSE_HOST_DEVICE static bool visible(const params&, const mask_context& m) {
    return m.key_position <= m.query_position;
  }

  // After a full step: records into each state the TopK tokens of highest weight, the weights
  // summed over the `group` query heads of its KV head. weights (sequences, q_heads, tokens) as
  // attention::token_weights wrote them; lengths[s] the length of sequence s.
  static void record(const params& p, host_view<const float, 3> weights,
                     const std::int64_t* lengths, std::int32_t kv_heads) {
    constexpr std::string_view call = "infuse::sparse::recycled::record";
    check(p, call);
    require(kv_heads >= 1 && weights.extent(1) % kv_heads == 0, call, "kv_heads", kv_heads,
            "a divisor of weights.extent(1), the query heads");
    const std::int64_t group = weights.extent(1) / kv_heads;
    std::vector<float> summed;
    std::vector<std::int64_t> order;
    for (std::int64_t s = 0; s < weights.extent(0); ++s) {
      const std::int64_t length = std::min(lengths[s], weights.extent(2));
      for (std::int32_t h = 0; h < kv_heads; ++h) {
        summed.assign(static_cast<std::size_t>(length), 0.0f);
        for (std::int64_t g = 0; g < group; ++g) {
          for (std::int64_t t = 0; t < length; ++t) summed[t] += weights(s, h * group + g, t);
        }
        order.resize(static_cast<std::size_t>(length));
        std::iota(order.begin(), order.end(), std::int64_t{0});
        const std::int64_t kept = std::min<std::int64_t>(TopK, length);
        std::partial_sort(order.begin(), order.begin() + kept, order.end(),
                          [&](std::int64_t a, std::int64_t b) {
                            return summed[a] > summed[b] || (summed[a] == summed[b] && a < b);
                          });
        std::sort(order.begin(), order.begin() + kept);
        state& st = p.states[s * kv_heads + h];
        st.recorded_length = length;
        st.count = static_cast<std::int32_t>(kept);
        std::copy(order.begin(), order.begin() + kept, st.tokens);
      }
    }
  }
};

static_assert(policy<recycled<64, 8>>,
              "infuse: sparse::recycled must satisfy sparse::policy; see "
              "docs/policies.md#sparsity-policies");

}  // namespace infuse::sparse
