// attention::decode with options::int8_query on the CPU: against the float64 reference over the
// query rounded as the option documents (tight), and against the float64 reference over the
// float query within the error bound the rounding allows.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <tuple>
#include <vector>

#include "infuse/attention/attention.hpp"
#include "infuse/attention/cpu/decode.hpp"
#include "infuse/core/float_types.hpp"
#include "infuse/quant/quant.hpp"
#include "infuse/sparse/sparse.hpp"
#include "reference/attention.hpp"
#include "reference/compare.hpp"
#include "store.hpp"
#include "support/random.hpp"

namespace {

namespace kv = infuse::kv;
namespace quant = infuse::quant;
namespace sparse = infuse::sparse;
namespace attention = infuse::attention;
namespace reference = infuse::reference;
using infuse::host_view;

// A query row as options::int8_query rounds it, per block of 32 (zero past dim): scale amax / 127,
// codes round(x / scale) clamped to [-127, 127]; `bound_weights` gets each element's largest
// rounding error, scale / 2.
std::vector<double> rounded_query(std::span<const float> q, std::vector<double>& bound_weights) {
  const std::size_t dim = q.size();
  std::vector<double> rounded(dim, 0.0);
  bound_weights.assign(dim, 0.0);
  for (std::size_t b = 0; b < dim; b += 32) {
    const std::size_t end = std::min(dim, b + 32);
    float amax = 0.0f;
    for (std::size_t i = b; i < end; ++i) amax = std::max(amax, std::fabs(q[i]));
    const float scale = amax / 127.0f;
    for (std::size_t i = b; i < end; ++i) {
      const int code =
          scale > 0.0f ? std::clamp(static_cast<int>(std::nearbyint(q[i] / scale)), -127, 127) : 0;
      rounded[i] = double(scale) * code;
      bound_weights[i] = double(scale) / 2.0;
    }
  }
  return rounded;
}

using f16 = quant::none<infuse::half>;
using hnd16 = kv::paged<16, kv::hnd>;

struct shape {
  std::vector<std::int64_t> lengths;
  std::int32_t q_heads;
  std::int32_t kv_heads;
  std::int32_t dim;
};

// A store of the shape's sequences, normal queries and an output to fill.
template <class Layout, class KS, class VS>
struct decode_case {
  infuse::test::kv_store<Layout, KS, VS> store;
  std::int64_t batch;
  std::int64_t q_heads;
  std::int64_t dim;
  std::int32_t group;
  std::vector<float> q;
  std::vector<float> out;

  decode_case(infuse::test::seeded_rng& rng, const shape& sh)
      : store(
            infuse::test::make_store<Layout, KS, VS>(rng, sh.lengths, sh.kv_heads, sh.dim, sh.dim)),
        batch(static_cast<std::int64_t>(sh.lengths.size())),
        q_heads(sh.q_heads),
        dim(sh.dim),
        group(sh.q_heads / sh.kv_heads),
        q(rng.normals(static_cast<std::size_t>(batch * q_heads * dim))),
        out(q.size(), NAN) {}
};

template <class Layout, class KS, class VS, class Sparsity = sparse::dense>
void check_int8_query(infuse::test::seeded_rng& rng, const shape& sh,
                      const typename Sparsity::params& params = {}) {
  using attn = attention::attention<Layout, KS, VS, Sparsity>;
  decode_case<Layout, KS, VS> c(rng, sh);
  auto& st = c.store;
  const auto cache = st.view();
  const auto [batch, q_heads, dim, group] = std::tuple(c.batch, c.q_heads, c.dim, c.group);
  const std::vector<float>& q = c.q;
  std::vector<float>& out = c.out;
  std::vector<float> lse(static_cast<std::size_t>(batch * q_heads), NAN);
  attention::options opt;
  opt.int8_query = true;
  const infuse::exec::cpu exec(2);
  infuse::test::run_decode<attn>(
      exec, q, cache, out, q_heads, params, opt,
      attention::lse_output{host_view<float, 2>(lse.data(), {batch, q_heads})});

  const double scale = 1.0 / std::sqrt(double(dim));
  const auto transform = [&](double dot, std::int64_t, std::int64_t, std::int64_t) {
    return dot * scale;
  };
  for (std::int64_t s = 0; s < batch; ++s) {
    const std::int64_t length = sh.lengths[s];
    for (std::int64_t qh = 0; qh < q_heads; ++qh) {
      const std::int64_t kh = qh / group;
      const std::span<const float> q_row(&q[(s * q_heads + qh) * dim], dim);
      const std::vector<char> mask = infuse::test::selection_mask<Sparsity>(
          st, params, static_cast<std::int32_t>(s), static_cast<std::int32_t>(kh),
          &q[(s * q_heads + kh * group) * dim], group, static_cast<float>(scale));
      std::vector<double> k_head(static_cast<std::size_t>(length * dim));
      std::vector<double> v_head(k_head.size());
      for (std::int64_t i = 0; i < length * dim; ++i) {
        const std::int64_t t = i / dim;
        const std::int64_t d = i % dim;
        k_head[i] = st.k[s][(t * sh.kv_heads + kh) * dim + d];
        v_head[i] = st.v[s][(t * sh.kv_heads + kh) * dim + d];
      }
      std::vector<double> bound_weights;
      const std::vector<double> q_rounded = rounded_query(q_row, bound_weights);
      const std::vector<double> q_float(q_row.begin(), q_row.end());
      const auto visible = [&](std::int64_t, std::int64_t key) { return mask[key] != 0; };
      const reference::attention_shape ref_shape{1, length, 1, 1, dim, dim};
      const auto rounded =
          reference::attention(ref_shape, q_rounded, k_head, v_head, transform, visible);
      const auto exact =
          reference::attention(ref_shape, q_float, k_head, v_head, transform, visible);
      // The documented bound on a score's error, and the output error it allows: each weight
      // moves by at most a factor exp(+-2 * bound).
      double score_bound = 0.0;
      double v_max = 0.0;
      for (std::int64_t t = 0; t < length; ++t) {
        if (mask[t] == 0) continue;
        double bound = 0.0;
        for (std::int64_t d = 0; d < dim; ++d) {
          bound += bound_weights[d] * std::fabs(k_head[t * dim + d]);
          v_max = std::max(v_max, std::fabs(v_head[t * dim + d]));
        }
        score_bound = std::max(score_bound, bound * scale);
      }
      INFO("sequence " << s << " of length " << length << ", q head " << qh);
      const std::span<const float> got(&out[(s * q_heads + qh) * dim], dim);
      CHECK(reference::relative_error(got, std::span<const double>(rounded.out)) < 2e-5);
      const float got_lse = lse[s * q_heads + qh];
      if (rounded.lse[0] == -INFINITY) {
        CHECK(got_lse == -INFINITY);
        continue;
      }
      CHECK(std::fabs(got_lse - rounded.lse[0]) < 1e-4 * (1.0 + std::fabs(rounded.lse[0])));
      const double out_bound = std::expm1(2.0 * score_bound) * v_max + 1e-5;
      for (std::int64_t d = 0; d < dim; ++d) {
        CHECK(std::fabs(got[d] - exact.out[d]) <= out_bound);
      }
      CHECK(std::fabs(got_lse - exact.lse[0]) <= score_bound + 1e-4 * (1.0 + std::fabs(got_lse)));
    }
  }
}

template <class K>
struct keys {
  using k = K;
};

// Every integer width, groups of a block, of several blocks and of a whole vector, symmetric and
// with zero points.
#define INT8_QUERY_KEYS                                                                      \
  keys<quant::int_<8, quant::per_channel>>, keys<quant::int_<8, 32, quant::zero_point>>,     \
      keys<quant::int_<4, 32>>, keys<quant::int_<4, 64>>,                                    \
      keys<quant::int_<4, 64, quant::zero_point>>, keys<quant::int_<4, quant::per_channel>>, \
      keys<quant::int_<3, 32>>, keys<quant::int_<2, 32, quant::zero_point>>

TEST_CASE_TEMPLATE("decode with int8 queries matches the reference of the rounded query", C,
                   INT8_QUERY_KEYS) {
  INFUSE_RANDOM(rng);
  using K = typename C::k;
  // Lengths 0, 1 and page boundaries; groups 4, 1 and 8; head dims 64, 128 (whole steps of the
  // integer product) and one whose last step has fewer blocks (80, or 192 for groups of 64);
  // two split-KV chunks. Three configurations a key scheme: each is a decode body of its own.
  constexpr std::int32_t short_step_dim = K::group == 64 ? 192 : 80;
  check_int8_query<hnd16, K, f16>(rng, {{0, 1, 16, 17}, 8, 2, 64});
  check_int8_query<kv::paged<16>, K, K>(rng, {{40, 600}, 4, 2, 128});
  check_int8_query<hnd16, K, f16>(rng, {{33}, 3, 3, short_step_dim});
  check_int8_query<hnd16, K, f16, sparse::window>(rng, {{100}, 16, 2, 128}, {4, 32});
}

// attention::decode with options::int8_weights (float keys, int8, int4 or int2 values) against the
// float64 reference: each output channel within the rounding bound the option documents. A token's
// rounded weight times its scale moves by at most 1/254 of the largest in its tile; every tile
// lies within 16 tokens of each of its tokens, so with a_t the reference's normalised weights and
// s_t the value's scale (of the channel's group), channel d moves by at most
//   sum_t max(a_i s_i, |i - t| < 16) / 254 * |v_td| / s_t.
template <class Layout, class VS>
void check_int8_weights(infuse::test::seeded_rng& rng, const shape& sh) {
  using attn = attention::attention<Layout, f16, VS, sparse::dense>;
  decode_case<Layout, f16, VS> c(rng, sh);
  auto& st = c.store;
  const auto cache = st.view();
  const auto& f = cache.format;
  const auto [batch, q_heads, dim, group] = std::tuple(c.batch, c.q_heads, c.dim, c.group);
  const std::vector<float>& q = c.q;
  std::vector<float>& out = c.out;
  attention::options opt;
  opt.int8_weights = true;
  infuse::test::run_decode<attn>(infuse::exec::cpu(2), q, cache, out, q_heads, {}, opt);

  const double scale = 1.0 / std::sqrt(double(dim));
  const auto transform = [&](double dot, std::int64_t, std::int64_t, std::int64_t) {
    return dot * scale;
  };
  const auto all = [](std::int64_t, std::int64_t) { return true; };
  const std::int64_t group_dims = VS::group > 0 ? VS::group : dim;
  for (std::int64_t s = 0; s < batch; ++s) {
    const std::int64_t length = sh.lengths[s];
    for (std::int64_t qh = 0; qh < q_heads; ++qh) {
      const std::int64_t kh = qh / group;
      std::vector<double> k_head(static_cast<std::size_t>(length * dim));
      std::vector<double> v_head(k_head.size());
      // The value scales, (token, group).
      std::vector<double> scales(static_cast<std::size_t>(length * (dim / group_dims)));
      for (std::int64_t t = 0; t < length; ++t) {
        for (std::int64_t d = 0; d < dim; ++d) {
          k_head[t * dim + d] = st.k[s][(t * sh.kv_heads + kh) * dim + d];
          v_head[t * dim + d] = st.v[s][(t * sh.kv_heads + kh) * dim + d];
        }
        const auto at = cache.locate(static_cast<std::int32_t>(s), t);
        const std::uint8_t* params = f.v_params(at.page, at.slot, static_cast<std::int32_t>(kh));
        for (std::int64_t g = 0; g < dim / group_dims; ++g) {
          scales[t * (dim / group_dims) + g] = f.v.group_params(params, static_cast<int>(g)).scale;
        }
      }
      const std::vector<double> q_row(&q[(s * q_heads + qh) * dim],
                                      &q[(s * q_heads + qh + 1) * dim]);
      const auto ref = reference::attention(reference::attention_shape{1, length, 1, 1, dim, dim},
                                            q_row, k_head, v_head, transform, all);
      INFO("sequence " << s << " of length " << length << ", q head " << qh);
      const std::span<const float> got(&out[(s * q_heads + qh) * dim], dim);
      for (std::int64_t d = 0; d < dim; ++d) {
        const std::int64_t g = d / group_dims;
        const auto weighted = [&](std::int64_t i) {
          return ref.weights[i] * scales[i * (dim / group_dims) + g];
        };
        double bound = 1e-5 * (1.0 + std::fabs(ref.out[d]));  // float arithmetic
        for (std::int64_t t = 0; t < length; ++t) {
          const double s_t = scales[t * (dim / group_dims) + g];
          if (s_t == 0.0) continue;
          double largest = 0.0;
          for (std::int64_t i = std::max<std::int64_t>(0, t - 15); i < std::min(length, t + 16);
               ++i) {
            largest = std::max(largest, weighted(i));
          }
          bound += largest / 254.0 * std::fabs(v_head[t * dim + d]) / s_t;
        }
        CHECK(std::fabs(got[d] - ref.out[d]) <= bound);
      }
    }
  }
}

template <class V>
struct values {
  using v = V;
};

// Int8 values: a scale per vector, symmetric groups of 128 and 32, zero-point groups of 64; int4
// values (their nibbles spread to bytes): symmetric groups of 32, zero-point groups of 128; int2
// values (four to a byte): zero-point groups of 64.
TEST_CASE_TEMPLATE("decode with int8 weights is within their rounding of the reference", C,
                   values<quant::int_<8, quant::per_channel>>, values<quant::int_<8, 128>>,
                   values<quant::int_<8, 32>>, values<quant::int_<8, 64, quant::zero_point>>,
                   values<quant::int_<4, 32>>, values<quant::int_<4, 128, quant::zero_point>>,
                   values<quant::int_<2, 64, quant::zero_point>>) {
  INFUSE_RANDOM(rng);
  using V = typename C::v;
  // Lengths 0, 1 and page boundaries; groups 4, 1 and 3 (runs of 4 heads and single ones); head
  // dims 64, 128 and 256 (one, two and four runs of 64); two split-KV chunks.
  check_int8_weights<hnd16, V>(rng, {{0, 1, 16, 17}, 8, 2, 128});
  check_int8_weights<kv::paged<16>, V>(rng, {{40, 600}, 4, 4, 256});
  check_int8_weights<hnd16, V>(rng, {{33, 5}, 6, 2, V::group == 128 ? 128 : 64});
}

TEST_CASE("int8 weights leave other values' decode unchanged") {
  INFUSE_RANDOM(rng);
  attention::options opt;
  opt.int8_weights = true;
  // Int3 values, and a head dim that is not whole runs of 64.
  infuse::test::check_decode<sparse::dense, hnd16, f16, quant::int_<3, 32>>(
      rng, {{20, 33}, 8, 2, 128}, {}, opt);
  infuse::test::check_decode<sparse::dense, hnd16, f16, quant::int_<8, quant::per_channel>>(
      rng, {{20, 33}, 8, 2, 96}, {}, opt);
}

TEST_CASE("int8 queries leave float keys' decode unchanged") {
  INFUSE_RANDOM(rng);
  attention::options opt;
  opt.int8_query = true;
  infuse::test::check_decode<sparse::dense, hnd16, f16, f16>(rng, {{20, 33}, 8, 2, 128}, {}, opt);
}

}  // namespace
