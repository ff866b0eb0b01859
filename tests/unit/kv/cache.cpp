#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "infuse/kv/page_pool.hpp"
#include "infuse/quant/quant.hpp"
#include "cache_model.hpp"
#include "support/errors.hpp"
#include "support/random.hpp"

namespace kv = infuse::kv;
using infuse::test::argument_of;

namespace {

// Bytes per token slot in these tests: odd, so that a wrong slot offset shows. The tests write
// raw bytes at the start of each page: the formats below leave 64 bytes per slot there (the K
// codes of one head of 32 halves).
constexpr std::int64_t token_bytes = 3;
constexpr kv::vector_format<infuse::quant::none<infuse::half>> one_head{1, 1};

// Byte j of a token written with `pattern`.
std::uint8_t token_byte(std::uint8_t pattern, std::int64_t j) {
  return static_cast<std::uint8_t>(pattern + 37 * j);
}

template <class Cache>
void write_token(Cache& cache, kv::sequence_id s, std::int64_t t, std::uint8_t pattern) {
  const auto page = cache.writable_page(s, t / Cache::page_size);
  for (std::int64_t j = 0; j < token_bytes; ++j) {
    page[static_cast<std::size_t>(t % Cache::page_size * token_bytes + j)] = token_byte(pattern, j);
  }
}

template <class Cache>
bool token_is(const Cache& cache, kv::sequence_id s, std::int64_t t, std::uint8_t pattern) {
  const auto page = cache.page(s, t / Cache::page_size);
  for (std::int64_t j = 0; j < token_bytes; ++j) {
    if (page[static_cast<std::size_t>(t % Cache::page_size * token_bytes + j)] !=
        token_byte(pattern, j)) {
      return false;
    }
  }
  return true;
}


}  // namespace

TEST_CASE_TEMPLATE("kv::cache appends across page boundaries and locates every token", Layout,
                   kv::paged<1>, kv::paged<16>, kv::paged<256>) {
  constexpr int page_size = Layout::page_size;
  kv::cache<Layout> cache(8, one_head, one_head);
  const kv::sequence_id a = cache.create();
  const kv::sequence_id b = cache.create();
  // Lengths that stop just before, at and just after page boundaries.
  const std::vector<std::int64_t> steps{1, page_size - 1 > 0 ? page_size - 1 : 1, 1, page_size};
  std::int64_t length = 0;
  for (const std::int64_t step : steps) {
    cache.append(a, step);
    for (std::int64_t t = length; t < length + step; ++t) write_token(cache, a, t, std::uint8_t(t));
    length += step;
    CHECK(cache.length(a) == length);
    CHECK(std::ssize(cache.pages(a)) == (length + page_size - 1) / page_size);
  }
  cache.append(b, 1);
  write_token(cache, b, 0, 200);
  CHECK(cache.pool().free_pages() == 8 - std::ssize(cache.pages(a)) - std::ssize(cache.pages(b)));

  const std::vector<kv::sequence_id> batch{b, a};
  const kv::page_table<page_size> table = cache.table(batch);
  const kv::page_table_view<page_size> view = table.view();
  CHECK_NOTHROW(kv::require_page_table(view, cache.pool().capacity(), "test"));
  CHECK(view.length(0) == 1);
  CHECK(view.length(1) == length);
  for (std::int64_t t = 0; t < length; ++t) {
    CAPTURE(t);
    const kv::token_location where = view.locate(1, t);
    CHECK(where.page == cache.locate(a, t).page);
    CHECK(where.slot == cache.locate(a, t).slot);
    CHECK(where.slot == t % page_size);
    CHECK(token_is(cache, a, t, std::uint8_t(t)));
    // The same token read straight from the pool through the view's location.
    const auto bytes = cache.pool().bytes(where.page);
    CHECK(bytes[static_cast<std::size_t>(where.slot * token_bytes)] == std::uint8_t(t));
  }
}

TEST_CASE("kv::cache fork shares pages and copies a partial last page on write") {
  constexpr int page_size = 16;
  kv::cache<kv::paged<page_size>> cache(6, one_head, one_head);
  const auto& pool = cache.pool();
  const kv::sequence_id a = cache.create();
  cache.append(a, 20);  // one full page and 4 tokens of a second
  for (std::int64_t t = 0; t < 20; ++t) write_token(cache, a, t, std::uint8_t(t));

  const kv::sequence_id b = cache.fork(a);
  CHECK(std::ranges::equal(cache.pages(a), cache.pages(b)));
  for (const std::int32_t page : cache.pages(a)) CHECK(pool.ref_count(page) == 2);
  CHECK(pool.free_pages() == 4);
  CHECK(argument_of([&] { (void)cache.writable_page(b, 1); }) == "index");

  // b appends: its partial page becomes its own copy; the full page stays shared.
  cache.append(b, 1);
  const std::int32_t full = cache.pages(a)[0];
  CHECK(cache.pages(b)[0] == full);
  CHECK(cache.pages(b)[1] != cache.pages(a)[1]);
  CHECK(pool.ref_count(full) == 2);
  CHECK(pool.ref_count(cache.pages(a)[1]) == 1);
  CHECK(pool.ref_count(cache.pages(b)[1]) == 1);
  CHECK(pool.free_pages() == 3);
  for (std::int64_t t = 0; t < 20; ++t) CHECK(token_is(cache, b, t, std::uint8_t(t)));
  write_token(cache, b, 20, 0xb0);
  write_token(cache, b, 19, 0xb1);  // an old token of b's own copy

  // a appends in place (nobody shares its last page now) and writes the same slot differently.
  cache.append(a, 1);
  CHECK(pool.free_pages() == 3);
  write_token(cache, a, 20, 0xa0);
  CHECK(token_is(cache, a, 19, 19));
  CHECK(token_is(cache, a, 20, 0xa0));
  CHECK(token_is(cache, b, 19, 0xb1));
  CHECK(token_is(cache, b, 20, 0xb0));

  // A fork at a page boundary shares everything; appending takes a fresh page, nothing copied.
  cache.truncate(a, 5);
  CHECK(cache.length(a) == 16);
  CHECK(pool.free_pages() == 4);
  const kv::sequence_id c = cache.fork(a);
  cache.append(c, 1);
  CHECK(cache.pages(c)[0] == full);
  CHECK(pool.ref_count(full) == 3);
  CHECK(pool.free_pages() == 3);
  write_token(cache, c, 16, 0xc0);
  CHECK(token_is(cache, b, 16, 16));

  // Truncating into a shared page makes it a shared partial page: the next append copies it.
  cache.truncate(c, 9);
  CHECK(pool.free_pages() == 4);
  cache.append(c, 1);
  CHECK(cache.pages(c)[0] != full);
  CHECK(pool.ref_count(full) == 2);
  write_token(cache, c, 8, 0xc8);
  CHECK(token_is(cache, a, 8, 8));
  CHECK(token_is(cache, b, 8, 8));
  CHECK(token_is(cache, c, 7, 7));

  for (const kv::sequence_id s : {a, b, c}) cache.free(s);
  CHECK(cache.sequences() == 0);
  CHECK(pool.free_pages() == pool.capacity());
  for (std::int32_t page = 0; page < pool.capacity(); ++page) CHECK(pool.ref_count(page) == 0);
}

TEST_CASE("kv::cache errors name the argument and leave the cache exactly as it was") {
  constexpr int page_size = 4;
  kv::cache<kv::paged<page_size>> cache(4, one_head, one_head);
  const kv::sequence_id a = cache.create();
  cache.append(a, 6);
  for (std::int64_t t = 0; t < 6; ++t) write_token(cache, a, t, std::uint8_t(t + 1));
  const kv::sequence_id b = cache.fork(a);  // shares both pages of a, the second one partial
  const kv::sequence_id c = cache.create();
  cache.append(c, 8);  // two full pages: the pool is full
  const kv::sequence_id gone = cache.create();
  cache.free(gone);
  REQUIRE(cache.pool().free_pages() == 0);

  const auto before = cache;
  const auto unchanged = [&](const char* what) {
    CAPTURE(what);
    CHECK(cache == before);
    CHECK(std::ranges::equal(cache.pool().all_bytes(), before.pool().all_bytes()));
  };
  CHECK(argument_of([&] { cache.append(c, 1); }) == "tokens");  // needs a page, none is free
  unchanged("append past the pool");
  CHECK(argument_of([&] { cache.append(b, 1); }) == "tokens");  // needs a copy, no page for it
  CHECK(argument_of([&] { cache.append(a, 2); }) == "tokens");
  unchanged("append needing a copy on write");
  CHECK(argument_of([&] { cache.append(a, -1); }) == "tokens");
  unchanged("append a negative count");
  CHECK(argument_of([&] { cache.truncate(b, 7); }) == "tokens");
  unchanged("truncate past the start");
  CHECK(argument_of([&] { cache.truncate(b, -1); }) == "tokens");
  unchanged("truncate a negative count");
  for (const kv::sequence_id unknown : {gone, kv::sequence_id{99}, kv::sequence_id{-1}}) {
    CAPTURE(unknown);
    CHECK(argument_of([&] { cache.append(unknown, 1); }) == "sequence");
    CHECK(argument_of([&] { (void)cache.fork(unknown); }) == "sequence");
    CHECK(argument_of([&] { cache.truncate(unknown, 0); }) == "sequence");
    CHECK(argument_of([&] { cache.free(unknown); }) == "sequence");
    CHECK(argument_of([&] { (void)cache.length(unknown); }) == "sequence");
    unchanged("an unknown sequence");
  }
  CHECK(argument_of([&] { (void)cache.writable_page(b, 1); }) == "index");  // shared with a
  CHECK(argument_of([&] { (void)cache.page(a, 2); }) == "index");
  CHECK(argument_of([&] { (void)cache.locate(a, 6); }) == "token");
  CHECK(argument_of([&] { (void)cache.pool().bytes(4); }) == "page");
  unchanged("reads out of range");
  CHECK(argument_of([] { kv::cache<kv::paged<4>>(0, one_head, one_head); }) == "capacity");
  CHECK(argument_of([] { kv::cache<kv::paged<4>>(1, {0, 64}, one_head); }) == "k.heads");
  CHECK(argument_of([] { kv::cache<kv::paged<4>>(1, one_head, {1, 0}); }) == "v.head_dim");
  CHECK(argument_of([] { kv::cache<kv::paged<4>>(1, one_head, {1, 1025}); }) == "v.head_dim");
  using int4_g64 = infuse::quant::int_<4, 64>;
  CHECK(argument_of([] {
          kv::cache<kv::paged<4>, int4_g64>(1, {1, 96}, {1, 128});
        }) == "k.head_dim");  // 96 is not a multiple of the group 64

  // With a page free again the same append works, and copies the shared page.
  cache.truncate(c, 4);
  cache.append(a, 2);
  CHECK(cache.length(a) == 8);
  CHECK(cache.pages(a)[1] != cache.pages(b)[1]);
  CHECK(token_is(cache, a, 5, 6));
}

namespace {

template <int PageSize>
void run_against_model(std::int32_t capacity, int operations) {
  INFUSE_RANDOM(rng);
  using cache_type = kv::cache<kv::paged<PageSize>>;
  // A model page: the byte pattern written to each slot.
  using model_page = std::array<std::uint8_t, PageSize>;
  cache_type cache(capacity, one_head, one_head);
  infuse::test::cache_model<cache_type, model_page> model(cache, rng, capacity, 12);
  const auto append = [&] {
    const kv::sequence_id s = model.pick();
    const std::int64_t tokens = rng.integer(0, 9) == 0 ? rng.integer(0, capacity * PageSize)
                                                       : rng.integer(0, 2 * PageSize + 1);
    const auto found = model.sequences().find(s);
    if (found == model.sequences().end()) {
      return model.expect_error([&] { cache.append(s, tokens); }, "sequence");
    }
    auto& seq = found->second;
    if (model.pages_needed(seq, tokens) > model.free_pages()) {
      return model.expect_error([&] { cache.append(s, tokens); }, "tokens");
    }
    cache.append(s, tokens);
    model.make_room(seq, tokens);
    for (std::int64_t t = seq.length; t < seq.length + tokens; ++t) {
      const auto pattern = static_cast<std::uint8_t>(rng.bits32());
      write_token(cache, s, t, pattern);
      (*seq.pages[static_cast<std::size_t>(t / PageSize)])[t % PageSize] = pattern;
    }
    seq.length += tokens;
  };
  // Every token's bytes, after every operation.
  const auto check_contents = [&] {
    for (const auto& [s, seq] : model.sequences()) {
      for (std::int64_t t = 0; t < seq.length; ++t) {
        const auto pattern = (*seq.pages[static_cast<std::size_t>(t / PageSize)])[t % PageSize];
        if (!token_is(cache, s, t, pattern)) REQUIRE_MESSAGE(false, "token " << t << " differs");
      }
    }
  };
  model.run(operations, append, check_contents);
}

}  // namespace

TEST_CASE("kv::cache matches a model over 9,000 random create/append/fork/truncate/free") {
  SUBCASE("page size 1") {
    run_against_model<1>(64, 3'000);
  }
  SUBCASE("page size 16") {
    run_against_model<16>(24, 3'000);
  }
  SUBCASE("page size 256") {
    run_against_model<256>(6, 3'000);
  }
}
