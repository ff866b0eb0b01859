// KV-cache layouts: where token t of sequence s lives, the same on the host and on the device.
//
// A layout is a tag type:
//   kv::contiguous<Order>          each sequence owns one run of `capacity` token slots;
//   kv::paged<PageSize, Order>     a sequence is a list of pages of PageSize token slots (1..256),
//                                  found through a CSR page table.
// Order says how a page (or a contiguous run) holds its tokens x heads x head_dim elements:
//   kv::nhd  tokens major: (tokens, heads, head_dim), one token's heads side by side;
//   kv::hnd  heads major:  (heads, tokens, head_dim), one head's tokens side by side.
// K and V take the same layout with their own head count and head dim (offset() takes both).
//
// The page table (CSR, as FlashInfer's paged KV takes it) for `sequences` sequences:
//   indptr         (sequences + 1)   sequence s owns indices[indptr[s] .. indptr[s + 1])
//   indices        (indptr[sequences]) page indices into the pool, in token order
//   last_page_len  (sequences)       tokens in the sequence's last page: 1..PageSize, 0 when the
//                                    sequence has no page (is empty)
// See docs/policies.md#kv-layouts.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

#include "infuse/core/config.hpp"
#include "infuse/core/error.hpp"

namespace infuse::kv {

// Tokens major inside a page: element (slot, head, dim) of a page of `slots` token slots.
struct nhd {
  static constexpr const char* name = "nhd";
  INFUSE_HOST_DEVICE static constexpr std::int64_t offset(std::int64_t slot, std::int64_t head,
                                                          std::int64_t dim, std::int64_t slots,
                                                          std::int64_t heads,
                                                          std::int64_t head_dim) {
    (void)slots;
    return (slot * heads + head) * head_dim + dim;
  }
};

// Heads major inside a page: one head's tokens are contiguous, as a per-head kernel reads them.
struct hnd {
  static constexpr const char* name = "hnd";
  INFUSE_HOST_DEVICE static constexpr std::int64_t offset(std::int64_t slot, std::int64_t head,
                                                          std::int64_t dim, std::int64_t slots,
                                                          std::int64_t heads,
                                                          std::int64_t head_dim) {
    (void)heads;
    return (head * slots + slot) * head_dim + dim;
  }
};

template <class Order>
inline constexpr bool is_order = std::is_same_v<Order, nhd> || std::is_same_v<Order, hnd>;

// Where a token lives: a page of the pool (for contiguous: the sequence's run) and a slot in it.
struct token_location {
  std::int32_t page;
  std::int32_t slot;
};

// The page table of a paged layout (see the top of this file). Pointers into host or device
// memory; the accessors run on both.
template <int PageSize>
struct page_table_view {
  const std::int32_t* indptr;         // (sequences + 1)
  const std::int32_t* indices;        // (indptr[sequences])
  const std::int32_t* last_page_len;  // (sequences)
  std::int32_t sequences;

  INFUSE_HOST_DEVICE std::int32_t pages(std::int32_t s) const { return indptr[s + 1] - indptr[s]; }

  INFUSE_HOST_DEVICE std::int64_t length(std::int32_t s) const {
    const std::int32_t count = pages(s);
    return count == 0 ? 0 : std::int64_t{count - 1} * PageSize + last_page_len[s];
  }

  // Token t (0 <= t < length(s)) of sequence s.
  INFUSE_HOST_DEVICE token_location locate(std::int32_t s, std::int64_t t) const {
    return {indices[indptr[s] + static_cast<std::int32_t>(t / PageSize)],
            static_cast<std::int32_t>(t % PageSize)};
  }
};

// The contiguous layout's table: sequence s owns run s of `capacity` slots and holds lengths[s].
struct contiguous_table_view {
  const std::int32_t* lengths;  // (sequences)
  std::int32_t sequences;
  std::int32_t capacity;

  INFUSE_HOST_DEVICE std::int64_t length(std::int32_t s) const { return lengths[s]; }

  INFUSE_HOST_DEVICE token_location locate(std::int32_t s, std::int64_t t) const {
    return {s, static_cast<std::int32_t>(t)};
  }
};

template <class Order = nhd>
struct contiguous {
  static_assert(is_order<Order>,
                "infuse: kv::contiguous<Order> takes kv::nhd or kv::hnd as its order; see "
                "docs/policies.md#kv-layouts");
  using order = Order;
  using table_view = contiguous_table_view;
  static constexpr bool is_paged = false;
};

template <int PageSize, class Order = nhd>
struct paged {
  static_assert(PageSize >= 1 && PageSize <= 256,
                "infuse: kv::paged<PageSize> needs a page size from 1 to 256 tokens; see "
                "docs/policies.md#kv-layouts");
  static_assert(is_order<Order>,
                "infuse: kv::paged<PageSize, Order> takes kv::nhd or kv::hnd as its order; see "
                "docs/policies.md#kv-layouts");
  using order = Order;
  using table_view = page_table_view<PageSize>;
  static constexpr bool is_paged = true;
  static constexpr int page_size = PageSize;
};

// Checks a page table handed in by a caller against a pool of `pool_pages` pages before a kernel
// trusts it: indptr starts at 0 and never decreases, every index is a page of the pool, and every
// last_page_len fits its sequence. Throws infuse::error naming the entry.
template <int PageSize>
void require_page_table(const page_table_view<PageSize>& table, std::int32_t pool_pages,
                        std::string_view call) {
  require(table.sequences >= 0, call, "page_table.sequences", table.sequences, "at least 0");
  require(table.indptr != nullptr, call, "page_table.indptr", table.indptr, "a pointer");
  require(table.indptr[0] == 0, call, "page_table.indptr[0]", table.indptr[0], "0");
  for (std::int32_t s = 0; s < table.sequences; ++s) {
    require(table.indptr[s + 1] >= table.indptr[s], call,
            "page_table.indptr[" + std::to_string(s + 1) + "]", table.indptr[s + 1],
            "at least the entry before it (indptr never decreases)");
    const std::int32_t len = table.last_page_len[s];
    const bool empty = table.pages(s) == 0;
    require(empty ? len == 0 : len >= 1 && len <= PageSize, call,
            "page_table.last_page_len[" + std::to_string(s) + "]", len,
            empty ? "0 for a sequence without pages" : "from 1 to the page size");
  }
  for (std::int32_t i = 0; i < table.indptr[table.sequences]; ++i) {
    require(table.indices[i] >= 0 && table.indices[i] < pool_pages, call,
            "page_table.indices[" + std::to_string(i) + "]", table.indices[i],
            "a page of the pool, 0 to " + std::to_string(pool_pages - 1));
  }
}

}  // namespace infuse::kv
