// The sparsity policies: their selections against the rules they implement, and decode through
// each of them against the float64 reference with the selection as the mask.
#include "infuse/sparse/sparse.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "infuse/attention/attention.hpp"
#include "infuse/attention/cpu/decode.hpp"
#include "infuse/quant/quant.hpp"
#include "store.hpp"
#include "support/random.hpp"

namespace {

namespace kv = infuse::kv;
namespace quant = infuse::quant;
namespace sparse = infuse::sparse;
namespace attention = infuse::attention;
using infuse::half;
using infuse::host_view;
using infuse::test::check_decode;
using infuse::test::make_store;
using infuse::test::run_decode;
using infuse::test::selection_mask;

using f16 = quant::none<half>;
using int8 = quant::int_<8, quant::per_channel>;
using int4 = quant::int_<4, 32>;

// A block list over `lengths`: every other block of `block` tokens, and the last one.
struct block_list {
  std::vector<std::int32_t> indptr{0};
  std::vector<std::int32_t> indices;
  sparse::block_sparse::params params(std::int64_t block) const {
    return {block, static_cast<std::int32_t>(indptr.size() - 1), indptr.data(), indices.data()};
  }
  block_list(const std::vector<std::int64_t>& lengths, std::int64_t block) {
    for (const auto length : lengths) {
      const std::int64_t blocks = (length + block - 1) / block;
      for (std::int64_t b = 0; b < blocks; ++b) {
        if (b % 2 == 0 || b == blocks - 1) indices.push_back(static_cast<std::int32_t>(b));
      }
      indptr.push_back(static_cast<std::int32_t>(indices.size()));
    }
  }
};

template <class Layout, class K, class V>
void check_policies(infuse::test::seeded_rng& rng) {
  const std::vector<std::int64_t> lengths = {0, 1, 31, 200, 1100};
  check_decode<sparse::window, Layout, K, V>(rng, {lengths, 8, 2, 64}, {4, 20});
  check_decode<sparse::window, Layout, K, V>(rng, {lengths, 4, 4, 128}, {0, 1});
  check_decode<sparse::quest<4>, Layout, K, V>(rng, {lengths, 8, 2, 64}, {});
  check_decode<sparse::quest<4>, Layout, K, V>(rng, {lengths, 7, 1, 80}, {1});
  check_decode<sparse::coverage<90>, Layout, K, V>(rng, {lengths, 8, 2, 64}, {});
  const block_list blocks(lengths, 24);
  check_decode<sparse::block_sparse, Layout, K, V>(rng, {lengths, 8, 2, 64}, blocks.params(24));
}

TEST_CASE("decode through every policy matches the reference with the policy's selection") {
  INFUSE_RANDOM(rng);
  check_policies<kv::paged<16>, f16, f16>(rng);
  check_policies<kv::paged<16, kv::hnd>, int8, int4>(rng);
  check_policies<kv::contiguous<>, int4, int4>(rng);
}

TEST_CASE("window selects the sink and the window ending at the query") {
  INFUSE_RANDOM(rng);
  auto st = make_store<kv::paged<16>, f16, f16>(rng, {1, 5, 30, 100}, 1, 32, 32);
  const std::vector<float> q(32, 1.0f);
  for (const sparse::window::params p : {sparse::window::params{0, 1}, {4, 8}, {40, 8}, {3, 200}}) {
    for (std::int32_t s = 0; s < 4; ++s) {
      const auto mask = selection_mask<sparse::window>(st, p, s, 0, q.data(), 1, 1.0f);
      const std::int64_t last = static_cast<std::int64_t>(mask.size()) - 1;
      for (std::int64_t t = 0; t <= last; ++t) {
        CHECK((mask[t] != 0) == (t < p.sink || last - t < p.window));
      }
    }
  }
}

TEST_CASE("quest bounds q·k from above and reads the pages of highest bound") {
  INFUSE_RANDOM(rng);
  constexpr std::int32_t dim = 64;
  constexpr std::int32_t group = 3;
  auto st = make_store<kv::paged<16>, int8, int8>(rng, {37, 300}, 2, dim, dim);
  const auto cache = st.view();
  for (std::int32_t s = 0; s < 2; ++s) {
    for (std::int32_t h = 0; h < 2; ++h) {
      const std::vector<float> q = rng.normals(group * dim);
      const std::int64_t length = st.length(s);
      const std::int64_t pages = (length + 15) / 16;
      std::vector<float> bounds;
      for (std::int64_t p = 0; p < pages; ++p) {
        sparse::query_context c{};
        c.q = q.data();
        c.group = group;
        c.head_dim = dim;
        c.kv_head = h;
        c.kv_heads = 2;
        c.pages = cache.table.indices + cache.table.indptr[s];
        c.key_min = cache.key_min;
        c.key_max = cache.key_max;
        const float bound = sparse::detail::page_bound(c, p);
        bounds.push_back(bound);
        // Quest's rule over the stored bounds, in float64.
        const std::int64_t base = (std::int64_t{c.pages[p]} * 2 + h) * dim;
        double rule = -INFINITY;
        for (std::int32_t g = 0; g < group; ++g) {
          double sum = 0;
          for (std::int32_t d = 0; d < dim; ++d) {
            const double qd = q[g * dim + d];
            sum += std::max(qd * static_cast<float>(cache.key_min[base + d]),
                            qd * static_cast<float>(cache.key_max[base + d]));
          }
          rule = std::max(rule, sum);
        }
        CHECK(bound == doctest::Approx(rule).epsilon(1e-5).scale(1.0));
        double best = -INFINITY;
        for (std::int64_t t = p * 16; t < std::min(length, (p + 1) * 16); ++t) {
          for (std::int32_t g = 0; g < group; ++g) {
            double dot = 0;
            for (std::int32_t d = 0; d < dim; ++d)
              dot += double(q[g * dim + d]) * st.k[s][(t * 2 + h) * dim + d];
            best = std::max(best, dot);
          }
        }
        CHECK(bound >= best - 1e-4 * (1 + std::fabs(best)));
      }
      for (const std::int64_t top : {1, 2, 5, 100}) {
        const auto mask = selection_mask<sparse::quest<4>>(st, {top}, s, h, q.data(), group, 1.0f);
        std::vector<char> read(static_cast<std::size_t>(pages));
        for (std::int64_t p = 0; p < pages; ++p) read[p] = mask[p * 16];
        CHECK(read[pages - 1] == 1);
        CHECK(std::count(read.begin(), read.end(), 1) == std::min(top, pages));
        // No page left out has a higher bound than one read (the last page aside).
        for (std::int64_t a = 0; a + 1 < pages; ++a) {
          for (std::int64_t b = 0; b + 1 < pages; ++b) {
            if (read[a] && !read[b]) CHECK(bounds[a] >= bounds[b]);
          }
        }
      }
    }
  }
}

TEST_CASE("recycled reads the recorded top-K and the tokens appended since") {
  INFUSE_RANDOM(rng);
  using policy = sparse::recycled<8, 4>;
  const std::vector<std::int64_t> lengths = {50, 3};
  auto st = make_store<kv::paged<16>, f16, f16>(rng, lengths, 2, 64, 64);
  std::vector<policy::state> states(4);
  // A full step's weights: recorded as the top 8 tokens per (sequence, KV head).
  using attn = attention::attention<kv::paged<16>, f16, f16, policy>;
  const infuse::exec::cpu exec(2);
  const std::vector<float> q = rng.normals(2 * 4 * 64);
  std::vector<float> out(2 * 4 * 64), weights(2 * 4 * 50);
  policy::params full{0, states.data()};
  run_decode<attn>(exec, q, st.view(), out, 4, full, {},
                   attention::token_weights{host_view<float, 3>(weights.data(), {2, 4, 50})});
  const std::vector<std::int64_t> recorded_lengths = lengths;
  policy::record(full, host_view<const float, 3>(weights.data(), {2, 4, 50}),
                 recorded_lengths.data(), 2);
  for (std::int32_t s = 0; s < 2; ++s) {
    for (std::int32_t h = 0; h < 2; ++h) {
      const auto& state = states[s * 2 + h];
      CHECK(state.count == std::min<std::int64_t>(8, lengths[s]));
      std::vector<float> summed(static_cast<std::size_t>(lengths[s]));
      for (std::int64_t t = 0; t < lengths[s]; ++t) {
        summed[t] = weights[(s * 4 + h * 2) * 50 + t] + weights[(s * 4 + h * 2 + 1) * 50 + t];
      }
      std::vector<float> sorted = summed;
      std::sort(sorted.rbegin(), sorted.rend());
      for (std::int32_t i = 0; i < state.count; ++i)
        CHECK(summed[state.tokens[i]] >= sorted[state.count - 1]);
    }
  }
  // The steps between: the recorded set plus whatever comes after the recording.
  auto longer = make_store<kv::paged<16>, f16, f16>(rng, {60, 3}, 2, 64, 64);
  const policy::params between{1, states.data()};
  const auto mask = selection_mask<policy>(longer, between, 0, 1, q.data(), 2, 1.0f);
  for (std::int64_t t = 0; t < 60; ++t) {
    const auto& state = states[1];
    const bool recorded =
        std::find(state.tokens, state.tokens + state.count, t) != state.tokens + state.count;
    CHECK((mask[t] != 0) == (recorded || t >= 50));
  }
  check_decode<policy, kv::paged<16>, f16, f16>(rng, {{60, 3}, 4, 2, 64}, between);
}

TEST_CASE("token weights add into the cache's mass") {
  INFUSE_RANDOM(rng);
  using attn = attention::attention<kv::paged<16>, int8, int8, sparse::window>;
  auto st = make_store<kv::paged<16>, int8, int8>(rng, {40, 70}, 2, 64, 64);
  const infuse::exec::cpu exec(2);
  const std::vector<float> q = rng.normals(2 * 6 * 64);
  std::vector<float> out(2 * 6 * 64), weights(2 * 6 * 70);
  const sparse::window::params window{2, 30};
  run_decode<attn>(exec, q, st.view(), out, 6, window, {},
                   attention::token_weights{host_view<float, 3>(weights.data(), {2, 6, 70})},
                   attention::accumulate_mass{});
  const auto cache = st.view();
  for (std::int32_t s = 0; s < 2; ++s) {
    for (std::int32_t h = 0; h < 2; ++h) {
      for (std::int64_t t = 0; t < st.length(s); ++t) {
        const auto at = cache.table.locate(s, t);
        float sum = 0;
        for (int g = 0; g < 3; ++g) sum += weights[(s * 6 + h * 3 + g) * 70 + t];
        CHECK(st.mass[(at.page * 16 + at.slot) * 2 + h] == doctest::Approx(sum).epsilon(1e-6));
      }
    }
  }
}

TEST_CASE("policies reject bad parameters, and quest a cache without key bounds") {
  INFUSE_RANDOM(rng);
  CHECK_REJECTS("sparsity.pages", sparse::quest<4>::check({0}, "test"));
  CHECK_REJECTS("sparsity.share", sparse::coverage<90>::check({0.0f}, "test"));
  CHECK_REJECTS("sparsity.window", sparse::window::check({1, 0}, "test"));
  CHECK_REJECTS("sparsity.states", (sparse::recycled<4, 2>::check({0, nullptr}, "test")));
  const std::vector<std::int32_t> indptr = {0, 2, 1};
  const std::vector<std::int32_t> indices = {3, 1};
  CHECK_REJECTS("sparsity.indptr[2]",
                sparse::block_sparse::check({16, 2, indptr.data(), indices.data()}, "test"));
  const std::vector<std::int32_t> indptr_ok = {0, 2, 2};
  CHECK_REJECTS("sparsity.indices[1]",
                sparse::block_sparse::check({16, 2, indptr_ok.data(), indices.data()}, "test"));
  CHECK_REJECTS("sparsity.block_size",
                sparse::block_sparse::check({0, 2, indptr_ok.data(), indices.data()}, "test"));

  using attn = attention::attention<kv::paged<16>, f16, f16, sparse::quest<4>>;
  auto st = make_store<kv::paged<16>, f16, f16>(rng, {40}, 1, 64, 64);
  auto cache = st.view();
  cache.key_min = nullptr;
  const infuse::exec::cpu exec(1);
  std::vector<float> q(64), out(64);
  std::vector<std::byte> workspace = infuse::test::decode_workspace<attn>(exec, 1, st.view(), {});
  CHECK_REJECTS("cache.key_min",
                attn::decode(exec, host_view<const float, 3>(q.data(), {1, 1, 64}), cache,
                             host_view<float, 3>(out.data(), {1, 1, 64}), {}, {}, workspace));
}

}  // namespace
