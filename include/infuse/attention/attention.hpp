// infuse::attention::attention<Layout, KQuant, VQuant, Sparsity>: decode attention over a
// (paged or contiguous, quantized) KV cache, and merge_states, the log-sum-exp union of partial
// results. See docs/policies.md#attention.
//
//   using attn = infuse::attention::attention<kv::paged<16>, quant::none<half>,
//                                             quant::int_<4, 32>, sparse::window>;
//   std::vector<std::byte> workspace(attn::decode_workspace_bytes(exec, q_heads, cache, window));
//   attn::decode(exec, q, cache, out, window, {}, workspace);                // out only
//   attn::decode(exec, q, cache, out, window, {}, workspace, attention::lse_output{lse});
//
// Decode: one query token per sequence. Sequence b of q (batch, q_heads, k.head_dim) is the cache
// table's sequence b, its query sits at position length(b) - 1 (its own K/V already in the cache),
// and out (batch, q_heads, v.head_dim) gets softmax(score(q·k)) · v over the tokens the Sparsity
// policy selects for each (sequence, KV head). Query head h reads KV head h / (q_heads / k.heads).
// An empty selection (a sequence of length 0) gives out = 0 and lse = -inf.
//
// Backends: the exec picks the body and the memory every view lives in. exec::cpu (bodies in
// attention/cpu/) reads host views and a host kv::cache_view; exec::cuda (bodies in
// attention/cuda/, included by <infuse/cuda.cuh>) reads device views, a device workspace and an
// attention::device_cache (attention/prefill.hpp): the device cache_view with the same table on
// the host, where the call checks it. The outputs then are device_lse_output and
// device_token_weights.
//
// Workspace: decode_workspace_bytes(exec, q_heads, cache, sparsity) bytes for this very cache,
// or decode_workspace_bytes(exec, q_heads, cache, sparsity, max_length) for every call on a batch
// of as many sequences none longer than max_length (one buffer for many steps, as a CUDA graph
// needs); the same two functions on both backends.
//
// Optional outputs, as trailing arguments in any order; each is compiled out when absent:
//   lse_output{lse}            lse (batch, q_heads): the natural log-sum-exp of the scores
//   token_weights{weights}     weights (batch, q_heads, >= longest sequence): each visited token's
//                              softmax weight, 0 for tokens not read
//   accumulate_mass{}          adds each visited token's weight, summed over its query group, to
//                              cache.mass (pool_pages, slots, k.heads); needs token_weights too
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>

#include "infuse/attention/options.hpp"
#include "infuse/attention/prefill.hpp"
#include "infuse/core/error.hpp"
#include "infuse/core/math.hpp"
#include "infuse/core/memory.hpp"
#include "infuse/core/view.hpp"
#include "infuse/exec/cpu.hpp"
#include "infuse/gemm/gemv.hpp"
#include "infuse/kv/cache_view.hpp"
#include "infuse/kv/layout.hpp"
#include "infuse/quant/scheme.hpp"
#include "infuse/sparse/block_sparse.hpp"
#include "infuse/sparse/dense.hpp"
#include "infuse/sparse/policy.hpp"

namespace infuse::attention {

// ---- optional outputs -----------------------------------------------------------------------

// Each in the memory of the call's backend: lse_output and token_weights for exec::cpu,
// device_lse_output and device_token_weights for exec::cuda.
template <class Space>
struct basic_lse_output {
  view<float, 2, Space> lse;  // (batch, q_heads)
};
template <class Space>
struct basic_token_weights {
  view<float, 3, Space> weights;  // (batch, q_heads, tokens), tokens >= the longest sequence
};
struct accumulate_mass {};

using lse_output = basic_lse_output<host_memory>;
using token_weights = basic_token_weights<host_memory>;
using device_lse_output = basic_lse_output<device_memory>;
using device_token_weights = basic_token_weights<device_memory>;

namespace detail {

template <class T, class... Ts>
inline constexpr bool has_output = (std::is_same_v<T, Ts> || ...);

// Whether T is an optional output of a call on memory space Space.
template <class T, class Space>
inline constexpr bool is_output =
    std::is_same_v<T, basic_lse_output<Space>> || std::is_same_v<T, basic_token_weights<Space>> ||
    std::is_same_v<T, accumulate_mass>;

// The one output of type T among the arguments (a default one when absent).
template <class T, class... Ts>
T find_output(const Ts&... outputs) {
  T found{};
  (([&] {
     if constexpr (std::is_same_v<T, Ts>) found = outputs;
   }()),
   ...);
  return found;
}

// Whether a policy asks for the cache's key_min / key_max (sparse::quest, sparse::coverage).
template <class P>
constexpr bool needs_key_bounds() {
  if constexpr (requires { P::needs_key_bounds; }) {
    return P::needs_key_bounds;
  } else {
    return false;
  }
}

// Floats of scratch per page of a sequence that a policy's select() needs.
template <class P>
constexpr std::int64_t scratch_floats_per_page() {
  if constexpr (requires { P::scratch_floats_per_page; }) {
    return P::scratch_floats_per_page;
  } else {
    return 0;
  }
}

template <class T>
inline constexpr bool always_false = false;

// The backend's body: run(exec, q, cache, out, params, options, workspace, plan, outputs...),
// arguments checked, cache what the kernels read (kernel_side), plan the backend's
// decode_planner's. Specialized in attention/cpu/decode.hpp and attention/cuda/decode.cuh.
template <class Exec>
struct decode_body {
  static_assert(always_false<Exec>,
                "infuse: could not find a decode attention body for this execution backend "
                "(include infuse/attention/cpu/decode.hpp for exec::cpu, or infuse/cuda.cuh for "
                "exec::cuda); see docs/policies.md#exec-backend");
};

// How a backend lays out decode's workspace: plan<Layout, K, V, Sparsity>(exec, q_heads, cache,
// sparsity, length_of, longest), sequence s taken as length_of(s) tokens long, none longer than
// `longest`; the plan's `bytes` is the workspace size. Specialized below for exec::cpu and in
// attention/cuda/decode.cuh for exec::cuda.
// K or V arrangements whose records a tile cannot decode one by one: kv::per_channel keys (their
// page's scales, or the sequence's full-precision window) and kv::mixed records (High or Low by
// the token's flag). The CPU walk stages a tile of them as floats in its scratch.
template <class S>
inline constexpr bool staged = kv::is_per_channel<S> || kv::is_mixed<S>;

template <class Exec>
struct decode_planner {
  static_assert(always_false<Exec>,
                "infuse: could not find a decode attention body for this execution backend "
                "(include infuse/cuda.cuh for exec::cuda); see docs/policies.md#exec-backend");
};

}  // namespace detail

// Tokens of one split-KV chunk: long selections are cut into chunks of this many tokens, each a
// unit of work whose partial result is merged by log-sum-exp.
inline constexpr std::int64_t split_tokens = 512;

// Tokens of a sequence's pages: what a table row can hold.
template <class Layout, class KQuant, class VQuant>
std::int64_t capacity(const kv::cache_view<Layout, KQuant, VQuant>& cache, std::int32_t s) {
  if constexpr (Layout::is_paged) {
    return std::int64_t{cache.table.pages(s)} * cache.format.slots;
  } else {
    return cache.format.slots;
  }
}

// The query_context of decode's query of sequence s over KV head h: the query at position
// length(s) - 1; q and scratch are the caller's to set. `run` points to s: the contiguous
// layout's one "page" is the sequence's run (it must outlive the context).
template <class Layout, class K, class V>
sparse::query_context decode_query_context(const kv::cache_view<Layout, K, V>& cache,
                                           std::int32_t s, std::int32_t h, std::int32_t group,
                                           float scale, const std::int32_t* run) {
  const std::int64_t length = cache.length(s);
  sparse::query_context c{};
  c.sequence = s;
  c.kv_head = h;
  c.length = length;
  c.query_begin = length - 1;
  c.query_end = length;
  c.new_begin = length;
  c.group = group;
  c.head_dim = cache.format.k.head_dim;
  c.scale = scale;
  c.page_size = cache.format.slots;
  if constexpr (Layout::is_paged) {
    c.pages = cache.table.indices + cache.table.indptr[s];
  } else {
    c.pages = run;
  }
  c.kv_heads = cache.format.k.heads;
  c.key_min = cache.key_min;
  c.key_max = cache.key_max;
  c.mass = cache.mass;
  c.pool_pages = cache.pool_pages;
  return c;
}

// Where each part of the decode workspace lies; built the same way by the size query and the call.
struct decode_workspace_layout {
  std::int64_t ranges_at = 0;          // token_range per (sequence, KV head): max_ranges of each
  std::int64_t range_offsets_at = 0;   // int64 (units + 1)
  std::int64_t range_counts_at = 0;    // int64 (units)
  std::int64_t chunk_offsets_at = 0;   // int64 (units + 1): partial slots, a bound per unit
  std::int64_t item_offsets_at = 0;    // int64 (units + 1): chunks each unit actually has
  std::int64_t chunks_done_at = 0;     // int64 (units): chunks finished, counted atomically
  std::int64_t partials_at = 0;        // float (slots, group, partial_floats): acc, max, sum
  std::int64_t partial_floats = 0;     // v.stored_dim() + 2
  std::int64_t thread_scratch_at = 0;  // float (threads, scratch_floats)
  std::int64_t scratch_floats = 0;
  std::int64_t select_scratch_floats = 0;
  std::int64_t total_ranges = 0;
  std::int64_t total_slots = 0;
  std::int64_t bytes = 0;
};

// Scores computed at once per query head, a tile of tokens.
inline constexpr std::int64_t score_tile = 16;

// The CPU body's workspace for sequences s of length_of(s) tokens (their lengths in the cache,
// or a bound: every size below grows with the lengths, so a bound's workspace serves the call).
template <class Layout, class KQuant, class VQuant, class Sparsity, class LengthOf>
decode_workspace_layout plan_decode_workspace(int threads, std::int64_t q_heads,
                                              const kv::cache_view<Layout, KQuant, VQuant>& cache,
                                              const typename Sparsity::params& sparsity,
                                              LengthOf length_of) {
  const std::int32_t kv_heads = cache.format.k.heads;
  const std::int64_t group = q_heads / kv_heads;
  const std::int64_t units = std::int64_t{cache.sequences()} * kv_heads;
  decode_workspace_layout w;
  std::int64_t max_pages = 1;
  for (std::int32_t s = 0; s < cache.sequences(); ++s) {
    const std::int64_t length = length_of(s);
    const std::int64_t pages = (length + cache.format.slots - 1) / cache.format.slots;
    max_pages = std::max(max_pages, pages);
    for (std::int32_t h = 0; h < kv_heads; ++h) {
      sparse::query_context q =
          decode_query_context(cache, s, h, static_cast<std::int32_t>(group), 0.0f, &s);
      q.length = length;
      q.query_begin = length - 1;
      q.query_end = length;
      q.new_begin = length;
      w.total_ranges += std::max<std::int64_t>(0, Sparsity::max_ranges(sparsity, q));
    }
    w.total_slots += kv_heads * ((length + split_tokens - 1) / split_tokens);
  }
  const auto align = [](std::int64_t n) { return kv::round_up(n, 64); };
  w.select_scratch_floats = detail::scratch_floats_per_page<Sparsity>() * max_pages;
  // Per thread (the CPU body's thread scratch): the group's query rows (padded to whole blocks),
  // a tile of scores, the group's rescale factors, then the policy's scratch, which the group's
  // int8 query rows (options::int8_query) or the walk's staged tile reuse once select() is done.
  const std::int64_t k_stored = cache.format.k.stored_dim();
  const std::int64_t int8_query_floats = (gemm::int8_workspace_bytes(group, k_stored) + 3) / 4;
  // Staged K or V: a tile of keys and one of values read back as floats, there too.
  const std::int64_t staged_floats = detail::staged<KQuant> || detail::staged<VQuant>
                                         ? score_tile * (k_stored + cache.format.v.stored_dim())
                                         : 0;
  w.scratch_floats =
      kv::round_up(group * k_stored + group * score_tile + kv::round_up(group, 16) +
                       std::max({w.select_scratch_floats, int8_query_floats, staged_floats}),
                   16);
  w.ranges_at = 0;
  w.range_offsets_at =
      align(w.ranges_at + w.total_ranges * std::int64_t{sizeof(sparse::token_range)});
  w.range_counts_at = align(w.range_offsets_at + (units + 1) * 8);
  w.chunk_offsets_at = align(w.range_counts_at + units * 8);
  w.item_offsets_at = align(w.chunk_offsets_at + (units + 1) * 8);
  w.chunks_done_at = align(w.item_offsets_at + (units + 1) * 8);
  w.partials_at = align(w.chunks_done_at + units * 8);
  w.partial_floats = cache.format.v.stored_dim() + 2;
  w.thread_scratch_at = align(w.partials_at + w.total_slots * group * w.partial_floats * 4);
  // 64 bytes of slack: the call aligns the start of the caller's buffer itself.
  w.bytes = w.thread_scratch_at + std::int64_t{threads} * w.scratch_floats * 4 + 64;
  return w;
}

namespace detail {

template <>
struct decode_planner<exec::cpu> {
  template <class Layout, class KQuant, class VQuant, class Sparsity, class LengthOf>
  static decode_workspace_layout plan(const exec::cpu& exec, std::int64_t q_heads,
                                      const kv::cache_view<Layout, KQuant, VQuant>& cache,
                                      const typename Sparsity::params& sparsity, LengthOf length_of,
                                      std::int64_t /*longest*/) {
    return plan_decode_workspace<Layout, KQuant, VQuant, Sparsity>(exec.threads(), q_heads, cache,
                                                                   sparsity, length_of);
  }
};

}  // namespace detail

template <class Layout, class KQuant, class VQuant, class Sparsity = sparse::dense>
struct attention {
  static_assert((quant::scheme<KQuant> || kv::is_per_channel<KQuant> ||
                 kv::is_mixed<KQuant>)&&(quant::scheme<VQuant> || kv::is_mixed<VQuant>),
                "infuse: attention<Layout, KQuant, VQuant, Sparsity> takes quantization schemes "
                "for K and V (or the arrangements kv::per_channel<S> for K and kv::mixed<High, "
                "Low> for either); see docs/policies.md#quantization-schemes");
  static_assert(sparse::policy<Sparsity>,
                "infuse: attention<Layout, KQuant, VQuant, Sparsity>: Sparsity is not a sparsity "
                "policy (sparse::policy): it needs `using identifier = sparse::policy_identifier`, "
                "name, params, check(params, call), max_ranges(params, query_context), "
                "select(params, query_context, token_range*) and visible(params, mask_context); "
                "see docs/policies.md#sparsity-policies");

  using cache_type = kv::cache_view<Layout, KQuant, VQuant>;
  using sparsity_params = typename Sparsity::params;
  static constexpr std::string_view call = "infuse::attention::decode";

  // The cache a call on exec takes: a host cache_view (exec::cpu), a device_cache (exec::cuda).
  template <class Exec>
  using cache_for = cache_argument<Layout, KQuant, VQuant, typename Exec::memory_space>;
  template <class Exec, class T, int Rank>
  using view_for = view<T, Rank, typename Exec::memory_space>;

  // Bytes of workspace decode() needs on exec for this cache, query head count and policy.
  template <class Exec>
  static std::int64_t decode_workspace_bytes(const Exec& exec, std::int64_t q_heads,
                                             const cache_for<Exec>& cache,
                                             const sparsity_params& sparsity) {
    check_workspace_query(q_heads, cache, sparsity);
    const cache_type host = detail::host_side(cache);
    return detail::decode_planner<Exec>::template plan<Layout, KQuant, VQuant, Sparsity>(
               exec, q_heads, detail::kernel_side(cache), sparsity,
               [&](std::int32_t s) { return host.length(s); }, detail::longest_sequence(host))
        .bytes;
  }

  // Bytes of workspace that serve every decode() on exec over a batch of as many sequences as
  // cache's, none longer than max_length tokens (the lengths in cache do not matter).
  template <class Exec>
  static std::int64_t decode_workspace_bytes(const Exec& exec, std::int64_t q_heads,
                                             const cache_for<Exec>& cache,
                                             const sparsity_params& sparsity,
                                             std::int64_t max_length) {
    constexpr std::string_view size_call = "infuse::attention::decode_workspace_bytes";
    check_workspace_query(q_heads, cache, sparsity);
    require(max_length >= 0, size_call, "max_length", max_length, "at least 0");
    return detail::decode_planner<Exec>::template plan<Layout, KQuant, VQuant, Sparsity>(
               exec, q_heads, detail::kernel_side(cache), sparsity,
               [&](std::int32_t) { return max_length; }, max_length)
        .bytes;
  }

  template <class Exec, class... Optional>
  static void decode(const Exec& exec, view_for<Exec, const float, 3> q,
                     const cache_for<Exec>& cache, view_for<Exec, float, 3> out,
                     const sparsity_params& sparsity, const options& opt,
                     std::span<std::byte> workspace, Optional... outputs) {
    exec::static_check_backend<Exec>();
    if constexpr (!std::is_same_v<typename Exec::memory_space, host_memory>) {
      static_check_read_formats<KQuant, VQuant>();
    }
    static_assert(std::is_same_v<typename Exec::memory_space, host_memory> ||
                      !std::is_same_v<Sparsity, sparse::block_sparse>,
                  "infuse: sparse::block_sparse decode runs on the CPU only: its max_ranges reads "
                  "the block lists on the host, which on exec::cuda would be device memory; see "
                  "docs/policies.md#the-cuda-bodies");
    static_assert((detail::is_output<Optional, typename Exec::memory_space> && ...),
                  "infuse: attention::decode takes as optional outputs only lse_output, "
                  "token_weights and accumulate_mass (device_lse_output and device_token_weights "
                  "on exec::cuda: the outputs live in the memory of the backend); see "
                  "docs/policies.md#attention");
    const auto plan = check(exec, q, cache, out, sparsity, opt, workspace, outputs...);
    detail::decode_body<Exec>::template run<Layout, KQuant, VQuant, Sparsity>(
        exec, q, detail::kernel_side(cache), out, sparsity, opt, workspace, plan, outputs...);
  }

  // Every host check of decode, before any work; returns the workspace plan.
  template <class Exec, class... Optional>
  static auto check(const Exec& exec, view_for<Exec, const float, 3> q,
                    const cache_for<Exec>& cache, view_for<Exec, float, 3> out,
                    const sparsity_params& sparsity, const options& opt,
                    std::span<std::byte> workspace, const Optional&... outputs) {
    using space = typename Exec::memory_space;
    detail::require_cache(cache, call);
    const cache_type host = detail::host_side(cache);
    const auto& f = host.format;
    const std::int64_t batch = q.extent(0);
    require(batch == host.sequences(), call, "q.extent(0)", batch,
            "cache.sequences() = " + std::to_string(host.sequences()) + " (the batch)");
    const std::int64_t q_heads = q.extent(1);
    require(q_heads >= 1 && q_heads % f.k.heads == 0, call, "q.extent(1)", q_heads,
            "a positive multiple of the cache's KV heads " + std::to_string(f.k.heads));
    require(f.v.heads == f.k.heads, call, "cache.format.v.heads", f.v.heads,
            "cache.format.k.heads = " + std::to_string(f.k.heads));
    require_view(q, call, "q", {any_extent, any_extent, {f.k.head_dim, "cache.format.k.head_dim"}});
    require_view(
        out, call, "out",
        {{batch, "batch"}, {q_heads, "q heads"}, {f.v.head_dim, "cache.format.v.head_dim"}});
    Sparsity::check(sparsity, call);
    if constexpr (detail::needs_key_bounds<Sparsity>()) {
      require(host.key_min != nullptr, call, "cache.key_min", host.key_min,
              std::string("per-page key minima, which sparse::") + Sparsity::name + " reads");
      require(host.key_max != nullptr, call, "cache.key_max", host.key_max,
              std::string("per-page key maxima, which sparse::") + Sparsity::name + " reads");
    }
    require_options(opt, call);
    const std::int64_t longest = detail::longest_sequence(host);
    constexpr bool weights = detail::has_output<basic_token_weights<space>, Optional...>;
    if constexpr (detail::has_output<basic_lse_output<space>, Optional...>) {
      require_view(detail::find_output<basic_lse_output<space>>(outputs...).lse, call, "lse",
                   {{batch, "batch"}, {q_heads, "q heads"}});
    }
    if constexpr (weights) {
      const auto w = detail::find_output<basic_token_weights<space>>(outputs...).weights;
      require_view(w, call, "weights", {{batch, "batch"}, {q_heads, "q heads"}, any_extent});
      require(w.extent(2) >= longest, call, "weights.extent(2)", w.extent(2),
              "at least the longest sequence, " + std::to_string(longest) + " tokens");
    }
    if constexpr (detail::has_output<accumulate_mass, Optional...>) {
      require(weights, call, "accumulate_mass", "without token_weights",
              "a token_weights output in the same call (the mass is summed from it)");
      require(host.mass != nullptr, call, "cache.mass", host.mass,
              "a pointer to (pool_pages, slots, k.heads) floats");
    }
    const auto plan = detail::decode_planner<Exec>::template plan<Layout, KQuant, VQuant, Sparsity>(
        exec, q_heads, detail::kernel_side(cache), sparsity,
        [&](std::int32_t s) { return host.length(s); }, longest);
    require(static_cast<std::int64_t>(workspace.size()) >= plan.bytes, call, "workspace.size()",
            workspace.size(),
            "at least decode_workspace_bytes(...) = " + std::to_string(plan.bytes));
    require(workspace.data() != nullptr, call, "workspace.data()", workspace.data(), "a pointer");
    return plan;
  }

  // Prefill of a ragged batch of new tokens: attention::prefill in attention/prefill.hpp.
  template <class Exec>
  static void prefill(const Exec& exec, view_for<Exec, const float, 3> q,
                      view_for<Exec, const float, 3> k, view_for<Exec, const float, 3> v,
                      view_for<Exec, const std::int32_t, 1> q_indptr, const cache_for<Exec>& cache,
                      view_for<Exec, float, 3> out, const sparsity_params& sparsity,
                      const options& opt = {}, view_for<Exec, float, 2> lse = {}) {
    ::infuse::attention::prefill<Layout, KQuant, VQuant, Sparsity>(exec, q, k, v, q_indptr, cache,
                                                                   out, sparsity, opt, lse);
  }

 private:
  // The checks both workspace queries make.
  template <class Cache>
  static void check_workspace_query(std::int64_t q_heads, const Cache& cache,
                                    const sparsity_params& sparsity) {
    constexpr std::string_view size_call = "infuse::attention::decode_workspace_bytes";
    detail::require_cache(cache, size_call);
    const std::int32_t kv_heads = detail::host_side(cache).format.k.heads;
    require(q_heads >= 1 && q_heads % kv_heads == 0, size_call, "q_heads", q_heads,
            "a positive multiple of the cache's KV heads " + std::to_string(kv_heads));
    Sparsity::check(sparsity, size_call);
  }
};

// The union of partial results of the same queries over disjoint key sets: part i has outputs
// (rows, heads, dim) and lses (rows, heads), natural logarithms; out and lse (either may alias
// the first part) get the merged output and the lse of the union. An empty part (lse = -inf) is
// neutral; all parts empty give out = 0, lse = -inf. Parts must match out's shape.
inline void merge_states(const exec::cpu& exec, std::span<const host_view<const float, 3>> outputs,
                         std::span<const host_view<const float, 2>> lses, host_view<float, 3> out,
                         host_view<float, 2> lse) {
  constexpr std::string_view call = "infuse::attention::merge_states";
  const std::int64_t rows = out.extent(0);
  const std::int64_t heads = out.extent(1);
  const std::int64_t dim = out.extent(2);
  require(outputs.size() == lses.size(), call, "lses.size()", lses.size(),
          "outputs.size() = " + std::to_string(outputs.size()));
  require_view(out, call, "out", {any_extent, any_extent, any_extent});
  require_view(lse, call, "lse", {{rows, "rows of out"}, {heads, "heads of out"}});
  for (std::size_t i = 0; i < outputs.size(); ++i) {
    const std::string index = std::to_string(i).append("]");
    require_view(outputs[i], call, std::string("outputs[").append(index),
                 {{rows, "rows of out"}, {heads, "heads of out"}, {dim, "dim of out"}});
    require_view(lses[i], call, std::string("lses[").append(index),
                 {{rows, "rows of out"}, {heads, "heads of out"}}, stride_rule::any);
  }
  exec.parallel_for(rows * heads, [&](std::int64_t i) {
    const std::int64_t r = i / heads;
    const std::int64_t h = i % heads;
    const auto partial_at = [&](std::size_t part) {
      return partial_result{&outputs[part](r, h, 0), lses[part](r, h)};
    };
    lse(r, h) = infuse::detail::merge_partials(outputs.size(), partial_at, &out(r, h, 0),
                                               static_cast<std::size_t>(dim));
  });
}

}  // namespace infuse::attention
