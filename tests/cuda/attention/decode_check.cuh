// One public decode call (attention<...>::decode) on exec::cuda against the same call on
// exec::cpu, on the same cache and queries: the two bodies compute the same function and differ
// only by the order of their float sums (and the device's approximate 2^x), so out, lse and the
// token weights agree to a few float roundings (and the attention mass, when accumulated); an
// empty selection gives out 0 and lse -inf on both.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
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

// What a decode call returns besides out: lse and the token weights (tokens: the longest
// sequence and 3 more, which must stay 0).
struct decode_outputs {
  std::vector<float> out, lse, weights;
};

inline void check_same_outputs(const decode_outputs& gpu, const decode_outputs& cpu,
                               const std::vector<std::int64_t>& lengths, std::int64_t q_heads) {
  const auto batch = static_cast<std::int64_t>(lengths.size());
  const auto per_sequence = [&](const std::vector<float>& all, std::int64_t s) {
    const auto n = static_cast<std::int64_t>(all.size()) / batch;
    return std::vector<float>(all.begin() + s * n, all.begin() + (s + 1) * n);
  };
  for (std::int64_t s = 0; s < batch; ++s) {
    INFO("sequence " << s << " of length " << lengths[static_cast<std::size_t>(s)]);
    CHECK(relative_difference(per_sequence(gpu.out, s), per_sequence(cpu.out, s)) < 1e-5);
    CHECK(relative_difference(per_sequence(gpu.weights, s), per_sequence(cpu.weights, s)) < 1e-5);
    for (std::int64_t h = 0; h < q_heads; ++h) {
      const float a = gpu.lse[static_cast<std::size_t>(s * q_heads + h)];
      const float b = cpu.lse[static_cast<std::size_t>(s * q_heads + h)];
      INFO("q head " << h << ": lse " << a << " on the device, " << b << " on the CPU");
      CHECK((a == b || std::fabs(a - b) < 1e-5 * (1.0 + std::fabs(b))));
    }
  }
}

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
  std::int64_t tokens = 3;
  for (const auto l : shape.lengths) tokens = std::max(tokens, l + 3);
  const std::vector<float> q = rng.normals(static_cast<std::size_t>(batch * q_heads * dim));
  const std::size_t out_size = static_cast<std::size_t>(batch * q_heads * dim);
  const std::size_t lse_size = static_cast<std::size_t>(batch * q_heads);
  const std::size_t weights_size = lse_size * static_cast<std::size_t>(tokens);

  // exec::cpu, the mass accumulated into the store's (the device has its own copy).
  decode_outputs cpu_result{std::vector<float>(out_size, NAN), std::vector<float>(lse_size, NAN),
                            std::vector<float>(weights_size, NAN)};
  attention::options host_opt = opt;
  if (!alibi_slopes.empty()) host_opt.alibi_slopes = alibi_slopes.data();
  const exec::cpu cpu(2);
  std::vector<std::byte> host_workspace(
      static_cast<std::size_t>(attn::decode_workspace_bytes(cpu, q_heads, cache, params)));
  attn::decode(cpu, host_view<const float, 3>(q.data(), {batch, q_heads, dim}), cache,
               host_view<float, 3>(cpu_result.out.data(), {batch, q_heads, dim}), params, host_opt,
               host_workspace,
               attention::lse_output{host_view<float, 2>(cpu_result.lse.data(), {batch, q_heads})},
               attention::token_weights{
                   host_view<float, 3>(cpu_result.weights.data(), {batch, q_heads, tokens})},
               attention::accumulate_mass{});

  // exec::cuda, its outputs and workspace poisoned with NaN first, the workspace sized for any
  // batch up to the longest sequence + 100.
  const exec::cuda gpu;
  const attention::device_cache<Layout, K, V> gpu_cache{device.view, cache.table};
  const device_buffer<float> q_device = to_device(q);
  const device_buffer<float> slopes_device = to_device(alibi_slopes);
  if (!alibi_slopes.empty()) opt.alibi_slopes = slopes_device.data();
  device_buffer<float> out_device(batch * q_heads * dim);
  device_buffer<float> lse_device(batch * q_heads);
  device_buffer<float> weights_device(batch * q_heads * tokens);
  device_buffer<std::byte> workspace(
      attn::decode_workspace_bytes(gpu, q_heads, gpu_cache, params, tokens + 100));
  INFUSE_CUDA_REQUIRE(cudaMemset(out_device.data(), 0xff, out_device.bytes()));
  INFUSE_CUDA_REQUIRE(cudaMemset(lse_device.data(), 0xff, lse_device.bytes()));
  INFUSE_CUDA_REQUIRE(cudaMemset(weights_device.data(), 0xff, weights_device.bytes()));
  INFUSE_CUDA_REQUIRE(cudaMemset(workspace.data(), 0xff, workspace.bytes()));
  attn::decode(gpu, device_view<const float, 3>(q_device.data(), {batch, q_heads, dim}), gpu_cache,
               out_device.as_view({batch, q_heads, dim}), params, opt,
               std::span<std::byte>(workspace.data(), workspace.bytes()),
               attention::device_lse_output{lse_device.as_view({batch, q_heads})},
               attention::device_token_weights{weights_device.as_view({batch, q_heads, tokens})},
               attention::accumulate_mass{});
  check_launch();
  check_same_outputs({out_device.to_host(), lse_device.to_host(), weights_device.to_host()},
                     cpu_result, shape.lengths, q_heads);
  CHECK(relative_difference(device.mass.to_host(), st.mass) < 1e-5);
}

}  // namespace infuse::test
