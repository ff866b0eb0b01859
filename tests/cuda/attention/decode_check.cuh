// One decode call on the device against the CPU body on the same cache and queries: the two
// compute the same function and differ only by the order of their float sums (and the device's
// approximate 2^x), so out agrees to a few float roundings and lse likewise; an empty selection
// gives out 0 and lse -inf on both.
#pragma once

#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "device_store.cuh"
#include "infuse/attention/attention.hpp"
#include "infuse/attention/cpu/decode.hpp"
#include "infuse/attention/cuda/decode.cuh"
#include "support/cuda.cuh"
#include "support/random.hpp"

namespace infuse::test {

template <class Sparsity, class Layout, class K, class V>
void check_device_decode(seeded_rng& rng, const decode_shape& shape,
                         const typename Sparsity::params& params, attention::options opt = {},
                         const std::vector<float>& alibi_slopes = {}) {
  using attn = attention::attention<Layout, K, V, Sparsity>;
  CAPTURE(Sparsity::name);
  CAPTURE(shape.q_heads);
  CAPTURE(shape.kv_heads);
  CAPTURE(shape.dim);
  auto st = make_store<Layout, K, V>(rng, shape.lengths, shape.kv_heads, shape.dim, shape.dim);
  const device_store<Layout, K, V> device(st);
  const auto cache = st.view();
  const auto batch = static_cast<std::int64_t>(shape.lengths.size());
  const std::int64_t q_heads = shape.q_heads;
  const std::int64_t dim = shape.dim;
  std::int64_t longest = 0;
  for (const auto l : shape.lengths) longest = std::max(longest, l);
  const std::vector<float> q = rng.normals(static_cast<std::size_t>(batch * q_heads * dim));

  // The CPU body.
  std::vector<float> out(static_cast<std::size_t>(batch * q_heads * dim), NAN);
  std::vector<float> lse(static_cast<std::size_t>(batch * q_heads), NAN);
  attention::options host_opt = opt;
  if (!alibi_slopes.empty()) host_opt.alibi_slopes = alibi_slopes.data();
  const exec::cpu cpu(2);
  std::vector<std::byte> host_workspace(
      static_cast<std::size_t>(attn::decode_workspace_bytes(cpu, q_heads, cache, params)));
  attn::decode(cpu, host_view<const float, 3>(q.data(), {batch, q_heads, dim}), cache,
               host_view<float, 3>(out.data(), {batch, q_heads, dim}), params, host_opt,
               host_workspace,
               attention::lse_output{host_view<float, 2>(lse.data(), {batch, q_heads})});

  // The device body, its outputs poisoned with NaN first.
  const exec::cuda gpu;
  const device_buffer<float> q_device = to_device(q);
  const device_buffer<float> slopes_device = to_device(alibi_slopes);
  if (!alibi_slopes.empty()) opt.alibi_slopes = slopes_device.data();
  device_buffer<float> out_device(batch * q_heads * dim);
  device_buffer<float> lse_device(batch * q_heads);
  INFUSE_CUDA_REQUIRE(cudaMemset(out_device.data(), 0xff, out_device.bytes()));
  INFUSE_CUDA_REQUIRE(cudaMemset(lse_device.data(), 0xff, lse_device.bytes()));
  const std::int64_t bytes = attention::cuda::decode_workspace_bytes<Layout, K, V, Sparsity>(
      gpu, q_heads, device.view, params, longest);
  device_buffer<std::byte> workspace(bytes);
  INFUSE_CUDA_REQUIRE(cudaMemset(workspace.data(), 0xff, workspace.bytes()));
  attention::cuda::decode<Layout, K, V, Sparsity>(
      gpu, device_view<const float, 3>(q_device.data(), {batch, q_heads, dim}), device.view,
      out_device.as_view({batch, q_heads, dim}), params, opt,
      std::span<std::byte>(workspace.data(), workspace.bytes()), longest,
      lse_device.as_view({batch, q_heads}));
  check_launch();
  const std::vector<float> out_gpu = out_device.to_host();
  const std::vector<float> lse_gpu = lse_device.to_host();

  for (std::int64_t s = 0; s < batch; ++s) {
    INFO("sequence " << s << " of length " << shape.lengths[s]);
    const auto rows = static_cast<std::size_t>(q_heads * dim);
    const std::vector<float> got(out_gpu.begin() + s * rows, out_gpu.begin() + (s + 1) * rows);
    const std::vector<float> want(out.begin() + s * rows, out.begin() + (s + 1) * rows);
    CHECK(relative_difference(got, want) < 1e-5);
    for (std::int64_t h = 0; h < q_heads; ++h) {
      const float a = lse_gpu[s * q_heads + h];
      const float b = lse[s * q_heads + h];
      INFO("q head " << h << ": lse " << a << " on the device, " << b << " on the CPU");
      CHECK((a == b || std::fabs(a - b) < 1e-5 * (1.0 + std::fabs(b))));
    }
  }
}

}  // namespace infuse::test
