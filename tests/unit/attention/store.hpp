// Test KV stores for the attention tests: random K and V written straight into pages through
// kv::page_format and vector_format::encode, with a page table whose pages are scattered over the
// pool, per-page key minima and maxima, and the dequantized values the reference reads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "infuse/kv/cache_view.hpp"
#include "infuse/kv/format.hpp"
#include "infuse/kv/layout.hpp"
#include "support/random.hpp"

namespace infuse::test {

template <class Layout, class KScheme, class VScheme>
struct kv_store {
  using cache_type = kv::cache_view<Layout, KScheme, VScheme>;
  typename cache_type::format_type format{};
  std::int32_t pool_pages = 0;
  std::vector<float> storage;  // the pool's bytes, float-aligned
  std::vector<std::int32_t> indptr, indices, last_page_len, lengths;
  std::vector<infuse::half> key_min, key_max;  // outward-rounded halves of the float bounds
  std::vector<float> mass;
  // Per sequence, as the kernel reads them: (length, heads, head_dim), dequantized.
  std::vector<std::vector<float>> k, v;

  std::uint8_t* pool() { return reinterpret_cast<std::uint8_t*>(storage.data()); }

  cache_type view() {
    cache_type c;
    c.pages = pool();
    c.pool_pages = pool_pages;
    c.format = format;
    if constexpr (Layout::is_paged) {
      c.table = {indptr.data(), indices.data(), last_page_len.data(),
                 static_cast<std::int32_t>(last_page_len.size())};
    } else {
      c.table = {lengths.data(), static_cast<std::int32_t>(lengths.size()), format.slots};
    }
    c.key_min = key_min.data();
    c.key_max = key_max.data();
    c.mass = mass.data();
    return c;
  }
  std::int64_t length(std::size_t s) const {
    return static_cast<std::int64_t>(k[s].size()) / (format.k.heads * format.k.head_dim);
  }
};

// Sequences of the given lengths with kv_heads heads of k_dim / v_dim; keys and values normal
// with standard deviation 1 (keys offset per channel, so that pages differ in their ranges).
template <class Layout, class KScheme, class VScheme>
kv_store<Layout, KScheme, VScheme> make_store(seeded_rng& rng,
                                              const std::vector<std::int64_t>& lengths,
                                              std::int32_t kv_heads, std::int32_t k_dim,
                                              std::int32_t v_dim) {
  kv_store<Layout, KScheme, VScheme> st;
  st.format.k = {kv_heads, k_dim};
  st.format.v = {kv_heads, v_dim};
  const auto sequences = static_cast<std::int32_t>(lengths.size());
  std::int64_t longest = 0;
  for (const auto l : lengths) longest = std::max(longest, l);
  // Where token t of sequence s goes: page and slot.
  std::vector<std::vector<std::int32_t>> pages_of(lengths.size());
  if constexpr (Layout::is_paged) {
    st.format.slots = Layout::page_size;
    std::int32_t needed = 0;
    for (const auto l : lengths)
      needed += static_cast<std::int32_t>((l + Layout::page_size - 1) / Layout::page_size);
    st.pool_pages = needed + 3;  // a few pages that no sequence owns
    std::vector<std::int32_t> order(static_cast<std::size_t>(st.pool_pages));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng.engine());
    std::size_t next = 0;
    st.indptr.push_back(0);
    for (std::size_t s = 0; s < lengths.size(); ++s) {
      const std::int64_t count = (lengths[s] + Layout::page_size - 1) / Layout::page_size;
      for (std::int64_t p = 0; p < count; ++p) {
        pages_of[s].push_back(order[next]);
        st.indices.push_back(order[next++]);
      }
      st.indptr.push_back(static_cast<std::int32_t>(st.indices.size()));
      st.last_page_len.push_back(
          count == 0 ? 0 : static_cast<std::int32_t>(lengths[s] - (count - 1) * Layout::page_size));
    }
  } else {
    st.format.slots = static_cast<std::int32_t>(std::max<std::int64_t>(longest, 1) + 5);
    st.pool_pages = sequences + 1;
    for (std::int32_t s = 0; s < sequences; ++s) {
      pages_of[s].push_back(s);
      st.lengths.push_back(static_cast<std::int32_t>(lengths[s]));
    }
  }
  const std::int64_t page_bytes = st.format.page_bytes();
  st.storage.assign(static_cast<std::size_t>(st.pool_pages * page_bytes / 4), 0.0f);
  const std::size_t meta = static_cast<std::size_t>(st.pool_pages) * kv_heads * k_dim;
  st.key_min.assign(meta, infuse::half(INFINITY));
  st.key_max.assign(meta, infuse::half(-INFINITY));
  st.mass.assign(static_cast<std::size_t>(st.pool_pages) * st.format.slots * kv_heads, 0.0f);
  std::vector<float> offsets = rng.normals(static_cast<std::size_t>(k_dim), 0.5);
  std::vector<float> x(static_cast<std::size_t>(std::max(k_dim, v_dim)));
  st.k.resize(lengths.size());
  st.v.resize(lengths.size());
  for (std::size_t s = 0; s < lengths.size(); ++s) {
    st.k[s].resize(static_cast<std::size_t>(lengths[s] * kv_heads * k_dim));
    st.v[s].resize(static_cast<std::size_t>(lengths[s] * kv_heads * v_dim));
    for (std::int64_t t = 0; t < lengths[s]; ++t) {
      const std::int32_t page = pages_of[s][static_cast<std::size_t>(t / st.format.slots)];
      const auto slot = static_cast<std::int32_t>(t % st.format.slots);
      std::uint8_t* base = st.pool() + page * page_bytes;
      for (std::int32_t h = 0; h < kv_heads; ++h) {
        for (std::int32_t d = 0; d < k_dim; ++d)
          x[d] = static_cast<float>(rng.normal()) + offsets[d];
        auto* kc = st.format.k_codes(base, slot, h);
        auto* kp = st.format.k_params(base, slot, h);
        st.format.k.encode(x.data(), kc, kp);
        for (std::int32_t d = 0; d < k_dim; ++d) {
          const float value = st.format.k.value(kc, kp, d);
          st.k[s][(t * kv_heads + h) * k_dim + d] = value;
          const std::size_t m = (static_cast<std::size_t>(page) * kv_heads + h) * k_dim + d;
          // Rounding outward commutes with min and max: this is the rounded float bound.
          st.key_min[m] = infuse::half_at_most(std::min(static_cast<float>(st.key_min[m]), value));
          st.key_max[m] = infuse::half_at_least(std::max(static_cast<float>(st.key_max[m]), value));
        }
        for (std::int32_t d = 0; d < v_dim; ++d) x[d] = static_cast<float>(rng.normal());
        auto* vc = st.format.v_codes(base, slot, h);
        auto* vp = st.format.v_params(base, slot, h);
        st.format.v.encode(x.data(), vc, vp);
        for (std::int32_t d = 0; d < v_dim; ++d) {
          st.v[s][(t * kv_heads + h) * v_dim + d] = st.format.v.value(vc, vp, d);
        }
      }
    }
  }
  return st;
}

}  // namespace infuse::test

// ---- one decode call against the float64 reference ----------------------------------------------

#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <span>

#include "infuse/attention/attention.hpp"
#include "infuse/attention/cpu/decode.hpp"
#include "infuse/core/error.hpp"
#include "infuse/sparse/dense.hpp"
#include "reference/attention.hpp"
#include "reference/compare.hpp"

// Runs `call` and checks that it throws infuse::error naming the argument `name`.
#define CHECK_REJECTS(name, call)      \
  do {                                 \
    bool thrown = false;               \
    try {                              \
      call;                            \
    } catch (const infuse::error& e) { \
      thrown = true;                   \
      INFO(e.what());                  \
      CHECK(e.argument() == (name));   \
    }                                  \
    CHECK(thrown);                     \
  } while (false)

namespace infuse::test {

// A workspace of the size Attention's decode asks for.
template <class Attention>
std::vector<std::byte> decode_workspace(const exec::cpu& exec, std::int64_t q_heads,
                                        const typename Attention::cache_type& cache,
                                        const typename Attention::sparsity_params& params) {
  return std::vector<std::byte>(
      static_cast<std::size_t>(Attention::decode_workspace_bytes(exec, q_heads, cache, params)));
}

// One Attention::decode on the CPU with the workspace it asks for: q is (sequences, q_heads,
// k head_dim), out (sequences, q_heads, v head_dim); `optional` are the call's optional outputs.
template <class Attention, class... Optional>
void run_decode(const exec::cpu& exec, const std::vector<float>& q,
                const typename Attention::cache_type& cache, std::vector<float>& out,
                std::int64_t q_heads, const typename Attention::sparsity_params& params,
                const attention::options& opt, const Optional&... optional) {
  const std::int64_t batch = cache.sequences();
  std::vector<std::byte> workspace = decode_workspace<Attention>(exec, q_heads, cache, params);
  Attention::decode(
      exec, host_view<const float, 3>(q.data(), {batch, q_heads, cache.format.k.head_dim}), cache,
      host_view<float, 3>(out.data(), {batch, q_heads, cache.format.v.head_dim}), params, opt,
      workspace, optional...);
}

// The tokens Sparsity's select() gives sequence s's query for KV head h, as a mask: what the
// kernel must read, computed on the host the way the kernel asks for it.
template <class Sparsity, class Store>
std::vector<char> selection_mask(Store& st, const typename Sparsity::params& params, std::int32_t s,
                                 std::int32_t h, const float* q_group, std::int32_t group,
                                 float scale) {
  const auto cache = st.view();
  const std::int64_t length = cache.length(s);
  std::vector<char> mask(static_cast<std::size_t>(length), 0);
  if (length == 0) return mask;
  sparse::query_context c = attention::decode_query_context(cache, s, h, group, scale, &s);
  c.q = q_group;
  std::vector<float> scratch(static_cast<std::size_t>(4 * (length + 1)));
  c.scratch = scratch.data();
  c.scratch_floats = static_cast<std::int64_t>(scratch.size());
  std::vector<sparse::token_range> ranges(
      static_cast<std::size_t>(Sparsity::max_ranges(params, c)) + 1);
  const std::int64_t count = Sparsity::select(params, c, ranges.data());
  for (std::int64_t r = 0; r < count; ++r) {
    for (std::int64_t t = ranges[r].begin; t < ranges[r].end; ++t) {
      if (Sparsity::visible(params, {s, length - 1, t, length})) mask[t] = 1;
    }
  }
  return mask;
}

struct decode_shape {
  std::vector<std::int64_t> lengths;
  std::int32_t q_heads;
  std::int32_t kv_heads;
  std::int32_t dim;
};

// Decodes one batch with Sparsity and compares out, lse and the token weights with the float64
// reference over the same dequantized K/V and the policy's selection.
template <class Sparsity, class Layout, class KS, class VS>
void check_decode(seeded_rng& rng, const decode_shape& shape,
                  const typename Sparsity::params& params, const attention::options& opt = {},
                  int threads = 2) {
  using attn = attention::attention<Layout, KS, VS, Sparsity>;
  auto st = make_store<Layout, KS, VS>(rng, shape.lengths, shape.kv_heads, shape.dim, shape.dim);
  const auto cache = st.view();
  const std::int64_t batch = static_cast<std::int64_t>(shape.lengths.size());
  const std::int64_t q_heads = shape.q_heads;
  const std::int64_t dim = shape.dim;
  std::int64_t longest = 1;
  for (const auto l : shape.lengths) longest = std::max(longest, l);
  const std::vector<float> q = rng.normals(static_cast<std::size_t>(batch * q_heads * dim));
  std::vector<float> out(static_cast<std::size_t>(batch * q_heads * dim), NAN);
  std::vector<float> lse(static_cast<std::size_t>(batch * q_heads), NAN);
  std::vector<float> weights(static_cast<std::size_t>(batch * q_heads * longest), NAN);
  run_decode<attn>(
      exec::cpu(threads), q, cache, out, q_heads, params, opt,
      attention::lse_output{host_view<float, 2>(lse.data(), {batch, q_heads})},
      attention::token_weights{host_view<float, 3>(weights.data(), {batch, q_heads, longest})});

  const std::int32_t group = shape.q_heads / shape.kv_heads;
  const double scale = opt.scale != 0.0f ? opt.scale : 1.0 / std::sqrt(double(dim));
  for (std::int64_t s = 0; s < batch; ++s) {
    const std::int64_t length = shape.lengths[s];
    std::vector<std::vector<char>> masks;
    for (std::int32_t h = 0; h < shape.kv_heads; ++h) {
      masks.push_back(selection_mask<Sparsity>(st, params, static_cast<std::int32_t>(s), h,
                                               &q[(s * q_heads + h * group) * dim], group,
                                               static_cast<float>(scale)));
    }
    // Each KV head's mask differs: run the reference per query head.
    for (std::int64_t qh = 0; qh < q_heads; ++qh) {
      const std::vector<float> q_row(q.begin() + (s * q_heads + qh) * dim,
                                     q.begin() + (s * q_heads + qh + 1) * dim);
      const std::int64_t kh = qh / group;
      std::vector<float> k_head(static_cast<std::size_t>(length * dim));
      std::vector<float> v_head(static_cast<std::size_t>(length * dim));
      for (std::int64_t t = 0; t < length; ++t) {
        for (std::int64_t d = 0; d < dim; ++d) {
          k_head[t * dim + d] = st.k[s][(t * shape.kv_heads + kh) * dim + d];
          v_head[t * dim + d] = st.v[s][(t * shape.kv_heads + kh) * dim + d];
        }
      }
      const auto transform = [&](double dot, std::int64_t, std::int64_t, std::int64_t key) {
        double score = dot * scale;
        if (opt.soft_cap > 0.0f) score = opt.soft_cap * std::tanh(score / opt.soft_cap);
        if (opt.alibi_slopes != nullptr) score += opt.alibi_slopes[qh] * double(key - (length - 1));
        return score;
      };
      const auto ref =
          reference::attention({1, length, 1, 1, dim, dim}, q_row, k_head, v_head, transform,
                               [&](std::int64_t, std::int64_t key) { return masks[kh][key] != 0; });
      INFO("sequence " << s << " of length " << length << ", q head " << qh);
      const std::span<const float> got(&out[(s * q_heads + qh) * dim], dim);
      CHECK(reference::relative_error(got, std::span<const double>(ref.out)) < 2e-5);
      if (ref.lse[0] == -INFINITY) {
        CHECK(lse[s * q_heads + qh] == -INFINITY);
      } else {
        CHECK(std::fabs(lse[s * q_heads + qh] - ref.lse[0]) < 1e-4 * (1.0 + std::fabs(ref.lse[0])));
      }
      const std::span<const float> got_weights(&weights[(s * q_heads + qh) * longest], length);
      CHECK(reference::relative_error(got_weights, std::span<const double>(ref.weights)) < 2e-5);
      for (std::int64_t t = length; t < longest; ++t) {
        CHECK(weights[(s * q_heads + qh) * longest + t] == 0.0f);
      }
    }
  }
}

// A layout, K and V schemes, and the policy of check_decode_shapes' long sequences: sparse::causal
// on a configuration or two per layout, dense elsewhere (each policy is a decode body of its own,
// and the bodies are what the tests' build time goes into).
template <class Layout, class K, class V = K, class LongPolicy = sparse::dense>
struct decode_config {
  using layout = Layout;
  using k = K;
  using v = V;
  using long_policy = LongPolicy;
};

// The shapes every decode configuration runs: lengths 0 and 1, page boundaries; groups 4, 7, 8
// and 1; head dims 64, 96 and 128 (compiled ones) and 80 (generic); a sequence long enough for
// two split-KV chunks; one thread.
template <class Config>
void check_decode_shapes(seeded_rng& rng) {
  using L = typename Config::layout;
  using K = typename Config::k;
  using V = typename Config::v;
  check_decode<sparse::dense, L, K, V>(rng, {{0, 1, 15, 16, 17, 33}, 8, 2, 64}, {});
  check_decode<sparse::dense, L, K, V>(rng, {{40, 1}, 7, 1, 80}, {});
  check_decode<typename Config::long_policy, L, K, V>(rng, {{100, 600}, 16, 2, 128}, {});
  check_decode<sparse::dense, L, K, V>(rng, {{70, 3}, 3, 3, 96}, {}, {}, 1);
}

}  // namespace infuse::test
