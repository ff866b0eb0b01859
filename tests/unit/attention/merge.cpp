// merge_states: the union of partial results over disjoint key sets equals attention over all
// keys; empty parts are neutral.
#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "infuse/attention/attention.hpp"
#include "infuse/attention/cpu/decode.hpp"
#include "infuse/quant/quant.hpp"
#include "infuse/sparse/sparse.hpp"
#include "reference/compare.hpp"
#include "store.hpp"
#include "support/random.hpp"

namespace {

namespace kv = infuse::kv;
namespace sparse = infuse::sparse;
namespace attention = infuse::attention;
using infuse::host_view;
using f32 = infuse::quant::none<float>;

TEST_CASE("decode over two halves, merged, equals decode over the whole") {
  INFUSE_RANDOM(rng);
  using attn = attention::attention<kv::paged<16>, f32, f32, sparse::block_sparse>;
  using dense = attention::attention<kv::paged<16>, f32, f32>;
  const std::vector<std::int64_t> lengths = {0, 1, 40, 1500};
  auto st = infuse::test::make_store<kv::paged<16>, f32, f32>(rng, lengths, 2, 128, 128);
  const std::int64_t batch = 4, heads = 8, dim = 128;
  const auto q = rng.normals(batch * heads * dim);
  const infuse::exec::cpu exec(2);
  // Blocks of 32 tokens: the even ones in the first part, the odd ones in the second.
  std::vector<float> outs[2], lses[2];
  for (int part = 0; part < 2; ++part) {
    std::vector<std::int32_t> indptr{0}, indices;
    for (const auto length : lengths) {
      for (std::int64_t b = part; b * 32 < length; b += 2)
        indices.push_back(static_cast<std::int32_t>(b));
      indptr.push_back(static_cast<std::int32_t>(indices.size()));
    }
    const sparse::block_sparse::params p{32, 4, indptr.data(), indices.data()};
    outs[part].resize(batch * heads * dim);
    lses[part].resize(batch * heads);
    infuse::test::run_decode<attn>(
        exec, q, st.view(), outs[part], heads, p, {},
        attention::lse_output{host_view<float, 2>(lses[part].data(), {batch, heads})});
  }
  std::vector<float> whole(batch * heads * dim), whole_lse(batch * heads);
  infuse::test::run_decode<dense>(
      exec, q, st.view(), whole, heads, {}, {},
      attention::lse_output{host_view<float, 2>(whole_lse.data(), {batch, heads})});

  std::vector<float> merged(batch * heads * dim), merged_lse(batch * heads);
  const host_view<const float, 3> parts[2] = {{outs[0].data(), {batch, heads, dim}},
                                              {outs[1].data(), {batch, heads, dim}}};
  const host_view<const float, 2> part_lses[2] = {{lses[0].data(), {batch, heads}},
                                                  {lses[1].data(), {batch, heads}}};
  attention::merge_states(exec, parts, part_lses,
                          host_view<float, 3>(merged.data(), {batch, heads, dim}),
                          host_view<float, 2>(merged_lse.data(), {batch, heads}));
  for (std::int64_t i = 0; i < batch * heads; ++i) {
    INFO("row " << i);
    if (whole_lse[i] == -INFINITY) {
      CHECK(merged_lse[i] == -INFINITY);
    } else {
      CHECK(std::fabs(merged_lse[i] - whole_lse[i]) <= 1e-6 * (1 + std::fabs(whole_lse[i])));
    }
    double diff = 0, norm = 0;
    for (std::int64_t d = 0; d < dim; ++d) {
      diff += std::pow(double(merged[i * dim + d]) - whole[i * dim + d], 2);
      norm += std::pow(double(whole[i * dim + d]), 2);
    }
    CHECK(std::sqrt(diff) <= 1e-6 * std::sqrt(norm) + 1e-7);
  }
}

TEST_CASE("merge_states: an empty part is neutral, all empty give 0 and -inf") {
  INFUSE_RANDOM(rng);
  const std::int64_t rows = 3, heads = 2, dim = 5;
  auto a = rng.normals(rows * heads * dim);
  std::vector<float> a_lse = rng.normals(rows * heads);
  std::vector<float> empty(rows * heads * dim, NAN), empty_lse(rows * heads, -INFINITY);
  std::vector<float> out(rows * heads * dim), lse(rows * heads);
  const infuse::exec::cpu exec(2);
  const host_view<const float, 3> parts[2] = {{empty.data(), {rows, heads, dim}},
                                              {a.data(), {rows, heads, dim}}};
  const host_view<const float, 2> lses[2] = {{empty_lse.data(), {rows, heads}},
                                             {a_lse.data(), {rows, heads}}};
  attention::merge_states(exec, parts, lses, host_view<float, 3>(out.data(), {rows, heads, dim}),
                          host_view<float, 2>(lse.data(), {rows, heads}));
  for (std::size_t i = 0; i < out.size(); ++i) CHECK(out[i] == doctest::Approx(a[i]).epsilon(1e-6));
  for (std::size_t i = 0; i < lse.size(); ++i)
    CHECK(lse[i] == doctest::Approx(a_lse[i]).epsilon(1e-6));
  attention::merge_states(exec, std::span(parts, 1), std::span(lses, 1),
                          host_view<float, 3>(out.data(), {rows, heads, dim}),
                          host_view<float, 2>(lse.data(), {rows, heads}));
  for (const float x : out) CHECK(x == 0.0f);
  for (const float x : lse) CHECK(x == -INFINITY);
  CHECK_THROWS_AS(attention::merge_states(exec, std::span(parts, 2), std::span(lses, 1),
                                          host_view<float, 3>(out.data(), {rows, heads, dim}),
                                          host_view<float, 2>(lse.data(), {rows, heads})),
                  infuse::error);
}

}  // namespace
