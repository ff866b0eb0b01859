// The few-query path of the CPU prefill (a speculative verification: up to 16 new tokens over a
// long cached prefix): outputs and lse against float64 attention over the stored K/V, causal and
// with a token-tree mask, over page boundaries and prefixes long enough to be split into chunks.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "infuse/attention/cpu/prefill.hpp"
#include "infuse/quant/int.hpp"
#include "infuse/quant/none.hpp"
#include "infuse/sparse/dense.hpp"
#include "infuse/sparse/tree.hpp"
#include "prefill_store.hpp"
#include "reference/attention.hpp"
#include "support/random.hpp"

namespace {

namespace kv = infuse::kv;
namespace quant = infuse::quant;
namespace sparse = infuse::sparse;
namespace attention = infuse::attention;
using infuse::half;
using infuse::host_view;
using infuse::test::prefill_store;
using infuse::test::seeded_rng;

struct shape {
  std::vector<std::int64_t> prefix;  // cached tokens per sequence
  std::vector<std::int64_t> fresh;   // new tokens per sequence
  std::int32_t kv_heads;
  std::int32_t group;
  std::int32_t head_dim;
};

// A chain of drafts per sequence, branching at random: new token i sees itself and the ancestors
// its parent sees (parent: a random earlier new token).
struct draft_tree {
  std::vector<std::uint32_t> words;
  std::vector<std::int64_t> offsets{0};

  sparse::tree::params build(seeded_rng& rng, const std::vector<std::int32_t>& q_indptr) {
    const auto batch = static_cast<std::int32_t>(q_indptr.size() - 1);
    for (std::int32_t b = 0; b < batch; ++b) {
      const std::int64_t n = q_indptr[std::size_t(b) + 1] - q_indptr[std::size_t(b)];
      const std::int64_t stride = sparse::tree::row_words(n);
      const std::size_t base = words.size();
      words.resize(base + static_cast<std::size_t>(sparse::tree::mask_words(n)), 0u);
      for (std::int64_t i = 0; i < n; ++i) {
        const std::size_t row = base + static_cast<std::size_t>(i * stride);
        if (i > 0) {
          const std::int64_t parent = rng.integer(0, i - 1);
          const std::size_t from = base + static_cast<std::size_t>(parent * stride);
          for (std::int64_t w = 0; w < stride; ++w)
            words[row + std::size_t(w)] = words[from + std::size_t(w)];
        }
        words[row + static_cast<std::size_t>(i / 32)] |= 1u << (i % 32);
      }
      offsets.push_back(static_cast<std::int64_t>(words.size()));
    }
    return {words.data(), offsets.data(), q_indptr.data(), batch};
  }
};

// Runs prefill on shape s (checking that it takes the few-query path) and compares every output
// and lse with the float64 reference over the K/V the cache holds afterwards.
template <class Layout, class K, class V, class Policy>
void check_few(seeded_rng& rng, const shape& s) {
  const auto batch = static_cast<std::int32_t>(s.prefix.size());
  std::vector<std::int64_t> lengths;
  std::vector<std::int32_t> q_indptr{0};
  for (std::int32_t b = 0; b < batch; ++b) {
    lengths.push_back(s.prefix[std::size_t(b)] + s.fresh[std::size_t(b)]);
    q_indptr.push_back(q_indptr.back() + static_cast<std::int32_t>(s.fresh[std::size_t(b)]));
  }
  CAPTURE(Policy::name);
  CAPTURE(s.kv_heads);
  CAPTURE(s.group);
  CAPTURE(s.head_dim);
  prefill_store<Layout, K, V> store(rng, lengths, s.kv_heads, s.head_dim, s.head_dim);
  for (std::int32_t b = 0; b < batch; ++b) store.fill_prefix(rng, b, s.prefix[std::size_t(b)]);

  const std::int64_t total = q_indptr.back();
  const std::int32_t q_heads = s.kv_heads * s.group;
  const std::int64_t dim = s.head_dim;
  const auto q = rng.normals(static_cast<std::size_t>(total * q_heads * dim));
  const auto k = rng.normals(static_cast<std::size_t>(total * s.kv_heads * dim));
  const auto v = rng.normals(static_cast<std::size_t>(total * s.kv_heads * dim));
  std::vector<float> out(static_cast<std::size_t>(total * q_heads * dim), NAN);
  std::vector<float> lse(static_cast<std::size_t>(total * q_heads), NAN);
  draft_tree tree;
  typename Policy::params params{};
  if constexpr (std::is_same_v<Policy, sparse::tree>) params = tree.build(rng, q_indptr);

  const host_view<const std::int32_t, 1> indptr(q_indptr.data(), {batch + 1});
  REQUIRE(attention::cpu::detail::takes_few_query_path(indptr, batch, s.group));
  attention::prefill<Layout, K, V, Policy>(
      infuse::exec::cpu(), host_view<const float, 3>(q.data(), {total, q_heads, dim}),
      host_view<const float, 3>(k.data(), {total, s.kv_heads, dim}),
      host_view<const float, 3>(v.data(), {total, s.kv_heads, dim}), indptr, store.view(),
      host_view<float, 3>(out.data(), {total, q_heads, dim}), params, {},
      host_view<float, 2>(lse.data(), {total, q_heads}));

  double worst_out = 0.0;
  double worst_lse = 0.0;
  const double scale = 1.0 / std::sqrt(double(dim));
  for (std::int32_t b = 0; b < batch; ++b) {
    const std::int64_t first = q_indptr[std::size_t(b)];
    const std::int64_t n = q_indptr[std::size_t(b) + 1] - first;
    if (n == 0) continue;
    const std::int64_t length = lengths[std::size_t(b)];
    const std::int64_t new_begin = length - n;
    const std::vector<double> qd(q.begin() + first * q_heads * dim,
                                 q.begin() + (first + n) * q_heads * dim);
    const auto ref = infuse::reference::attention(
        {n, length, q_heads, s.kv_heads, dim, dim}, qd, store.stored_keys(b),
        store.stored_values(b),
        [&](double dot, std::int64_t, std::int64_t, std::int64_t) { return dot * scale; },
        [&](std::int64_t i, std::int64_t j) {
          return Policy::visible(params, sparse::mask_context{b, new_begin + i, j, new_begin});
        });
    for (std::size_t e = 0; e < ref.out.size(); ++e) {
      const double got = out[static_cast<std::size_t>(first * q_heads * dim) + e];
      worst_out = std::max(worst_out, std::isfinite(got) ? std::fabs(got - ref.out[e]) : INFINITY);
    }
    for (std::size_t e = 0; e < ref.lse.size(); ++e) {
      const double got = lse[static_cast<std::size_t>(first * q_heads) + e];
      worst_lse = std::max(worst_lse, std::isfinite(got) ? std::fabs(got - ref.lse[e]) /
                                                               (1.0 + std::fabs(ref.lse[e]))
                                                         : INFINITY);
    }
  }
  // Values are N(0, 1), outputs their convex combinations: float rounding of sums of up to a
  // couple of thousand terms.
  CHECK(worst_out <= 2e-5);
  CHECK(worst_lse <= 2e-6);
}

using paged_hnd = kv::paged<16, kv::hnd>;

template <class Layout, class Scheme>
struct config {
  using layout = Layout;
  using scheme = Scheme;
};

// Random new-token counts up to `most`, prefixes that end on and around page boundaries, and one
// long enough to be split into several chunks.
template <class Layout, class Scheme, class Policy>
void check_shapes(seeded_rng& rng) {
  const auto fresh = [&](std::int64_t most) { return rng.integer(1, most); };
  // Group 1, head dim 64: a single new token on a page boundary, 16 new tokens, and a prefix of
  // a few chunks.
  check_few<Layout, Scheme, Scheme, Policy>(rng, {{16, 47, 1300}, {1, 16, fresh(16)}, 2, 1, 64});
  // Group 4, head dim 128, the new tokens across a page boundary; group 7, head dim 80.
  check_few<Layout, Scheme, Scheme, Policy>(rng,
                                            {{rng.integer(10, 15), 31}, {8, fresh(8)}, 1, 4, 128});
  check_few<Layout, Scheme, Scheme, Policy>(rng,
                                            {{rng.integer(0, 40), 700}, {fresh(4), 4}, 2, 7, 80});
  // Group 8, head dim 64, a second sequence without new tokens.
  check_few<Layout, Scheme, Scheme, Policy>(rng,
                                            {{rng.integer(1, 100), 9}, {fresh(4), 0}, 1, 8, 64});
}

#define INFUSE_FEW_CONFIGS(L)                                  \
  config<L, quant::none<float>>, config<L, quant::none<half>>, \
      config<L, quant::int_<8, quant::per_channel>>, config<L, quant::int_<4, 32>>

}  // namespace

TEST_CASE_TEMPLATE("attention::prefill of a few new tokens over a cached prefix matches float64",
                   Config, INFUSE_FEW_CONFIGS(kv::paged<16>), INFUSE_FEW_CONFIGS(paged_hnd),
                   INFUSE_FEW_CONFIGS(kv::contiguous<>)) {
  using layout = typename Config::layout;
  using scheme = typename Config::scheme;
  INFUSE_RANDOM(rng);
  SUBCASE("causal") {
    check_shapes<layout, scheme, sparse::causal>(rng);
  }
  SUBCASE("tree") {
    check_shapes<layout, scheme, sparse::tree>(rng);
  }
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
