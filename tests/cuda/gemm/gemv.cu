// infuse::gemv on CUDA against the float64 reference of the dequantized weights and against the
// CPU body, for every scheme, batch 1 to 15 (one launch, several batch tiles, partial tiles;
// batch 16 and up take the tensor-core path: gemm_tc.cu),
// odd row counts, K of a single group and K over several chunks of 1024 inputs with a partial
// last chunk; then the host checks that throw before anything is launched.
//
// The device's weights equal quant::dequantize's bit for bit (gemm/cuda/gemv.cuh), so the GPU and
// the CPU differ only by the order of their float sums: within a few float roundings of each dot
// product's condition, sum |w x|.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "device_matrix.cuh"
#include "infuse/exec/cuda.cuh"
#include "infuse/gemm/cpu/gemv.hpp"
#include "infuse/gemm/cuda/gemv.cuh"
#include "infuse/quant/quant.hpp"
#include "reference/compare.hpp"
#include "reference/gemm.hpp"
#include "support/cuda.cuh"
#include "support/random.hpp"
#include "support/tolerance.hpp"

namespace {

namespace quant = infuse::quant;
using infuse::device_buffer;
using infuse::device_view;
using infuse::host_view;
using infuse::test::device_matrix;
using infuse::test::to_device;

struct problem {
  std::int64_t rows;
  std::int64_t cols;
  std::int64_t batch;
};

template <class S>
void check_shape(infuse::test::seeded_rng& rng, problem shape) {
  CAPTURE(shape.rows);
  CAPTURE(shape.cols);
  CAPTURE(shape.batch);
  const auto weights = rng.normals(static_cast<std::size_t>(shape.rows * shape.cols), 0.1);
  const auto q =
      quant::quantize<S>(host_view<const float, 2>(weights.data(), {shape.rows, shape.cols}));
  const device_matrix<S> w(q);
  // x and y with padded row strides; y's padding and every output start as NaN, so an output
  // left unwritten or a write past a row shows.
  const std::int64_t x_stride = shape.cols + 32;
  const std::int64_t y_stride = shape.rows + 3;
  const auto x = rng.normals(static_cast<std::size_t>(shape.batch * x_stride));
  const device_buffer<float> x_device = to_device(x);
  device_buffer<float> y_device(shape.batch * y_stride);
  INFUSE_CUDA_REQUIRE(cudaMemset(y_device.data(), 0xff, y_device.bytes()));  // NaN

  infuse::gemv(
      infuse::exec::cuda{}, w.view,
      device_view<const float, 2>(x_device.data(), {shape.batch, shape.cols}, {x_stride, 1}),
      device_view<float, 2>(y_device.data(), {shape.batch, shape.rows}, {y_stride, 1}));
  infuse::test::check_launch();
  const std::vector<float> y = y_device.to_host();

  std::vector<float> x_packed;  // (batch, cols), as the reference reads it
  for (std::int64_t b = 0; b < shape.batch; ++b) {
    const auto row = x.begin() + b * x_stride;
    x_packed.insert(x_packed.end(), row, row + shape.cols);
  }
  std::vector<float> cpu(static_cast<std::size_t>(shape.batch * shape.rows));
  infuse::gemv(infuse::exec::cpu{}, q.view(),
               host_view<const float, 2>(x_packed.data(), {shape.batch, shape.cols}),
               host_view<float, 2>(cpu.data(), {shape.batch, shape.rows}));

  std::vector<float> out;
  for (std::int64_t b = 0; b < shape.batch; ++b) {
    for (std::int64_t n = 0; n < shape.rows; ++n) {
      out.push_back(y[static_cast<std::size_t>(b * y_stride + n)]);
    }
    for (std::int64_t n = shape.rows; n < y_stride; ++n) {
      CHECK(std::isnan(y[static_cast<std::size_t>(b * y_stride + n)]));
    }
  }
  const auto ref = infuse::reference::gemv(q.view(), x_packed, shape.batch);
  const auto magnitude = infuse::reference::gemv_magnitude(q.view(), x_packed, shape.batch);
  double worst_reference = 0.0;
  double worst_cpu = 0.0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double scale = std::max(magnitude[i], 1e-30);
    // NaN (an unwritten output) compares false and would hide: count it as the worst error.
    const double to_reference = std::fabs(out[i] - ref[i]) / scale;
    const double to_cpu = std::fabs(double(out[i]) - double(cpu[i])) / scale;
    worst_reference = std::isnan(to_reference) ? INFINITY : std::max(worst_reference, to_reference);
    worst_cpu = std::isnan(to_cpu) ? INFINITY : std::max(worst_cpu, to_cpu);
  }
  CHECK(worst_reference <= 1e-6);
  CHECK(worst_cpu <= 2e-6);
  CHECK(infuse::reference::relative_error(out, ref) <= infuse::test::tolerance<float>::relative);
}

// K of one group, a few groups, and over 1024 inputs (two chunks, the last one partial).
template <class S>
std::vector<std::int64_t> test_cols() {
  const std::int64_t unit = S::group > 0 ? S::group : 32;
  return {unit, 3 * unit, unit * ((1100 + unit - 1) / unit)};
}

using schemes =
    std::tuple<quant::int_<8, 32>, quant::int_<8, 128, quant::zero_point>, quant::int_<4, 128>,
               quant::int_<4, 64, quant::zero_point>, quant::int_<4, quant::per_channel>,
               quant::int_<3, 64>, quant::int_<3, 128, quant::zero_point>, quant::int_<2, 32>,
               quant::int_<2, 128, quant::zero_point>, quant::fp8<infuse::fp8_e4m3>,
               quant::fp8<infuse::fp8_e5m2, quant::per_channel>, quant::fp8<infuse::fp8_e4m3, 32>,
               quant::none<float>, quant::none<infuse::half>, quant::none<infuse::bfloat16>,
               quant::bcq<3, 128>, quant::bcq<1, 32>>;

TEST_CASE_TEMPLATE_DEFINE("cuda gemv matches the float64 reference and the CPU body", S,
                          gemv_reference) {
  INFUSE_RANDOM(rng);
  for (const std::int64_t cols : test_cols<S>()) {
    for (const std::int64_t rows : {std::int64_t{1}, std::int64_t{17}, std::int64_t{33}}) {
      for (const std::int64_t batch :
           {std::int64_t{1}, std::int64_t{3}, std::int64_t{7}, std::int64_t{9}, std::int64_t{15}}) {
        check_shape<S>(rng, {rows, cols, batch});
      }
    }
  }
}
TEST_CASE_TEMPLATE_APPLY(gemv_reference, schemes);

TEST_CASE("cuda gemv: a large odd shape over many blocks of rows") {
  INFUSE_RANDOM(rng);
  check_shape<quant::int_<4, 128>>(rng, {4099, 4096, 1});
  check_shape<quant::int_<4, 128, quant::zero_point>>(rng, {1001, 2048, 5});
}

// The fused epilogues and gated_gemv against the CPU body with the same options: y = act(W x +
// bias) + residual with the residual in y itself, and y = gate(W_gate x) * (W_up x) + residual.
TEST_CASE("cuda gemv: fused epilogues and gated_gemv match the CPU body") {
  using S = quant::int_<4, 64, quant::zero_point>;
  using infuse::gemm::act;
  INFUSE_RANDOM(rng);
  for (const std::int64_t batch : {std::int64_t{3}, std::int64_t{9}}) {
    CAPTURE(batch);
    const std::int64_t rows = 37;
    const std::int64_t cols = 1088;
    const auto gate_weights = rng.normals(static_cast<std::size_t>(rows * cols), 0.1);
    const auto up_weights = rng.normals(static_cast<std::size_t>(rows * cols), 0.1);
    const auto gate_q =
        quant::quantize<S>(host_view<const float, 2>(gate_weights.data(), {rows, cols}));
    const auto up_q =
        quant::quantize<S>(host_view<const float, 2>(up_weights.data(), {rows, cols}));
    const device_matrix<S> gate_w(gate_q);
    const device_matrix<S> up_w(up_q);
    const auto x = rng.normals(static_cast<std::size_t>(batch * cols));
    const auto bias = rng.normals(static_cast<std::size_t>(rows));
    const auto start = rng.normals(static_cast<std::size_t>(batch * rows));  // y's residual
    const device_buffer<float> x_device = to_device(x);
    const device_buffer<float> bias_device = to_device(bias);
    const host_view<const float, 2> xh(x.data(), {batch, cols});
    const device_view<const float, 2> xd(x_device.data(), {batch, cols});

    for (const act activation : {act::none, act::silu, act::gelu}) {
      CAPTURE(static_cast<int>(activation));
      for (const bool gated : {false, true}) {
        CAPTURE(gated);
        std::vector<float> cpu = start;
        device_buffer<float> y_device = to_device(start);
        infuse::gemm::gemv_options host_options;
        infuse::gemm::gemv_options device_options;
        host_options.residual = cpu.data();
        device_options.residual = y_device.data();
        const host_view<float, 2> yh(cpu.data(), {batch, rows});
        const device_view<float, 2> yd(y_device.data(), {batch, rows});
        if (gated) {
          infuse::gated_gemv(infuse::exec::cpu{}, gate_q.view(), up_q.view(), xh, yh, activation,
                             host_options);
          infuse::gated_gemv(infuse::exec::cuda{}, gate_w.view, up_w.view, xd, yd, activation,
                             device_options);
        } else {
          host_options.bias = bias.data();
          device_options.bias = bias_device.data();
          host_options.activation = device_options.activation = activation;
          infuse::gemv(infuse::exec::cpu{}, gate_q.view(), xh, yh, host_options);
          infuse::gemv(infuse::exec::cuda{}, gate_w.view, xd, yd, device_options);
        }
        infuse::test::check_launch();
        const std::vector<double> expected(cpu.begin(), cpu.end());
        CHECK(infuse::reference::relative_error(y_device.to_host(), expected) <= 1e-5);
      }
    }
  }
}

TEST_CASE("cuda gemv throws infuse::error on bad arguments before launching") {
  using S = quant::int_<4, 64>;
  INFUSE_RANDOM(rng);
  const auto weights = rng.normals(6 * 128, 0.1);
  const auto q = quant::quantize<S>(host_view<const float, 2>(weights.data(), {6, 128}));
  const device_matrix<S> w(q);
  const device_buffer<float> x(to_device(std::vector<float>(2 * 128, 1.0f)));
  device_buffer<float> y(to_device(std::vector<float>(2 * 6, -7.0f)));
  const auto message = [&](quant::matrix<S, infuse::device_memory> wv,
                           device_view<const float, 2> xv, device_view<float, 2> yv) {
    try {
      infuse::gemv(infuse::exec::cuda{}, wv, xv, yv);
    } catch (const infuse::error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const device_view<const float, 2> good_x(x.data(), {2, 128});
  const device_view<float, 2> good_y(y.data(), {2, 6});

  auto bad_k = w.view;
  bad_k.cols = 96;
  CHECK(message(bad_k, device_view<const float, 2>(x.data(), {2, 96}), good_y) ==
        "infuse::gemv: k is 96, expected a multiple of the group size 64");
  auto no_scales = w.view;
  no_scales.scales = nullptr;
  CHECK(message(no_scales, good_x, good_y).find("w.scales is null") != std::string::npos);
  CHECK(message(w.view, device_view<const float, 2>(x.data(), {0, 128}),
                device_view<float, 2>(y.data(), {0, 6})) ==
        "infuse::gemv: batch is 0, expected at least 1 (the rows of x, x.extent(0))");
  CHECK(message(w.view, good_x, device_view<float, 2>(y.data(), {2, 5})) ==
        "infuse::gemv: y.extent(1) is 5, expected 6 (n, the rows of w)");
  // int4 blocks are read as 16-byte vectors: codes off that alignment are refused.
  auto misaligned = w.view;
  misaligned.codes += 4;
  const std::string text = message(misaligned, good_x, good_y);
  CHECK(text.find("w.codes") != std::string::npos);
  CHECK(text.find("aligned to 16 bytes") != std::string::npos);

  infuse::test::check_launch();
  for (const float value : y.to_host()) CHECK(value == -7.0f);  // nothing was written
}

}  // namespace
