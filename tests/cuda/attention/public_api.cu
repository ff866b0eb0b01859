// The public attention calls on exec::cuda over kv::cache<..., kv::device_pages>, against the same
// calls on exec::cpu over kv::cache on the host fed the same appends: a batch with a forked
// sequence (pages shared, so the attention mass of a page gathers from two sequences), decode
// with every optional output; and the checks only the device can make (memory that is not device
// memory) rejecting a call before anything is launched.
#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "decode_check.cuh"
#include "device_store.cuh"
#include "infuse/attention/attention.hpp"
#include "infuse/attention/cpu/decode.hpp"
#include "infuse/attention/cpu/prefill.hpp"
#include "infuse/attention/cuda/decode.cuh"
#include "infuse/attention/cuda/prefill.cuh"
#include "infuse/kv/cuda/cache.cuh"
#include "infuse/kv/kv.hpp"
#include "infuse/quant/quant.hpp"
#include "infuse/sparse/sparse.hpp"
#include "support/cuda.cuh"
#include "support/errors.hpp"
#include "support/random.hpp"

namespace {

namespace kv = infuse::kv;
namespace attention = infuse::attention;
namespace test = infuse::test;
using infuse::device_buffer;
using infuse::device_view;
using infuse::host_view;

using layout = kv::paged<16>;
using scheme = infuse::quant::int_<8, infuse::quant::per_channel>;
using attn = attention::attention<layout, scheme, scheme, infuse::sparse::window>;

constexpr std::int32_t kv_heads = 2;
constexpr std::int32_t q_heads = 8;
constexpr std::int32_t dim = 64;

}  // namespace

TEST_CASE("decode over kv::cache on the device matches it on the host, with every output") {
  INFUSE_RANDOM(rng);
  const infuse::exec::cpu cpu(2);
  const infuse::exec::cuda gpu;
  kv::cache<layout, scheme, scheme> host(64, {kv_heads, dim}, {kv_heads, dim});
  kv::cache<layout, scheme, scheme, kv::device_pages> device(64, {kv_heads, dim}, {kv_heads, dim},
                                                             kv::device_pages{gpu});
  // The same appends on both: 40 tokens to a, forked into b, then 300 more to a and 5 to b.
  const auto append = [&](std::vector<kv::sequence_id> seqs, std::vector<std::int64_t> counts) {
    std::int64_t rows = 0;
    for (const auto c : counts) rows += c;
    const auto k = rng.normals(static_cast<std::size_t>(rows * kv_heads * dim));
    const auto v = rng.normals(static_cast<std::size_t>(rows * kv_heads * dim));
    host.append(cpu, seqs, counts, host_view<const float, 3>(k.data(), {rows, kv_heads, dim}),
                host_view<const float, 3>(v.data(), {rows, kv_heads, dim}));
    const device_buffer<float> k_device = test::to_device(k);
    const device_buffer<float> v_device = test::to_device(v);
    device.append(gpu, seqs, counts, k_device.as_view({rows, kv_heads, dim}),
                  v_device.as_view({rows, kv_heads, dim}));
  };
  const kv::sequence_id a = host.create();
  REQUIRE(device.create() == a);
  append({a}, {40});
  const kv::sequence_id b = host.fork(a);
  REQUIRE(device.fork(a) == b);
  append({a, b}, {300, 5});
  const std::vector<kv::sequence_id> batch = {b, a};
  const std::vector<std::int64_t> lengths = {45, 340};
  const std::int64_t tokens = 343;
  const attn::sparsity_params window{4, 100};
  const auto q = rng.normals(static_cast<std::size_t>(2 * q_heads * dim));

  const auto host_batch = host.view(batch);
  test::decode_outputs cpu_result{std::vector<float>(2 * q_heads * dim),
                                  std::vector<float>(2 * q_heads),
                                  std::vector<float>(2 * q_heads * tokens)};
  std::vector<std::byte> host_workspace(static_cast<std::size_t>(
      attn::decode_workspace_bytes(cpu, q_heads, host_batch.view(), window)));
  attn::decode(cpu, host_view<const float, 3>(q.data(), {2, q_heads, dim}), host_batch.view(),
               host_view<float, 3>(cpu_result.out.data(), {2, q_heads, dim}), window, {},
               host_workspace,
               attention::lse_output{host_view<float, 2>(cpu_result.lse.data(), {2, q_heads})},
               attention::token_weights{
                   host_view<float, 3>(cpu_result.weights.data(), {2, q_heads, tokens})},
               attention::accumulate_mass{});

  const auto device_batch = device.view(batch);
  const auto cache = attention::device_cache_of(device_batch);
  const device_buffer<float> q_device = test::to_device(q);
  device_buffer<float> out(2 * q_heads * dim), lse(2 * q_heads), weights(2 * q_heads * tokens);
  device_buffer<std::byte> workspace(attn::decode_workspace_bytes(gpu, q_heads, cache, window));
  INFUSE_CUDA_REQUIRE(cudaMemset(weights.data(), 0xff, weights.bytes()));
  attn::decode(gpu, device_view<const float, 3>(q_device.data(), {2, q_heads, dim}), cache,
               out.as_view({2, q_heads, dim}), window, {},
               std::span<std::byte>(workspace.data(), workspace.bytes()),
               attention::accumulate_mass{},
               attention::device_token_weights{weights.as_view({2, q_heads, tokens})},
               attention::device_lse_output{lse.as_view({2, q_heads})});
  test::check_launch();
  test::check_same_outputs({out.to_host(), lse.to_host(), weights.to_host()}, cpu_result, lengths,
                           q_heads);
  const std::vector<float> mass = device.metadata().mass_to_host();
  const float* host_mass = host_batch.view().mass;
  CHECK(test::relative_difference(mass, std::vector<float>(host_mass, host_mass + mass.size())) <
        1e-5);
}

TEST_CASE("decode and prefill on exec::cuda reject memory that is not device memory") {
  INFUSE_RANDOM(rng);
  using f16 = infuse::quant::none<infuse::half>;
  using dense = attention::attention<layout, f16, f16>;
  auto st = test::make_store<layout, f16, f16>(rng, {5, 20}, kv_heads, dim, dim);
  const test::device_store<layout, f16, f16> stored(st);
  const attention::device_cache<layout, f16, f16> cache{stored.view, st.view().table};
  const infuse::exec::cuda gpu;
  device_buffer<std::byte> workspace(dense::decode_workspace_bytes(gpu, q_heads, cache, {}));
  device_buffer<float> q(2 * q_heads * dim), out(2 * q_heads * dim);
  std::vector<float> host_q(2 * q_heads * dim);
  std::vector<std::byte> host_workspace(workspace.bytes());
  INFUSE_CUDA_REQUIRE(cudaMemset(out.data(), 0xff, out.bytes()));
  const auto decode = [&](const float* q_data, std::span<std::byte> ws,
                          const attention::device_cache<layout, f16, f16>& c) {
    dense::decode(gpu, device_view<const float, 3>(q_data, {2, q_heads, dim}), c,
                  out.as_view({2, q_heads, dim}), {}, {}, ws);
  };
  const std::span<std::byte> device_ws(workspace.data(), workspace.bytes());
  CHECK(test::argument_of([&] { decode(host_q.data(), device_ws, cache); }) == "q");
  CHECK(test::argument_of([&] { decode(q.data(), host_workspace, cache); }) == "workspace");
  attention::device_cache<layout, f16, f16> host_pages = cache;
  host_pages.view.pages = reinterpret_cast<std::uint8_t*>(st.storage.data());
  CHECK(test::argument_of([&] { decode(q.data(), device_ws, host_pages); }) == "cache.pages");
  test::check_launch();
  for (const float value : out.to_host()) CHECK(std::isnan(value));  // nothing was written
  decode(q.data(), device_ws, cache);  // the same call on device memory runs
  test::check_launch();

  const std::vector<std::int32_t> q_indptr = {0, 1, 2};
  const device_buffer<std::int32_t> indptr_device = test::to_device(q_indptr);
  device_buffer<float> k(2 * kv_heads * dim);
  std::vector<float> host_k(2 * kv_heads * dim);
  const auto prefill = [&](const float* k_data) {
    attention::prefill<layout, f16, f16, infuse::sparse::causal>(
        gpu, device_view<const float, 3>(q.data(), {2, q_heads, dim}),
        device_view<const float, 3>(k_data, {2, kv_heads, dim}),
        device_view<const float, 3>(k.data(), {2, kv_heads, dim}),
        device_view<const std::int32_t, 1>(indptr_device.data(), {3}), cache,
        out.as_view({2, q_heads, dim}), {});
  };
  CHECK(test::argument_of([&] { prefill(host_k.data()); }) == "k");
  test::check_launch();
}
