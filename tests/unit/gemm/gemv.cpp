#include "infuse/gemm/cpu/gemv.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "infuse/quant/quant.hpp"
#include "reference/compare.hpp"
#include "reference/gemm.hpp"
#include "support/random.hpp"
#include "support/tolerance.hpp"

namespace {

namespace quant = infuse::quant;
using infuse::host_view;

struct problem {
  std::int64_t rows;
  std::int64_t cols;
  std::int64_t batch;
};

template <class S>
void check_against_reference(infuse::test::seeded_rng& rng, problem shape, int threads) {
  CAPTURE(shape.rows);
  CAPTURE(shape.cols);
  CAPTURE(shape.batch);
  CAPTURE(threads);
  const auto weights = rng.normals(static_cast<std::size_t>(shape.rows * shape.cols), 0.1);
  const auto q =
      quant::quantize<S>(host_view<const float, 2>(weights.data(), {shape.rows, shape.cols}));
  const auto x = rng.normals(static_cast<std::size_t>(shape.batch * shape.cols));
  // y with a padded row stride, and NaN in the padding that must stay untouched.
  const std::int64_t y_stride = shape.rows + 3;
  std::vector<float> y(static_cast<std::size_t>(shape.batch * y_stride), NAN);
  infuse::gemv(infuse::exec::cpu(threads), q.view(),
               host_view<const float, 2>(x.data(), {shape.batch, shape.cols}),
               host_view<float, 2>(y.data(), {shape.batch, shape.rows}, {y_stride, 1}));
  std::vector<float> out;
  for (std::int64_t b = 0; b < shape.batch; ++b) {
    for (std::int64_t n = 0; n < shape.rows; ++n)
      out.push_back(y[static_cast<std::size_t>(b * y_stride + n)]);
    for (std::int64_t n = shape.rows; n < y_stride; ++n)
      CHECK(std::isnan(y[static_cast<std::size_t>(b * y_stride + n)]));
  }
  const auto ref = infuse::reference::gemv(q.view(), x, shape.batch);
  const auto magnitude = infuse::reference::gemv_magnitude(q.view(), x, shape.batch);
  // Each output within float rounding of its dot product's condition (sum of |w x|), which a
  // single output with cancellation needs; over many outputs the norm-wise bound of the issue.
  double worst = 0.0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    worst = std::max(worst, std::fabs(out[i] - ref[i]) / std::max(magnitude[i], 1e-30));
  }
  CHECK(worst <= 1e-6);
  if (ref.size() >= 16) {
    CHECK(infuse::reference::relative_error(out, ref) <= infuse::test::tolerance<float>::relative);
  }
}

}  // namespace

#define INFUSE_GEMV_SCHEMES                                                                 \
  quant::int_<4, 128>, quant::int_<4, 32, quant::zero_point>, quant::int_<8, 64>,           \
      quant::int_<8, quant::per_channel, quant::zero_point>, quant::int_<3, 128>,           \
      quant::int_<3, 32, quant::zero_point>, quant::int_<2, 64>,                            \
      quant::int_<2, quant::per_channel, quant::zero_point>, quant::fp8<infuse::fp8_e4m3>,  \
      quant::fp8<infuse::fp8_e5m2, 32>, quant::fp8<infuse::fp8_e4m3, quant::per_channel>,   \
      quant::bcq<1, 32>, quant::bcq<3, 128>, quant::none<float>, quant::none<infuse::half>, \
      quant::none<infuse::bfloat16>

TEST_CASE_TEMPLATE("gemv matches the float64 reference, batch 1 to 8", S, INFUSE_GEMV_SCHEMES) {
  INFUSE_RANDOM(rng);
  const std::int64_t group = S::group > 0 ? S::group : 32;
  // K of one group, odd N, batch 1 and 7 (and 8, a full batch tile), then random shapes.
  check_against_reference<S>(rng, {1, group, 1}, 1);
  check_against_reference<S>(rng, {37, group, 7}, 2);
  check_against_reference<S>(rng, {13, 4 * group, 8}, 3);
  for (int trial = 0; trial < 3; ++trial) {
    check_against_reference<S>(
        rng, {rng.integer(1, 70) | 1, group * rng.integer(1, 12), rng.integer(1, 8)},
        static_cast<int>(rng.integer(1, 4)));
  }
}

TEST_CASE_TEMPLATE("gemv as a GEMM: batch above 8, in tiles", S, quant::int_<4, 128>,
                   quant::int_<3, 64, quant::zero_point>, quant::bcq<2, 32>,
                   quant::fp8<infuse::fp8_e4m3, 128>, quant::none<infuse::half>) {
  INFUSE_RANDOM(rng);
  check_against_reference<S>(rng, {21, 256, 9}, 2);
  check_against_reference<S>(rng, {7, 128, 64}, 3);
  check_against_reference<S>(rng,
                             {rng.integer(1, 40), 128 * rng.integer(1, 4), rng.integer(9, 100)}, 2);
}

TEST_CASE_TEMPLATE("CPU unpacking gives every FP8 code the value of the scheme", F,
                   infuse::fp8_e4m3, infuse::fp8_e5m2) {
  // All 256 codes, NaN and Inf included, against the scalar dequantize (bits_to_float).
  using S = quant::fp8<F>;
  namespace hn = hwy::HWY_NAMESPACE;
  const infuse::gemm::cpu::float_tag<S> d;
  const int lanes = static_cast<int>(hn::Lanes(d));
  const typename S::params p{0.75f};
  for (int start = 0; start < 256; start += quant::block_size) {
    std::uint8_t block[quant::block_size];
    for (int j = 0; j < quant::block_size; ++j) block[j] = static_cast<std::uint8_t>(start + j);
    for (int first = 0; first < quant::block_size; first += lanes) {
      float values[16];
      hn::StoreU(infuse::gemm::cpu::detail::dequantize_chunk<S>(d, block, first, p), d, values);
      for (int lane = 0; lane < lanes; ++lane) {
        const float expected = quant::dequantize<S>(block, first + lane, p);
        INFO("code " << start + first + lane);
        if (std::isnan(expected)) {
          CHECK(std::isnan(values[lane]));
        } else {
          CHECK(values[lane] == expected);
        }
      }
    }
  }
}

TEST_CASE("gemv refuses bad arguments, naming them, and writes nothing") {
  using S = quant::int_<4, 64>;
  std::vector<float> weights(6 * 128, 0.5f);
  const auto q = quant::quantize<S>(host_view<const float, 2>(weights.data(), {6, 128}));
  std::vector<float> x(2 * 128, 1.0f);
  std::vector<float> y(2 * 6, -7.0f);
  const auto message = [&](quant::matrix<S> w, host_view<const float, 2> xv,
                           host_view<float, 2> yv) {
    try {
      infuse::gemv(infuse::exec::cpu{}, w, xv, yv);
    } catch (const infuse::error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  const host_view<const float, 2> good_x(x.data(), {2, 128});
  const host_view<float, 2> good_y(y.data(), {2, 6});
  CHECK(message(q.view(), good_x, good_y).empty());
  std::fill(y.begin(), y.end(), -7.0f);

  auto bad_k = q.view();
  bad_k.cols = 96;
  CHECK(message(bad_k, host_view<const float, 2>(x.data(), {2, 96}), good_y) ==
        "infuse::gemv: k is 96, expected a multiple of the group size 64");
  auto no_codes = q.view();
  no_codes.codes = nullptr;
  CHECK(message(no_codes, good_x, good_y).find("w.codes is null") != std::string::npos);
  auto no_scales = q.view();
  no_scales.scales = nullptr;
  CHECK(message(no_scales, good_x, good_y).find("w.scales is null") != std::string::npos);
  CHECK(message(q.view(), host_view<const float, 2>(x.data(), {0, 128}),
                host_view<float, 2>(y.data(), {0, 6})) ==
        "infuse::gemv: batch is 0, expected at least 1 (the rows of x, x.extent(0))");
  CHECK(message(q.view(), host_view<const float, 2>(x.data(), {2, 64}), good_y) ==
        "infuse::gemv: x.extent(1) is 64, expected 128 (k, the columns of w)");
  CHECK(message(q.view(), good_x, host_view<float, 2>(y.data(), {2, 5})) ==
        "infuse::gemv: y.extent(1) is 5, expected 6 (n, the rows of w)");
  CHECK(message(q.view(), good_x, host_view<float, 2>(y.data(), {1, 6})) ==
        "infuse::gemv: y.extent(0) is 1, expected 2 (batch, the rows of x)");
  CHECK(message(q.view(), host_view<const float, 2>(nullptr, {2, 128}), good_y) ==
        "infuse::gemv: x.data() is null, expected a pointer to 256 elements");
  CHECK(message(q.view(), good_x,
                host_view<float, 2>(reinterpret_cast<float*>(reinterpret_cast<char*>(y.data()) + 1),
                                    {2, 6}, {6, 1}))
            .find("y.data()") != std::string::npos);
  for (const float value : y) CHECK(value == -7.0f);

  using F = quant::none<float>;
  std::vector<std::uint8_t> codes(F::block_bytes * 2 + 1);
  const quant::matrix<F> misaligned{codes.data() + 1, nullptr, nullptr, 1, 64};
  std::vector<float> y1(2);
  const std::string text = [&] {
    try {
      infuse::gemv(infuse::exec::cpu{}, misaligned, host_view<const float, 2>(x.data(), {2, 64}),
                   host_view<float, 2>(y1.data(), {2, 1}));
    } catch (const infuse::error& e) {
      return std::string(e.what());
    }
    return std::string();
  }();
  CHECK(text.find("w.codes") != std::string::npos);
  CHECK(text.find("aligned to 4 bytes") != std::string::npos);
}
