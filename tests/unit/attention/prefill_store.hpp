// A KV cache over plain host buffers for the prefill tests: a pool of pages in kv::page_format,
// a CSR page table (paged layouts, pages drawn from a shuffled pool) or one run per sequence
// (contiguous), prefixes encoded from random K and V, and the read-back of what is stored.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#include "infuse/kv/cache_view.hpp"
#include "support/random.hpp"

namespace infuse::test {

template <class Layout, class K, class V>
class prefill_store {
 public:
  using cache_type = kv::cache_view<Layout, K, V>;
  using format_type = typename cache_type::format_type;

  // lengths: each sequence's tokens after the prefill (prefix and new tokens); spare pages or
  // slots are left unused, filled with 0xFF bytes (NaN as floats) that the kernel must not read.
  prefill_store(seeded_rng& rng, const std::vector<std::int64_t>& lengths, std::int32_t kv_heads,
                std::int32_t k_dim, std::int32_t v_dim, bool key_bounds = false)
      : lengths_(lengths.begin(), lengths.end()) {
    format_.k = {kv_heads, k_dim};
    format_.v = {kv_heads, v_dim};
    const auto sequences = static_cast<std::int32_t>(lengths.size());
    if constexpr (Layout::is_paged) {
      constexpr int page_size = Layout::page_size;
      format_.slots = page_size;
      indptr_.push_back(0);
      for (const std::int64_t length : lengths) {
        const auto pages = static_cast<std::int32_t>((length + page_size - 1) / page_size);
        indptr_.push_back(indptr_.back() + pages);
        last_page_len_.push_back(static_cast<std::int32_t>(
            pages == 0 ? 0 : length - std::int64_t{pages - 1} * page_size));
      }
      pool_pages_ = indptr_.back() + 3;
      std::vector<std::int32_t> order(static_cast<std::size_t>(pool_pages_));
      std::iota(order.begin(), order.end(), 0);
      std::shuffle(order.begin(), order.end(), rng.engine());
      indices_.assign(order.begin(), order.begin() + indptr_.back());
    } else {
      const std::int64_t longest =
          lengths.empty() ? 0 : *std::max_element(lengths.begin(), lengths.end());
      format_.slots = static_cast<std::int32_t>(longest + 5);
      pool_pages_ = sequences + 1;
    }
    pool_.assign(static_cast<std::size_t>(pool_pages_ * format_.page_bytes()), 0xFF);
    if (key_bounds) {
      const auto count = static_cast<std::size_t>(std::int64_t{pool_pages_} * kv_heads * k_dim);
      key_min_.assign(count, infuse::half(0.0f));
      key_max_.assign(count, infuse::half(0.0f));
    }
  }

  cache_type view() {
    cache_type cache;
    cache.pages = pool_.data();
    cache.pool_pages = pool_pages_;
    cache.format = format_;
    const auto sequences = static_cast<std::int32_t>(lengths_.size());
    if constexpr (Layout::is_paged) {
      cache.table = {indptr_.data(), indices_.data(), last_page_len_.data(), sequences};
    } else {
      cache.table = {lengths_.data(), sequences, format_.slots};
    }
    cache.key_min = key_min_.empty() ? nullptr : key_min_.data();
    cache.key_max = key_max_.empty() ? nullptr : key_max_.data();
    return cache;
  }

  const format_type& format() const { return format_; }
  const std::vector<std::uint8_t>& bytes() const { return pool_; }
  std::vector<std::uint8_t>& bytes() { return pool_; }
  const std::vector<infuse::half>& key_min() const { return key_min_; }
  const std::vector<infuse::half>& key_max() const { return key_max_; }

  // Encodes random K and V (normal, stddev 1) into tokens 0 .. prefix of sequence s.
  void fill_prefix(seeded_rng& rng, std::int32_t s, std::int64_t prefix) {
    const cache_type cache = view();
    for (std::int64_t t = 0; t < prefix; ++t) {
      const kv::token_address at = cache.locate(s, t);
      for (std::int32_t h = 0; h < format_.k.heads; ++h) {
        const auto k = rng.normals(static_cast<std::size_t>(format_.k.head_dim));
        const auto v = rng.normals(static_cast<std::size_t>(format_.v.head_dim));
        format_.k.encode(k.data(), format_.k_codes(at.page, at.slot, h),
                         format_.k_params(at.page, at.slot, h));
        format_.v.encode(v.data(), format_.v_codes(at.page, at.slot, h),
                         format_.v_params(at.page, at.slot, h));
      }
    }
  }

  // The stored (dequantized) keys or values of sequence s: (length, heads, head_dim) doubles.
  std::vector<double> stored_keys(std::int32_t s) { return stored(s, true); }
  std::vector<double> stored_values(std::int32_t s) { return stored(s, false); }

  // Whether token t of sequence s holds exactly the records encode() makes of k_row / v_row
  // (heads x head_dim floats each); when `write` is set, writes them into `pool` instead.
  bool records_equal(std::int32_t s, std::int64_t t, const float* k_row, const float* v_row,
                     std::vector<std::uint8_t>* write = nullptr) {
    const cache_type cache = view();
    const kv::token_address at = cache.locate(s, t);
    std::uint8_t* base = write != nullptr ? write->data() : pool_.data();
    std::uint8_t* page = base + (at.page - pool_.data());
    std::vector<std::uint8_t> codes(4096), params(4096);
    bool equal = true;
    const auto compare = [&](const auto& vector, const float* x, std::uint8_t* stored_codes,
                             std::uint8_t* stored_params) {
      std::fill(codes.begin(), codes.end(), 0);
      vector.encode(x, codes.data(), params.data());
      const auto code_bytes = static_cast<std::size_t>(vector.code_bytes());
      const auto param_bytes = static_cast<std::size_t>(vector.param_bytes());
      if (write != nullptr) {
        std::memcpy(stored_codes, codes.data(), code_bytes);
        std::memcpy(stored_params, params.data(), param_bytes);
      } else {
        equal = equal && std::memcmp(stored_codes, codes.data(), code_bytes) == 0 &&
                std::memcmp(stored_params, params.data(), param_bytes) == 0;
      }
    };
    for (std::int32_t h = 0; h < format_.k.heads; ++h) {
      compare(format_.k, k_row + std::int64_t{h} * format_.k.head_dim,
              format_.k_codes(page, at.slot, h), format_.k_params(page, at.slot, h));
      compare(format_.v, v_row + std::int64_t{h} * format_.v.head_dim,
              format_.v_codes(page, at.slot, h), format_.v_params(page, at.slot, h));
    }
    return equal;
  }

 private:
  std::vector<double> stored(std::int32_t s, bool keys) {
    const cache_type cache = view();
    const std::int64_t length = cache.length(s);
    const std::int32_t heads = format_.k.heads;
    const std::int32_t dim = keys ? format_.k.head_dim : format_.v.head_dim;
    std::vector<double> out(static_cast<std::size_t>(length * heads * dim));
    for (std::int64_t t = 0; t < length; ++t) {
      const kv::token_address at = cache.locate(s, t);
      for (std::int32_t h = 0; h < heads; ++h) {
        for (std::int32_t d = 0; d < dim; ++d) {
          out[static_cast<std::size_t>((t * heads + h) * dim + d)] =
              keys ? format_.k.value(format_.k_codes(at.page, at.slot, h),
                                     format_.k_params(at.page, at.slot, h), d)
                   : format_.v.value(format_.v_codes(at.page, at.slot, h),
                                     format_.v_params(at.page, at.slot, h), d);
        }
      }
    }
    return out;
  }

  format_type format_{};
  std::vector<std::int32_t> lengths_;
  std::vector<std::int32_t> indptr_, indices_, last_page_len_;
  std::int32_t pool_pages_ = 0;
  std::vector<std::uint8_t> pool_;
  std::vector<infuse::half> key_min_, key_max_;
};

}  // namespace infuse::test

// ---- one prefill call against the float64 reference ---------------------------------------------

#include <doctest/doctest.h>

#include <cmath>

#include "infuse/attention/cpu/prefill.hpp"
#include "infuse/quant/int.hpp"
#include "infuse/quant/none.hpp"
#include "infuse/sparse/dense.hpp"
#include "infuse/sparse/tree.hpp"
#include "reference/attention.hpp"

namespace infuse::test {

// A random token tree per sequence (the parent of new token i is a random earlier new token):
// each row sees its ancestors and itself.
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

// The params a policy is checked with, built for the call's q_indptr: the tree's random mask,
// default params for the others.
template <class Policy>
struct policy_params {
  typename Policy::params build(seeded_rng&, const std::vector<std::int32_t>&) { return {}; }
};
template <>
struct policy_params<sparse::tree> : tree_mask {};

// The CPU body's two walks (cpu/prefill.hpp). A problem that names one must take it, so that a
// change of the few-query limits cannot leave a walk untested.
enum class prefill_path { either, few_queries, tiles };

// One batch: per sequence the tokens already cached and the new ones; the head shape.
struct prefill_problem {
  std::vector<std::int64_t> prefix;
  std::vector<std::int64_t> fresh;
  std::int32_t kv_heads;
  std::int32_t group;
  std::int32_t k_dim;
  std::int32_t v_dim;
  prefill_path path = prefill_path::either;
  attention::options options{};
};

// The logit of a (query head, query, key) pair from the raw dot product: scale, then the soft cap
// cap * tanh(s / cap) when cap > 0, then ALiBi slope[h] * (key_position - query_position).
struct logit_rule {
  double scale;
  double soft_cap = 0.0;
  const float* alibi_slopes = nullptr;
  std::int64_t first_query_position = 0;  // position of query 0; key i is at position i

  double operator()(double dot, std::int64_t q_head, std::int64_t query, std::int64_t key) const {
    double s = dot * scale;
    if (soft_cap > 0.0) s = soft_cap * std::tanh(s / soft_cap);
    if (alibi_slopes != nullptr) {
      s += static_cast<double>(alibi_slopes[q_head]) *
           static_cast<double>(key - (first_query_position + query));
    }
    return s;
  }
};

// Runs prefill on random inputs and checks the cache bytes (new records equal encode() of the
// inputs, nothing else changed), the outputs and the lse against the float64 reference over the
// stored keys and values.
template <class Layout, class K, class V, class Policy>
void check_prefill(seeded_rng& rng, const prefill_problem& p, int threads = 0) {
  const auto batch = static_cast<std::int32_t>(p.prefix.size());
  std::vector<std::int64_t> lengths;
  std::vector<std::int32_t> q_indptr{0};
  for (std::int32_t b = 0; b < batch; ++b) {
    lengths.push_back(p.prefix[static_cast<std::size_t>(b)] + p.fresh[static_cast<std::size_t>(b)]);
    q_indptr.push_back(q_indptr.back() +
                       static_cast<std::int32_t>(p.fresh[static_cast<std::size_t>(b)]));
  }
  INFO("policy " << Policy::name);
  CAPTURE(p.kv_heads);
  CAPTURE(p.group);
  CAPTURE(p.k_dim);
  CAPTURE(p.v_dim);
  const host_view<const std::int32_t, 1> indptr(q_indptr.data(), {batch + 1});
  if (p.path != prefill_path::either) {
    REQUIRE(attention::cpu::detail::takes_few_query_path(indptr, batch, p.group) ==
            (p.path == prefill_path::few_queries));
  }
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
      exec::cpu(threads), host_view<const float, 3>(q.data(), {total, q_heads, p.k_dim}),
      host_view<const float, 3>(k.data(), {total, p.kv_heads, p.k_dim}),
      host_view<const float, 3>(v.data(), {total, p.kv_heads, p.v_dim}), indptr, store.view(),
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
    const std::vector<double> qd(q.begin() + first * q_heads * p.k_dim,
                                 q.begin() + (first + n) * q_heads * p.k_dim);
    const logit_rule logit{scale, p.options.soft_cap, p.options.alibi_slopes, new_begin};
    const auto ref = reference::attention(
        {n, length, q_heads, p.kv_heads, p.k_dim, p.v_dim}, qd, store.stored_keys(b),
        store.stored_values(b),
        [&](double dot, std::int64_t i, std::int64_t h, std::int64_t j) {
          return logit(dot, h, i, j);
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
  // Values are N(0, 1), outputs their convex combinations: float rounding of sums of up to a few
  // thousand terms.
  CHECK(worst_out <= 2e-5);
  CHECK(worst_lse <= 2e-6);
}

// A layout, K and V schemes and a sparsity policy: one instantiation of the prefill body.
template <class Layout, class K, class V, class Policy>
struct prefill_config {
  using layout = Layout;
  using k = K;
  using v = V;
  using policy = Policy;
};

// Every K/V scheme under every sparsity the prefill tests take, on layout L: the list a
// TEST_CASE_TEMPLATE runs check_prefill_shapes over.
#define INFUSE_PREFILL_SCHEMES(L, P)                                                             \
  ::infuse::test::prefill_config<L, ::infuse::quant::none<float>, ::infuse::quant::none<float>,  \
                                 P>,                                                             \
      ::infuse::test::prefill_config<L, ::infuse::quant::none<::infuse::half>,                   \
                                     ::infuse::quant::none<::infuse::half>, P>,                  \
      ::infuse::test::prefill_config<L, ::infuse::quant::int_<8, ::infuse::quant::per_channel>,  \
                                     ::infuse::quant::int_<8, ::infuse::quant::per_channel>, P>, \
      ::infuse::test::prefill_config<L, ::infuse::quant::int_<4, 32>,                            \
                                     ::infuse::quant::int_<4, 32>, P>
#define INFUSE_PREFILL_COMBINATIONS(L)                     \
  INFUSE_PREFILL_SCHEMES(L, ::infuse::sparse::dense),      \
      INFUSE_PREFILL_SCHEMES(L, ::infuse::sparse::causal), \
      INFUSE_PREFILL_SCHEMES(L, ::infuse::sparse::tree)

// The shapes every configuration runs, each on the walk it names: groups 1, 4, 7 and 8; head dims
// 64 and 128 (the few-query walk's compiled dims), 80 and keys of 80 with values of 64 (its
// generic one); sequences of 0 and 1 tokens, new tokens from and across a page boundary, a
// prefix long enough to be split into chunks, 4097 tokens.
template <class Config>
void check_prefill_shapes(seeded_rng& rng) {
  using layout = typename Config::layout;
  const auto check = [&](const prefill_problem& p) {
    check_prefill<layout, typename Config::k, typename Config::v, typename Config::policy>(rng, p);
  };
  std::int64_t page = 16;
  if constexpr (layout::is_paged) page = layout::page_size;
  constexpr auto tiles = prefill_path::tiles;
  constexpr auto few = prefill_path::few_queries;
  const auto fresh = [&](std::int64_t most) { return rng.integer(1, most); };
  // Tiles. A single new token, new tokens from a page boundary, an empty sequence, a few hundred
  // new tokens after a random prefix.
  check({{0, page, 0, fresh(60)}, {1, page, 0, 200}, 2, 1, 64, 64, tiles});
  check({{fresh(40), 0}, {page + 1, 33}, 1, 4, 128, 128, tiles});
  check({{rng.integer(0, 40), 3}, {20, 1}, 2, 7, 80, 64, tiles});
  // Few queries. A single new token on a page boundary, 16 new tokens, 4097 tokens in all.
  const std::int64_t last = fresh(16);
  check({{16, 47, 4097 - last}, {1, 16, last}, 2, 1, 64, 64, few});
  // New tokens across a page boundary; a prefix of a few chunks; 32 rows, a second sequence
  // without new tokens.
  check({{rng.integer(10, 15), 31}, {8, fresh(8)}, 1, 4, 128, 128, few});
  check({{rng.integer(0, 40), 700}, {fresh(4), 4}, 2, 7, 80, 80, few});
  check({{fresh(100), 9}, {4, 0}, 1, 8, 64, 64, few});
}

}  // namespace infuse::test
