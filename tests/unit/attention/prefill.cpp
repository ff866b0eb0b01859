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
#include "reference/attention.hpp"
#include "support/random.hpp"

namespace {

// The logit of a (query head, query, key) pair from the raw dot product: scale, then the soft cap
// cap * tanh(s / cap) when cap > 0, then ALiBi slope[h] * (key_position - query_position).
struct logit_rule {
  double scale;
  double soft_cap = 0.0;
  const float* alibi_slopes = nullptr;
  std::int64_t first_query_position = 0;  // position of query 0; key i is at position i

  double operator()(double dot, std::int32_t q_head, std::int64_t query, std::int64_t key) const {
    double s = dot * scale;
    if (soft_cap > 0.0) s = soft_cap * std::tanh(s / soft_cap);
    if (alibi_slopes != nullptr) {
      s += static_cast<double>(alibi_slopes[q_head]) *
           static_cast<double>(key - (first_query_position + query));
    }
    return s;
  }
};

namespace kv = infuse::kv;
namespace quant = infuse::quant;
namespace sparse = infuse::sparse;
namespace attention = infuse::attention;
using infuse::half;
using infuse::host_view;
using infuse::test::prefill_store;
using infuse::test::seeded_rng;

// One batch: per sequence the tokens already cached and the new ones; the head shape.
struct problem {
  std::vector<std::int64_t> prefix;
  std::vector<std::int64_t> fresh;
  std::int32_t kv_heads;
  std::int32_t group;
  std::int32_t k_dim;
  std::int32_t v_dim;
  attention::options options{};
};

// A random token tree per sequence (the parent of new token i is an earlier new token): each
// row sees its ancestors and itself.
struct tree_mask {
  std::vector<std::uint32_t> words;
  std::vector<std::int64_t> offsets{0};

  sparse::tree::params build(seeded_rng& rng, const std::vector<std::int32_t>& q_indptr) {
    const auto batch = static_cast<std::int32_t>(q_indptr.size() - 1);
    for (std::int32_t b = 0; b < batch; ++b) {
      const std::int64_t n =
          q_indptr[static_cast<std::size_t>(b) + 1] - q_indptr[static_cast<std::size_t>(b)];
      const std::int64_t stride = sparse::tree::row_words(n);
      const std::size_t base = words.size();
      words.resize(base + static_cast<std::size_t>(sparse::tree::mask_words(n)), 0u);
      std::vector<std::int64_t> parent(static_cast<std::size_t>(n), -1);
      for (std::int64_t i = 0; i < n; ++i) {
        if (i > 0) parent[static_cast<std::size_t>(i)] = rng.integer(0, i - 1);
        for (std::int64_t a = i; a >= 0; a = parent[static_cast<std::size_t>(a)]) {
          words[base + static_cast<std::size_t>(i * stride + a / 32)] |= 1u << (a % 32);
        }
      }
      offsets.push_back(static_cast<std::int64_t>(words.size()));
    }
    return {words.data(), offsets.data(), q_indptr.data(), batch};
  }
};

template <class Policy>
struct policy_params {
  typename Policy::params build(seeded_rng&, const std::vector<std::int32_t>&) { return {}; }
};
template <>
struct policy_params<sparse::tree> : tree_mask {};

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
template <>
struct policy_params<blind_thirds> {
  blind_thirds::params build(seeded_rng&, const std::vector<std::int32_t>&) { return {}; }
};

// Runs prefill on random inputs and checks the cache bytes (new records equal encode() of the
// inputs, nothing else changed), the outputs and the lse against the float64 reference over the
// stored keys and values.
template <class Layout, class K, class V, class Policy>
void check_prefill(seeded_rng& rng, const problem& p, int threads = 0) {
  const auto batch = static_cast<std::int32_t>(p.prefix.size());
  std::vector<std::int64_t> lengths;
  std::vector<std::int32_t> q_indptr{0};
  for (std::int32_t b = 0; b < batch; ++b) {
    lengths.push_back(p.prefix[static_cast<std::size_t>(b)] + p.fresh[static_cast<std::size_t>(b)]);
    q_indptr.push_back(q_indptr.back() +
                       static_cast<std::int32_t>(p.fresh[static_cast<std::size_t>(b)]));
  }
  CAPTURE(Policy::name);
  CAPTURE(p.kv_heads);
  CAPTURE(p.group);
  CAPTURE(p.k_dim);
  CAPTURE(p.v_dim);
  prefill_store<Layout, K, V> store(rng, lengths, p.kv_heads, p.k_dim, p.v_dim);
  for (std::int32_t b = 0; b < batch; ++b)
    store.fill_prefix(rng, b, p.prefix[static_cast<std::size_t>(b)]);

  const std::int64_t total = q_indptr.back();
  const std::int32_t q_heads = p.kv_heads * p.group;
  const auto q = rng.normals(static_cast<std::size_t>(total * q_heads * p.k_dim));
  const auto k = rng.normals(static_cast<std::size_t>(total * p.kv_heads * p.k_dim));
  const auto v = rng.normals(static_cast<std::size_t>(total * p.kv_heads * p.v_dim));
  std::vector<float> out(static_cast<std::size_t>(total * q_heads * p.v_dim), NAN);
  std::vector<float> lse(static_cast<std::size_t>(total * q_heads), NAN);
  policy_params<Policy> maker;
  const auto params = maker.build(rng, q_indptr);

  std::vector<std::uint8_t> expected = store.bytes();
  for (std::int32_t b = 0; b < batch; ++b) {
    for (std::int32_t i = q_indptr[static_cast<std::size_t>(b)];
         i < q_indptr[static_cast<std::size_t>(b) + 1]; ++i) {
      const std::int64_t position =
          lengths[static_cast<std::size_t>(b)] - (q_indptr[static_cast<std::size_t>(b) + 1] - i);
      store.records_equal(b, position, &k[static_cast<std::size_t>(i) * p.kv_heads * p.k_dim],
                          &v[static_cast<std::size_t>(i) * p.kv_heads * p.v_dim], &expected);
    }
  }

  attention::prefill<Layout, K, V, Policy>(
      infuse::exec::cpu(threads), host_view<const float, 3>(q.data(), {total, q_heads, p.k_dim}),
      host_view<const float, 3>(k.data(), {total, p.kv_heads, p.k_dim}),
      host_view<const float, 3>(v.data(), {total, p.kv_heads, p.v_dim}),
      host_view<const std::int32_t, 1>(q_indptr.data(), {batch + 1}), store.view(),
      host_view<float, 3>(out.data(), {total, q_heads, p.v_dim}), params, p.options,
      host_view<float, 2>(lse.data(), {total, q_heads}));

  CHECK(store.bytes() == expected);
  const double scale = p.options.scale != 0.0f ? p.options.scale : 1.0 / std::sqrt(double(p.k_dim));
  double worst_out = 0.0;
  double worst_lse = 0.0;
  for (std::int32_t b = 0; b < batch; ++b) {
    const std::int64_t first = q_indptr[static_cast<std::size_t>(b)];
    const std::int64_t n = q_indptr[static_cast<std::size_t>(b) + 1] - first;
    if (n == 0) continue;
    const std::int64_t length = lengths[static_cast<std::size_t>(b)];
    const std::int64_t new_begin = length - n;
    std::vector<double> qd(q.begin() + first * q_heads * p.k_dim,
                           q.begin() + (first + n) * q_heads * p.k_dim);
    const logit_rule logit{scale, p.options.soft_cap, p.options.alibi_slopes,
                                              new_begin};
    const auto ref = infuse::reference::attention(
        {n, length, q_heads, p.kv_heads, p.k_dim, p.v_dim}, qd, store.stored_keys(b),
        store.stored_values(b),
        [&](double dot, std::int64_t i, std::int64_t h, std::int64_t j) {
          return logit(dot, static_cast<std::int32_t>(h), i, j);
        },
        [&](std::int64_t i, std::int64_t j) {
          return Policy::visible(params, sparse::mask_context{b, new_begin + i, j, new_begin});
        });
    for (std::size_t e = 0; e < ref.out.size(); ++e) {
      const double got = out[static_cast<std::size_t>(first * q_heads * p.v_dim) + e];
      worst_out = std::max(worst_out, std::isfinite(got) ? std::fabs(got - ref.out[e]) : INFINITY);
    }
    for (std::size_t e = 0; e < ref.lse.size(); ++e) {
      const double got = lse[static_cast<std::size_t>(first * q_heads) + e];
      if (ref.lse[e] == -INFINITY) {
        worst_lse = std::max(worst_lse, got == -INFINITY ? 0.0 : INFINITY);
      } else {
        worst_lse = std::max(worst_lse, std::isfinite(got) ? std::fabs(got - ref.lse[e]) /
                                                                 (1.0 + std::fabs(ref.lse[e]))
                                                           : INFINITY);
      }
    }
  }
  // Values are N(0, 1), outputs their convex combinations: float rounding of sums of a few
  // hundred terms.
  CHECK(worst_out <= 2e-5);
  CHECK(worst_lse <= 2e-6);
}

using paged_hnd = kv::paged<16, kv::hnd>;

template <class Layout, class Scheme>
struct config {
  using layout = Layout;
  using scheme = Scheme;
};

#define INFUSE_PREFILL_CONFIGS(L)                              \
  config<L, quant::none<float>>, config<L, quant::none<half>>, \
      config<L, quant::int_<8, quant::per_channel>>, config<L, quant::int_<4, 32>>

template <class Layout, class Scheme, class Policy>
void check_shapes(seeded_rng& rng) {
  std::int64_t page = 16;
  if constexpr (Layout::is_paged) page = Layout::page_size;
  // Group 1, head dim 64: a single new token, new tokens from a page boundary, an empty
  // sequence, a few hundred new tokens after a random prefix.
  check_prefill<Layout, Scheme, Scheme, Policy>(
      rng, {{0, page, 0, rng.integer(1, 60)}, {1, page, 0, 200}, 2, 1, 64, 64});
  // Group 4, head dim 128; group 7, head dim 80 for keys and 64 for values.
  check_prefill<Layout, Scheme, Scheme, Policy>(
      rng, {{rng.integer(1, 40), 0}, {page + 1, 33}, 1, 4, 128, 128});
  check_prefill<Layout, Scheme, Scheme, Policy>(rng,
                                                {{rng.integer(0, 40), 3}, {20, 1}, 2, 7, 80, 64});
}

}  // namespace

TEST_CASE_TEMPLATE(
    "attention::prefill matches float64 attention over the stored K/V, and stores "
    "the new K/V as encode() does",
    Config, INFUSE_PREFILL_CONFIGS(kv::paged<16>), INFUSE_PREFILL_CONFIGS(paged_hnd),
    INFUSE_PREFILL_CONFIGS(kv::paged<1>), INFUSE_PREFILL_CONFIGS(kv::contiguous<>)) {
  using layout = typename Config::layout;
  using scheme = typename Config::scheme;
  INFUSE_RANDOM(rng);
  SUBCASE("dense") {
    check_shapes<layout, scheme, sparse::dense>(rng);
  }
  SUBCASE("causal") {
    check_shapes<layout, scheme, sparse::causal>(rng);
  }
  SUBCASE("tree") {
    check_shapes<layout, scheme, sparse::tree>(rng);
  }
}

TEST_CASE("attention::prefill applies the scale, the soft cap and ALiBi as the reference does") {
  INFUSE_RANDOM(rng);
  std::vector<float> slopes(14);
  for (auto& slope : slopes) slope = static_cast<float>(rng.uniform(-0.2, 0.0));
  problem p{{rng.integer(0, 40), 5}, {70, 9}, 2, 7, 64, 64};
  p.options.scale = 0.3f;
  p.options.soft_cap = 2.5f;
  p.options.alibi_slopes = slopes.data();
  check_prefill<kv::paged<16>, quant::none<float>, quant::none<float>, sparse::causal>(rng, p);
  p.options.soft_cap = 0.0f;
  check_prefill<kv::contiguous<>, quant::none<half>, quant::none<half>, sparse::dense>(rng, p, 1);
}

TEST_CASE("attention::prefill: K and V schemes may differ; one thread gives the same checks") {
  INFUSE_RANDOM(rng);
  using keys = quant::int_<8, quant::per_channel>;
  using values = quant::int_<4, 32>;
  check_prefill<kv::paged<16, kv::hnd>, keys, values, sparse::causal>(
      rng, {{rng.integer(0, 40), 0}, {40, 7}, 2, 2, 96, 256}, 1);
  check_prefill<kv::paged<16>, quant::none<half>, quant::none<float>, sparse::tree>(
      rng, {{3, 17}, {33, 64}, 1, 16, 64, 32});
}

TEST_CASE("attention::prefill: a query that sees no key gets out = 0 and lse = -inf") {
  INFUSE_RANDOM(rng);
  check_prefill<kv::paged<16>, quant::none<float>, quant::none<float>, blind_thirds>(
      rng, {{0, rng.integer(1, 30)}, {40, 20}, 1, 3, 64, 64});
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
          CHECK(store.key_min()[at_bound] == (written ? lo : 0.0));
          CHECK(store.key_max()[at_bound] == (written ? hi : 0.0));
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
