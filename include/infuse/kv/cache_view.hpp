// kv::cache_view: what an attention kernel reads (and prefill writes) of a KV cache, without
// copies: the pool's pages, their byte map, the page table of a batch and the per-page metadata.
// The same struct on the host and on the device; Space says where the pointers point.
// See docs/policies.md#kv-layouts.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "infuse/core/config.hpp"
#include "infuse/core/error.hpp"
#include "infuse/core/float_types.hpp"
#include "infuse/core/memory.hpp"
#include "infuse/kv/format.hpp"
#include "infuse/kv/layout.hpp"

namespace infuse::kv {

// Where a token's K and V records are: the page's first byte and the slot in it.
struct token_address {
  std::uint8_t* page;
  std::int32_t slot;
};

template <class Layout, class KScheme, class VScheme, memory_space Space = host_memory>
struct cache_view {
  using layout = Layout;
  using k_scheme = KScheme;
  using v_scheme = VScheme;
  using memory_space = Space;
  using format_type = page_format<typename Layout::order, KScheme, VScheme>;

  // (pool_pages, format.page_bytes()); contiguous: one run a sequence.
  std::uint8_t* pages = nullptr;
  std::int32_t pool_pages = 0;
  format_type format{};  // format.slots: the page size (contiguous: the run's capacity)
  typename Layout::table_view table{};
  // Per-page metadata, null when not kept: (pool_pages, k.heads, k.head_dim) key minimum and
  // maximum per channel over the page's stored (dequantized) keys, rounded outward to half
  // (kv/metadata.hpp); (pool_pages, slots, k.heads) attention mass accumulated per token.
  half* key_min = nullptr;
  half* key_max = nullptr;
  float* mass = nullptr;
  // kv::per_channel keys: per sequence of the table, the full-precision keys of its last page
  // while that page is not full, (format.slots, k.heads, k.head_dim) floats, slot after slot;
  // null for other arrangements.
  const float* const* windows = nullptr;

  INFUSE_HOST_DEVICE std::int32_t sequences() const { return table.sequences; }
  INFUSE_HOST_DEVICE std::int64_t length(std::int32_t s) const { return table.length(s); }
  INFUSE_HOST_DEVICE std::uint8_t* page(std::int32_t index) const {
    return pages + std::int64_t{index} * format.page_bytes();
  }
  // Token t (below length(s)) of sequence s: its page index and slot. On a device the index is
  // clamped to the pool: the host checked its own copy of the table, and a device copy that
  // disagrees must still not send a kernel outside the pool.
  INFUSE_HOST_DEVICE token_location location(std::int32_t s, std::int64_t t) const {
    token_location at = table.locate(s, t);
#if defined(__CUDA_ARCH__)
    at.page = at.page < 0 ? 0 : at.page < pool_pages ? at.page : pool_pages - 1;
#endif
    return at;
  }
  // The same as the page's bytes and the slot.
  INFUSE_HOST_DEVICE token_address locate(std::int32_t s, std::int64_t t) const {
    const token_location at = location(s, t);
    return {page(at.page), at.slot};
  }
};

// Reads back the stored key of token t (below length(s)) of sequence s, head `head`: the first
// k.head_dim of the k.stored_dim() floats written to out are the key. A kv::per_channel page that
// is not full is read from the sequence's window (full precision), any other from its codes.
template <class Layout, class KScheme, class VScheme, memory_space Space>
INFUSE_HOST_DEVICE void read_key(const cache_view<Layout, KScheme, VScheme, Space>& view,
                                 std::int32_t s, std::int64_t t, std::int32_t head, float* out) {
  const token_address at = view.locate(s, t);
  if constexpr (is_per_channel<KScheme>) {
    const std::int64_t slots = view.format.slots;
    if (t >= view.length(s) / slots * slots) {
      const auto& k = view.format.k;
      const float* key = view.windows[s] + (std::int64_t{at.slot} * k.heads + head) * k.head_dim;
      for (std::int32_t d = 0; d < k.stored_dim(); ++d) out[d] = d < k.head_dim ? key[d] : 0.0f;
      return;
    }
  }
  view.format.read_key(at.page, at.slot, head, out);
}

// Reads back the stored value of token t of sequence s, head `head` (v.stored_dim() floats).
template <class Layout, class KScheme, class VScheme, memory_space Space>
INFUSE_HOST_DEVICE void read_value(const cache_view<Layout, KScheme, VScheme, Space>& view,
                                   std::int32_t s, std::int64_t t, std::int32_t head, float* out) {
  const token_address at = view.locate(s, t);
  view.format.read_value(at.page, at.slot, head, out);
}

// Host checks of a cache view (host memory) before a kernel reads it; throws infuse::error naming
// the part.
template <class Layout, class KQuant, class VQuant>
void require_cache_view(const cache_view<Layout, KQuant, VQuant>& cache, std::string_view call) {
  cache.format.k.require_valid(call, "cache.format.k");
  cache.format.v.require_valid(call, "cache.format.v");
  require(cache.pool_pages >= 0, call, "cache.pool_pages", cache.pool_pages, "at least 0");
  require(cache.pool_pages == 0 || cache.pages != nullptr, call, "cache.pages", cache.pages,
          "a pointer to pool_pages pages");
  // Unquantized float codes are read as floats, half codes as 16-bit words.
  require(reinterpret_cast<std::uintptr_t>(cache.pages) % 4 == 0, call, "cache.pages",
          static_cast<const void*>(cache.pages), "a pointer aligned to 4 bytes");
  if constexpr (is_per_channel<KQuant>) {
    require(cache.table.sequences == 0 || cache.windows != nullptr, call, "cache.windows",
            cache.windows, "a window per sequence (kv::per_channel keys)");
  }
  if constexpr (Layout::is_paged) {
    require(cache.format.slots == Layout::page_size, call, "cache.format.slots", cache.format.slots,
            "the layout's page size " + std::to_string(Layout::page_size));
    require_page_table(cache.table, cache.pool_pages, call);
  } else {
    const auto& table = cache.table;
    require(table.sequences >= 0, call, "cache.table.sequences", table.sequences, "at least 0");
    require(table.capacity == cache.format.slots, call, "cache.table.capacity", table.capacity,
            "cache.format.slots, the slots of a sequence's run");
    require(table.sequences <= cache.pool_pages, call, "cache.table.sequences", table.sequences,
            "at most cache.pool_pages, one run per sequence");
    require(table.sequences == 0 || table.lengths != nullptr, call, "cache.table.lengths",
            table.lengths, "a pointer to one length per sequence");
    for (std::int32_t s = 0; s < table.sequences; ++s) {
      require(table.lengths[s] >= 0 && table.lengths[s] <= table.capacity, call,
              "cache.table.lengths[" + std::to_string(s) + "]", table.lengths[s],
              "0 to the capacity " + std::to_string(table.capacity));
    }
  }
}

}  // namespace infuse::kv
