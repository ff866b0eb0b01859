// attention::cuda::decode against the CPU body over paged<16> hnd pages (see decode_nhd.cu), and
// its host checks.
#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>

#include "decode_check.cuh"
#include "decode_configs.hpp"

TEST_CASE_TEMPLATE("CUDA decode matches the CPU body (hnd)", C, DECODE_SCHEMES(infuse::kv::hnd)) {
  infuse::test::check_decode_policies<typename C::layout, typename C::k, typename C::v>();
}

TEST_CASE_TEMPLATE("CUDA decode matches the CPU body (hnd, more schemes, dense)", C,
                   DECODE_MORE_SCHEMES(infuse::kv::hnd)) {
  infuse::test::check_decode_dense<typename C::layout, typename C::k, typename C::v>();
}

TEST_CASE("CUDA decode checks its arguments before anything is launched") {
  INFUSE_RANDOM(rng);
  using layout = infuse::kv::paged<16, infuse::kv::hnd>;
  using f16 = infuse::test::f16;
  using dense = infuse::sparse::dense;
  auto st = infuse::test::make_store<layout, f16, f16>(rng, {5, 20}, 2, 64, 64);
  const infuse::test::device_store<layout, f16, f16> device(st);
  const infuse::exec::cuda gpu;
  const std::int64_t bytes =
      infuse::attention::cuda::decode_workspace_bytes<layout, f16, f16, dense>(gpu, 4, device.view,
                                                                               {}, 20);
  infuse::device_buffer<std::byte> workspace(bytes);
  infuse::device_buffer<float> q(2 * 4 * 64);
  infuse::device_buffer<float> out(2 * 4 * 64);
  INFUSE_CUDA_REQUIRE(cudaMemset(out.data(), 0xff, out.bytes()));
  const auto run = [&](std::int64_t q_heads, std::int64_t out_dim, std::size_t workspace_bytes) {
    infuse::attention::cuda::decode<layout, f16, f16, dense>(
        gpu, infuse::device_view<const float, 3>(q.data(), {2, q_heads, 64}), device.view,
        out.as_view({2, 4, out_dim}), {}, {},
        std::span<std::byte>(workspace.data(), workspace_bytes), 20);
  };
  CHECK_THROWS_AS(run(3, 64, workspace.bytes()), infuse::error);      // not a multiple of 2
  CHECK_THROWS_AS(run(4, 63, workspace.bytes()), infuse::error);      // out's dim
  CHECK_THROWS_AS(run(4, 64, workspace.bytes() - 1), infuse::error);  // workspace too small
  infuse::test::check_launch();
  for (const float value : out.to_host()) CHECK(std::isnan(value));  // nothing was written
}
