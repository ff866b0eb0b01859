#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "infuse/kv/layout.hpp"
#include "support/random.hpp"

namespace kv = infuse::kv;

namespace {

// Lengths around the page boundaries of a page size, and 0.
template <int PageSize>
std::vector<std::int64_t> boundary_lengths() {
  std::vector<std::int64_t> lengths{0, 1, PageSize, PageSize + 1, 2 * PageSize, 3 * PageSize - 1};
  if (PageSize > 1) lengths.push_back(PageSize - 1);
  return lengths;
}

}  // namespace

TEST_CASE_TEMPLATE("kv::page_table_view maps token t to (page, slot) across page boundaries",
                   Layout, kv::paged<1>, kv::paged<16>, kv::paged<256>, kv::paged<16, kv::hnd>) {
  constexpr int page_size = Layout::page_size;
  INFUSE_RANDOM(rng);
  const std::vector<std::int64_t> lengths = boundary_lengths<page_size>();

  // Each sequence gets its pages from a shuffled pool, so page indices are not in token order.
  std::vector<std::int32_t> indptr{0}, indices, last_page_len;
  for (const std::int64_t length : lengths) {
    const auto pages = static_cast<std::int32_t>((length + page_size - 1) / page_size);
    indptr.push_back(indptr.back() + pages);
    last_page_len.push_back(
        static_cast<std::int32_t>(pages == 0 ? 0 : length - std::int64_t{pages - 1} * page_size));
  }
  indices.resize(static_cast<std::size_t>(indptr.back()));
  std::iota(indices.begin(), indices.end(), 0);
  std::shuffle(indices.begin(), indices.end(), rng.engine());
  const typename Layout::table_view table{indptr.data(), indices.data(), last_page_len.data(),
                                          static_cast<std::int32_t>(lengths.size())};
  CHECK_NOTHROW(kv::require_page_table(table, indptr.back(), "test"));

  std::set<std::pair<std::int32_t, std::int32_t>> seen;  // every (page, slot) at most once
  for (std::int32_t s = 0; s < table.sequences; ++s) {
    CAPTURE(s);
    CHECK(table.length(s) == lengths[static_cast<std::size_t>(s)]);
    // Walk the sequence's pages slot by slot: the t-th slot visited holds token t.
    std::int64_t t = 0;
    for (std::int32_t i = indptr[s]; i < indptr[s + 1]; ++i) {
      for (std::int32_t slot = 0; slot < page_size && t < table.length(s); ++slot, ++t) {
        const kv::token_location where = table.locate(s, t);
        CHECK(where.page == indices[static_cast<std::size_t>(i)]);
        CHECK(where.slot == slot);
        CHECK(seen.insert({where.page, where.slot}).second);
      }
    }
    CHECK(t == table.length(s));
  }
}

TEST_CASE("kv::contiguous_table_view gives each sequence its own run") {
  const std::vector<std::int32_t> lengths{0, 5, 7};
  const kv::contiguous<>::table_view table{lengths.data(), 3, 8};
  CHECK(table.length(2) == 7);
  const kv::token_location where = table.locate(1, 4);
  CHECK(where.page == 1);
  CHECK(where.slot == 4);
  static_assert(!kv::contiguous<kv::hnd>::is_paged && kv::paged<8>::is_paged);
}

TEST_CASE_TEMPLATE("kv::nhd and kv::hnd place every element of a page once", Order, kv::nhd,
                   kv::hnd) {
  constexpr std::int64_t slots = 5, heads = 3, head_dim = 4;
  std::vector<int> hits(slots * heads * head_dim, 0);
  for (std::int64_t slot = 0; slot < slots; ++slot) {
    for (std::int64_t head = 0; head < heads; ++head) {
      for (std::int64_t dim = 0; dim < head_dim; ++dim) {
        const std::int64_t at = Order::offset(slot, head, dim, slots, heads, head_dim);
        REQUIRE(at >= 0);
        REQUIRE(at < slots * heads * head_dim);
        ++hits[static_cast<std::size_t>(at)];
        // What is contiguous: a token's heads (nhd) or a head's tokens (hnd).
        if constexpr (std::is_same_v<Order, kv::nhd>) {
          CHECK(at == Order::offset(slot, 0, 0, slots, heads, head_dim) + head * head_dim + dim);
        } else {
          CHECK(at == Order::offset(0, head, 0, slots, heads, head_dim) + slot * head_dim + dim);
        }
      }
    }
  }
  CHECK(std::all_of(hits.begin(), hits.end(), [](int count) { return count == 1; }));
}

TEST_CASE("kv::require_page_table names the entry that is wrong") {
  std::vector<std::int32_t> indptr{0, 2, 3}, indices{4, 1, 0}, last_page_len{16, 3};
  const kv::page_table_view<16> table{indptr.data(), indices.data(), last_page_len.data(), 2};
  CHECK_NOTHROW(kv::require_page_table(table, 5, "infuse::test"));

  const auto argument_of = [&](std::int32_t pool_pages) {
    try {
      kv::require_page_table(table, pool_pages, "infuse::test");
    } catch (const infuse::error& failure) {
      return failure.argument();
    }
    return std::string("(no error)");
  };
  CHECK(argument_of(4) == "page_table.indices[0]");  // page 4 of a pool of 4
  indices[0] = -1;
  CHECK(argument_of(5) == "page_table.indices[0]");
  indices[0] = 4;
  last_page_len[1] = 17;
  CHECK(argument_of(5) == "page_table.last_page_len[1]");
  last_page_len[1] = 0;
  CHECK(argument_of(5) == "page_table.last_page_len[1]");
  last_page_len[1] = 3;
  indptr[2] = 1;
  CHECK(argument_of(5) == "page_table.indptr[2]");
  indptr[2] = 3;
  indptr[0] = 1;
  CHECK(argument_of(5) == "page_table.indptr[0]");
}
