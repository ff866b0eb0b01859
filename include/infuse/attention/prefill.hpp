// infuse::attention::prefill: attention of a ragged batch of new tokens over their sequences'
// cached prefix and themselves, writing the new K and V into the cache, quantized, first.
//
//   infuse::attention::prefill<kv::paged<16>, quant::none<half>, quant::none<half>,
//   sparse::causal>(
//       exec, q, k, v, q_indptr, cache, out, {}, {});
//
// Shapes: q (new_total, q_heads, head_dim), k (new_total, kv_heads, head_dim), v (new_total,
// kv_heads, v_head_dim), out (new_total, q_heads, v_head_dim), optional lse (new_total, q_heads),
// q_indptr (batch + 1): the new tokens of sequence b are rows q_indptr[b] .. q_indptr[b + 1].
// The cache's table already counts them (the caller reserved their slots): sequence b's n_b new
// tokens sit at positions length(b) - n_b .. length(b) - 1, after its prefix.
//
// Each new token's K and V are encoded by the cache's formats (kv::vector_format::encode) into
// their slots; then each query attends to the keys the sparsity policy selects for its tile,
// masked by visible(), reading every key back from the cache: prefill and a later decode see the
// same, stored, keys. Query heads are grouped over the KV heads (q_heads a multiple of kv_heads).
// A query that sees no key gets out = 0 and lse = -inf. When the cache keeps key_min / key_max,
// the pages that received new keys get them recomputed over their stored keys.
//
// Backends: the views live in the memory of the exec (exec::cpu: host memory; exec::cuda: device
// memory). A cache in device memory is passed as attention::device_cache (below): its device view
// and the same table on the host, which the call checks. q_indptr on the device is not read by
// the host: its entries are checked on exec::cpu only (the CUDA kernels clamp what they derive
// from them).
//
// The arguments are checked first, on the host, and nothing is written (cache or outputs) when
// one is wrong: infuse::error names it. The bodies: attention/cpu/prefill.hpp (exec::cpu) and
// attention/cuda/prefill.cuh (exec::cuda). See docs/policies.md#prefill-attention.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

#include "infuse/attention/options.hpp"
#include "infuse/core/concepts.hpp"
#include "infuse/core/error.hpp"
#include "infuse/core/memory.hpp"
#include "infuse/core/view.hpp"
#include "infuse/exec/backend.hpp"
#include "infuse/kv/cache_view.hpp"
#include "infuse/kv/layout.hpp"
#include "infuse/quant/scheme.hpp"
#include "infuse/sparse/policy.hpp"

namespace infuse::attention {

// ---- the cache argument ----------------------------------------------------------------------

// A cache in device memory as decode and prefill take it: `view`, what the kernels read, and
// `table`, the same page table (contiguous layout: the same lengths) in host memory, where the
// call checks it and finds the longest sequence without reading device memory.
// kv::cache<..., kv::device_pages>::view(seqs) holds both: device_cache_of(batch).
template <class Layout, class KQuant, class VQuant>
struct device_cache {
  kv::cache_view<Layout, KQuant, VQuant, device_memory> view;
  typename Layout::table_view table;
};

// The device_cache of a batch that keeps its table on the host (kv::device_cache_batch).
template <class Batch>
auto device_cache_of(const Batch& batch) {
  using view_type = typename Batch::view_type;
  return device_cache<typename view_type::layout, typename view_type::k_scheme,
                      typename view_type::v_scheme>{batch.view(), batch.table().view()};
}

// What a call on memory space Space takes as its cache: a host cache_view, or a device_cache.
template <class Layout, class KQuant, class VQuant, class Space>
using cache_argument =
    std::conditional_t<std::is_same_v<Space, host_memory>, kv::cache_view<Layout, KQuant, VQuant>,
                       device_cache<Layout, KQuant, VQuant>>;

namespace detail {

// The cache as the host checks it: a cache_view whose table the host reads. A device cache's is
// its view with the table swapped for the host copy: the checks read the table only, never the
// pages or the metadata.
template <class Layout, class K, class V>
const kv::cache_view<Layout, K, V>& host_side(const kv::cache_view<Layout, K, V>& cache) {
  return cache;
}
template <class Layout, class K, class V>
kv::cache_view<Layout, K, V> host_side(const device_cache<Layout, K, V>& cache) {
  const auto& d = cache.view;
  return {d.pages, d.pool_pages, d.format, cache.table, d.key_min, d.key_max, d.mass};
}

// What the kernels read.
template <class Layout, class K, class V>
const kv::cache_view<Layout, K, V>& kernel_side(const kv::cache_view<Layout, K, V>& cache) {
  return cache;
}
template <class Layout, class K, class V>
const kv::cache_view<Layout, K, V, device_memory>& kernel_side(
    const device_cache<Layout, K, V>& cache) {
  return cache.view;
}

// The host checks of a cache argument: its format and table (kv::require_cache_view); a device
// cache's two tables must describe the same batch.
template <class Layout, class K, class V>
void require_cache(const kv::cache_view<Layout, K, V>& cache, std::string_view call) {
  kv::require_cache_view(cache, call);
}
template <class Layout, class K, class V>
void require_cache(const device_cache<Layout, K, V>& cache, std::string_view call) {
  kv::require_cache_view(host_side(cache), call);
  require(cache.view.table.sequences == cache.table.sequences, call, "cache.view.table.sequences",
          cache.view.table.sequences,
          "cache.table.sequences = " + std::to_string(cache.table.sequences) +
              " (the host copy of the same table)");
}

// The longest sequence of a cache the host can read.
template <class Layout, class K, class V>
std::int64_t longest_sequence(const kv::cache_view<Layout, K, V>& cache) {
  std::int64_t longest = 0;
  for (std::int32_t s = 0; s < cache.sequences(); ++s) longest = std::max(longest, cache.length(s));
  return longest;
}

template <class T>
inline constexpr bool always_false_prefill = false;

// One specialization per backend holds its body: run(exec, q, k, v, q_indptr, cache, out, params,
// options, lse), the arguments already checked; cache is what the kernels read (kernel_side).
template <class Exec>
struct prefill_body {
  static_assert(always_false_prefill<Exec>,
                "infuse: could not find a prefill body for this execution backend (include "
                "infuse/attention/cpu/prefill.hpp for exec::cpu, or infuse/cuda.cuh for "
                "exec::cuda); see docs/policies.md#exec-backend");
};

}  // namespace detail

// The host checks of prefill's arguments; throws infuse::error naming the first wrong one.
template <class Sparsity, class Layout, class K, class V, class Space>
void check_prefill_arguments(const view<const float, 3, Space>& q,
                             const view<const float, 3, Space>& k,
                             const view<const float, 3, Space>& v,
                             const view<const std::int32_t, 1, Space>& q_indptr,
                             const cache_argument<Layout, K, V, Space>& cache,
                             const view<float, 3, Space>& out,
                             const typename Sparsity::params& sparsity, const options& opts,
                             const view<float, 2, Space>& lse) {
  constexpr std::string_view call = "infuse::attention::prefill";
  constexpr bool host_indptr = std::is_same_v<Space, host_memory>;
  const kv::cache_view<Layout, K, V> host = detail::host_side(cache);
  const auto& format = host.format;
  format.k.require_valid(call, "cache.format.k");
  format.v.require_valid(call, "cache.format.v");
  require(format.v.heads == format.k.heads, call, "cache.format.v.heads", format.v.heads,
          "cache.format.k.heads = " + std::to_string(format.k.heads) +
              " (each KV head has its keys and values)");
  const std::int64_t new_total = q.extent(0);
  const std::int64_t q_heads = q.extent(1);
  const std::int32_t kv_heads = format.k.heads;
  require(q_heads >= 1 && q_heads % kv_heads == 0, call, "q.extent(1)", q_heads,
          "a multiple of the KV heads " + std::to_string(kv_heads) + " (query heads are grouped)");
  require_view(q, call, "q", {any_extent, any_extent, {format.k.head_dim, "k head_dim"}});
  require_view(k, call, "k",
               {{new_total, "new_total, the rows of q"},
                {kv_heads, "k heads"},
                {format.k.head_dim, "k head_dim"}});
  require_view(v, call, "v",
               {{new_total, "new_total, the rows of q"},
                {kv_heads, "v heads"},
                {format.v.head_dim, "v head_dim"}});
  require_view(out, call, "out",
               {{new_total, "new_total, the rows of q"},
                {q_heads, "q heads"},
                {format.v.head_dim, "v head_dim"}});
  if (lse.data() != nullptr) {
    require_view(lse, call, "lse", {{new_total, "new_total, the rows of q"}, {q_heads, "q heads"}},
                 stride_rule::any);
  }

  detail::require_cache(cache, call);
  const std::int32_t batch = host.sequences();
  require_view(q_indptr, call, "q_indptr", {{std::int64_t{batch} + 1, "batch + 1"}},
               stride_rule::contiguous);
  if constexpr (host_indptr) {
    require(q_indptr(0) == 0, call, "q_indptr[0]", q_indptr(0), "0");
    for (std::int32_t b = 0; b < batch; ++b) {
      const std::string entry = "q_indptr[" + std::to_string(b + 1) + "]";
      require(q_indptr(b + 1) >= q_indptr(b), call, entry, q_indptr(b + 1),
              "at least the entry before it (q_indptr never decreases)");
      require(q_indptr(b + 1) - q_indptr(b) <= host.length(b), call, entry, q_indptr(b + 1),
              "at most q_indptr[" + std::to_string(b) + "] + the length of sequence " +
                  std::to_string(b) + " in the cache (" + std::to_string(host.length(b)) +
                  "): its new tokens have their slots already");
    }
    require(q_indptr(batch) == new_total, call, "q_indptr[" + std::to_string(batch) + "]",
            q_indptr(batch), "new_total = " + std::to_string(new_total) + ", the rows of q");
  }
  if (new_total > 0) {
    require(host.pages != nullptr, call, "cache.pages", host.pages, "a pointer");
    // Parameter records hold floats, and none<float> or none<half> codes are read as such.
    require(reinterpret_cast<std::uintptr_t>(host.pages) % 4 == 0, call, "cache.pages",
            static_cast<const void*>(host.pages), "a pointer aligned to 4 bytes");
  }
  require((host.key_min == nullptr) == (host.key_max == nullptr), call, "cache.key_max",
          static_cast<const void*>(host.key_max), "set exactly when cache.key_min is");

  Sparsity::check(sparsity, call);
  if constexpr (host_indptr &&
                requires { Sparsity::check_batch(sparsity, q_indptr.data(), batch, call); }) {
    Sparsity::check_batch(sparsity, q_indptr.data(), batch, call);
  }
  if constexpr (requires { Sparsity::needs_key_bounds; }) {
    require(!Sparsity::needs_key_bounds || host.key_min != nullptr, call, "cache.key_min",
            static_cast<const void*>(host.key_min),
            std::string("per-page key bounds, which sparse::") + Sparsity::name + " reads");
  }

  require_options(opts, call);
}

// The K and V arrangements prefill and the CUDA decode read: not yet kv::per_channel keys (KIVI)
// or kv::mixed records (ZipVL), whose scales live per page or per token flag (decode on exec::cpu
// reads them).
template <class KQuant, class VQuant>
constexpr void static_check_read_formats() {
  static_assert(!kv::is_per_channel<KQuant> && !kv::is_mixed<KQuant> && !kv::is_mixed<VQuant>,
                "infuse: prefill and the CUDA decode do not read kv::per_channel keys (KIVI) or "
                "kv::mixed records (ZipVL) yet (decode on exec::cpu does); see "
                "docs/policies.md#kivi-and-zipvl-arrangements");
}

// Prefill attention (see the top of this file). lse is optional: an empty view writes none.
template <class Layout, class KQuant, class VQuant, class Sparsity, class Exec,
          class Space = typename Exec::memory_space>
void prefill(const Exec& exec, std::type_identity_t<view<const float, 3, Space>> q,
             std::type_identity_t<view<const float, 3, Space>> k,
             std::type_identity_t<view<const float, 3, Space>> v,
             std::type_identity_t<view<const std::int32_t, 1, Space>> q_indptr,
             const std::type_identity_t<cache_argument<Layout, KQuant, VQuant, Space>>& cache,
             std::type_identity_t<view<float, 3, Space>> out,
             const typename Sparsity::params& sparsity_params, const options& opts = {},
             std::type_identity_t<view<float, 2, Space>> lse = {}) {
  exec::static_check_backend<Exec>();
  static_check_read_formats<KQuant, VQuant>();
  quant::static_check_scheme<KQuant>();
  quant::static_check_scheme<VQuant>();
  sparse::static_check_policy<Sparsity>();
  static_check_view<Exec, 3, view<const float, 3, Space>>();
  check_prefill_arguments<Sparsity, Layout, KQuant, VQuant, Space>(q, k, v, q_indptr, cache, out,
                                                                   sparsity_params, opts, lse);
  if (q.extent(0) == 0) return;
  detail::prefill_body<Exec>::template run<Sparsity>(
      exec, q, k, v, q_indptr, detail::kernel_side(cache), out, sparsity_params, opts, lse);
}

}  // namespace infuse::attention
