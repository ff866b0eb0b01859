// The page pool and the sequence bookkeeping of the paged KV cache, on host memory.
//
// kv::page_pool: `capacity` pages of `page_bytes` bytes each, a reference count per page and a
// free list. kv::cache<paged<PageSize, Order>>: sequences over one pool, each a list of pages in
// token order:
//   create   a new empty sequence;
//   append   n tokens, taking pages from the free list as the sequence grows;
//   fork     a new sequence sharing every page of its parent (reference counts go up); a shared
//            partial last page is copied on write: the first branch that appends to it gets its
//            own copy, so a write to one branch never shows in the other;
//   truncate rolls back the last n tokens (rejected speculative tokens), releasing pages;
//   free     releases every page of a sequence.
// A page returns to the free list when its reference count drops to zero.
//
// Every operation checks its arguments (and that the pool has the pages it needs) before it
// changes anything, and throws infuse::error naming the argument: on error the cache is exactly as
// it was (compare with operator==).
#pragma once

#include <cstdint>
#include <cstring>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "infuse/core/error.hpp"
#include "infuse/kv/layout.hpp"

namespace infuse::kv {

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
  std::vector<std::uint8_t> bytes_;       // (capacity, page_bytes)
  std::vector<std::int32_t> ref_counts_;  // (capacity)
  std::vector<std::int32_t> free_list_;   // (free_pages), a stack
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

template <class Layout>
class cache {
  static_assert(Layout::is_paged,
                "infuse: kv::cache needs a paged layout, kv::paged<PageSize, Order>; see "
                "docs/policies.md#kv-layouts");

 public:
  using layout = Layout;
  static constexpr int page_size = Layout::page_size;

  // A pool of `capacity` pages of `page_bytes` bytes (page_size token slots each).
  cache(std::int32_t capacity, std::int64_t page_bytes) : pool_(capacity, page_bytes) {}

  sequence_id create() {
    sequences_.emplace(next_id_, sequence{});
    return next_id_++;
  }

  // Makes room for `tokens` more tokens at the end of sequence s; their bytes are then written
  // through writable_page(). A shared partial last page is first copied (copy on write).
  void append(sequence_id s, std::int64_t tokens) {
    constexpr const char* call = "infuse::kv::cache::append";
    sequence& seq = find(s, call);
    require(tokens >= 0, call, "tokens", tokens, "at least 0");
    const std::int64_t have = static_cast<std::int64_t>(seq.pages.size());
    const std::int64_t need = pages_for(seq.length + tokens);
    const bool copy_last = tokens > 0 && seq.length % page_size != 0 &&
                           pool_.ref_count(seq.pages.back()) > 1;
    const std::int64_t new_pages = need - have + (copy_last ? 1 : 0);
    require(new_pages <= pool_.free_pages(), call, "tokens", tokens,
            "a count that fits the pool: it needs " + std::to_string(new_pages) +
                " new pages and " + std::to_string(pool_.free_pages()) + " are free");
    seq.pages.reserve(static_cast<std::size_t>(need));  // the last step that may throw
    if (copy_last) {
      const std::int32_t shared = seq.pages.back();
      const std::int32_t copy = pool_.allocate();
      std::memcpy(pool_.bytes(copy).data(), pool_.bytes(shared).data(),
                  static_cast<std::size_t>(pool_.page_bytes()));
      pool_.release(shared);
      seq.pages.back() = copy;
    }
    for (std::int64_t page = have; page < need; ++page) seq.pages.push_back(pool_.allocate());
    seq.length += tokens;
  }

  // A new sequence holding the same tokens as s, sharing its pages.
  sequence_id fork(sequence_id s) {
    const sequence& parent = find(s, "infuse::kv::cache::fork");
    sequences_.emplace(next_id_, parent);  // the last step that may throw
    for (const std::int32_t page : parent.pages) pool_.retain(page);
    return next_id_++;
  }

  // Removes the last `tokens` tokens of sequence s, releasing the pages it no longer reaches.
  void truncate(sequence_id s, std::int64_t tokens) {
    constexpr const char* call = "infuse::kv::cache::truncate";
    sequence& seq = find(s, call);
    require(tokens >= 0 && tokens <= seq.length, call, "tokens", tokens,
            "from 0 to the sequence's length " + std::to_string(seq.length));
    seq.length -= tokens;
    const auto keep = static_cast<std::size_t>(pages_for(seq.length));
    for (std::size_t page = keep; page < seq.pages.size(); ++page) pool_.release(seq.pages[page]);
    seq.pages.resize(keep);
  }

  // Releases every page of sequence s; s is no longer a sequence of this cache.
  void free(sequence_id s) {
    const sequence& seq = find(s, "infuse::kv::cache::free");
    for (const std::int32_t page : seq.pages) pool_.release(page);
    sequences_.erase(s);
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
    return {seq.pages[static_cast<std::size_t>(t / page_size)],
            static_cast<std::int32_t>(t % page_size)};
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

  [[nodiscard]] const page_pool& pool() const { return pool_; }

  friend bool operator==(const cache&, const cache&) = default;

 private:
  struct sequence {
    std::int64_t length = 0;
    std::vector<std::int32_t> pages;  // (ceil(length / page_size))
    friend bool operator==(const sequence&, const sequence&) = default;
  };

  static std::int64_t pages_for(std::int64_t tokens) {
    return (tokens + page_size - 1) / page_size;
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
    require(index >= 0 && index < static_cast<std::int64_t>(seq.pages.size()), call, "index",
            index, "a page of the sequence (below its page count)");
    return seq.pages[static_cast<std::size_t>(index)];
  }

  page_pool pool_;
  std::map<sequence_id, sequence> sequences_;
  sequence_id next_id_ = 0;
};

}  // namespace infuse::kv
