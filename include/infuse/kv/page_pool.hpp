// The quantized paged KV cache: kv::page_pool and kv::cache<Layout, KQuant, VQuant, Alloc>.
//
// kv::page_ledger: which of `capacity` pages are in use (a reference count per page and a free
// list). kv::page_pool: a ledger and its pages on host memory, `page_bytes` bytes each (64-byte
// aligned). kv::cache<paged<PageSize, Order>, KQuant, VQuant, Alloc>: sequences over one pool,
// each a list of pages in token order; a page holds PageSize token slots laid out by
// kv::page_format (format.hpp): K and V records of each (slot, head), each in its own scheme.
// Alloc says where the page bytes and the metadata live: kv::host_pages (the default, here) or
// kv::device_pages (kv/cuda/cache.cuh, for .cu files). The bookkeeping (sequences, page lists,
// reference counts, the checks) is on the host and the same for both; Alloc's storage carries out
// the byte operations: copy a page, clear attention mass, encode rows, fold key bounds, move
// records.
//   create   a new empty sequence;
//   append   n tokens: reserve their slots (a prefill kernel then writes them), or, for a batch,
//            quantize their K and V into the slots in the same pass and update the key bounds;
//   fork     a new sequence sharing every page of its parent (reference counts go up); a shared
//            partial last page is copied on write, bytes and metadata: the first branch that
//            appends to it gets its own copy, so a write to one branch never shows in the other;
//   truncate rolls back the last n tokens (rejected speculative tokens), releasing pages and
//            recomputing the key bounds of the new last page;
//   free     releases every page of a sequence;
//   unshare  gives a sequence its own copy of every page it shares (before writing in place);
//   compact  keeps chosen tokens of sequences (kv::retain::select) and moves them to the front,
//            records and attention mass, after unsharing their pages, then recomputes the key
//            bounds and releases the pages no longer reached (kv::per_channel keys: each full
//            page that receives a moved token is quantized again from the stored keys, and the
//            window takes the kept keys of a last page short of full);
//   compact_merged  the same after folding evicted tokens into kept ones (kv::retain::merge).
// A page returns to the free list when its reference count drops to zero. Per-page metadata (key
// bounds, attention mass) is described in kv/metadata.hpp; view(batch) hands a kernel the pool,
// the metadata and the batch's page table as a kv::cache_view, without copies.
//
// Every operation checks its arguments (and that the pool has the pages it needs) before it
// changes anything, and throws infuse::error naming the argument: on error the cache is exactly as
// it was (compare with operator==). See docs/policies.md#the-quantized-paged-kv-cache.
#pragma once

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <hwy/highway.h>

#include <algorithm>
#include <array>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <limits>
#include <map>
#include <new>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "infuse/core/error.hpp"
#include "infuse/core/float_types.hpp"
#include "infuse/core/view.hpp"
#include "infuse/exec/cpu.hpp"
#include "infuse/kv/cache_view.hpp"
#include "infuse/kv/cpu/compact.hpp"
#include "infuse/kv/format.hpp"
#include "infuse/kv/layout.hpp"
#include "infuse/kv/metadata.hpp"
#include "infuse/quant/int.hpp"
#include "infuse/quant/none.hpp"

namespace infuse::kv {

namespace detail {

namespace hn = hwy::HWY_NAMESPACE;

// vector_format<per_channel<S>>::encode_page for quant::int_ keys, bit for bit, with SIMD lanes
// across a block's channels. The float operations are the scalar ones in the same order (the fit's
// comparisons, w / scale + zero rounded to nearest even and clamped), so the codes and parameters
// are the same bits. Per head, extremes(head, stored) then receives the minimum and maximum of
// the head's stored keys, scale * (u - zero) as a kernel dequantizes them (stored: 2 x head_dim
// floats, the minima first; NaN skipped).
template <class S, class Key, class Codes, class Extremes>
void encode_int_key_page(const vector_format<per_channel<S>>& k, std::int32_t slots, Key& key,
                         Codes& codes, std::uint8_t* page_params, Extremes&& extremes) {
  const hn::CappedTag<float, quant::block_size> d;
  constexpr int lanes = static_cast<int>(hn::MaxLanes(d));
  constexpr int width = quant::block_size;
  const auto zero = hn::Zero(d);
  const auto top = hn::Set(d, static_cast<float>(S::max_code));
  std::memset(page_params, 0, static_cast<std::size_t>(k.page_param_bytes()));
  HWY_ALIGN float block[max_page_slots * width];
  HWY_ALIGN float stored_codes[max_page_slots * width];  // the codes as floats, exact
  HWY_ALIGN float lo[width], hi[width], scale[width], zero_point[width];
  // The minima, then (from `maxima`) the maxima of a head; head_dim is at most 1024.
  constexpr int maxima = 1024 + width;
  HWY_ALIGN float head_extremes[2 * maxima];
  for (std::int32_t head = 0; head < k.heads; ++head) {
    for (int b = 0; b < k.blocks(); ++b) {
      k.gather_block(slots, key, head, b, block);
      // The fit's range: min(w, 0) and max(w, 0) per channel (NaN skipped).
      for (int c = 0; c < width; c += lanes) {
        auto low = zero, high = zero;
        for (std::int32_t slot = 0; slot < slots; ++slot) {
          const auto x = hn::Load(d, block + slot * width + c);
          low = hn::IfThenElse(hn::Lt(x, low), x, low);
          high = hn::IfThenElse(hn::Gt(x, high), x, high);
        }
        hn::Store(low, d, lo + c);
        hn::Store(high, d, hi + c);
      }
      for (int j = 0; j < width; ++j) {
        const int dim = b * width + j;
        k.set_channel_params(page_params, head, dim, S::fit_range(lo[j], hi[j], 1.0f));
        const typename S::params p = k.channel_params(page_params, head, dim);
        scale[j] = p.scale;
        zero_point[j] = p.zero;
      }
      for (int c = 0; c < width; c += lanes) {
        const auto s = hn::Load(d, scale + c);
        const auto z = hn::Load(d, zero_point + c);
        const auto fitted = hn::Gt(s, zero);  // a group of no range stores its zero
        auto low = hn::Set(d, std::numeric_limits<float>::infinity());
        auto high = hn::Neg(low);
        for (std::int32_t slot = 0; slot < slots; ++slot) {
          auto u = hn::Round(hn::Add(hn::Div(hn::Load(d, block + slot * width + c), s), z));
          u = hn::IfThenElse(hn::Gt(u, top), top, u);
          // Up from 0, so that -0 (a rounded small negative) and NaN give code 0 as the
          // scalar clamp of an int does.
          u = hn::IfThenElse(hn::Gt(u, zero), u, zero);
          u = hn::IfThenElse(fitted, u, z);
          hn::Store(u, d, stored_codes + slot * width + c);
          const auto value = hn::Mul(s, hn::Sub(u, z));
          low = hn::IfThenElse(hn::Lt(value, low), value, low);
          high = hn::IfThenElse(hn::Lt(high, value), value, high);
        }
        hn::Store(low, d, head_extremes + b * width + c);
        hn::Store(high, d, head_extremes + maxima + b * width + c);
      }
      for (std::int32_t slot = 0; slot < slots; ++slot) {
        std::uint32_t block_codes[width];
        for (int j = 0; j < width; ++j) {
          block_codes[j] = static_cast<std::uint32_t>(stored_codes[slot * width + j]);
        }
        S::pack(block_codes, codes(slot, head) + std::int64_t{b} * S::block_bytes);
      }
    }
    // The maxima right after the head_dim minima (forward, onto a lower address).
    std::copy(head_extremes + maxima, head_extremes + maxima + k.head_dim,
              head_extremes + k.head_dim);
    extremes(head, static_cast<const float*>(head_extremes));
  }
}

}  // namespace detail

// Storage for pages: cache-line aligned, so every region of every page (each at a multiple of
// region_alignment) starts on a cache line. A pool of 2 MiB or more starts on a 2 MiB boundary and
// asks Linux for transparent huge pages: attention reads each page's head a few KiB at a time from
// pages all over the pool, and with 4 KiB pages nearly every such run would miss the TLB.
template <class T>
struct page_allocator {
  using value_type = T;
  static constexpr std::size_t huge_page = std::size_t{1} << 21;
  page_allocator() = default;
  template <class U>
  page_allocator(const page_allocator<U>&) noexcept {}  // NOLINT: rebinding is implicit
  T* allocate(std::size_t n) {
    const std::size_t bytes = n * sizeof(T);
    void* p = ::operator new (bytes, std::align_val_t{alignment(bytes)});
#if defined(__linux__)
    if (bytes >= huge_page) ::madvise(p, bytes & ~(huge_page - 1), MADV_HUGEPAGE);  // a hint
#endif
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t n) noexcept {
    ::operator delete (p, std::align_val_t{alignment(n * sizeof(T))});
  }
  friend bool operator==(const page_allocator&, const page_allocator&) = default;

 private:
  static constexpr std::size_t alignment(std::size_t bytes) {
    return bytes >= huge_page ? huge_page : std::size_t{region_alignment};
  }
};

// Which pages of a pool are in use: a reference count per page and a free list.
class page_ledger {
 public:
  explicit page_ledger(std::int32_t capacity) {
    require(capacity >= 1, "infuse::kv::page_pool", "capacity", capacity, "at least 1 page");
    ref_counts_.assign(static_cast<std::size_t>(capacity), 0);
    // Full capacity up front, so that release() never reallocates (and never throws).
    free_list_.reserve(static_cast<std::size_t>(capacity));
    // A stack popped from the back: page 0 is handed out first.
    for (std::int32_t page = capacity - 1; page >= 0; --page) free_list_.push_back(page);
  }

  [[nodiscard]] std::int32_t capacity() const {
    return static_cast<std::int32_t>(ref_counts_.size());
  }
  [[nodiscard]] std::int32_t free_pages() const {
    return static_cast<std::int32_t>(free_list_.size());
  }
  [[nodiscard]] std::int32_t ref_count(std::int32_t page) const {
    require_page(page, "infuse::kv::page_pool::ref_count");
    return ref_counts_[static_cast<std::size_t>(page)];
  }

  // A free page, now with reference count 1.
  std::int32_t allocate() {
    require(!free_list_.empty(), "infuse::kv::page_pool::allocate", "free_pages", 0,
            "at least 1 (the pool is exhausted)");
    const std::int32_t page = free_list_.back();
    free_list_.pop_back();
    ref_counts_[static_cast<std::size_t>(page)] = 1;
    return page;
  }

  // One more holder of a page in use.
  void retain(std::int32_t page) {
    require_in_use(page, "infuse::kv::page_pool::retain");
    ++ref_counts_[static_cast<std::size_t>(page)];
  }

  // One holder less; the page returns to the free list at zero.
  void release(std::int32_t page) {
    require_in_use(page, "infuse::kv::page_pool::release");
    if (--ref_counts_[static_cast<std::size_t>(page)] == 0) free_list_.push_back(page);
  }

  friend bool operator==(const page_ledger&, const page_ledger&) = default;

 protected:
  void require_page(std::int32_t page, const char* call) const {
    require(page >= 0 && page < capacity(), call, "page", page,
            "a page of the pool (0 to capacity - 1)");
  }

 private:
  void require_in_use(std::int32_t page, const char* call) const {
    require_page(page, call);
    require(ref_counts_[static_cast<std::size_t>(page)] > 0, call, "page", page,
            "a page in use (reference count above 0)");
  }

  std::vector<std::int32_t> ref_counts_;  // (capacity)
  std::vector<std::int32_t> free_list_;   // (free_pages), a stack
};

// A ledger and its pages on host memory.
class page_pool : public page_ledger {
 public:
  page_pool(std::int32_t capacity, std::int64_t page_bytes)
      : page_ledger(capacity), page_bytes_(page_bytes) {
    require(page_bytes >= 1, "infuse::kv::page_pool", "page_bytes", page_bytes, "at least 1");
    bytes_.assign(static_cast<std::size_t>(capacity) * static_cast<std::size_t>(page_bytes), 0);
  }

  [[nodiscard]] std::int64_t page_bytes() const { return page_bytes_; }

  // The bytes of one page, and of the whole pool: capacity * page_bytes, page after page.
  [[nodiscard]] std::span<std::uint8_t> bytes(std::int32_t page) {
    require_page(page, "infuse::kv::page_pool::bytes");
    return {bytes_.data() + offset(page), static_cast<std::size_t>(page_bytes_)};
  }
  [[nodiscard]] std::span<const std::uint8_t> bytes(std::int32_t page) const {
    require_page(page, "infuse::kv::page_pool::bytes");
    return {bytes_.data() + offset(page), static_cast<std::size_t>(page_bytes_)};
  }
  [[nodiscard]] std::span<const std::uint8_t> all_bytes() const { return bytes_; }
  // The first byte of page 0, for views that address pages themselves (kv::cache_view).
  [[nodiscard]] std::uint8_t* data() { return bytes_.data(); }

  friend bool operator==(const page_pool&, const page_pool&) = default;

 private:
  [[nodiscard]] std::size_t offset(std::int32_t page) const {
    return static_cast<std::size_t>(page) * static_cast<std::size_t>(page_bytes_);
  }

  std::int64_t page_bytes_;
  std::vector<std::uint8_t, page_allocator<std::uint8_t>> bytes_;  // (capacity, page_bytes)
};

// A sequence of a cache, named by the id create() or fork() returned; ids are never reused.
using sequence_id = std::int64_t;

// A page table built for a batch of sequences, owning its arrays; view() is what a kernel reads.
template <int PageSize>
struct page_table {
  std::vector<std::int32_t> indptr;         // (sequences + 1)
  std::vector<std::int32_t> indices;        // (indptr.back())
  std::vector<std::int32_t> last_page_len;  // (sequences)

  [[nodiscard]] page_table_view<PageSize> view() const {
    return {indptr.data(), indices.data(), last_page_len.data(),
            static_cast<std::int32_t>(last_page_len.size())};
  }
};

// What cache::view(batch) returns: the batch's page table, owned, and the kv::cache_view over it,
// the cache's pool and its metadata. Valid until the cache changes a sequence of the batch
// (append, truncate, free) or is destroyed; movable, not copyable (the view points into it).
template <class Layout, class KQuant, class VQuant>
class cache_batch {
 public:
  using view_type = cache_view<Layout, KQuant, VQuant, host_memory>;

  // windows: per sequence of the table, its full-precision keys (kv::per_channel keys), or empty.
  cache_batch(page_table<Layout::page_size> table, view_type view,
              std::vector<const float*> windows = {})
      : table_(std::move(table)), windows_(std::move(windows)), view_(view) {
    view_.table = table_.view();
    view_.windows = windows_.empty() ? nullptr : windows_.data();
  }
  cache_batch(cache_batch&&) noexcept = default;
  cache_batch& operator=(cache_batch&&) noexcept = default;
  cache_batch(const cache_batch&) = delete;
  cache_batch& operator=(const cache_batch&) = delete;

  [[nodiscard]] const page_table<Layout::page_size>& table() const { return table_; }
  [[nodiscard]] const view_type& view() const { return view_; }

 private:
  page_table<Layout::page_size>
      table_;  // moving the vectors keeps their buffers: view_ stays valid
  std::vector<const float*> windows_;
  view_type view_;
};

// Slots [slot_begin, slot_end) of one page; for an append, the rows of k and v from `row` on
// fill them in order. With kv::per_channel keys, `window` is the full-precision keys of the
// sequence's last page, (page size, k.heads, k.head_dim) floats: slots [0, slot_begin) are there
// before an append, and a run that leaves its page short of full writes its keys there.
struct page_run {
  std::int32_t page;
  std::int32_t slot_begin;
  std::int32_t slot_end;
  std::int64_t row;
  float* window = nullptr;
};

// One token's records and attention mass, moved by compaction from one slot to another.
struct token_move {
  token_location from;
  token_location to;
};

// A full page of kv::per_channel keys to quantize again from floats (after a compaction):
// keys is (page size, k.heads, k.head_dim), slot after slot.
struct key_page {
  std::int32_t page;
  const float* keys;
};

struct host_pages;

// What kv::cache's Alloc names: the memory space of the pages and metadata, the exec of an append
// or a compaction, the storage of a page format (its bytes, its metadata and the byte operations)
// and what view(batch) returns.
template <class A>
concept page_memory = memory_space<typename A::memory_space> && requires {
  typename A::exec_type;
  typename A::template storage<page_format<nhd, quant::none<half>, quant::none<half>>>;
  typename A::template batch<paged<1>, quant::none<half>, quant::none<half>>;
};

// The bytes and metadata of a cache's pages on host memory, and the byte operations on them.
template <class Format>
class host_page_storage {
 public:
  host_page_storage(std::int32_t capacity, const Format& format, const host_pages&)
      : format_(format),
        pool_(capacity, format.page_bytes()),
        metadata_(capacity, format.k.heads, format.k.head_dim, format.slots) {}

  [[nodiscard]] const Format& format() const { return format_; }
  [[nodiscard]] page_ledger& ledger() { return pool_; }
  [[nodiscard]] const page_ledger& ledger() const { return pool_; }
  [[nodiscard]] const page_pool& pool() const { return pool_; }
  [[nodiscard]] const page_metadata& metadata() const { return metadata_; }
  [[nodiscard]] std::int64_t metadata_bytes_per_page() const { return metadata_.bytes_per_page(); }
  [[nodiscard]] std::int32_t covered(std::int32_t page) const { return metadata_.covered(page); }
  void set_covered(std::int32_t page, std::int32_t slots) { metadata_.set_covered(page, slots); }

  // What a cache_view points at.
  [[nodiscard]] std::uint8_t* pages() { return pool_.data(); }
  [[nodiscard]] half* key_min() { return metadata_.key_min(); }
  [[nodiscard]] half* key_max() { return metadata_.key_max(); }
  [[nodiscard]] float* mass() { return metadata_.mass(); }

  // What cache::view(batch) returns: the table and the view over it, on the host.
  template <class Batch, class Table>
  Batch make_batch(Table table, const typename Batch::view_type& view,
                   std::vector<const float*> windows = {}) const {
    return Batch(std::move(table), view, std::move(windows));
  }

  // Any CPU exec may run an append or a compaction.
  void check_exec(const exec::cpu& /*exec*/, const char* /*call*/) const {}

  // Host operations need no buffers beyond the ones the cache passes.
  void prepare(std::int64_t /*runs*/, std::int64_t /*moves*/) {}

  // Page `to` takes the bytes and every metadata value of page `from`.
  void copy_page(std::int32_t from, std::int32_t to) {
    std::memcpy(pool_.bytes(to).data(), pool_.bytes(from).data(),
                static_cast<std::size_t>(pool_.page_bytes()));
    metadata_.copy_page(from, to);
  }

  // Zeroes the attention mass of the runs' slots.
  void clear_mass(std::span<const page_run> runs) {
    for (const page_run& run : runs) {
      float* mass = metadata_.mass(run.page);
      std::fill(mass + std::int64_t{run.slot_begin} * format_.k.heads,
                mass + std::int64_t{run.slot_end} * format_.k.heads, 0.0f);
    }
  }

  // Folds the stored keys of the runs' slots into their pages' bounds (detail::fold_key_bounds).
  void fold(std::span<const page_run> runs) {
    for (const page_run& run : runs) fold_run(run);
  }

  // Quantizes rows of k and v into the runs' slots and folds the keys into the bounds, a run per
  // work item (one thread owns a page's bounds). important: a flag per row (kv::mixed records;
  // null: none important). kv::per_channel keys: a run that fills its page quantizes the page's
  // keys (the window's, then the run's) per channel; the other runs, after those, copy their keys
  // into the window (a sequence's window may be read by one run and rewritten by a later one).
  template <class Row>
  void write(const exec::cpu& exec, std::span<const page_run> runs, host_view<const Row, 3> k,
             host_view<const Row, 3> v, const std::uint8_t* important = nullptr) {
    const Format& f = format_;
    exec.parallel_for(std::ssize(runs), [&](std::int64_t n) {
      const page_run& run = runs[static_cast<std::size_t>(n)];
      std::uint8_t* page = pool_.data() + run.page * f.page_bytes();
      for (std::int32_t slot = run.slot_begin; slot < run.slot_end; ++slot) {
        const std::int64_t r = run.row + (slot - run.slot_begin);
        const bool flagged = important != nullptr && important[r] != 0;
        if constexpr (Format::has_flags) *f.flag(page, slot) = flagged ? 1 : 0;
        if constexpr (!per_channel_keys) {
          for (std::int32_t h = 0; h < f.k.heads; ++h) {
            encode_row(f.k, &k(r, h, 0), f.k_codes(page, slot, h), f.k_params(page, slot, h),
                       flagged);
          }
        }
        for (std::int32_t h = 0; h < f.v.heads; ++h) {
          encode_row(f.v, &v(r, h, 0), f.v_codes(page, slot, h), f.v_params(page, slot, h),
                     flagged);
        }
      }
      if constexpr (per_channel_keys) {
        if (run.slot_end < f.slots) return;
        const auto key = [&](std::int32_t slot, std::int32_t h, int d) {
          return slot < run.slot_begin
                     ? run.window[(std::int64_t{slot} * f.k.heads + h) * f.k.head_dim + d]
                     : static_cast<float>(k(run.row + (slot - run.slot_begin), h, d));
        };
        // The page's earlier slots change too: from the window's keys to their quantized ones.
        encode_key_page(run.page, key);
      } else {
        fold_run(run);
      }
    });
    if constexpr (per_channel_keys) {
      exec.parallel_for(std::ssize(runs), [&](std::int64_t n) {
        const page_run& run = runs[static_cast<std::size_t>(n)];
        if (run.slot_end == f.slots) return;
        for (std::int32_t slot = run.slot_begin; slot < run.slot_end; ++slot) {
          for (std::int32_t h = 0; h < f.k.heads; ++h) {
            float* key = run.window + (std::int64_t{slot} * f.k.heads + h) * f.k.head_dim;
            const Row* row = &k(run.row + (slot - run.slot_begin), h, 0);
            for (std::int32_t d = 0; d < f.k.head_dim; ++d) key[d] = static_cast<float>(row[d]);
          }
        }
        fold_run(run);
      });
    }
  }

  // Carries out the moves in order (each source is read before a later move overwrites it, as
  // compaction's ascending moves within a sequence guarantee).
  // exec: the moves run in order on the calling thread.
  void move(const exec::cpu& /*exec*/, std::span<const token_move> moves) {
    using order = decltype(order_of(format_));
    const Format& f = format_;
    for (const token_move& m : moves) {
      const std::uint8_t* from = pool_.data() + m.from.page * f.page_bytes();
      std::uint8_t* to = pool_.data() + m.to.page * f.page_bytes();
      const auto region = [&](std::int64_t offset, std::int32_t heads, std::int64_t bytes) {
        retain::detail::copy_records<order>(to + offset, m.to.slot, from + offset, m.from.slot,
                                            f.slots, heads, bytes);
      };
      region(f.k_codes_offset(), f.k.heads, f.k.code_bytes());
      region(f.k_params_offset(), f.k.heads, f.k.param_bytes());
      region(f.v_codes_offset(), f.v.heads, f.v.code_bytes());
      region(f.v_params_offset(), f.v.heads, f.v.param_bytes());
      if constexpr (Format::has_flags) *f.flag(to, m.to.slot) = *f.flag(from, m.from.slot);
      std::memcpy(metadata_.mass(m.to.page) + std::int64_t{m.to.slot} * f.k.heads,
                  metadata_.mass(m.from.page) + std::int64_t{m.from.slot} * f.k.heads,
                  sizeof(float) * static_cast<std::size_t>(f.k.heads));
    }
  }

  // kv::per_channel keys: quantizes each listed page's keys per channel and starts its key
  // bounds afresh, a page per work item.
  void requantize_keys(const exec::cpu& exec, std::span<const key_page> pages) {
    const auto& k = format_.k;
    exec.parallel_for(std::ssize(pages), [&](std::int64_t n) {
      const key_page& at = pages[static_cast<std::size_t>(n)];
      const auto key = [&](std::int32_t slot, std::int32_t h, int d) {
        return at.keys[(std::int64_t{slot} * k.heads + h) * k.head_dim + d];
      };
      encode_key_page(at.page, key);
    });
  }

  friend bool operator==(const host_page_storage& a, const host_page_storage& b) {
    return a.pool_ == b.pool_ && a.metadata_ == b.metadata_;
  }

 private:
  static constexpr bool per_channel_keys = is_per_channel<typename decltype(Format::k)::scheme>;

  template <class Order, class K, class V>
  static Order order_of(const page_format<Order, K, V>&);

  // vector_format::encode of one vector of floats, or of halves read as floats; kv::mixed records
  // take the token's flag.
  template <class Scheme, class Row>
  static void encode_row(const vector_format<Scheme>& format, const Row* x, std::uint8_t* codes,
                         std::uint8_t* params, bool important) {
    float values[1024];  // head_dim is at most 1024 (vector_format::require_valid)
    const float* row = values;
    if constexpr (std::is_same_v<Row, float>) {
      row = x;
    } else {
      for (std::int32_t d = 0; d < format.head_dim; ++d) values[d] = static_cast<float>(x[d]);
    }
    if constexpr (is_mixed<Scheme>) {
      format.encode(row, codes, params, important);
    } else {
      format.encode(row, codes, params);
    }
  }

  // Quantizes the keys of a full page per channel, key(slot, head, d) for d below head_dim, and
  // starts its key bounds afresh from the stored keys.
  template <class Key>
  void encode_key_page(std::int32_t page_index, Key& key) {
    const Format& f = format_;
    std::uint8_t* page = pool_.data() + page_index * f.page_bytes();
    const auto codes = [&](std::int32_t slot, std::int32_t h) { return f.k_codes(page, slot, h); };
    using scheme = typename decltype(Format::k)::scheme::scheme;
    if constexpr (quant::is_int<scheme>) {
      // A channel's bounds over the page's stored keys are its bounds over their minimum and
      // maximum: the fold of those two rows (a page of one head and two slots) sets them.
      Format extremes_format = f;
      extremes_format.k.heads = 1;
      const std::int64_t offset = std::int64_t{f.k.head_dim};
      detail::encode_int_key_page(f.k, f.slots, key, codes, page + f.k_page_params_offset(),
                                  [&](std::int32_t head, const float* extremes) {
                                    detail::fold_key_bounds(
                                        extremes_format, page, 0, 2,
                                        metadata_.key_min(page_index) + head * offset,
                                        metadata_.key_max(page_index) + head * offset, extremes);
                                  });
    } else {
      f.k.encode_page(f.slots, key, codes, page + f.k_page_params_offset());
      fold_run({page_index, 0, f.slots, 0});
    }
  }

  // A per_channel page short of full reads its keys from the run's window.
  void fold_run(const page_run& run) {
    const bool windowed = per_channel_keys && run.slot_end < format_.slots;
    detail::fold_key_bounds(format_, pool_.data() + run.page * format_.page_bytes(), run.slot_begin,
                            run.slot_end, metadata_.key_min(run.page), metadata_.key_max(run.page),
                            windowed ? run.window : nullptr);
  }

  Format format_;
  page_pool pool_;
  page_metadata metadata_;
};

// Pages and metadata on host memory: what kv::cache holds unless told otherwise.
struct host_pages {
  using memory_space = host_memory;
  using exec_type = exec::cpu;
  template <class Format>
  using storage = host_page_storage<Format>;
  template <class Layout, class KQuant, class VQuant>
  using batch = cache_batch<Layout, KQuant, VQuant>;
};

static_assert(page_memory<host_pages>);

template <class Layout, class KQuant = quant::none<half>, class VQuant = KQuant,
          class Alloc = host_pages>
class cache {
  static_assert(Layout::is_paged,
                "infuse: kv::cache needs a paged layout, kv::paged<PageSize, Order>; see "
                "docs/policies.md#kv-layouts");
  static_assert(page_memory<Alloc>,
                "infuse: kv::cache<Layout, KQuant, VQuant, Alloc> takes Alloc = kv::host_pages, "
                "kv::device_pages (kv/cuda/cache.cuh) or a type naming memory_space, exec_type, "
                "storage<Format> and batch<Layout, KQuant, VQuant>; see "
                "docs/policies.md#the-quantized-paged-kv-cache");

 public:
  using layout = Layout;
  using k_scheme = KQuant;
  using v_scheme = VQuant;
  using allocator = Alloc;
  using memory_space = typename Alloc::memory_space;
  using exec_type = typename Alloc::exec_type;
  using format_type = page_format<typename Layout::order, KQuant, VQuant>;
  using storage_type = typename Alloc::template storage<format_type>;
  using batch_type = typename Alloc::template batch<Layout, KQuant, VQuant>;
  static constexpr int page_size = Layout::page_size;
  // Keys grouped per channel across a page (KIVI): each sequence keeps the keys of its last page
  // in full precision (its window) until the page fills and is quantized.
  static constexpr bool per_channel_keys = is_per_channel<KQuant>;
  // A flag per token picks the high or low scheme of kv::mixed records (ZipVL).
  static constexpr bool flagged = format_type::has_flags;

  // A pool of `capacity` pages, each page_size tokens of K in format k and V in format v, in the
  // memory `alloc` says.
  cache(std::int32_t capacity, vector_format<KQuant> k, vector_format<VQuant> v,
        const Alloc& alloc = {})
      : storage_(capacity, checked_format(k, v), alloc) {}

  sequence_id create() {
    sequence seq;
    if constexpr (per_channel_keys)
      seq.window.assign(static_cast<std::size_t>(window_floats()), 0.0f);
    sequences_.emplace(next_id_, std::move(seq));
    return next_id_++;
  }

  // Reserves `tokens` more slots at the end of sequence s without writing them: a prefill kernel
  // writes their K and V (through view() or writable_page()) and then calls
  // kv::update_key_bounds for them. A shared partial last page is first copied (copy on write);
  // the new slots' attention mass is zeroed.
  void append(sequence_id s, std::int64_t tokens) {
    static_assert(!per_channel_keys,
                  "infuse: kv::per_channel keys are quantized by the cache's batch append when a "
                  "page fills; reserving slots for a kernel to write is for per-token keys; see "
                  "docs/policies.md#kivi-and-zipvl-arrangements");
    const std::array<sequence_id, 1> seqs{s};
    const std::array<std::int64_t, 1> counts{tokens};
    growth_plan plan = plan_growth(seqs, counts, "infuse::kv::cache::append", true);
    grow(plan, counts);
  }

  // Appends counts[i] tokens to sequence seqs[i] for each i and quantizes their keys and values
  // into the new slots in one parallel pass: k is (sum of counts, k.heads, k.head_dim), v is
  // (sum of counts, v.heads, v.head_dim), the tokens of seqs[0] first, in the cache's memory.
  // Updates the key bounds of the pages written and zeroes the new slots' attention mass.
  // Everything is checked first (unknown or repeated sequences, negative counts, shapes, free pages
  // for the whole batch).
  void append(const exec_type& exec, std::span<const sequence_id> seqs,
              std::span<const std::int64_t> counts, infuse::view<const float, 3, memory_space> k,
              infuse::view<const float, 3, memory_space> v) {
    append_rows(exec, seqs, counts, k, v);
  }
  // The same from half rows: each value is read as the float it stands for, so the cache holds
  // what appending those floats gives.
  void append(const exec_type& exec, std::span<const sequence_id> seqs,
              std::span<const std::int64_t> counts, infuse::view<const half, 3, memory_space> k,
              infuse::view<const half, 3, memory_space> v) {
    append_rows(exec, seqs, counts, k, v);
  }
  // The same with kv::mixed records: important[r] (one per row of k, host memory) nonzero stores
  // row r at the high bit-width, else at the low one (the appends above store every row low).
  void append(const exec_type& exec, std::span<const sequence_id> seqs,
              std::span<const std::int64_t> counts, infuse::view<const float, 3, memory_space> k,
              infuse::view<const float, 3, memory_space> v,
              std::span<const std::uint8_t> important) requires flagged {
    append_rows(exec, seqs, counts, k, v, important);
  }
  void append(const exec_type& exec, std::span<const sequence_id> seqs,
              std::span<const std::int64_t> counts, infuse::view<const half, 3, memory_space> k,
              infuse::view<const half, 3, memory_space> v,
              std::span<const std::uint8_t> important) requires flagged {
    append_rows(exec, seqs, counts, k, v, important);
  }

  // A new sequence holding the same tokens as s, sharing its pages.
  sequence_id fork(sequence_id s) {
    const sequence& parent = find(s, "infuse::kv::cache::fork");
    sequences_.emplace(next_id_, parent);  // the last step that may throw
    for (const std::int32_t page : parent.pages) ledger().retain(page);
    return next_id_++;
  }

  // Removes the last `tokens` tokens of sequence s, releasing the pages it no longer reaches, and
  // recomputes the key bounds of pages whose filled slots shrank (its new last page).
  void truncate(sequence_id s, std::int64_t tokens) {
    constexpr const char* call = "infuse::kv::cache::truncate";
    sequence& seq = find(s, call);
    require(tokens >= 0 && tokens <= seq.length, call, "tokens", tokens,
            "from 0 to the sequence's length " + std::to_string(seq.length));
    if (tokens == 0) return;
    const std::int64_t old_length = seq.length;
    seq.length -= tokens;
    const std::int64_t keep = pages_for(seq.length);
    if constexpr (per_channel_keys) {
      // Truncating into a quantized page: its kept tokens go back to the window as stored.
      if (seq.length % page_size != 0 && old_length >= keep * page_size) {
        fill_window(seq, seq.pages[static_cast<std::size_t>(keep - 1)]);
      }
    }
    release_from(seq, keep);
    if (keep > 0) refresh_bounds(seq.pages.back(), keep - 1);
  }

  // Releases every page of sequence s; s is no longer a sequence of this cache.
  void free(sequence_id s) {
    sequence& seq = find(s, "infuse::kv::cache::free");
    seq.length = 0;
    release_from(seq, 0);
    sequences_.erase(s);
  }

  // Gives sequence s its own copy of every page it shares with another sequence (bytes and
  // metadata), so that writing its pages in place (compaction) never shows in the others. Needs a
  // free page per shared page.
  void unshare(sequence_id s) {
    constexpr const char* call = "infuse::kv::cache::unshare";
    sequence& seq = find(s, call);
    const std::array<sequence*, 1> one{&seq};
    require_copies_fit(one, call, "sequence", std::to_string(s));
    unshare_pages(seq);
  }

  // Keeps tokens kept[kept_indptr[i] .. kept_indptr[i + 1]) (ascending positions) of sequence
  // seqs[i] for each i: their K/V records and attention mass move to positions 0, 1, ... in order
  // (bytes, so a kept token reads back bit for bit), the sequence is shortened to the kept count
  // and the key bounds of its pages are recomputed. Pages a sequence shares are first unshared
  // (one free page each), so no other sequence changes. Everything is checked first (unknown or
  // repeated sequences, kept_indptr, positions, free pages). kv::per_channel keys: a full page
  // that receives a moved token is quantized again per channel from its tokens' stored keys, and
  // the kept tokens of a last page short of full go to the window as stored (settle).
  void compact(const exec_type& exec, std::span<const sequence_id> seqs,
               std::span<const std::int32_t> kept_indptr, std::span<const std::int32_t> kept) {
    constexpr const char* call = "infuse::kv::cache::compact";
    require(kept_indptr.size() == seqs.size() + 1, call, "kept_indptr.size()", kept_indptr.size(),
            "seqs.size() + 1 = " + std::to_string(seqs.size() + 1));
    require(kept_indptr[0] == 0, call, "kept_indptr[0]", kept_indptr[0], "0");
    storage_.check_exec(exec, call);
    std::vector<sequence*> targets = find_batch(seqs, call);
    std::int64_t moves = 0;
    std::int64_t runs = 0;
    // Messages are built only on failure: kept lists a position per token.
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      if (kept_indptr[i + 1] < kept_indptr[i] || kept_indptr[i + 1] > std::ssize(kept)) {
        throw error(call, "kept_indptr[" + std::to_string(i + 1) + "]",
                    std::to_string(kept_indptr[i + 1]),
                    "from kept_indptr[" + std::to_string(i) + "] to kept.size() " +
                        std::to_string(kept.size()));
      }
      const std::int64_t length = targets[i]->length;
      for (std::int32_t j = kept_indptr[i]; j < kept_indptr[i + 1]; ++j) {
        const std::int64_t low = j == kept_indptr[i] ? 0 : std::int64_t{kept[j - 1]} + 1;
        if (kept[j] < low || kept[j] >= length) {
          throw error(call, "kept[" + std::to_string(j) + "]", std::to_string(kept[j]),
                      "a position of sequence " + std::to_string(seqs[i]) + " (length " +
                          std::to_string(length) +
                          ") above the one before it (kept positions ascend)");
        }
        if (kept[j] != j - kept_indptr[i]) ++moves;
      }
      runs += pages_for(kept_indptr[i + 1] - kept_indptr[i]);
    }
    require_copies_fit(targets, call, "seqs", std::to_string(seqs.size()) + " sequences");
    std::vector<token_move> move_list;
    settle_plan plan;
    move_list.reserve(static_cast<std::size_t>(moves));
    plan.reserve(runs);
    // kv::per_channel keys: each sequence's kept keys as stored, read before anything moves.
    std::vector<std::vector<float>> kept_keys(per_channel_keys ? seqs.size() : 0);
    for (std::size_t i = 0; i < kept_keys.size(); ++i) {
      kept_keys[i].resize(
          static_cast<std::size_t>((kept_indptr[i + 1] - kept_indptr[i]) * key_floats()));
    }
    storage_.prepare(runs, moves);  // the last step that may throw
    for (std::size_t i = 0; i < targets.size(); ++i) {
      sequence& seq = *targets[i];
      unshare_pages(seq);
      const std::span<const std::int32_t> positions =
          kept.subspan(static_cast<std::size_t>(kept_indptr[i]),
                       static_cast<std::size_t>(kept_indptr[i + 1] - kept_indptr[i]));
      for (std::size_t j = 0; j < positions.size(); ++j) {
        const auto to = static_cast<std::int64_t>(j);
        if (positions[j] != to)
          move_list.push_back({location(seq, positions[j]), location(seq, to)});
      }
      if constexpr (per_channel_keys) read_stored_keys(seq, positions, kept_keys[i].data());
    }
    storage_.move(exec, move_list);
    for (std::size_t i = 0; i < targets.size(); ++i) {
      const std::int32_t first = kept_indptr[i];
      settle(
          *targets[i], kept_indptr[i + 1] - first, per_channel_keys ? kept_keys[i].data() : nullptr,
          [&](std::int64_t j) { return kept[static_cast<std::size_t>(first + j)] != j; }, plan);
    }
    finish_settle(exec, plan);
  }

  // Merge compaction (kv::retain::merge, Elastic Cache and D2O) of sequence s: what
  // kv::retain::compact_merged does on a view (kv/cpu/compact.hpp), on pages s holds alone (its
  // shared pages are first unshared, one free page each), then the key bounds are recomputed and
  // s is shortened to kept.size(), which it returns. kv::per_channel keys: the merged keys are
  // the means of the keys as stored (the window's in full precision), and every full page that
  // receives a moved or merged key is quantized again per channel, as compact does. kept and
  // counts as for kv::retain::compact_merged; everything is checked first.
  template <int Budget, float Threshold, int Recent>
  std::int64_t compact_merged(
      const exec_type& exec, const retain::merge<Budget, Threshold, Recent>& rule, sequence_id s,
      std::span<const std::int32_t> kept,
      std::span<std::int32_t> counts = {}) requires std::same_as<memory_space, host_memory> {
    constexpr const char* call = "infuse::kv::cache::compact_merged";
    sequence& seq = find(s, call);
    const host_view<const std::int32_t, 1> kept_view(kept.data(), {std::ssize(kept)});
    const host_view<std::int32_t, 1> counts_view(counts.data(), {std::ssize(counts)});
    retain::detail::require_merge(rule, s, seq.length, kept_view, counts_view, call);
    const std::array<sequence*, 1> one{&seq};
    require_copies_fit(one, call, "sequence", std::to_string(s));
    lone_table table;
    const auto pieces =
        retain::detail::merge_pieces(exec, lone_view(seq, table), seq.length, std::ssize(kept));
    std::vector<double> workspace(static_cast<std::size_t>(pieces.bytes() / 8 + 1));
    std::vector<char> merged(kept.size(), 0);
    settle_plan plan;
    plan.reserve(pages_for(std::ssize(kept)));  // the last step that may throw
    unshare_pages(seq);
    const auto view = lone_view(seq, table);
    auto* base = reinterpret_cast<std::byte*>(workspace.data());
    // The kept keys as floats (the workspace's), each merged one replaced by its mean.
    auto* keys = reinterpret_cast<float*>(base + pieces.kept_keys());
    if constexpr (per_channel_keys) {
      retain::detail::merge_into_kept(
          exec, rule, view, 0, kept_view, counts_view, base,
          [&](std::int64_t j, token_location, const double* sums, double weight, float*) {
            for (std::int64_t d = 0; d < pieces.key_dims; ++d) {
              keys[j * pieces.key_dims + d] = static_cast<float>(sums[d] / weight);
            }
            merged[static_cast<std::size_t>(j)] = 1;
          });
      retain::detail::move_kept(view, 0, kept.data(), std::ssize(kept),
                                counts.empty() ? nullptr : counts.data());
    } else {
      retain::compact_merged(exec, rule, view, 0, kept_view, counts_view,
                             host_view<std::byte, 1>(base, {pieces.bytes()}));
    }
    settle(
        seq, std::ssize(kept), per_channel_keys ? keys : nullptr,
        [&](std::int64_t j) {
          return kept[static_cast<std::size_t>(j)] != j || merged[static_cast<std::size_t>(j)];
        },
        plan);
    finish_settle(exec, plan);
    return std::ssize(kept);
  }

  // Sets the flags of tokens [begin, begin + important.size()) of sequence s (kv::mixed records,
  // ZipVL's re-quantization after the importance of tokens is known): a token whose flag changes
  // is read back and stored again in the other scheme, from its stored values (raised to High it
  // keeps Low's error; lowered to Low it adds Low's). Pages s shares with another sequence and
  // writes to are copied first (one free page each), so no other sequence changes; the key
  // bounds of the pages written are recomputed.
  void requantize(sequence_id s, std::int64_t begin,
                  std::span<const std::uint8_t> important) requires flagged {
    constexpr const char* call = "infuse::kv::cache::requantize";
    sequence& seq = find(s, call);
    require(begin >= 0 && begin <= seq.length, call, "begin", begin,
            "from 0 to the sequence's length " + std::to_string(seq.length));
    require(std::ssize(important) <= seq.length - begin, call, "important.size()", important.size(),
            "at most the tokens from begin to the end of the sequence (" +
                std::to_string(seq.length - begin) + ")");
    const format_type& f = format();
    const auto changes = [&](std::int64_t t) {
      const token_location at = location(seq, t);
      return f.important(storage_.pages() + at.page * f.page_bytes(), at.slot) !=
             (important[static_cast<std::size_t>(t - begin)] != 0);
    };
    // The pages written: those holding a token whose flag changes.
    std::vector<std::int64_t> written;
    std::int64_t copies = 0;
    for (std::int64_t t = begin; t < begin + std::ssize(important); ++t) {
      const std::int64_t index = t / page_size;
      if (changes(t) && (written.empty() || written.back() != index)) {
        written.push_back(index);
        if (ledger().ref_count(seq.pages[static_cast<std::size_t>(index)]) > 1) ++copies;
      }
    }
    require(
        copies <= ledger().free_pages(), call, "important",
        std::to_string(copies) + " shared pages to write",
        "changes that fit the pool: " + std::to_string(ledger().free_pages()) + " pages are free");
    for (const std::int64_t index : written) {
      if (ledger().ref_count(seq.pages[static_cast<std::size_t>(index)]) > 1) {
        copy_shared_page(seq, index);
      }
    }
    for (std::int64_t t = begin; t < begin + std::ssize(important); ++t) {
      if (!changes(t)) continue;
      const token_location at = location(seq, t);
      std::uint8_t* page = storage_.pages() + at.page * f.page_bytes();
      const bool raise = important[static_cast<std::size_t>(t - begin)] != 0;
      float stored[1024];  // head_dim is at most 1024
      if constexpr (is_mixed<KQuant>) {
        for (std::int32_t h = 0; h < f.k.heads; ++h) {
          f.read_key(page, at.slot, h, stored);
          f.k.encode(stored, f.k_codes(page, at.slot, h), f.k_params(page, at.slot, h), raise);
        }
      }
      if constexpr (is_mixed<VQuant>) {
        for (std::int32_t h = 0; h < f.v.heads; ++h) {
          f.read_value(page, at.slot, h, stored);
          f.v.encode(stored, f.v_codes(page, at.slot, h), f.v_params(page, at.slot, h), raise);
        }
      }
      *f.flag(page, at.slot) = raise ? 1 : 0;
    }
    if constexpr (is_mixed<KQuant>) {
      for (const std::int64_t index : written) {
        const auto filled = static_cast<std::int32_t>(
            std::min<std::int64_t>(page_size, seq.length - index * page_size));
        fold_bounds(seq.pages[static_cast<std::size_t>(index)], 0, filled);
      }
    }
  }

  // The CSR page table of `batch`, in that order.
  [[nodiscard]] page_table<page_size> table(std::span<const sequence_id> batch) const {
    page_table<page_size> result;
    result.indptr.push_back(0);
    for (const sequence_id s : batch) {
      const sequence& seq = find(s, "infuse::kv::cache::table");
      result.indices.insert(result.indices.end(), seq.pages.begin(), seq.pages.end());
      result.indptr.push_back(static_cast<std::int32_t>(result.indices.size()));
      result.last_page_len.push_back(static_cast<std::int32_t>(
          seq.length == 0 ? 0 : seq.length - (pages_for(seq.length) - 1) * page_size));
    }
    return result;
  }

  // The batch's page table and the kv::cache_view a kernel reads (and prefill writes): the pool's
  // pages and the metadata arrays, in place, in the cache's memory.
  [[nodiscard]] batch_type view(std::span<const sequence_id> batch) {
    typename batch_type::view_type view{};
    view.pages = storage_.pages();
    view.pool_pages = ledger().capacity();
    view.format = storage_.format();
    view.key_min = storage_.key_min();
    view.key_max = storage_.key_max();
    view.mass = storage_.mass();
    if constexpr (per_channel_keys) {
      std::vector<const float*> windows;
      windows.reserve(batch.size());
      for (const sequence_id s : batch) {
        windows.push_back(find(s, "infuse::kv::cache::view").window.data());
      }
      return storage_.template make_batch<batch_type>(table(batch), view, std::move(windows));
    } else {
      return storage_.template make_batch<batch_type>(table(batch), view);
    }
  }

  [[nodiscard]] bool contains(sequence_id s) const { return sequences_.contains(s); }
  [[nodiscard]] std::int64_t sequences() const {
    return static_cast<std::int64_t>(sequences_.size());
  }
  [[nodiscard]] std::int64_t length(sequence_id s) const {
    return find(s, "infuse::kv::cache::length").length;
  }
  // The pool's pages of sequence s, in token order.
  [[nodiscard]] std::span<const std::int32_t> pages(sequence_id s) const {
    return find(s, "infuse::kv::cache::pages").pages;
  }
  // Where token t of sequence s lives.
  [[nodiscard]] token_location locate(sequence_id s, std::int64_t t) const {
    constexpr const char* call = "infuse::kv::cache::locate";
    const sequence& seq = find(s, call);
    require(t >= 0 && t < seq.length, call, "token", t,
            "a token of the sequence (below its length)");
    return location(seq, t);
  }

  // The bytes of page `index` (in token order) of sequence s (host memory).
  [[nodiscard]] std::span<const std::uint8_t> page(
      sequence_id s, std::int64_t index) const requires std::same_as<memory_space, host_memory> {
    return storage_.pool().bytes(page_index(s, index, "infuse::kv::cache::page"));
  }
  // The same, to write: only a page no other sequence holds (append copies a shared last page
  // before new tokens go into it, so the pages of freshly appended tokens are always writable).
  [[nodiscard]] std::span<std::uint8_t> writable_page(
      sequence_id s, std::int64_t index) requires std::same_as<memory_space, host_memory> {
    constexpr const char* call = "infuse::kv::cache::writable_page";
    const std::int32_t page = page_index(s, index, call);
    require(ledger().ref_count(page) == 1, call, "index", index,
            "a page that no other sequence shares (reference count 1)");
    return {storage_.pages() + page * storage_.format().page_bytes(),
            static_cast<std::size_t>(storage_.format().page_bytes())};
  }

  // The pool (host: kv::page_pool, pages included; device: its ledger) and the metadata.
  [[nodiscard]] const auto& pool() const { return storage_.pool(); }
  [[nodiscard]] const auto& metadata() const { return storage_.metadata(); }
  [[nodiscard]] const format_type& format() const { return storage_.format(); }

  // The exact memory cost: K and V records of one token (codes and group parameters of every
  // head) and its flag (kv::mixed), a page of page_size tokens (each region padded to
  // region_alignment, with the K groups of kv::per_channel keys), the metadata of a page (key
  // min and max per K channel, attention mass per slot and K head), and the full-precision window
  // each sequence keeps with kv::per_channel keys (0 otherwise).
  [[nodiscard]] std::int64_t bytes_per_token() const { return format().bytes_per_token(); }
  [[nodiscard]] std::int64_t window_bytes_per_sequence() const {
    return per_channel_keys ? std::int64_t{sizeof(float)} * window_floats() : 0;
  }
  [[nodiscard]] std::int64_t page_bytes() const { return format().page_bytes(); }
  [[nodiscard]] std::int64_t metadata_bytes_per_page() const {
    return storage_.metadata_bytes_per_page();
  }

  // The same formats, sequences, page contents and metadata.
  friend bool operator==(const cache& a, const cache& b) {
    const auto same_format = [](const auto& x, const auto& y) {
      return x.heads == y.heads && x.head_dim == y.head_dim;
    };
    return same_format(a.format().k, b.format().k) && same_format(a.format().v, b.format().v) &&
           a.storage_ == b.storage_ && a.sequences_ == b.sequences_ && a.next_id_ == b.next_id_;
  }

 private:
  struct sequence {
    std::int64_t length = 0;
    std::vector<std::int32_t> pages;  // (ceil(length / page_size))
    // kv::per_channel keys: the keys of the last page's slots [0, length % page_size) in full
    // precision, (page_size, k.heads, k.head_dim); empty otherwise.
    std::vector<float> window;
    friend bool operator==(const sequence&, const sequence&) = default;
  };

  // What a batch of appends needs, found before anything changes.
  struct growth_plan {
    std::vector<sequence*> sequences;  // seqs[i]'s sequence
    std::int64_t tokens = 0;           // the sum of the counts
    std::vector<page_run> runs;        // the new slots, a run per page, rows in batch order
  };

  static format_type checked_format(const vector_format<KQuant>& k,
                                    const vector_format<VQuant>& v) {
    k.require_valid("infuse::kv::cache", "k");
    v.require_valid("infuse::kv::cache", "v");
    return {k, v, page_size};
  }

  static std::int64_t pages_for(std::int64_t tokens) {
    return (tokens + page_size - 1) / page_size;
  }
  static std::int32_t page_of(const sequence& seq, std::int64_t t) {
    return seq.pages[static_cast<std::size_t>(t / page_size)];
  }
  static token_location location(const sequence& seq, std::int64_t t) {
    return {page_of(seq, t), static_cast<std::int32_t>(t % page_size)};
  }
  page_ledger& ledger() { return storage_.ledger(); }
  const page_ledger& ledger() const { return storage_.ledger(); }

  std::int64_t window_floats() const {
    return std::int64_t{page_size} * format().k.heads * format().k.head_dim;
  }

  std::int64_t key_floats() const { return std::int64_t{format().k.heads} * format().k.head_dim; }

  // Reads the stored keys of seq's tokens at `positions` into out (positions x k.heads x
  // k.head_dim): from the window while their page is not full, else from the codes
  // (kv::per_channel).
  void read_stored_keys(const sequence& seq, std::span<const std::int32_t> positions,
                        float* out) requires per_channel_keys {
    const format_type& f = format();
    const std::int64_t window_begin = seq.length / page_size * page_size;
    for (const std::int32_t t : positions) {
      const token_location at = location(seq, t);
      if (t >= window_begin) {
        const float* key = seq.window.data() + std::int64_t{at.slot} * key_floats();
        out = std::copy(key, key + key_floats(), out);
        continue;
      }
      for (std::int32_t h = 0; h < f.k.heads; ++h) {
        float key[1024];  // head_dim is at most 1024
        f.read_key(storage_.pages() + at.page * f.page_bytes(), at.slot, h, key);
        out = std::copy(key, key + f.k.head_dim, out);
      }
    }
  }

  // A page table of one sequence over its own page list, and the view of that sequence alone
  // (no copies, nothing allocated): valid while its page list and window stay where they are.
  struct lone_table {
    std::array<std::int32_t, 2> indptr{};
    std::int32_t last_page_len = 0;
    const float* window = nullptr;
  };
  typename batch_type::view_type lone_view(sequence& seq, lone_table& table) {
    table.indptr = {0, static_cast<std::int32_t>(seq.pages.size())};
    table.last_page_len = static_cast<std::int32_t>(
        seq.length == 0 ? 0 : seq.length - (pages_for(seq.length) - 1) * page_size);
    table.window = seq.window.data();
    typename batch_type::view_type view{};
    view.pages = storage_.pages();
    view.pool_pages = ledger().capacity();
    view.format = storage_.format();
    view.table = {table.indptr.data(), seq.pages.data(), &table.last_page_len, 1};
    view.key_min = storage_.key_min();
    view.key_max = storage_.key_max();
    view.mass = storage_.mass();
    if constexpr (per_channel_keys) view.windows = &table.window;
    return view;
  }

  // What a compaction does to its sequences' pages once the kept tokens are in place: the runs
  // whose key bounds are folded afresh and (kv::per_channel keys) the pages quantized again.
  struct settle_plan {
    std::vector<page_run> folds;
    std::vector<key_page> requantized;
    void reserve(std::int64_t pages) {
      folds.reserve(static_cast<std::size_t>(pages));
      if constexpr (per_channel_keys) requantized.reserve(static_cast<std::size_t>(pages));
    }
  };

  // Shortens seq, whose kept tokens now sit at positions [0, count), releasing the pages left
  // over, and plans its pages' key bounds. kv::per_channel keys: `keys` holds the kept tokens'
  // keys in order (count x k.heads x k.head_dim) and changed(j) says whether position j took
  // another token or a merged key; a full page holding a changed position is quantized again
  // from keys (one more rounding of keys already stored), the others keep their bytes, and the
  // keys of a last page short of full go to the window.
  template <class Changed>
  void settle(sequence& seq, std::int64_t count, const float* keys, Changed&& changed,
              settle_plan& plan) {
    for (std::int64_t index = 0; index < pages_for(count); ++index) {
      const std::int32_t page = seq.pages[static_cast<std::size_t>(index)];
      const auto filled =
          static_cast<std::int32_t>(std::min<std::int64_t>(page_size, count - index * page_size));
      if constexpr (per_channel_keys) {
        const float* page_keys = keys + index * page_size * key_floats();
        if (filled < page_size) {
          std::copy(page_keys, page_keys + filled * key_floats(), seq.window.data());
        } else {
          bool moved = false;
          for (std::int64_t j = index * page_size; j < (index + 1) * page_size; ++j) {
            moved = moved || changed(j);
          }
          if (moved) {
            plan.requantized.push_back({page, page_keys});
            continue;
          }
        }
      }
      plan.folds.push_back({page, 0, filled, 0, per_channel_keys ? seq.window.data() : nullptr});
    }
    seq.length = count;
    release_from(seq, pages_for(count));
  }

  void finish_settle(const exec_type& exec, const settle_plan& plan) {
    if constexpr (per_channel_keys) {
      storage_.requantize_keys(exec, plan.requantized);
      for (const key_page& at : plan.requantized) storage_.set_covered(at.page, page_size);
    }
    storage_.fold(plan.folds);
    for (const page_run& run : plan.folds) storage_.set_covered(run.page, run.slot_end);
  }

  // The window of seq's page `index` when that page is its last and not full (kv::per_channel).
  float* window_of(sequence& seq, std::int64_t index) {
    const bool windowed =
        per_channel_keys && index == std::ssize(seq.pages) - 1 && seq.length % page_size != 0;
    return windowed ? seq.window.data() : nullptr;
  }

  // Reads slots [0, seq.length % page_size) of quantized page `page` back into seq's window.
  void fill_window(sequence& seq, std::int32_t page) requires per_channel_keys {
    const format_type& f = format();
    const std::uint8_t* bytes = storage_.pages() + page * f.page_bytes();
    for (std::int32_t slot = 0; slot < seq.length % page_size; ++slot) {
      for (std::int32_t h = 0; h < f.k.heads; ++h) {
        float key[1024];  // head_dim is at most 1024
        f.read_key(bytes, slot, h, key);
        std::copy(key, key + f.k.head_dim,
                  seq.window.data() + (std::int64_t{slot} * f.k.heads + h) * f.k.head_dim);
      }
    }
  }

  template <class Row>
  void append_rows(const exec_type& exec, std::span<const sequence_id> seqs,
                   std::span<const std::int64_t> counts, infuse::view<const Row, 3, memory_space> k,
                   infuse::view<const Row, 3, memory_space> v,
                   std::span<const std::uint8_t> important = {}) {
    constexpr const char* call = "infuse::kv::cache::append";
    require(counts.size() == seqs.size(), call, "counts.size()", counts.size(),
            "seqs.size() = " + std::to_string(seqs.size()));
    storage_.check_exec(exec, call);
    growth_plan plan = plan_growth(seqs, counts, call, false);
    const format_type& format = storage_.format();
    require_view(k, call, "k",
                 {{plan.tokens, "sum of counts"},
                  {format.k.heads, "k.heads"},
                  {format.k.head_dim, "k.head_dim"}});
    require_view(v, call, "v",
                 {{plan.tokens, "sum of counts"},
                  {format.v.heads, "v.heads"},
                  {format.v.head_dim, "v.head_dim"}});
    if constexpr (flagged) {
      require(important.empty() || std::ssize(important) == plan.tokens, call, "important.size()",
              important.size(), "one flag per row of k (" + std::to_string(plan.tokens) + ")");
      grow(plan, counts);  // nothing throws from here on
      storage_.write(exec, plan.runs, k, v, important.empty() ? nullptr : important.data());
    } else {
      grow(plan, counts);  // nothing throws from here on
      storage_.write(exec, plan.runs, k, v);
    }
  }

  // Whether appending to seq copies its last page first: a partial last page another sequence
  // holds too.
  bool copies_last_page(const sequence& seq) const {
    return seq.length % page_size != 0 && ledger().ref_count(seq.pages.back()) > 1;
  }

  // The sequences of a batch, each known and at most once; the names are the batch's ("seqs[i]").
  std::vector<sequence*> find_batch(std::span<const sequence_id> seqs, const char* call) {
    std::vector<sequence*> found;
    found.reserve(seqs.size());
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      const auto at = sequences_.find(seqs[i]);
      const bool repeated = std::find(seqs.begin(), seqs.begin() + static_cast<std::ptrdiff_t>(i),
                                      seqs[i]) != seqs.begin() + static_cast<std::ptrdiff_t>(i);
      if (at == sequences_.end() || repeated) {
        throw error(call, "seqs[" + std::to_string(i) + "]", std::to_string(seqs[i]),
                    repeated ? "a sequence not already in the batch (each sequence once)"
                             : "a sequence of this cache (created, not freed)");
      }
      found.push_back(&at->second);
    }
    return found;
  }

  // Checks that unsharing the sequences, in order, finds the free pages it needs: a page held
  // by n > 1 holders is copied for each of them in the list until one holder is left.
  void require_copies_fit(std::span<sequence* const> seqs, const char* call, const char* name,
                          const std::string& value) const {
    std::map<std::int32_t, std::int32_t> holders;  // the pages seen, and their holders left
    std::int64_t copies = 0;
    for (const sequence* seq : seqs) {
      for (const std::int32_t page : seq->pages) {
        auto& left = holders.try_emplace(page, ledger().ref_count(page)).first->second;
        if (left > 1) {
          ++copies;
          --left;
        }
      }
    }
    require(copies <= ledger().free_pages(), call, name, value,
            "sequences whose shared pages fit the pool: unsharing them needs " +
                std::to_string(copies) + " new pages and " + std::to_string(ledger().free_pages()) +
                " are free");
  }

  // Checks a batch of appends; the argument names are the single append's ("sequence", "tokens")
  // or the batch's ("seqs[i]", "counts[i]", "counts").
  growth_plan plan_growth(std::span<const sequence_id> seqs, std::span<const std::int64_t> counts,
                          const char* call, bool single) {
    // Messages are built only on failure: a decode step appends to every sequence of a batch.
    const auto fail = [&](const char* batch_name, std::size_t i, const char* single_name,
                          std::int64_t value, const std::string& expected) {
      throw error(call,
                  single ? std::string(single_name)
                         : std::string(batch_name) + "[" + std::to_string(i) + "]",
                  std::to_string(value), expected);
    };
    growth_plan plan;
    plan.sequences.reserve(seqs.size());
    const std::int64_t most_tokens = std::int64_t{ledger().capacity()} * page_size;
    std::int64_t new_pages = 0;
    std::int64_t runs = 0;
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      const auto found = sequences_.find(seqs[i]);
      if (found == sequences_.end()) {
        fail("seqs", i, "sequence", seqs[i], "a sequence of this cache (created, not freed)");
      }
      if (std::find(seqs.begin(), seqs.begin() + static_cast<std::ptrdiff_t>(i), seqs[i]) !=
          seqs.begin() + static_cast<std::ptrdiff_t>(i)) {
        fail("seqs", i, "sequence", seqs[i],
             "a sequence not already in the batch (each sequence appends once per call)");
      }
      const sequence& seq = found->second;
      const std::int64_t tokens = counts[i];
      if (tokens < 0 || tokens > most_tokens) {
        fail("counts", i, "tokens", tokens,
             "from 0 to the pool's " + std::to_string(most_tokens) + " token slots");
      }
      if (tokens > 0) {
        new_pages += pages_for(seq.length + tokens) - std::ssize(seq.pages) +
                     (copies_last_page(seq) ? 1 : 0);
        runs += pages_for(seq.length + tokens) - seq.length / page_size;
      }
      plan.sequences.push_back(&found->second);
      plan.tokens += tokens;
    }
    if (new_pages > ledger().free_pages()) {
      throw error(call, single ? "tokens" : "counts",
                  single ? std::to_string(counts[0]) : std::to_string(plan.tokens) + " tokens",
                  "a count that fits the pool: it needs " + std::to_string(new_pages) +
                      " new pages and " + std::to_string(ledger().free_pages()) + " are free");
    }
    // The last steps that may throw.
    plan.runs.reserve(static_cast<std::size_t>(runs));
    storage_.prepare(runs, 0);
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      sequence& seq = *plan.sequences[i];
      seq.pages.reserve(static_cast<std::size_t>(pages_for(seq.length + counts[i])));
    }
    return plan;
  }

  // Carries out a checked plan: copies shared last pages, takes new pages, lists the new slots
  // in runs, marks the slots the pages' key bounds are to cover and zeroes the new slots'
  // attention mass. Throws nothing on host memory (on device memory, only a device fault).
  void grow(growth_plan& plan, std::span<const std::int64_t> counts) {
    std::int64_t row = 0;
    for (std::size_t i = 0; i < plan.sequences.size(); ++i) {
      sequence& seq = *plan.sequences[i];
      const std::int64_t tokens = counts[i];
      if (tokens == 0) continue;
      if (copies_last_page(seq)) copy_shared_page(seq, std::ssize(seq.pages) - 1);
      while (std::ssize(seq.pages) < pages_for(seq.length + tokens)) {
        seq.pages.push_back(ledger().allocate());
      }
      const std::int64_t end = seq.length + tokens;
      for (std::int64_t t = seq.length; t < end;) {
        const auto slot = static_cast<std::int32_t>(t % page_size);
        const auto count =
            static_cast<std::int32_t>(std::min<std::int64_t>(page_size - slot, end - t));
        plan.runs.push_back({page_of(seq, t), slot, slot + count, row,
                             per_channel_keys ? seq.window.data() : nullptr});
        storage_.set_covered(page_of(seq, t), slot + count);
        t += count;
        row += count;
      }
      seq.length = end;
    }
    storage_.clear_mass(plan.runs);
  }

  // Copy on write of seq's shared page `index`: the copy's bounds cover seq's slots alone, and
  // the original's shrink to what its other holders fill.
  void copy_shared_page(sequence& seq, std::int64_t index) {
    const std::int32_t shared = seq.pages[static_cast<std::size_t>(index)];
    const std::int32_t copy = ledger().allocate();
    storage_.copy_page(shared, copy);
    ledger().release(shared);
    seq.pages[static_cast<std::size_t>(index)] = copy;
    const auto filled = static_cast<std::int32_t>(
        std::min<std::int64_t>(page_size, seq.length - index * page_size));
    if (storage_.covered(copy) != filled) fold_bounds(copy, 0, filled, window_of(seq, index));
    refresh_bounds(shared, index);
  }

  // Copies every page seq shares (the free pages were checked).
  void unshare_pages(sequence& seq) {
    for (std::int64_t index = 0; index < std::ssize(seq.pages); ++index) {
      if (ledger().ref_count(seq.pages[static_cast<std::size_t>(index)]) > 1) {
        copy_shared_page(seq, index);
      }
    }
  }

  // Releases seq's pages from `index` on (seq.length is already the new length).
  void release_from(sequence& seq, std::int64_t index) {
    for (std::int64_t i = index; i < std::ssize(seq.pages); ++i) {
      const std::int32_t page = seq.pages[static_cast<std::size_t>(i)];
      ledger().release(page);
      refresh_bounds(page, i);
    }
    seq.pages.resize(static_cast<std::size_t>(index));
  }

  // Recomputes the key bounds of page `page` (page `index` of each sequence holding it) when its
  // holders now fill fewer slots than the bounds cover.
  void refresh_bounds(std::int32_t page, std::int64_t index) {
    if (ledger().ref_count(page) == 0) return;
    std::int64_t filled = 0;
    float* window = nullptr;  // the longest holder's, when its keys are there (kv::per_channel)
    for (auto& [id, other] : sequences_) {
      if (std::ssize(other.pages) > index && other.pages[static_cast<std::size_t>(index)] == page) {
        const std::int64_t slots =
            std::min<std::int64_t>(page_size, other.length - index * page_size);
        if (slots > filled) {
          filled = slots;
          window = window_of(other, index);
        }
      }
    }
    if (filled < storage_.covered(page)) {
      fold_bounds(page, 0, static_cast<std::int32_t>(filled), window);
    }
  }

  // The storage's fold on one page's slots (the function update_key_bounds runs); `window`: the
  // page's keys when they are in a sequence's window (kv::per_channel).
  void fold_bounds(std::int32_t page, std::int32_t slot_begin, std::int32_t slot_end,
                   float* window = nullptr) {
    const page_run run{page, slot_begin, slot_end, 0, window};
    storage_.fold(std::span<const page_run>(&run, 1));
    if (slot_begin == 0) storage_.set_covered(page, slot_end);
  }

  // Sequence s, const or not, or an error naming it.
  template <class Self>
  static auto& find(Self& self, sequence_id s, const char* call) {
    const auto found = self.sequences_.find(s);
    require(found != self.sequences_.end(), call, "sequence", s,
            "a sequence of this cache (created, not freed)");
    return found->second;
  }
  const sequence& find(sequence_id s, const char* call) const { return find(*this, s, call); }
  sequence& find(sequence_id s, const char* call) { return find(*this, s, call); }
  std::int32_t page_index(sequence_id s, std::int64_t index, const char* call) const {
    const sequence& seq = find(s, call);
    require(index >= 0 && index < static_cast<std::int64_t>(seq.pages.size()), call, "index", index,
            "a page of the sequence (below its page count)");
    return seq.pages[static_cast<std::size_t>(index)];
  }

  storage_type storage_;
  std::map<sequence_id, sequence> sequences_;
  sequence_id next_id_ = 0;
};

}  // namespace infuse::kv
