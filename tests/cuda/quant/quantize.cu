// quant::quantize on CUDA (quant/cuda/quantize.cuh) against the host's quant::quantize with
// round to nearest: codes, scales and zero points byte for byte, for every integer scheme, odd
// row counts, a padded row stride, K of one group and K over many groups; then the host checks.
#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "infuse/cuda.cuh"
#include "support/cuda.cuh"
#include "support/random.hpp"

namespace {

namespace quant = infuse::quant;
using infuse::device_buffer;
using infuse::device_view;
using infuse::host_view;

template <class S>
void check_shape(infuse::test::seeded_rng& rng, std::int64_t rows, std::int64_t cols) {
  CAPTURE(rows);
  CAPTURE(cols);
  const std::int64_t stride = cols + 32;
  auto weights = rng.normals(static_cast<std::size_t>(rows * stride), 0.1);
  // A group of exact zeros and an outlier: both edges of the fit.
  for (std::int64_t k = 0; k < 32; ++k) weights[static_cast<std::size_t>(k)] = 0.0f;
  weights[static_cast<std::size_t>(rows / 2 * stride + cols - 1)] = 3.0f;
  std::vector<float> packed;  // (rows, cols) for the host
  for (std::int64_t r = 0; r < rows; ++r) {
    const auto row = weights.begin() + r * stride;
    packed.insert(packed.end(), row, row + cols);
  }
  const auto expected = quant::quantize<S>(host_view<const float, 2>(packed.data(), {rows, cols}));

  const device_buffer<float> w{std::span<const float>(weights)};
  device_buffer<std::uint8_t> codes(std::ssize(expected.codes));
  device_buffer<float> scales(std::ssize(expected.scales));
  device_buffer<std::uint8_t> zeros(std::ssize(expected.zeros));
  INFUSE_CUDA_REQUIRE(cudaMemset(codes.data(), 0xa5, codes.bytes()));
  INFUSE_CUDA_REQUIRE(cudaMemset(scales.data(), 0xff, scales.bytes()));
  const auto view = quant::quantize<S>(
      infuse::exec::cuda{}, device_view<const float, 2>(w.data(), {rows, cols}, {stride, 1}),
      codes.as_view(), scales.as_view(), zeros.as_view());
  infuse::test::check_launch();
  CHECK(view.codes == codes.data());
  CHECK(view.rows == rows);
  CHECK(view.cols == cols);

  const auto got_codes = codes.to_host();
  const auto got_scales = scales.to_host();
  CHECK(got_codes == expected.codes);
  CHECK(std::memcmp(got_scales.data(), expected.scales.data(), scales.bytes()) == 0);
  if constexpr (S::has_zero) CHECK(zeros.to_host() == expected.zeros);
}

using schemes =
    std::tuple<quant::int_<8, 32>, quant::int_<8, 128, quant::zero_point>, quant::int_<4, 128>,
               quant::int_<4, 64, quant::zero_point>, quant::int_<4, quant::per_channel>,
               quant::int_<3, 64>, quant::int_<3, 128, quant::zero_point>, quant::int_<2, 32>,
               quant::int_<2, quant::per_channel, quant::zero_point>>;

TEST_CASE_TEMPLATE_DEFINE("cuda quantize is bit-identical to the host's round to nearest", S,
                          quantize_host) {
  INFUSE_RANDOM(rng);
  const std::int64_t unit = S::group > 0 ? S::group : 32;
  for (const std::int64_t cols : {unit, 9 * unit, 64 * unit}) {
    for (const std::int64_t rows : {std::int64_t{1}, std::int64_t{7}, std::int64_t{45}}) {
      check_shape<S>(rng, rows, cols);
    }
  }
}
TEST_CASE_TEMPLATE_APPLY(quantize_host, schemes);

TEST_CASE("cuda quantize throws infuse::error on bad arguments before launching") {
  using S = quant::int_<4, 64, quant::zero_point>;
  const std::vector<float> ones(4 * 128, 1.0f);
  const device_buffer<float> w{std::span<const float>(ones)};
  device_buffer<std::uint8_t> codes(4 * 4 * S::block_bytes);
  device_buffer<float> scales(8);
  device_buffer<std::uint8_t> zeros(8);
  const auto message = [&](device_view<const float, 2> wv, std::int64_t code_bytes,
                           std::int64_t zero_count, quant::quantize_options options) {
    try {
      quant::quantize<S>(infuse::exec::cuda{}, wv, codes.as_view({code_bytes}), scales.as_view(),
                         zeros.as_view({zero_count}), options);
    } catch (const infuse::error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const device_view<const float, 2> good(w.data(), {4, 128});
  const std::int64_t code_bytes = codes.size();
  CHECK(message(good, code_bytes, 8, {}) == "no error");
  infuse::test::check_launch();
  CHECK(message(device_view<const float, 2>(w.data(), {4, 96}), code_bytes, 8, {})
            .find("k is 96") != std::string::npos);
  CHECK(message(good, code_bytes - 1, 8, {}).find("codes") != std::string::npos);
  CHECK(message(good, code_bytes, 7, {}).find("zeros") != std::string::npos);
  quant::quantize_options search;
  search.method = quant::rounding::clip_search;
  CHECK(message(good, code_bytes, 8, search).find("options.method") != std::string::npos);
}

}  // namespace
