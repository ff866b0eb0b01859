// attention::decode on the CPU over the KIVI (kv::per_channel keys) and ZipVL (kv::mixed records)
// arrangements, which the walk reads back a tile at a time: against the float64 reference over
// the keys and values kv::read_key / kv::read_value give, for sequences of 0 tokens, less than a
// page (all in the full-precision window), whole pages and a partial last page, dense and with
// sparse::window (policy ranges cutting pages) and quest (the cache's key bounds).
#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "infuse/attention/attention.hpp"
#include "infuse/attention/cpu/decode.hpp"
#include "infuse/exec/cpu.hpp"
#include "infuse/kv/kv.hpp"
#include "infuse/quant/quant.hpp"
#include "infuse/sparse/sparse.hpp"
#include "reference/attention.hpp"
#include "reference/compare.hpp"
#include "support/random.hpp"

namespace {

namespace kv = infuse::kv;
namespace quant = infuse::quant;
namespace sparse = infuse::sparse;
namespace attention = infuse::attention;
namespace reference = infuse::reference;
using infuse::host_view;

using int2_channel = quant::int_<2, quant::per_channel, quant::zero_point>;
using int8_channel = quant::int_<8, quant::per_channel>;
using int2_g32 = quant::int_<2, 32, quant::zero_point>;
using int4_g32 = quant::int_<4, 32>;

template <class Layout, class K, class V>
struct config {
  using layout = Layout;
  using k = K;
  using v = V;
};

template <class Config, class Sparsity>
void check_staged(infuse::test::seeded_rng& rng, std::int32_t dim, std::int32_t group,
                  const typename Sparsity::params& params) {
  using layout = typename Config::layout;
  using cache_type = kv::cache<layout, typename Config::k, typename Config::v>;
  using attn = attention::attention<layout, typename Config::k, typename Config::v, Sparsity>;
  constexpr std::int32_t kv_heads = 2;
  const std::int32_t q_heads = kv_heads * group;
  const std::vector<std::int64_t> lengths = {0, 5, 32, 45};
  cache_type cache(64, {kv_heads, dim}, {kv_heads, dim});
  std::vector<kv::sequence_id> seqs;
  std::int64_t rows = 0;
  for (const std::int64_t length : lengths) {
    seqs.push_back(cache.create());
    rows += length;
  }
  const std::vector<float> k_rows = rng.normals(static_cast<std::size_t>(rows * kv_heads * dim));
  const std::vector<float> v_rows = rng.normals(k_rows.size());
  std::vector<std::uint8_t> important(static_cast<std::size_t>(rows));
  for (auto& flag : important) flag = rng.uniform() < 0.3 ? 1 : 0;
  const infuse::exec::cpu exec(2);
  const host_view<const float, 3> k_view(k_rows.data(), {rows, kv_heads, dim});
  const host_view<const float, 3> v_view(v_rows.data(), {rows, kv_heads, dim});
  if constexpr (cache_type::flagged) {
    cache.append(exec, seqs, lengths, k_view, v_view, important);
  } else {
    cache.append(exec, seqs, lengths, k_view, v_view);
  }
  const auto batch_view = cache.view(seqs);
  const auto& view = batch_view.view();

  const auto batch = static_cast<std::int64_t>(lengths.size());
  const std::vector<float> q = rng.normals(static_cast<std::size_t>(batch * q_heads * dim));
  std::vector<float> out(q.size(), NAN);
  std::vector<float> lse(static_cast<std::size_t>(batch * q_heads), NAN);
  std::vector<std::byte> workspace(
      static_cast<std::size_t>(attn::decode_workspace_bytes(exec, q_heads, view, params)));
  attn::decode(exec, host_view<const float, 3>(q.data(), {batch, q_heads, dim}), view,
               host_view<float, 3>(out.data(), {batch, q_heads, dim}), params, {}, workspace,
               attention::lse_output{host_view<float, 2>(lse.data(), {batch, q_heads})});

  const double scale = 1.0 / std::sqrt(double(dim));
  const std::int32_t stored = view.format.k.stored_dim();
  for (std::int32_t s = 0; s < batch; ++s) {
    const std::int64_t length = lengths[s];
    for (std::int32_t h = 0; h < kv_heads; ++h) {
      // The keys and values as stored, and the tokens the policy selects for this head.
      std::vector<double> k_head(static_cast<std::size_t>(length * dim));
      std::vector<double> v_head(k_head.size());
      std::vector<float> row(static_cast<std::size_t>(stored));
      for (std::int64_t t = 0; t < length; ++t) {
        kv::read_key(view, s, t, h, row.data());
        for (std::int32_t d = 0; d < dim; ++d) k_head[t * dim + d] = row[d];
        kv::read_value(view, s, t, h, row.data());
        for (std::int32_t d = 0; d < dim; ++d) v_head[t * dim + d] = row[d];
      }
      std::vector<char> selected(static_cast<std::size_t>(length), 0);
      if (length > 0) {
        sparse::query_context context =
            attention::decode_query_context(view, s, h, group, static_cast<float>(scale), &s);
        context.q = &q[(s * q_heads + h * group) * dim];
        std::vector<float> scratch(static_cast<std::size_t>(4 * (length + 1)));
        context.scratch = scratch.data();
        context.scratch_floats = static_cast<std::int64_t>(scratch.size());
        std::vector<sparse::token_range> ranges(
            static_cast<std::size_t>(Sparsity::max_ranges(params, context)));
        const std::int64_t count = Sparsity::select(params, context, ranges.data());
        for (std::int64_t r = 0; r < count; ++r) {
          for (std::int64_t t = ranges[r].begin; t < ranges[r].end; ++t) {
            selected[t] = Sparsity::visible(params, {s, length - 1, t, length}) ? 1 : 0;
          }
        }
      }
      for (std::int32_t g = 0; g < group; ++g) {
        const std::int64_t qh = std::int64_t{h} * group + g;
        const std::vector<double> q_row(&q[(s * q_heads + qh) * dim],
                                        &q[(s * q_heads + qh) * dim] + dim);
        const auto ref = reference::attention(
            reference::attention_shape{1, length, 1, 1, dim, dim}, q_row, k_head, v_head,
            [&](double dot, std::int64_t, std::int64_t, std::int64_t) { return dot * scale; },
            [&](std::int64_t, std::int64_t key) { return selected[key] != 0; });
        const std::span<const float> got(&out[(s * q_heads + qh) * dim],
                                         static_cast<std::size_t>(dim));
        INFO("sequence " << s << " of " << length << " tokens, head " << qh);
        CHECK(reference::relative_error(got, std::span<const double>(ref.out)) < 1e-5);
        const float got_lse = lse[s * q_heads + qh];
        if (std::isinf(ref.lse[0])) {
          CHECK(std::isinf(got_lse));
          CHECK(got_lse < 0.0f);
        } else {
          CHECK(std::fabs(got_lse - ref.lse[0]) < 1e-5 * (1.0 + std::fabs(ref.lse[0])));
        }
      }
    }
  }
}

using kivi_nhd = config<kv::paged<16, kv::nhd>, kv::per_channel<int2_channel>, int2_g32>;
using kivi_hnd = config<kv::paged<16, kv::hnd>, kv::per_channel<int8_channel>, int4_g32>;
using zipvl = config<kv::paged<16, kv::hnd>, kv::mixed<int8_channel, int2_g32>,
                     kv::mixed<int8_channel, int2_g32>>;
using zipvl_values =
    config<kv::paged<16, kv::nhd>, quant::none<infuse::half>, kv::mixed<int8_channel, int4_g32>>;

}  // namespace

TEST_CASE_TEMPLATE("decode reads KIVI and ZipVL arrangements as stored", Config, kivi_nhd, kivi_hnd,
                   zipvl, zipvl_values) {
  infuse::test::seeded_rng rng;
  for (const std::int32_t dim : {64, 80}) {
    for (const std::int32_t group : {1, 4, 7}) {
      check_staged<Config, sparse::dense>(rng, dim, group, {});
    }
  }
  check_staged<Config, sparse::window>(rng, 128, 4, sparse::window::params{2, 9});
  check_staged<Config, sparse::quest<1>>(rng, 64, 4, {});
}
