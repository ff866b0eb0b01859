// attention::prefill on exec::cuda against the same call on exec::cpu, on the same cache: the K and
// V written into the pool and the recomputed key bounds agree bit for bit (both encode with the
// formats' own encode), out and lse to a few float roundings on CUDA cores, to the rounding of
// the operands to half (bfloat16) on tensor cores. Layouts paged<16> nhd and hnd; schemes f16,
// int8 and int4; policies causal, dense and window; groups 1, 4 and 8; head dims 64, 128 and 80;
// sequences with and without a cached prefix, a single new token, a page boundary, and a sequence
// with no new token. The tensor-core body also on bf16, mixed K and V schemes and pages of 3, over
// the query tile's edges (1, 63, 64, 65 new tokens), tiles of keys past one, 4097 new tokens, and
// a soft-cap with a scale of its own.
#include <doctest/doctest.h>

#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#include "decode_configs.hpp"
#include "device_store.cuh"
#include "infuse/attention/cpu/prefill.hpp"
#include "infuse/attention/cuda/prefill.cuh"
#include "infuse/attention/prefill.hpp"
#include "infuse/core/float_types.hpp"
#include "infuse/quant/quant.hpp"
#include "infuse/sparse/sparse.hpp"
#include "support/cuda.cuh"
#include "support/key_bounds.hpp"
#include "support/random.hpp"

namespace {

namespace kv = infuse::kv;
namespace quant = infuse::quant;
namespace sparse = infuse::sparse;
namespace attention = infuse::attention;
namespace test = infuse::test;
using infuse::device_buffer;
using infuse::device_view;
using infuse::host_view;

struct prefill_shape {
  std::vector<std::int64_t> prefix;  // cached tokens per sequence
  std::vector<std::int64_t> fresh;   // new tokens per sequence
  std::int32_t q_heads;
  std::int32_t kv_heads;
  std::int32_t dim;
};

// The bound of the relative error of out (and of |lse difference| / (1 + |lse|)): float sums on
// CUDA cores; on tensor cores the queries, keys, values and weights rounded to the operand type
// (half: 2^-11, bfloat16: 2^-8 relative, about 4 times the expected error of the output).
template <class Sparsity, class K, class V>
double prefill_tolerance(std::int32_t dim) {
  if (!attention::cuda::prefill_takes_tensor_cores<Sparsity, K, V>(dim, dim)) return 1e-5;
  using bf16 = quant::none<infuse::bfloat16>;
  return std::is_same_v<K, bf16> || std::is_same_v<V, bf16> ? 1e-2 : 2e-3;
}

template <class Sparsity, class Layout, class K, class V>
void check_device_prefill(test::seeded_rng& rng, const prefill_shape& shape,
                          const typename Sparsity::params& params,
                          const attention::options& opt = {}) {
  CAPTURE(Sparsity::name);
  CAPTURE(shape.q_heads);
  CAPTURE(shape.kv_heads);
  CAPTURE(shape.dim);
  CAPTURE(opt.soft_cap);
  const double tolerance = prefill_tolerance<Sparsity, K, V>(shape.dim);
  std::vector<std::int64_t> lengths(shape.prefix.size());
  std::vector<std::int32_t> q_indptr{0};
  for (std::size_t s = 0; s < lengths.size(); ++s) {
    lengths[s] = shape.prefix[s] + shape.fresh[s];
    q_indptr.push_back(q_indptr.back() + static_cast<std::int32_t>(shape.fresh[s]));
  }
  auto st = test::make_store<Layout, K, V>(rng, lengths, shape.kv_heads, shape.dim, shape.dim);
  const test::device_store<Layout, K, V> device(st);  // before the CPU body writes the new tokens
  const std::int64_t rows = q_indptr.back();
  const std::int64_t q_heads = shape.q_heads;
  const std::int64_t kv_heads = shape.kv_heads;
  const std::int64_t dim = shape.dim;
  const auto q = rng.normals(static_cast<std::size_t>(rows * q_heads * dim));
  const auto k = rng.normals(static_cast<std::size_t>(rows * kv_heads * dim));
  const auto v = rng.normals(static_cast<std::size_t>(rows * kv_heads * dim));

  std::vector<float> out(static_cast<std::size_t>(rows * q_heads * dim), NAN);
  std::vector<float> lse(static_cast<std::size_t>(rows * q_heads), NAN);
  attention::prefill<Layout, K, V, Sparsity>(
      infuse::exec::cpu(2), host_view<const float, 3>(q.data(), {rows, q_heads, dim}),
      host_view<const float, 3>(k.data(), {rows, kv_heads, dim}),
      host_view<const float, 3>(v.data(), {rows, kv_heads, dim}),
      host_view<const std::int32_t, 1>(q_indptr.data(), {std::ssize(q_indptr)}), st.view(),
      host_view<float, 3>(out.data(), {rows, q_heads, dim}), params, opt,
      host_view<float, 2>(lse.data(), {rows, q_heads}));

  const infuse::exec::cuda gpu;
  const auto q_device = test::to_device(q);
  const auto k_device = test::to_device(k);
  const auto v_device = test::to_device(v);
  const auto indptr_device = test::to_device(q_indptr);
  device_buffer<float> out_device(rows * q_heads * dim);
  device_buffer<float> lse_device(rows * q_heads);
  INFUSE_CUDA_REQUIRE(cudaMemset(out_device.data(), 0xff, out_device.bytes()));  // NaN
  INFUSE_CUDA_REQUIRE(cudaMemset(lse_device.data(), 0xff, lse_device.bytes()));
  attention::prefill<Layout, K, V, Sparsity>(
      gpu, device_view<const float, 3>(q_device.data(), {rows, q_heads, dim}),
      device_view<const float, 3>(k_device.data(), {rows, kv_heads, dim}),
      device_view<const float, 3>(v_device.data(), {rows, kv_heads, dim}),
      device_view<const std::int32_t, 1>(indptr_device.data(), {std::ssize(q_indptr)}),
      attention::device_cache<Layout, K, V>{device.view, st.view().table},
      out_device.as_view({rows, q_heads, dim}), params, opt, lse_device.as_view({rows, q_heads}));
  test::check_launch();

  CHECK(device.pool_on_host() == st.storage);
  CHECK(test::same_bits(device.key_min.to_host(), st.key_min.data()));
  CHECK(test::same_bits(device.key_max.to_host(), st.key_max.data()));
  const auto out_gpu = out_device.to_host();
  const auto lse_gpu = lse_device.to_host();
  CHECK(test::relative_difference(out_gpu, out) < tolerance);
  for (std::size_t i = 0; i < lse.size(); ++i) {
    INFO("lse " << i << ": " << lse_gpu[i] << " on the device, " << lse[i] << " on the CPU");
    CHECK((lse_gpu[i] == lse[i] ||
           std::fabs(lse_gpu[i] - lse[i]) < tolerance * (1 + std::fabs(lse[i]))));
  }
}

}  // namespace

// Outside the anonymous namespace: nvcc's host stub cannot name a test template nested in one.
TEST_CASE_TEMPLATE("CUDA prefill matches the CPU body", C, DECODE_SCHEMES(infuse::kv::nhd),
                   DECODE_SCHEMES(infuse::kv::hnd)) {
  INFUSE_RANDOM(rng);
  using L = typename C::layout;
  using K = typename C::k;
  using V = typename C::v;
  const prefill_shape shapes[] = {{{0, 30, 5, 7}, {17, 1, 40, 0}, 8, 8, 64},
                                  {{16, 0}, {33, 70}, 16, 4, 128},
                                  {{3, 50}, {29, 2}, 16, 2, 80}};
  for (const prefill_shape& shape : shapes) {
    check_device_prefill<sparse::causal, L, K, V>(rng, shape, {});
    check_device_prefill<sparse::dense, L, K, V>(rng, shape, {});
    check_device_prefill<sparse::window, L, K, V>(rng, shape, {2, 20});
  }
}

using bf16_cache = infuse::quant::none<infuse::bfloat16>;

TEST_CASE_TEMPLATE(
    "CUDA prefill on tensor cores matches the CPU body", C,
    infuse::test::decode_config<infuse::kv::paged<16, infuse::kv::nhd>, infuse::test::f16>,
    infuse::test::decode_config<infuse::kv::paged<16, infuse::kv::nhd>, bf16_cache>,
    infuse::test::decode_config<infuse::kv::paged<16, infuse::kv::hnd>, infuse::test::int8>,
    infuse::test::decode_config<infuse::kv::paged<3, infuse::kv::nhd>, infuse::test::int8,
                                infuse::test::f16>,
    infuse::test::decode_config<infuse::kv::paged<16, infuse::kv::hnd>, bf16_cache,
                                infuse::test::f16>) {
  INFUSE_RANDOM(rng);
  using L = typename C::layout;
  using K = typename C::k;
  using V = typename C::v;
  const prefill_shape shapes[] = {{{0, 0, 0, 0}, {1, 63, 64, 65}, 8, 8, 64},
                                  {{0, 37, 130}, {129, 200, 1}, 16, 4, 128},
                                  {{0}, {4097}, 1, 1, 64}};
  for (const prefill_shape& shape : shapes) {
    REQUIRE(
        attention::cuda::prefill_takes_tensor_cores<sparse::causal, K, V>(shape.dim, shape.dim));
    check_device_prefill<sparse::causal, L, K, V>(rng, shape, {});
    check_device_prefill<sparse::dense, L, K, V>(rng, shape, {});
  }
  attention::options capped;
  capped.scale = 0.2f;
  capped.soft_cap = 5.0f;
  check_device_prefill<sparse::causal, L, K, V>(rng, shapes[1], {}, capped);
}
