// sparse::policy: what every attention sparsity rule provides, on the host and the device. See
// docs/policies.md#sparsity-policies.
//
// Every rule reduces to "which tokens does this query read, with what mask". A policy is a struct
// of static members:
//   using identifier = sparse::policy_identifier;       opt in
//   static constexpr const char* name;                  "window", for messages and benchmarks
//   struct params;                                      its run-time values (window length, top-K)
//   static void check(const params&, std::string_view call);    host: throws infuse::error
//                                                       naming a bad value before any work
//   INFUSE_HOST_DEVICE static std::int64_t max_ranges(const params&, const query_context&);
//                                                       how many ranges select() may write
//   INFUSE_HOST_DEVICE static std::int64_t select(const params&, const query_context&,
//                                                 token_range* out);
//                                                       the token ranges one (query, KV head)
//                                                       reads, ascending and disjoint; the count
//   INFUSE_HOST_DEVICE static bool visible(const params&, const mask_context&);
//                                                       inside the selected ranges: may this query
//                                                       see this key (causal, tree masks)
// The kernel walks the selected ranges page by page; tokens outside them are never read.
#pragma once

#include <concepts>
#include <cstdint>
#include <string_view>

#include "infuse/core/config.hpp"
#include "infuse/core/float_types.hpp"

namespace infuse::sparse {

// The opt-in identifier of a policy: `using identifier = sparse::policy_identifier;`.
struct policy_identifier {};

// Tokens [begin, end) of a sequence.
struct token_range {
  std::int64_t begin;
  std::int64_t end;
};

// What a policy sees when it chooses the tokens of one query (decode: the sequence's new token;
// prefill: one query tile, query_begin..query_end) for one KV head.
struct query_context {
  std::int32_t sequence;        // index of the sequence in the batch
  std::int32_t kv_head;
  std::int64_t length;          // tokens of the sequence in the cache, the new ones included
  std::int64_t query_begin;     // positions of the queries: decode has one, length - 1
  std::int64_t query_end;       // one past the last query position
  std::int64_t new_begin;       // position of the first token written by this call (prefill)
  const float* q;               // (group, head_dim): the query heads that share this KV head
  std::int32_t group;
  std::int32_t head_dim;
  float scale;                  // softmax scale applied to q·k
  std::int32_t page_size;       // tokens per page (contiguous layout: the sequence's whole run)
  const std::int32_t* pages;    // the sequence's pool pages in token order
  std::int32_t kv_heads;
  // Per-page metadata of the cache, null when the cache keeps none: (pool pages, kv_heads,
  // head_dim) per-channel minimum and maximum of the stored keys, rounded outward to half;
  // (pool pages, page_size, kv_heads) attention mass accumulated per token.
  const half* key_min;
  const half* key_max;
  const float* mass;
  // Scratch the kernel hands to select(): `scratch_floats` floats of its own.
  float* scratch;
  std::int64_t scratch_floats;
  // Pages of the pool: a device clamps the page indices it reads metadata at to [0, pool_pages),
  // since only the host's copy of the page table was checked.
  std::int32_t pool_pages;
};

// The pair a mask decides on.
struct mask_context {
  std::int32_t sequence;
  std::int64_t query_position;
  std::int64_t key_position;
  std::int64_t new_begin;  // position of the first token written by this call
};

template <class P>
concept policy =
    requires {
      typename P::identifier;
      typename P::params;
      { P::name } -> std::convertible_to<const char*>;
    } && std::same_as<typename P::identifier, policy_identifier> &&
    requires(const typename P::params& p, const query_context& q, const mask_context& m,
             token_range* out, std::string_view call) {
      P::check(p, call);
      { P::max_ranges(p, q) } -> std::same_as<std::int64_t>;
      { P::select(p, q, out) } -> std::same_as<std::int64_t>;
      { P::visible(p, m) } -> std::same_as<bool>;
    };

// The check where a policy is defined and where a kernel consumes one.
template <class P>
INFUSE_HOST_DEVICE constexpr void static_check_policy() {
  static_assert(policy<P>,
                "infuse: this type is not a sparsity policy (sparse::policy): it needs "
                "`using identifier = sparse::policy_identifier`, name, params, check(params, "
                "call), max_ranges(params, query_context), select(params, query_context, "
                "token_range*) and visible(params, mask_context); see "
                "docs/policies.md#sparsity-policies");
}

}  // namespace infuse::sparse
