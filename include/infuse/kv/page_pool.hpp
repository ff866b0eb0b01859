// The quantized paged KV cache on host memory: kv::page_pool and kv::cache<Layout, KQuant, VQuant>.
//
// kv::page_pool: `capacity` pages of `page_bytes` bytes each (64-byte aligned), a reference count
// per page and a free list. kv::cache<paged<PageSize, Order>, KQuant, VQuant>: sequences over one
// pool, each a list of pages in token order; a page holds PageSize token slots laid out by
// kv::page_format (format.hpp): K and V records of each (slot, head), each in its own scheme.
//   create   a new empty sequence;
//   append   n tokens: reserve their slots (a prefill kernel then writes them), or, for a batch,
//            quantize their K and V into the slots in the same pass and update the key bounds;
//   fork     a new sequence sharing every page of its parent (reference counts go up); a shared
//            partial last page is copied on write, bytes and metadata: the first branch that
//            appends to it gets its own copy, so a write to one branch never shows in the other;
//   truncate rolls back the last n tokens (rejected speculative tokens), releasing pages and
//            recomputing the key bounds of the new last page;
//   free     releases every page of a sequence.
// A page returns to the free list when its reference count drops to zero. Per-page metadata (key
// bounds, attention mass) is described in kv/metadata.hpp; view(batch) hands a kernel the pool,
// the metadata and the batch's page table as a kv::cache_view, without copies.
//
// Every operation checks its arguments (and that the pool has the pages it needs) before it
// changes anything, and throws infuse::error naming the argument: on error the cache is exactly as
// it was (compare with operator==). See docs/policies.md#the-quantized-paged-kv-cache.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <map>
#include <new>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "infuse/core/error.hpp"
#include "infuse/core/float_types.hpp"
#include "infuse/core/view.hpp"
#include "infuse/exec/cpu.hpp"
#include "infuse/kv/cache_view.hpp"
#include "infuse/kv/format.hpp"
#include "infuse/kv/layout.hpp"
#include "infuse/kv/metadata.hpp"
#include "infuse/quant/none.hpp"

namespace infuse::kv {

namespace detail {

// Cache-line aligned storage for the pages, so every region of every page (each at a multiple of
// region_alignment) starts on a cache line.
template <class T>
struct page_allocator {
  using value_type = T;
  page_allocator() = default;
  template <class U>
  page_allocator(const page_allocator<U>&) noexcept {}  // NOLINT: rebinding is implicit
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new (n * sizeof(T), std::align_val_t{region_alignment}));
  }
  void deallocate(T* p, std::size_t) noexcept {
    ::operator delete (p, std::align_val_t{region_alignment});
  }
  friend bool operator==(const page_allocator&, const page_allocator&) = default;
};

}  // namespace detail

class page_pool {
 public:
  page_pool(std::int32_t capacity, std::int64_t page_bytes) : page_bytes_(page_bytes) {
    require(capacity >= 1, "infuse::kv::page_pool", "capacity", capacity, "at least 1 page");
    require(page_bytes >= 1, "infuse::kv::page_pool", "page_bytes", page_bytes, "at least 1");
    bytes_.assign(static_cast<std::size_t>(capacity) * static_cast<std::size_t>(page_bytes), 0);
    ref_counts_.assign(static_cast<std::size_t>(capacity), 0);
    // Full capacity up front, so that release() never reallocates (and never throws).
    free_list_.reserve(static_cast<std::size_t>(capacity));
    // A stack popped from the back: page 0 is handed out first.
    for (std::int32_t page = capacity - 1; page >= 0; --page) free_list_.push_back(page);
  }

  [[nodiscard]] std::int32_t capacity() const {
    return static_cast<std::int32_t>(ref_counts_.size());
  }
  [[nodiscard]] std::int64_t page_bytes() const { return page_bytes_; }
  [[nodiscard]] std::int32_t free_pages() const {
    return static_cast<std::int32_t>(free_list_.size());
  }
  [[nodiscard]] std::int32_t ref_count(std::int32_t page) const {
    require_page(page, "infuse::kv::page_pool::ref_count");
    return ref_counts_[static_cast<std::size_t>(page)];
  }

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

  friend bool operator==(const page_pool&, const page_pool&) = default;

 private:
  [[nodiscard]] std::size_t offset(std::int32_t page) const {
    return static_cast<std::size_t>(page) * static_cast<std::size_t>(page_bytes_);
  }
  void require_page(std::int32_t page, const char* call) const {
    require(page >= 0 && page < capacity(), call, "page", page,
            "a page of the pool (0 to capacity - 1)");
  }
  void require_in_use(std::int32_t page, const char* call) const {
    require_page(page, call);
    require(ref_counts_[static_cast<std::size_t>(page)] > 0, call, "page", page,
            "a page in use (reference count above 0)");
  }

  std::int64_t page_bytes_;
  std::vector<std::uint8_t, detail::page_allocator<std::uint8_t>> bytes_;  // (capacity, page_bytes)
  std::vector<std::int32_t> ref_counts_;                                   // (capacity)
  std::vector<std::int32_t> free_list_;                                    // (free_pages), a stack
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

  cache_batch(page_table<Layout::page_size> table, view_type view)
      : table_(std::move(table)), view_(view) {
    view_.table = table_.view();
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
  view_type view_;
};

template <class Layout, class KQuant = quant::none<half>, class VQuant = KQuant>
class cache {
  static_assert(Layout::is_paged,
                "infuse: kv::cache needs a paged layout, kv::paged<PageSize, Order>; see "
                "docs/policies.md#kv-layouts");

 public:
  using layout = Layout;
  using k_scheme = KQuant;
  using v_scheme = VQuant;
  using format_type = page_format<typename Layout::order, KQuant, VQuant>;
  using batch_type = cache_batch<Layout, KQuant, VQuant>;
  static constexpr int page_size = Layout::page_size;

  // A pool of `capacity` pages, each page_size tokens of K in format k and V in format v.
  cache(std::int32_t capacity, vector_format<KQuant> k, vector_format<VQuant> v)
      : format_(checked_format(k, v)),
        pool_(capacity, format_.page_bytes()),
        metadata_(capacity, k.heads, k.head_dim, page_size) {}

  sequence_id create() {
    sequences_.emplace(next_id_, sequence{});
    return next_id_++;
  }

  // Reserves `tokens` more slots at the end of sequence s without writing them: a prefill kernel
  // writes their K and V (through view() or writable_page()) and then calls
  // kv::update_key_bounds for them. A shared partial last page is first copied (copy on write);
  // the new slots' attention mass is zeroed.
  void append(sequence_id s, std::int64_t tokens) {
    const std::array<sequence_id, 1> seqs{s};
    const std::array<std::int64_t, 1> counts{tokens};
    const growth_plan plan = plan_growth(seqs, counts, "infuse::kv::cache::append", true);
    grow(plan, counts);
  }

  // Appends counts[i] tokens to sequence seqs[i] for each i and quantizes their keys and values
  // into the new slots in one parallel pass: k is (sum of counts, k.heads, k.head_dim), v is
  // (sum of counts, v.heads, v.head_dim), the tokens of seqs[0] first. Updates the key bounds of
  // the pages written and zeroes the new slots' attention mass. Everything is checked first
  // (unknown or repeated sequences, negative counts, shapes, free pages for the whole batch).
  void append(const exec::cpu& exec, std::span<const sequence_id> seqs,
              std::span<const std::int64_t> counts, host_view<const float, 3> k,
              host_view<const float, 3> v) {
    constexpr const char* call = "infuse::kv::cache::append";
    require(counts.size() == seqs.size(), call, "counts.size()", counts.size(),
            "seqs.size() = " + std::to_string(seqs.size()));
    const growth_plan plan = plan_growth(seqs, counts, call, false);
    require_view(k, call, "k",
                 {{plan.tokens, "sum of counts"},
                  {format_.k.heads, "k.heads"},
                  {format_.k.head_dim, "k.head_dim"}});
    require_view(v, call, "v",
                 {{plan.tokens, "sum of counts"},
                  {format_.v.heads, "v.heads"},
                  {format_.v.head_dim, "v.head_dim"}});
    // The new tokens in runs that share a page: one work item each, so that a page's keys are
    // encoded and folded into its bounds by one thread, in one parallel pass.
    struct page_run {
      std::int32_t page;
      std::int32_t slot_begin;
      std::int32_t slot_end;
      std::int64_t row;  // the run's first row of k and v
    };
    std::vector<page_run> runs;
    runs.reserve(static_cast<std::size_t>(plan.tokens / page_size + 2 * std::ssize(seqs)));
    grow(plan, counts);  // nothing throws from here on
    std::int64_t row = 0;
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      const sequence& seq = *plan.sequences[i];
      for (std::int64_t t = seq.length - counts[i]; t < seq.length;) {
        const auto slot = static_cast<std::int32_t>(t % page_size);
        const auto count =
            static_cast<std::int32_t>(std::min<std::int64_t>(page_size - slot, seq.length - t));
        runs.push_back({page_of(seq, t), slot, slot + count, row});
        t += count;
        row += count;
      }
    }
    exec.parallel_for(std::ssize(runs), [&](std::int64_t n) {
      const page_run& run = runs[static_cast<std::size_t>(n)];
      std::uint8_t* page = pool_.data() + run.page * format_.page_bytes();
      for (std::int32_t slot = run.slot_begin; slot < run.slot_end; ++slot) {
        const std::int64_t r = run.row + (slot - run.slot_begin);
        for (std::int32_t h = 0; h < format_.k.heads; ++h) {
          format_.k.encode(&k(r, h, 0), format_.k_codes(page, slot, h),
                           format_.k_params(page, slot, h));
        }
        for (std::int32_t h = 0; h < format_.v.heads; ++h) {
          format_.v.encode(&v(r, h, 0), format_.v_codes(page, slot, h),
                           format_.v_params(page, slot, h));
        }
      }
      fold_bounds(run.page, run.slot_begin, run.slot_end);
    });
  }

  // A new sequence holding the same tokens as s, sharing its pages.
  sequence_id fork(sequence_id s) {
    const sequence& parent = find(s, "infuse::kv::cache::fork");
    sequences_.emplace(next_id_, parent);  // the last step that may throw
    for (const std::int32_t page : parent.pages) pool_.retain(page);
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
    seq.length -= tokens;
    const std::int64_t keep = pages_for(seq.length);
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
  // pages and the metadata arrays, in place.
  [[nodiscard]] batch_type view(std::span<const sequence_id> batch) {
    typename batch_type::view_type view{};
    view.pages = pool_.data();
    view.pool_pages = pool_.capacity();
    view.format = format_;
    view.key_min = metadata_.key_min();
    view.key_max = metadata_.key_max();
    view.mass = metadata_.mass();
    return batch_type(table(batch), view);
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
    return {page_of(seq, t), static_cast<std::int32_t>(t % page_size)};
  }

  // The bytes of page `index` (in token order) of sequence s.
  [[nodiscard]] std::span<const std::uint8_t> page(sequence_id s, std::int64_t index) const {
    return pool_.bytes(page_index(s, index, "infuse::kv::cache::page"));
  }
  // The same, to write: only a page no other sequence holds (append copies a shared last page
  // before new tokens go into it, so the pages of freshly appended tokens are always writable).
  [[nodiscard]] std::span<std::uint8_t> writable_page(sequence_id s, std::int64_t index) {
    constexpr const char* call = "infuse::kv::cache::writable_page";
    const std::int32_t page = page_index(s, index, call);
    require(pool_.ref_count(page) == 1, call, "index", index,
            "a page that no other sequence shares (reference count 1)");
    return pool_.bytes(page);
  }

  [[nodiscard]] const page_pool& pool() const { return pool_; }
  [[nodiscard]] const page_metadata& metadata() const { return metadata_; }
  [[nodiscard]] const format_type& format() const { return format_; }

  // The exact memory cost: K and V records of one token (codes and group parameters of every
  // head), a page of page_size tokens (each region padded to region_alignment), and the metadata
  // of a page (key min and max per K channel, attention mass per slot and K head).
  [[nodiscard]] std::int64_t bytes_per_token() const {
    return format_.k.bytes_per_token() + format_.v.bytes_per_token();
  }
  [[nodiscard]] std::int64_t page_bytes() const { return format_.page_bytes(); }
  [[nodiscard]] std::int64_t metadata_bytes_per_page() const { return metadata_.bytes_per_page(); }

  // The same formats, sequences, page contents and metadata.
  friend bool operator==(const cache& a, const cache& b) {
    const auto same_format = [](const auto& x, const auto& y) {
      return x.heads == y.heads && x.head_dim == y.head_dim;
    };
    return same_format(a.format_.k, b.format_.k) && same_format(a.format_.v, b.format_.v) &&
           a.pool_ == b.pool_ && a.metadata_ == b.metadata_ && a.sequences_ == b.sequences_ &&
           a.next_id_ == b.next_id_;
  }

 private:
  struct sequence {
    std::int64_t length = 0;
    std::vector<std::int32_t> pages;  // (ceil(length / page_size))
    friend bool operator==(const sequence&, const sequence&) = default;
  };

  // What a batch of appends needs, found before anything changes.
  struct growth_plan {
    std::vector<sequence*> sequences;  // seqs[i]'s sequence
    std::int64_t tokens = 0;           // the sum of the counts
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
  // Whether appending to seq copies its last page first: a partial last page another sequence
  // holds too.
  bool copies_last_page(const sequence& seq) const {
    return seq.length % page_size != 0 && pool_.ref_count(seq.pages.back()) > 1;
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
    const std::int64_t most_tokens = std::int64_t{pool_.capacity()} * page_size;
    std::int64_t new_pages = 0;
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
      }
      plan.sequences.push_back(&found->second);
      plan.tokens += tokens;
    }
    if (new_pages > pool_.free_pages()) {
      throw error(call, single ? "tokens" : "counts",
                  single ? std::to_string(counts[0]) : std::to_string(plan.tokens) + " tokens",
                  "a count that fits the pool: it needs " + std::to_string(new_pages) +
                      " new pages and " + std::to_string(pool_.free_pages()) + " are free");
    }
    for (std::size_t i = 0; i < seqs.size(); ++i) {  // the last steps that may throw
      sequence& seq = *plan.sequences[i];
      seq.pages.reserve(static_cast<std::size_t>(pages_for(seq.length + counts[i])));
    }
    return plan;
  }

  // Carries out a checked plan: copies shared last pages, takes new pages, zeroes the new slots'
  // attention mass and marks the slots the pages' key bounds are to cover. Never throws.
  void grow(const growth_plan& plan, std::span<const std::int64_t> counts) noexcept {
    for (std::size_t i = 0; i < plan.sequences.size(); ++i) {
      sequence& seq = *plan.sequences[i];
      const std::int64_t tokens = counts[i];
      if (tokens == 0) continue;
      if (copies_last_page(seq)) copy_last_page(seq);
      while (std::ssize(seq.pages) < pages_for(seq.length + tokens)) {
        seq.pages.push_back(pool_.allocate());
      }
      for (std::int64_t t = seq.length; t < seq.length + tokens; ++t) {
        const auto slot = static_cast<std::int32_t>(t % page_size);
        float* mass = metadata_.mass(page_of(seq, t)) + std::int64_t{slot} * format_.k.heads;
        std::fill(mass, mass + format_.k.heads, 0.0f);
        metadata_.set_covered(page_of(seq, t), slot + 1);
      }
      seq.length += tokens;
    }
  }

  // Copy on write of seq's shared partial last page: the copy's bounds cover seq's slots alone,
  // and the original's shrink to what its other holders fill.
  void copy_last_page(sequence& seq) {
    const std::int32_t shared = seq.pages.back();
    const std::int32_t copy = pool_.allocate();
    std::memcpy(pool_.bytes(copy).data(), pool_.bytes(shared).data(),
                static_cast<std::size_t>(pool_.page_bytes()));
    metadata_.copy_page(shared, copy);
    pool_.release(shared);
    seq.pages.back() = copy;
    const std::int64_t index = std::ssize(seq.pages) - 1;
    const auto filled = static_cast<std::int32_t>(seq.length - index * page_size);
    if (metadata_.covered(copy) != filled) fold_bounds(copy, 0, filled);
    refresh_bounds(shared, index);
  }

  // Releases seq's pages from `index` on (seq.length is already the new length).
  void release_from(sequence& seq, std::int64_t index) {
    for (std::int64_t i = index; i < std::ssize(seq.pages); ++i) {
      const std::int32_t page = seq.pages[static_cast<std::size_t>(i)];
      pool_.release(page);
      refresh_bounds(page, i);
    }
    seq.pages.resize(static_cast<std::size_t>(index));
  }

  // Recomputes the key bounds of page `page` (page `index` of each sequence holding it) when its
  // holders now fill fewer slots than the bounds cover.
  void refresh_bounds(std::int32_t page, std::int64_t index) {
    if (pool_.ref_count(page) == 0) return;
    std::int64_t filled = 0;
    for (const auto& [id, other] : sequences_) {
      if (std::ssize(other.pages) > index && other.pages[static_cast<std::size_t>(index)] == page) {
        filled =
            std::max(filled, std::min<std::int64_t>(page_size, other.length - index * page_size));
      }
    }
    if (filled < metadata_.covered(page)) fold_bounds(page, 0, static_cast<std::int32_t>(filled));
  }

  // detail::fold_key_bounds on one page of the pool (the function update_key_bounds runs).
  void fold_bounds(std::int32_t page, std::int32_t slot_begin, std::int32_t slot_end) {
    detail::fold_key_bounds(format_, pool_.data() + page * format_.page_bytes(), slot_begin,
                            slot_end, metadata_.key_min(page), metadata_.key_max(page));
    if (slot_begin == 0) metadata_.set_covered(page, slot_end);
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

  format_type format_;
  page_pool pool_;
  page_metadata metadata_;
  std::map<sequence_id, sequence> sequences_;
  sequence_id next_id_ = 0;
};

}  // namespace infuse::kv
