#include <doctest/doctest.h>

#include <cstdint>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include "infuse/core/concepts.hpp"
#include "infuse/core/view.hpp"
#include "infuse/exec/cpu.hpp"
#include "support/random.hpp"

namespace {

using infuse::device_memory;
using infuse::host_memory;
using infuse::host_view;

std::vector<float> iota_values(std::int64_t count) {
  std::vector<float> values(static_cast<std::size_t>(count));
  std::iota(values.begin(), values.end(), 0.0f);
  return values;
}

// The exact message require_view throws, or "" when it does not throw.
template <class T, int Rank, class Space>
std::string require_view_message(const infuse::view<T, Rank, Space>& x,
                                 const infuse::expected_extent (&extents)[Rank],
                                 infuse::stride_rule rule = infuse::stride_rule::unit_inner) {
  try {
    infuse::require_view(x, "infuse::op", "x", extents, rule);
  } catch (const infuse::error& failure) {
    return failure.what();
  }
  return "";
}

}  // namespace

// What a kernel argument must be: a few words, copied bit for bit into a CUDA kernel's parameters.
static_assert(std::is_trivially_copyable_v<host_view<float, 3>>);
static_assert(std::is_trivially_copyable_v<infuse::device_view<const float, 4>>);
static_assert(sizeof(host_view<float, 2>) == sizeof(float*) + 4 * sizeof(std::int64_t));

// Const views from non-const, never the other way and never across memory spaces.
static_assert(std::is_convertible_v<host_view<float, 2>, host_view<const float, 2>>);
static_assert(!std::is_convertible_v<host_view<const float, 2>, host_view<float, 2>>);
static_assert(!std::is_convertible_v<host_view<float, 2>, infuse::device_view<float, 2>>);
static_assert(!std::is_convertible_v<infuse::device_view<float, 2>, host_view<const float, 2>>);
static_assert(!std::is_convertible_v<host_view<float, 2>, host_view<const float, 3>>);
static_assert(!std::is_convertible_v<host_view<int, 2>, host_view<const float, 2>>);

// The compile-time checks behind static_check_view.
static_assert(infuse::view_type<host_view<float, 1>>);
static_assert(infuse::view_type<const host_view<float, 1>>);
static_assert(!infuse::view_type<float*>);
static_assert(infuse::readable_by<host_view<const float, 2>, infuse::exec::cpu>);
static_assert(!infuse::readable_by<infuse::device_view<float, 2>, infuse::exec::cpu>);
static_assert(!infuse::readable_by<float*, infuse::exec::cpu>);
static_assert(!infuse::readable_by<host_view<float, 2>, int>);
static_assert(infuse::memory_space<host_memory> && infuse::memory_space<device_memory>);
static_assert(!infuse::memory_space<int> && !infuse::memory_space<infuse::exec::cpu>);

TEST_CASE("a row-major view: extents, strides, size and indexing by hand") {
  std::vector<float> storage = iota_values(2 * 3 * 4);
  const host_view<float, 3> x(storage.data(), {2, 3, 4});  // (2,3,4)
  CHECK(x.data() == storage.data());
  CHECK(x.extent(0) == 2);
  CHECK(x.extent(1) == 3);
  CHECK(x.extent(2) == 4);
  CHECK(x.stride(0) == 12);
  CHECK(x.stride(1) == 4);
  CHECK(x.stride(2) == 1);
  CHECK(x.size() == 24);
  CHECK(x.is_contiguous());
  CHECK(x(0, 0, 0) == 0.0f);
  CHECK(x(0, 0, 3) == 3.0f);
  CHECK(x(0, 2, 1) == 9.0f);
  CHECK(x(1, 0, 0) == 12.0f);
  CHECK(x(1, 2, 3) == 23.0f);
  // Indices of any integer type.
  CHECK(x(std::size_t{1}, short{1}, std::int64_t{1}) == 17.0f);

  // Writes go through to the storage, also through a const view object (a view is a pointer).
  x(1, 1, 2) = -5.0f;
  CHECK(storage[1 * 12 + 1 * 4 + 2] == -5.0f);
}

TEST_CASE("indexing matches the offset formula on random shapes and strides") {
  INFUSE_RANDOM(rng);
  for (int trial = 0; trial < 50; ++trial) {
    const infuse::index_array<3> extents{{rng.integer(1, 5), rng.integer(1, 5), rng.integer(1, 5)}};
    // Strides with gaps (a slice of something larger), in a random order of dimensions.
    infuse::index_array<3> strides{};
    std::int64_t step = rng.integer(1, 3);
    int order[3] = {0, 1, 2};
    std::swap(order[0], order[rng.integer(0, 2)]);
    std::swap(order[1], order[rng.integer(1, 2)]);
    for (int d : order) {
      strides[d] = step;
      step *= extents[d] + rng.integer(0, 2);
    }
    std::vector<float> storage = iota_values(step);
    const host_view<float, 3> x(storage.data(), extents, strides);
    for (std::int64_t i = 0; i < extents[0]; ++i) {
      for (std::int64_t j = 0; j < extents[1]; ++j) {
        for (std::int64_t k = 0; k < extents[2]; ++k) {
          const std::int64_t offset = i * strides[0] + j * strides[1] + k * strides[2];
          REQUIRE(&x(i, j, k) == storage.data() + offset);
        }
      }
    }
  }
}

TEST_CASE("a transposed view reads the same storage in the other order") {
  std::vector<float> storage = iota_values(3 * 5);
  const host_view<float, 2> a(storage.data(), {3, 5});           // (3,5)
  const host_view<float, 2> at(storage.data(), {5, 3}, {1, 5});  // (5,3), column-major
  CHECK_FALSE(at.is_contiguous());
  CHECK(at.size() == a.size());
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 5; ++j) CHECK(at(j, i) == a(i, j));
  }
}

TEST_CASE("a sliced view: a block of rows and columns, and every other column") {
  std::vector<float> storage = iota_values(6 * 8);
  const host_view<float, 2> full(storage.data(), {6, 8});  // (6,8)

  // Rows 2..4, columns 3..6: start at (2, 3), keep the parent's strides.
  const host_view<float, 2> block(&full(2, 3), {3, 4}, full.strides());  // (3,4)
  CHECK_FALSE(block.is_contiguous());
  CHECK(block(0, 0) == 19.0f);  // 2 * 8 + 3
  CHECK(block(2, 3) == 38.0f);  // 4 * 8 + 6

  // Every other column of row 1.
  const host_view<float, 1> evens(&full(1, 0), {4}, {2});  // (4)
  CHECK_FALSE(evens.is_contiguous());
  for (int j = 0; j < 4; ++j) CHECK(evens(j) == static_cast<float>(8 + 2 * j));

  // A full row is contiguous even though it was cut out of a larger matrix.
  const host_view<float, 1> row(&full(5, 0), {8}, {1});
  CHECK(row.is_contiguous());
}

TEST_CASE("is_contiguous ignores the strides of extent-1 dimensions and accepts empty views") {
  float storage[8] = {};
  CHECK(host_view<float, 3>(storage, {2, 1, 4}, {4, 999, 1}).is_contiguous());
  CHECK(host_view<float, 2>(storage, {1, 8}, {0, 1}).is_contiguous());
  CHECK_FALSE(host_view<float, 2>(storage, {2, 4}, {5, 1}).is_contiguous());
  CHECK_FALSE(host_view<float, 2>(storage, {2, 4}, {4, 2}).is_contiguous());
  CHECK(host_view<float, 2>(storage, {0, 4}, {123, 7}).is_contiguous());

  const host_view<float, 2> empty;
  CHECK(empty.data() == nullptr);
  CHECK(empty.size() == 0);
  CHECK(empty.is_contiguous());
}

TEST_CASE("a view converts to a view of const elements over the same memory") {
  std::vector<float> storage = iota_values(12);
  const host_view<float, 2> mutable_x(storage.data(), {4, 3}, {1, 4});
  const host_view<const float, 2> x = mutable_x;
  static_assert(std::is_same_v<decltype(x(0, 0)), const float&>);
  CHECK(x.data() == mutable_x.data());
  for (int d = 0; d < 2; ++d) {
    CHECK(x.extent(d) == mutable_x.extent(d));
    CHECK(x.stride(d) == mutable_x.stride(d));
  }
  CHECK(&x(3, 2) == &mutable_x(3, 2));
}

TEST_CASE("require_view accepts a view that meets every requirement") {
  std::vector<float> storage(2 * 8 * 64);
  const host_view<const float, 3> q(storage.data(), {2, 8, 64});
  CHECK_NOTHROW(infuse::require_view(q, "infuse::op", "q", {2, 8, 64}));
  CHECK_NOTHROW(infuse::require_view(q, "infuse::op", "q",
                                     {infuse::any_extent, {8, "heads"}, {64, "head_dim"}},
                                     infuse::stride_rule::contiguous));
  // Rows of a wider matrix: the last dimension is contiguous, the view as a whole is not.
  const host_view<const float, 2> rows(storage.data(), {4, 64}, {128, 1});
  CHECK_NOTHROW(infuse::require_view(rows, "infuse::op", "rows", {4, 64}));
  // An empty view needs no pointer and no particular strides.
  const host_view<const float, 2> empty(nullptr, {0, 64}, {1, 7});
  CHECK_NOTHROW(infuse::require_view(empty, "infuse::op", "x", {0, 64},
                                     infuse::stride_rule::contiguous));
}

TEST_CASE("require_view names the argument, the faulty part, its value and what was expected") {
  std::vector<float> storage(2 * 8 * 64);
  const host_view<float, 3> q(storage.data(), {2, 8, 63});

  try {
    infuse::require_view(q, "infuse::attention::decode", "q",
                         {infuse::any_extent, 8, {64, "head_dim"}});
    FAIL("require_view did not throw");
  } catch (const infuse::error& failure) {
    CHECK(std::string(failure.what()) ==
          "infuse::attention::decode: q.extent(2) is 63, expected 64 (head_dim)");
    CHECK(failure.argument() == "q.extent(2)");
  }

  // An unnamed extent; the first faulty dimension is reported.
  CHECK(require_view_message(q, {3, 9, 63}) == "infuse::op: x.extent(0) is 2, expected 3");
  CHECK(require_view_message(q, {2, 8, 63}).empty());

  const host_view<float, 2> negative(storage.data(), {2, -1});
  CHECK(require_view_message(negative, {infuse::any_extent, infuse::any_extent}) ==
        "infuse::op: x.extent(1) is -1, expected a nonnegative extent");

  // Shapes are checked before the pointer: the wrong shape is the first thing to fix.
  const host_view<float, 2> null(nullptr, {2, 3});
  CHECK(require_view_message(null, {2, 4}) == "infuse::op: x.extent(1) is 3, expected 4");
  CHECK(require_view_message(null, {2, 3}) ==
        "infuse::op: x.data() is null, expected a pointer to 6 elements");

  const host_view<float, 2> transposed(storage.data(), {4, 3}, {1, 4});
  CHECK(require_view_message(transposed, {4, 3}) ==
        "infuse::op: x.stride(1) is 4, expected 1 (the last dimension must be contiguous)");
  CHECK(require_view_message(transposed, {4, 3}, infuse::stride_rule::any).empty());

  const host_view<float, 2> rows(storage.data(), {4, 64}, {128, 1});
  CHECK(require_view_message(rows, {4, 64}, infuse::stride_rule::contiguous) ==
        "infuse::op: x.stride(0) is 128, expected 64 (the view must be row-major contiguous)");
}

TEST_CASE("require_view reports the dimension and value of a random wrong extent") {
  INFUSE_RANDOM(rng);
  std::vector<float> storage(6 * 6 * 6 * 6);
  for (int trial = 0; trial < 20; ++trial) {
    const infuse::index_array<4> extents{
        {rng.integer(0, 6), rng.integer(0, 6), rng.integer(0, 6), rng.integer(0, 6)}};
    const host_view<float, 4> x(storage.data(), extents);
    const int wrong = static_cast<int>(rng.integer(0, 3));
    infuse::expected_extent expected[4] = {extents[0], extents[1], extents[2], extents[3]};
    expected[wrong] = {extents[wrong] + rng.integer(1, 100), "size"};
    CHECK(require_view_message(x, expected) ==
          "infuse::op: x.extent(" + std::to_string(wrong) + ") is " +
              std::to_string(extents[wrong]) + ", expected " +
              std::to_string(expected[wrong].value) + " (size)");
    expected[wrong] = infuse::any_extent;
    CHECK(require_view_message(x, expected).empty());
  }
}
