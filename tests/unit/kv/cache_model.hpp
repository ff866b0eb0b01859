// A model of kv::cache for randomized tests: sequences as lists of pages shared through shared_ptr
// (use_count is the page's reference count), each page whatever the test writes to its slots.
// The model drives create / fork / truncate / free against the cache, predicts the pages an append
// needs (a shared partial last page is copied on write), and checks lengths, free pages, reference
// counts and page identity after every step; the test supplies the append and its content checks.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <map>
#include <memory>
#include <set>
#include <string>

#include "infuse/kv/page_pool.hpp"
#include "support/errors.hpp"
#include "support/random.hpp"

namespace infuse::test {

template <class Page>
struct model_sequence {
  std::int64_t length = 0;
  std::vector<std::shared_ptr<Page>> pages;
};

template <class Cache, class Page>
class cache_model {
 public:
  static constexpr int page_size = Cache::page_size;
  using sequence = model_sequence<Page>;

  cache_model(Cache& cache, seeded_rng& rng, std::int32_t capacity, std::size_t max_sequences)
      : cache_(cache), rng_(rng), capacity_(capacity), max_sequences_(max_sequences) {}

  static std::int64_t pages_for(std::int64_t tokens) {
    return (tokens + page_size - 1) / page_size;
  }

  std::map<kv::sequence_id, sequence>& sequences() { return model_; }
  std::int32_t free_pages() const { return capacity_ - live_pages(); }
  int errors() const { return errors_; }

  // A known sequence, or now and then one that is not (freed, or never created).
  kv::sequence_id pick() {
    if (model_.empty() || rng_.integer(0, 19) == 0) return rng_.integer(-1, last_id_ + 2);
    auto at = model_.begin();
    std::advance(at, rng_.integer(0, static_cast<std::int64_t>(model_.size()) - 1));
    return at->first;
  }

  // The pages appending `tokens` to the sequence takes from the pool.
  static std::int64_t pages_needed(const sequence& seq, std::int64_t tokens) {
    if (tokens <= 0) return 0;
    const bool copy = seq.length % page_size != 0 && seq.pages.back().use_count() > 1;
    return pages_for(seq.length + tokens) - std::ssize(seq.pages) + (copy ? 1 : 0);
  }

  // The model side of a successful append of `tokens`: the shared partial last page copied, new
  // pages for the rest; the test then writes slots [length, length + tokens) and adds to length.
  static void make_room(sequence& seq, std::int64_t tokens) {
    if (tokens <= 0) return;
    if (seq.length % page_size != 0 && seq.pages.back().use_count() > 1) {
      seq.pages.back() = std::make_shared<Page>(*seq.pages.back());
    }
    while (std::ssize(seq.pages) < pages_for(seq.length + tokens)) {
      seq.pages.push_back(std::make_shared<Page>());
    }
  }

  // The call must fail naming `argument` and leave the cache exactly as it was.
  template <class Call>
  void expect_error(Call call, const std::string& argument) {
    const Cache before = cache_;
    CHECK(argument_of(call) == argument);
    CHECK(cache_ == before);
    CHECK(std::ranges::equal(cache_.pool().all_bytes(), before.pool().all_bytes()));
    ++errors_;
  }

  // `operations` random steps: action 0 creates, 1-4 call append(), 5-6 fork, 7-8 truncate, 9
  // frees; after each step the common checks, then check_contents().
  template <class Append, class CheckContents>
  void run(int operations, Append append, CheckContents check_contents) {
    for (int step = 0; step < operations; ++step) {
      CAPTURE(step);
      const std::int64_t action = rng_.integer(0, 9);
      if (action == 0 && model_.size() < max_sequences_) {
        last_id_ = cache_.create();
        model_[last_id_] = {};
      } else if (action <= 4) {
        append();
      } else if (action <= 6) {
        fork();
      } else if (action <= 8) {
        truncate();
      } else {
        free();
      }
      check_pages();
      check_contents();
    }
    // Errors were exercised, then everything goes back to the pool.
    CHECK(errors_ > operations / 50);
    for (const auto& [s, seq] : model_) cache_.free(s);
    CHECK(cache_.pool().free_pages() == capacity_);
    for (std::int32_t page = 0; page < capacity_; ++page) CHECK(cache_.pool().ref_count(page) == 0);
  }

 private:
  std::int32_t live_pages() const {
    std::set<const void*> pages;
    for (const auto& [id, seq] : model_) {
      for (const auto& page : seq.pages) pages.insert(page.get());
    }
    return static_cast<std::int32_t>(pages.size());
  }

  void fork() {
    const kv::sequence_id s = pick();
    if (!model_.contains(s)) return expect_error([&] { (void)cache_.fork(s); }, "sequence");
    last_id_ = cache_.fork(s);
    model_[last_id_] = model_[s];
  }

  void truncate() {
    const kv::sequence_id s = pick();
    const auto found = model_.find(s);
    if (found == model_.end()) return expect_error([&] { cache_.truncate(s, 0); }, "sequence");
    sequence& seq = found->second;
    const std::int64_t tokens = rng_.integer(0, seq.length + 2);
    if (tokens > seq.length) return expect_error([&] { cache_.truncate(s, tokens); }, "tokens");
    cache_.truncate(s, tokens);
    seq.length -= tokens;
    seq.pages.resize(static_cast<std::size_t>(pages_for(seq.length)));
  }

  void free() {
    const kv::sequence_id s = pick();
    if (!model_.contains(s)) return expect_error([&] { cache_.free(s); }, "sequence");
    cache_.free(s);
    model_.erase(s);
  }

  // Lengths, free pages, and each cache page standing for exactly one model page (and back) with
  // the model page's reference count.
  void check_pages() {
    REQUIRE(cache_.sequences() == std::ssize(model_));
    REQUIRE(cache_.pool().free_pages() == free_pages());
    std::map<std::int32_t, const void*> same_page;
    std::map<const void*, std::int32_t> same_model_page;
    for (const auto& [s, seq] : model_) {
      CAPTURE(s);
      REQUIRE(cache_.length(s) == seq.length);
      const auto pages = cache_.pages(s);
      REQUIRE(std::ssize(pages) == std::ssize(seq.pages));
      for (std::size_t i = 0; i < pages.size(); ++i) {
        REQUIRE(cache_.pool().ref_count(pages[i]) == seq.pages[i].use_count());
        REQUIRE(same_page.emplace(pages[i], seq.pages[i].get()).first->second ==
                seq.pages[i].get());
        REQUIRE(same_model_page.emplace(seq.pages[i].get(), pages[i]).first->second == pages[i]);
      }
    }
  }

  Cache& cache_;
  seeded_rng& rng_;
  std::int32_t capacity_;
  std::size_t max_sequences_;
  std::map<kv::sequence_id, sequence> model_;
  kv::sequence_id last_id_ = -1;
  int errors_ = 0;
};

}  // namespace infuse::test
