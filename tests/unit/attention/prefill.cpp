// attention::prefill on the CPU, paged NHD layout: every K/V scheme under every sparsity against
// the float64 reference on both walks of the body, the options, mixed K/V schemes, queries that
// see nothing, the key bounds it keeps, and its argument checks. prefill_hnd.cpp and
// prefill_contiguous.cpp run the same checks on the other layouts.
#include "infuse/attention/cpu/prefill.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "infuse/quant/int.hpp"
#include "infuse/quant/none.hpp"
#include "infuse/sparse/dense.hpp"
#include "infuse/sparse/tree.hpp"
#include "prefill_store.hpp"
#include "support/key_bounds.hpp"
#include "support/random.hpp"

namespace {

namespace kv = infuse::kv;
namespace quant = infuse::quant;
namespace sparse = infuse::sparse;
namespace attention = infuse::attention;
using infuse::half;
using infuse::host_view;
using infuse::test::check_prefill;
using infuse::test::prefill_path;
using infuse::test::prefill_problem;
using infuse::test::prefill_store;
using infuse::test::seeded_rng;
using infuse::test::tree_mask;

// Queries at positions that are multiples of 3 see nothing: their output is 0, their lse -inf.
struct blind_thirds {
  using identifier = sparse::policy_identifier;
  static constexpr const char* name = "blind_thirds";
  struct params {};
  static void check(const params&, std::string_view) {}
  static std::int64_t max_ranges(const params&, const sparse::query_context&) { return 1; }
  static std::int64_t select(const params&, const sparse::query_context& q,
                             sparse::token_range* out) {
    return sparse::dense::select({}, q, out);
  }
  static bool visible(const params&, const sparse::mask_context& m) {
    return m.query_position % 3 != 0;
  }
};
static_assert(sparse::policy<blind_thirds>);

}  // namespace

TEST_CASE_TEMPLATE(
    "attention::prefill, paged NHD: matches float64 attention over the stored K/V, and stores "
    "the new K/V as encode() does",
    Config, INFUSE_PREFILL_COMBINATIONS(kv::paged<16>)) {
  INFUSE_RANDOM(rng);
  infuse::test::check_prefill_shapes<Config>(rng);
}

TEST_CASE("attention::prefill applies the scale, the soft cap and ALiBi as the reference does") {
  INFUSE_RANDOM(rng);
  std::vector<float> slopes(14);
  for (auto& slope : slopes) slope = static_cast<float>(rng.uniform(-0.2, 0.0));
  for (const prefill_path path : {prefill_path::tiles, prefill_path::few_queries}) {
    const bool few = path == prefill_path::few_queries;
    prefill_problem p{{rng.integer(0, 40), 5}, {few ? 4 : 70, few ? 1 : 9}, 2, 7, 64, 64, path};
    p.options.scale = 0.3f;
    p.options.soft_cap = 2.5f;
    p.options.alibi_slopes = slopes.data();
    check_prefill<kv::paged<16>, quant::none<float>, quant::none<float>, sparse::causal>(rng, p);
    p.options.soft_cap = 0.0f;
    check_prefill<kv::paged<16>, quant::none<half>, quant::none<half>, sparse::dense>(rng, p, 1);
  }
}

// prefill_hnd.cpp runs int8 keys with int4 values.
TEST_CASE("attention::prefill: K and V schemes may differ; one thread gives the same checks") {
  INFUSE_RANDOM(rng);
  using keys = quant::none<half>;
  using values = quant::none<float>;
  check_prefill<kv::paged<16>, keys, values, sparse::tree>(
      rng, {{3, 17}, {33, 64}, 1, 16, 64, 32, prefill_path::tiles});
  check_prefill<kv::paged<16>, keys, values, sparse::tree>(
      rng, {{3, 170}, {2, 1}, 1, 16, 64, 32, prefill_path::few_queries}, 1);
}

TEST_CASE("attention::prefill: a query that sees no key gets out = 0 and lse = -inf") {
  INFUSE_RANDOM(rng);
  for (const prefill_path path : {prefill_path::tiles, prefill_path::few_queries}) {
    const std::int64_t second = path == prefill_path::tiles ? 20 : 5;
    check_prefill<kv::paged<16>, quant::none<float>, quant::none<float>, blind_thirds>(
        rng, {{0, rng.integer(1, 30)}, {10, second}, 1, 3, 64, 64, path});
  }
}

TEST_CASE("attention::prefill recomputes the key bounds of the pages it writes") {
  INFUSE_RANDOM(rng);
  using scheme = quant::int_<8, quant::per_channel>;
  const std::vector<std::int64_t> prefix{21, 0}, fresh{30, 5};
  prefill_store<kv::paged<16>, scheme, scheme> store(rng, {51, 5}, 2, 64, 64, true);
  store.fill_prefix(rng, 0, 21);
  const std::vector<std::int32_t> q_indptr{0, 30, 35};
  const auto q = rng.normals(35 * 2 * 64);
  const auto k = rng.normals(35 * 2 * 64);
  const auto v = rng.normals(35 * 2 * 64);
  std::vector<float> out(35 * 2 * 64);
  auto cache = store.view();
  attention::prefill<kv::paged<16>, scheme, scheme, sparse::causal>(
      infuse::exec::cpu{}, host_view<const float, 3>(q.data(), {35, 2, 64}),
      host_view<const float, 3>(k.data(), {35, 2, 64}),
      host_view<const float, 3>(v.data(), {35, 2, 64}),
      host_view<const std::int32_t, 1>(q_indptr.data(), {3}), cache,
      host_view<float, 3>(out.data(), {35, 2, 64}), {}, {});
  // Pages 1..3 of sequence 0 (tokens 16..50) and page 0 of sequence 1; page 0 of sequence 0
  // holds only prefix tokens and keeps its (zero) bounds.
  for (std::int32_t b = 0; b < 2; ++b) {
    const auto keys = store.stored_keys(b);
    const std::int64_t length = cache.length(b);
    for (std::int64_t page = 0; page * 16 < length; ++page) {
      const kv::token_address at = cache.locate(b, page * 16);
      const std::int64_t index = (at.page - cache.pages) / cache.format.page_bytes();
      const bool written = (page + 1) * 16 > prefix[static_cast<std::size_t>(b)];
      for (std::int32_t h = 0; h < 2; ++h) {
        for (std::int32_t d = 0; d < 64; ++d) {
          double lo = INFINITY, hi = -INFINITY;
          for (std::int64_t t = page * 16; t < std::min(length, (page + 1) * 16); ++t) {
            lo = std::min(lo, keys[static_cast<std::size_t>((t * 2 + h) * 64 + d)]);
            hi = std::max(hi, keys[static_cast<std::size_t>((t * 2 + h) * 64 + d)]);
          }
          const auto at_bound = static_cast<std::size_t>((index * 2 + h) * 64 + d);
          CHECK(infuse::test::bounds_are(store.key_min()[at_bound], store.key_max()[at_bound],
                                         written ? static_cast<float>(lo) : 0.0f,
                                         written ? static_cast<float>(hi) : 0.0f));
        }
      }
    }
  }
}

namespace {

// A valid call that each bad-input check spoils in one argument.
struct bad_input_call {
  using layout = kv::paged<16>;
  using scheme = quant::none<float>;
  seeded_rng& rng;
  prefill_store<layout, scheme, scheme> store;
  std::vector<std::int32_t> q_indptr{0, 20, 20, 27};
  std::vector<float> q, k, v, out, lse;
  tree_mask mask;
  sparse::tree::params tree;
  kv::cache_view<layout, scheme, scheme> cache;
  std::int64_t total = 27;
  std::int64_t q_heads = 4;
  std::int64_t out_rows = 27;
  std::int64_t lse_heads = 4;
  attention::options options{};

  explicit bad_input_call(seeded_rng& r)
      : rng(r),
        store(r, {35, 3, 7}, 2, 64, 64),
        q(rng.normals(27 * 4 * 64)),
        k(rng.normals(27 * 2 * 64)),
        v(rng.normals(27 * 2 * 64)),
        out(27 * 4 * 64, 0.5f),
        lse(27 * 4, 0.5f) {
    store.fill_prefix(rng, 0, 15);
    store.fill_prefix(rng, 1, 3);
    tree = mask.build(rng, q_indptr);
    cache = store.view();
  }

  template <class Policy = sparse::causal>
  void run(const typename Policy::params& params = {}) {
    attention::prefill<layout, scheme, scheme, Policy>(
        infuse::exec::cpu{}, host_view<const float, 3>(q.data(), {total, q_heads, 64}),
        host_view<const float, 3>(k.data(), {total, 2, 64}),
        host_view<const float, 3>(v.data(), {total, 2, 64}),
        host_view<const std::int32_t, 1>(q_indptr.data(),
                                         {static_cast<std::int64_t>(q_indptr.size())}),
        cache, host_view<float, 3>(out.data(), {out_rows, q_heads, 64}), params, options,
        host_view<float, 2>(lse.data(), {total, lse_heads}));
  }
};

// The call throws infuse::error naming `argument`, and neither the cache nor the outputs change.
void expect_rejected(bad_input_call& call, const std::function<void()>& run,
                     const std::string& argument) {
  CAPTURE(argument);
  const auto bytes = call.store.bytes();
  const auto out = call.out;
  const auto lse = call.lse;
  try {
    run();
    FAIL("no infuse::error");
  } catch (const infuse::error& e) {
    CHECK(e.argument() == argument);
  }
  CHECK(call.store.bytes() == bytes);
  CHECK(call.out == out);
  CHECK(call.lse == lse);
}

}  // namespace

TEST_CASE("attention::prefill rejects bad arguments before writing anything") {
  INFUSE_RANDOM(rng);
  {
    bad_input_call call(rng);
    CHECK_NOTHROW(call.run());
    CHECK_NOTHROW(call.run<sparse::tree>(call.tree));
  }
  const auto spoiled =
      [&](
          const std::function<void(bad_input_call&)>& spoil, const std::string& argument,
          const std::function<void(bad_input_call&)>& run = [](bad_input_call& c) { c.run(); }) {
        bad_input_call call(rng);
        spoil(call);
        expect_rejected(
            call, [&] { run(call); }, argument);
      };
  spoiled([](bad_input_call& c) { c.q_heads = 3; }, "q.extent(1)");
  spoiled([](bad_input_call& c) { c.cache.format.k.head_dim = 63; }, "q.extent(2)");
  spoiled([](bad_input_call& c) { c.cache.format.v.head_dim = 32; }, "v.extent(2)");
  spoiled([](bad_input_call& c) { c.cache.format.v.heads = 1; }, "cache.format.v.heads");
  spoiled([](bad_input_call& c) { c.q_indptr[0] = 1; }, "q_indptr[0]");
  spoiled([](bad_input_call& c) { c.q_indptr[2] = 19; }, "q_indptr[2]");
  spoiled([](bad_input_call& c) { c.q_indptr[3] = 26; }, "q_indptr[3]");
  spoiled([](bad_input_call& c) { c.q_indptr.pop_back(); }, "q_indptr.extent(0)");
  // Sequence 1 holds 3 tokens: 4 new ones cannot have their slots.
  spoiled([](bad_input_call& c) { c.q_indptr = {0, 19, 23, 27}; }, "q_indptr[2]");
  spoiled([](bad_input_call&) {}, "page_table.indices[1]",
          [](bad_input_call& c) {
            std::vector<std::int32_t> indices(c.cache.table.indices,
                                              c.cache.table.indices + c.cache.table.indptr[3]);
            indices[1] = c.cache.pool_pages;
            c.cache.table.indices = indices.data();
            c.run();
          });
  spoiled([](bad_input_call& c) { c.out_rows = 26; }, "out.extent(0)");
  spoiled([](bad_input_call& c) { c.lse_heads = 2; }, "lse.extent(1)");
  spoiled([](bad_input_call& c) { c.mask.offsets[2] += 1; }, "sparsity.word_offsets[2]",
          [](bad_input_call& c) { c.run<sparse::tree>(c.tree); });
  spoiled([](bad_input_call&) {}, "sparsity.q_indptr[1]",
          [](bad_input_call& c) {
            std::vector<std::int32_t> other{0, 19, 20, 27};
            tree_mask other_mask;
            c.run<sparse::tree>(other_mask.build(c.rng, other));
          });
  spoiled([](bad_input_call& c) { c.options.soft_cap = -1.0f; }, "options.soft_cap");
}

TEST_CASE("attention::prefill takes the few-query path up to 16 new tokens and 32 rows a KV head") {
  const auto takes = [](std::vector<std::int32_t> q_indptr, std::int32_t group) {
    return attention::cpu::detail::takes_few_query_path(
        host_view<const std::int32_t, 1>(q_indptr.data(), {std::int64_t(q_indptr.size())}),
        static_cast<std::int32_t>(q_indptr.size() - 1), group);
  };
  CHECK(takes({0, 16, 17}, 2));
  CHECK(takes({0, 5}, 4));
  CHECK_FALSE(takes({0, 17}, 1));
  CHECK_FALSE(takes({0, 1, 10}, 4));
}
