// infuse::gemv and gated_gemv on CUDA at batch >= 16, the tensor-core body (gemm/cuda/gemm_tc.cuh),
// against the float64 reference of the dequantized weights and against the GEMV body run on the
// same inputs in tiles of 8 batch rows: every scheme, batch 15 (the GEMV) to 100 (several tiles of
// 32 batch rows, partial ones), row counts that are not multiples of the 64-row tile, K of one
// group and K over several chunks of 128 inputs with a partial last chunk; then the epilogues.
// Without a CUDA device the binary reports itself skipped (tests/support/cuda_main.cu).
//
// Tolerance, from half's rounding: x and each dequantized weight are rounded to half, a relative
// error of at most 2^-11 each, so each product w x is off by at most |w x| (2^-10 + 2^-22), and
// the float accumulation adds a few 2^-24 per term at these K: |y - ref| <= sum |w x| (2^-10 +
// 1e-5). Half's subnormals (below 2^-14) round to an absolute 2^-25 instead, far inside the 1e-5
// at these magnitudes (weights ~0.1, x ~1).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <tuple>
#include <vector>

#include "infuse/exec/cuda.cuh"
#include "infuse/gemm/cuda/gemv.cuh"
#include "infuse/quant/quant.hpp"
#include "reference/gemm.hpp"
#include "support/cuda.cuh"
#include "support/random.hpp"

namespace {

namespace quant = infuse::quant;
using infuse::device_buffer;
using infuse::device_view;
using infuse::host_view;
using infuse::gemm::act;

constexpr double half_product_bound = 0x1p-10 + 1e-5;  // of sum |w x|, see above
constexpr double float_product_bound = 1e-6;           // the GEMV's float products

template <class T>
device_buffer<T> to_device(const std::vector<T>& host) {
  return device_buffer<T>(std::span<const T>(host));
}

// A quantized matrix of normal(0, 0.1) weights, on the host and copied to the device.
template <class S>
struct test_matrix {
  quant::quantized<S> host;
  device_buffer<std::uint8_t> codes;
  device_buffer<float> scales;
  device_buffer<std::uint8_t> zeros;
  quant::matrix<S, infuse::device_memory> device;

  test_matrix(infuse::test::seeded_rng& rng, std::int64_t rows, std::int64_t cols)
      : host(quant::quantize<S>(host_view<const float, 2>(
            rng.normals(static_cast<std::size_t>(rows * cols), 0.1).data(), {rows, cols}))),
        codes(to_device(host.codes)),
        scales(to_device(host.scales)),
        zeros(to_device(host.zeros)),
        device{codes.data(), scales.size() > 0 ? scales.data() : nullptr,
               zeros.size() > 0 ? zeros.data() : nullptr, host.rows, host.cols} {}
};

// The worst |out - ref| / sum |w x|; NaN (an unwritten output) is the worst of all.
double worst_error(const std::vector<float>& out, const std::vector<double>& ref,
                   const std::vector<double>& magnitude) {
  double worst = 0.0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double error = std::fabs(out[i] - ref[i]) / std::max(magnitude[i], 1e-30);
    worst = std::isnan(error) ? INFINITY : std::max(worst, error);
  }
  return worst;
}

template <class S>
void check_product(infuse::test::seeded_rng& rng, std::int64_t rows, std::int64_t cols,
                   std::int64_t batch) {
  CAPTURE(rows);
  CAPTURE(cols);
  CAPTURE(batch);
  const test_matrix<S> w(rng, rows, cols);
  // x and y with padded row strides; y starts as NaN, so an output left unwritten or a write into
  // a row's padding shows.
  const std::int64_t x_stride = cols + 32;
  const std::int64_t y_stride = rows + 3;
  const auto x = rng.normals(static_cast<std::size_t>(batch * x_stride));
  const device_buffer<float> x_device = to_device(x);
  device_buffer<float> y_device(batch * y_stride);
  device_buffer<float> tiled_device(batch * y_stride);
  INFUSE_CUDA_REQUIRE(cudaMemset(y_device.data(), 0xff, y_device.bytes()));  // NaN
  INFUSE_CUDA_REQUIRE(cudaMemset(tiled_device.data(), 0xff, tiled_device.bytes()));
  const auto x_rows = [&](std::int64_t first, std::int64_t count) {
    return device_view<const float, 2>(x_device.data() + first * x_stride, {count, cols},
                                       {x_stride, 1});
  };
  const auto y_rows = [&](device_buffer<float>& y, std::int64_t first, std::int64_t count) {
    return device_view<float, 2>(y.data() + first * y_stride, {count, rows}, {y_stride, 1});
  };

  const infuse::exec::cuda exec;
  infuse::gemv(exec, w.device, x_rows(0, batch), y_rows(y_device, 0, batch));
  // The GEMV body: the same product in calls of at most 8 batch rows.
  for (std::int64_t first = 0; first < batch; first += 8) {
    const std::int64_t count = std::min<std::int64_t>(8, batch - first);
    infuse::gemv(exec, w.device, x_rows(first, count), y_rows(tiled_device, first, count));
  }
  infuse::test::check_launch();
  const std::vector<float> y = y_device.to_host();
  const std::vector<float> tiled = tiled_device.to_host();

  std::vector<float> x_packed;  // (batch, cols), as the reference reads it
  std::vector<float> out;
  std::vector<float> out_tiled;
  for (std::int64_t b = 0; b < batch; ++b) {
    const auto x_row = x.begin() + b * x_stride;
    x_packed.insert(x_packed.end(), x_row, x_row + cols);
    const auto y_row = y.begin() + b * y_stride;
    out.insert(out.end(), y_row, y_row + rows);
    const auto tiled_row = tiled.begin() + b * y_stride;
    out_tiled.insert(out_tiled.end(), tiled_row, tiled_row + rows);
    for (std::int64_t n = rows; n < y_stride; ++n) CHECK(std::isnan(y_row[n]));
  }
  const auto ref = infuse::reference::gemv(w.host.view(), x_packed, batch);
  const auto magnitude = infuse::reference::gemv_magnitude(w.host.view(), x_packed, batch);
  const std::vector<double> tiled_as_ref(out_tiled.begin(), out_tiled.end());
  const double to_reference = worst_error(out, ref, magnitude);
  const bool tensor_cores = infuse::gemm::cuda::detail::tensor_core_scheme<S> &&
                            batch >= infuse::gemm::cuda::detail::tensor_core_min_batch;
  CHECK(worst_error(out_tiled, ref, magnitude) <= float_product_bound);
  if (tensor_cores) {
    CHECK(to_reference <= half_product_bound);
    CHECK(worst_error(out, tiled_as_ref, magnitude) <= half_product_bound + float_product_bound);
    // Half's rounding shows: the product did go through the tensor cores.
    CHECK(to_reference > float_product_bound);
  } else {
    CHECK(to_reference <= float_product_bound);
  }
}

template <class S>
std::vector<std::int64_t> test_cols() {
  const std::int64_t unit = S::group > 0 ? S::group : 32;
  // Over 1024 inputs: several rounds of up to 4 chunks of 128 in flight, the last one partial.
  return {unit, unit * ((1100 + unit - 1) / unit)};
}

using schemes =
    std::tuple<quant::int_<8, 32>, quant::int_<8, 128, quant::zero_point>, quant::int_<4, 128>,
               quant::int_<4, 64, quant::zero_point>, quant::int_<4, quant::per_channel>,
               quant::int_<3, 64>, quant::int_<3, 128, quant::zero_point>, quant::int_<2, 32>,
               quant::int_<2, 128, quant::zero_point>, quant::fp8<infuse::fp8_e4m3>,
               quant::fp8<infuse::fp8_e5m2, quant::per_channel>, quant::fp8<infuse::fp8_e4m3, 32>,
               quant::none<float>, quant::none<infuse::half>, quant::none<infuse::bfloat16>,
               quant::bcq<3, 128>, quant::bcq<1, 32>>;

TEST_CASE_TEMPLATE_DEFINE("cuda gemm on tensor cores matches the float64 reference and the GEMV", S,
                          gemm_tc_reference) {
  INFUSE_RANDOM(rng);
  for (const std::int64_t cols : test_cols<S>()) {
    for (const std::int64_t rows : {std::int64_t{17}, std::int64_t{129}}) {
      for (const std::int64_t batch : {std::int64_t{15}, std::int64_t{16}, std::int64_t{17},
                                       std::int64_t{64}, std::int64_t{100}}) {
        check_product<S>(rng, rows, cols, batch);
      }
    }
  }
}
TEST_CASE_TEMPLATE_APPLY(gemm_tc_reference, schemes);

TEST_CASE("cuda gemm on tensor cores: a large odd shape") {
  INFUSE_RANDOM(rng);
  check_product<quant::int_<4, 128>>(rng, 1001, 2048, 33);
}

// Lipschitz constant of the activations (silu' <= 1.1, gelu' <= 1.13).
constexpr double activation_slope = 1.2;

// y = act(W x + bias) + residual and y = gate(W_gate x) * (W_up x) + residual, with the residual
// in y itself (row stride residual_stride > n), against the float64 epilogue of the float64
// products; the product bound above carried through the activation's slope.
TEST_CASE("cuda gemm on tensor cores: fused epilogues and gated_gemv") {
  using S = quant::int_<4, 64, quant::zero_point>;
  INFUSE_RANDOM(rng);
  const std::int64_t rows = 37;
  const std::int64_t cols = 1088;
  const std::int64_t stride = rows + 5;
  const test_matrix<S> gate_w(rng, rows, cols);
  const test_matrix<S> up_w(rng, rows, cols);
  const auto bias = rng.normals(static_cast<std::size_t>(rows));
  const device_buffer<float> bias_device = to_device(bias);
  for (const std::int64_t batch : {std::int64_t{17}, std::int64_t{64}}) {
    CAPTURE(batch);
    const auto x = rng.normals(static_cast<std::size_t>(batch * cols));
    const auto start = rng.normals(static_cast<std::size_t>(batch * stride));  // the residual
    const device_buffer<float> x_device = to_device(x);
    const device_view<const float, 2> xv(x_device.data(), {batch, cols});
    const auto gate_ref = infuse::reference::gemv(gate_w.host.view(), x, batch);
    const auto gate_magnitude = infuse::reference::gemv_magnitude(gate_w.host.view(), x, batch);
    const auto up_ref = infuse::reference::gemv(up_w.host.view(), x, batch);
    const auto up_magnitude = infuse::reference::gemv_magnitude(up_w.host.view(), x, batch);

    for (const act function : {act::none, act::silu, act::gelu}) {
      CAPTURE(static_cast<int>(function));
      const double slope = function == act::none ? 1.0 : activation_slope;
      const auto activate = [&](double v) {
        return function == act::silu   ? v / (1.0 + std::exp(-v))
               : function == act::gelu ? 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)))
                                       : v;
      };
      for (const bool gated : {false, true}) {
        CAPTURE(gated);
        device_buffer<float> y_device = to_device(start);
        infuse::gemm::gemv_options options;
        options.residual = y_device.data();
        options.residual_stride = stride;
        const device_view<float, 2> yv(y_device.data(), {batch, rows}, {stride, 1});
        if (gated) {
          infuse::gated_gemv(infuse::exec::cuda{}, gate_w.device, up_w.device, xv, yv, function,
                             options);
        } else {
          options.bias = bias_device.data();
          options.activation = function;
          infuse::gemv(infuse::exec::cuda{}, gate_w.device, xv, yv, options);
        }
        infuse::test::check_launch();
        const std::vector<float> y = y_device.to_host();
        int failures = 0;
        for (std::int64_t b = 0; b < batch; ++b) {
          for (std::int64_t n = 0; n < stride; ++n) {
            const auto at = static_cast<std::size_t>(b * stride + n);
            if (n >= rows) {  // the padding between rows is not touched
              failures += y[at] != start[at];
              continue;
            }
            const auto i = static_cast<std::size_t>(b * rows + n);
            const double gate_error = half_product_bound * gate_magnitude[i];
            double expected = 0.0;
            double allowed = 0.0;
            if (gated) {
              const double up_error = half_product_bound * up_magnitude[i];
              const double gate_value = activate(gate_ref[i]);
              expected = gate_value * up_ref[i];
              allowed = slope * gate_error * (std::fabs(up_ref[i]) + up_error) +
                        std::fabs(gate_value) * up_error;
            } else {
              expected = activate(gate_ref[i] + bias[n]);
              allowed = slope * gate_error;
            }
            // The float epilogue (expf, erff, the additions) rounds a few 2^-24 of its values.
            allowed += 1e-5 * (std::fabs(expected) + std::fabs(start[at]) + gate_magnitude[i]);
            expected += start[at];
            const double error = std::fabs(y[at] - expected);
            failures += !(error <= allowed);  // NaN fails
          }
        }
        CHECK(failures == 0);
      }
    }
  }
}

}  // namespace
