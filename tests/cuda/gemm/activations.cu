// infuse::gemv and gated_gemv on CUDA with half and bfloat16 x, and the LUT-GEMV of quant::bcq
// weights (gemm::lut_activations, gemm/cuda/lut.cuh), against the float64 product of the
// dequantized weights; odd row counts, K of one group and K over several chunks with a partial
// last one, batch 1, 2 and 7 (and 20 on tensor cores); the fused epilogues against the CPU body;
// then the host checks of narrow x.
//
// Tolerances. Half and bfloat16 x are exact once converted to float, so the reference multiplies
// the dequantized weights by the rounded x and what remains is the float GEMV's summation: 1e-6 of
// each output's sum |w x|, as for float x (gemv.cu). From batch 16 the tensor-core body rounds the
// weights to half (x stays exact): 2^-11 of sum |w x| more. The LUT-GEMV's tables hold sums of
// +/-x, so its rounding is relative to sum_k (|offset| + sum_i |alpha_i|) |x_k|: a few float
// roundings of that per output, 2e-6 of it here (a wrong table entry is off by ~1e-3 of it).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "device_matrix.cuh"
#include "infuse/exec/cuda.cuh"
#include "infuse/gemm/cpu/gemv.hpp"
#include "infuse/gemm/cuda/gemv.cuh"
#include "infuse/quant/quant.hpp"
#include "reference/compare.hpp"
#include "reference/gemm.hpp"
#include "support/cuda.cuh"
#include "support/errors.hpp"
#include "support/random.hpp"

namespace {

namespace quant = infuse::quant;
namespace gemm = infuse::gemm;
using infuse::bfloat16;
using infuse::device_buffer;
using infuse::device_view;
using infuse::half;
using infuse::host_view;
using infuse::test::device_matrix;
using infuse::test::to_device;

constexpr double float_product_bound = 1e-6;   // of sum |w x|
constexpr double half_weight_bound = 0x1p-11;  // more on tensor cores, of sum |w x|
constexpr double lut_bound = 2e-6;             // of sum (|offset| + sum |alpha|) |x|

// x rounded to X, and back to float exactly: the values the kernels multiply.
template <class X>
std::vector<X> rounded(const std::vector<float>& x) {
  std::vector<X> out;
  for (const float value : x) out.push_back(X(value));
  return out;
}
template <class X>
std::vector<float> widened(const std::vector<X>& x) {
  std::vector<float> out;
  for (const X value : x) out.push_back(float(value));
  return out;
}

struct problem {
  std::int64_t rows;
  std::int64_t cols;
  std::int64_t batch;
};

// y = W x on the device with x of type X, against the float64 product of the dequantized weights
// and the rounded x: the worst |y - ref| / scale, where scale is sum |w x| or, with lut
// activations, the LUT's magnitude. x and y have padded row strides; y's padding and every output
// start as NaN, so an output left unwritten or a write past a row shows (as the worst error).
template <class S, class X, class Activations>
double product_error(infuse::test::seeded_rng& rng, problem shape, Activations activations) {
  CAPTURE(shape.rows);
  CAPTURE(shape.cols);
  CAPTURE(shape.batch);
  const auto weights = rng.normals(static_cast<std::size_t>(shape.rows * shape.cols), 0.1);
  const auto q =
      quant::quantize<S>(host_view<const float, 2>(weights.data(), {shape.rows, shape.cols}));
  const device_matrix<S> w(q);
  const std::int64_t x_stride = shape.cols + 32;
  const std::int64_t y_stride = shape.rows + 3;
  const std::vector<X> x =
      rounded<X>(rng.normals(static_cast<std::size_t>(shape.batch * x_stride)));
  const device_buffer<X> x_device = to_device(x);
  device_buffer<float> y_device(shape.batch * y_stride);
  INFUSE_CUDA_REQUIRE(cudaMemset(y_device.data(), 0xff, y_device.bytes()));  // NaN

  infuse::gemv(infuse::exec::cuda{}, w.view,
               device_view<const X, 2>(x_device.data(), {shape.batch, shape.cols}, {x_stride, 1}),
               device_view<float, 2>(y_device.data(), {shape.batch, shape.rows}, {y_stride, 1}), {},
               activations);
  infuse::test::check_launch();
  const std::vector<float> y = y_device.to_host();

  std::vector<float> x_packed;  // (batch, cols) as float, as the reference reads it
  for (std::int64_t b = 0; b < shape.batch; ++b) {
    for (std::int64_t k = 0; k < shape.cols; ++k) {
      x_packed.push_back(float(x[static_cast<std::size_t>(b * x_stride + k)]));
    }
  }
  const auto ref = infuse::reference::gemv(q.view(), x_packed, shape.batch);
  const auto scale = [&] {
    if constexpr (std::is_same_v<Activations, gemm::lut_activations>) {
      return infuse::reference::lut_magnitude(q.view(), x_packed, shape.batch);
    } else {
      return infuse::reference::gemv_magnitude(q.view(), x_packed, shape.batch);
    }
  }();
  double worst = 0.0;
  for (std::int64_t b = 0; b < shape.batch; ++b) {
    for (std::int64_t n = 0; n < y_stride; ++n) {
      const float out = y[static_cast<std::size_t>(b * y_stride + n)];
      if (n >= shape.rows) {
        CHECK(std::isnan(out));
        continue;
      }
      const auto i = static_cast<std::size_t>(b * shape.rows + n);
      const double error = std::fabs(out - ref[i]) / std::max(scale[i], 1e-30);
      worst = std::isnan(error) ? INFINITY : std::max(worst, error);
    }
  }
  return worst;
}

// K of one group, and over 1024 inputs (the GEMV's chunks; 32 of the LUT's) with a partial last
// chunk where the group allows.
template <class S>
std::vector<std::int64_t> test_cols() {
  const std::int64_t unit = S::group > 0 ? S::group : 32;
  return {unit, unit * ((1100 + unit - 1) / unit)};
}

// A scheme and an element type of x. The check takes them as deduced template arguments, not as
// member aliases: nvcc's host stubs of the kernels must name the types themselves.
template <class S, class X>
struct narrow_case {};

template <class S, class X>
void check_narrow(infuse::test::seeded_rng& rng, narrow_case<S, X>) {
  namespace body = infuse::gemm::cuda::detail;
  for (const std::int64_t cols : test_cols<S>()) {
    for (const std::int64_t rows : {std::int64_t{1}, std::int64_t{17}, std::int64_t{33}}) {
      for (const std::int64_t batch : {std::int64_t{1}, std::int64_t{7}, std::int64_t{20}}) {
        const bool tensor_cores =
            body::tensor_core_scheme<S> && batch >= body::tensor_core_min_batch;
        const double bound = float_product_bound + (tensor_cores ? half_weight_bound : 0.0);
        CHECK(product_error<S, X>(rng, {rows, cols, batch}, gemm::float_activations{}) <= bound);
      }
    }
  }
}

using narrow_cases =
    std::tuple<narrow_case<quant::int_<4, 128>, half>, narrow_case<quant::int_<4, 128>, bfloat16>,
               narrow_case<quant::int_<8, 32>, half>,
               narrow_case<quant::int_<3, 64, quant::zero_point>, bfloat16>,
               narrow_case<quant::fp8<infuse::fp8_e4m3, 32>, half>,
               narrow_case<quant::none<half>, bfloat16>, narrow_case<quant::none<float>, half>,
               narrow_case<quant::bcq<3, 128>, half>>;

TEST_CASE_TEMPLATE_DEFINE("cuda gemv with half and bfloat16 x matches the float64 product", Case,
                          narrow_reference) {
  INFUSE_RANDOM(rng);
  check_narrow(rng, Case{});
}
TEST_CASE_TEMPLATE_APPLY(narrow_reference, narrow_cases);

TEST_CASE_TEMPLATE("cuda LUT-GEMV of bcq weights matches the float64 product", S, quant::bcq<1, 32>,
                   quant::bcq<2, 64>, quant::bcq<3, 128>, quant::bcq<4, quant::per_channel>) {
  INFUSE_RANDOM(rng);
  for (const std::int64_t cols : test_cols<S>()) {
    // Rows inside one block of 64, and over two blocks with a partial one.
    for (const std::int64_t rows : {std::int64_t{1}, std::int64_t{65}, std::int64_t{130}}) {
      for (const std::int64_t batch : {std::int64_t{1}, std::int64_t{2}, std::int64_t{7}}) {
        CHECK(product_error<S, float>(rng, {rows, cols, batch}, gemm::lut_activations{}) <=
              lut_bound);
        CHECK(product_error<S, half>(rng, {rows, cols, batch}, gemm::lut_activations{}) <=
              lut_bound);
      }
    }
  }
}

// The epilogues with narrow x against the CPU body on the same x as float and the same options:
// y = act(W x + bias) + residual with the residual in y itself, y = gate(W_gate x) * (W_up x) +
// residual, and x gathered through an input order. The CPU body's own error is that of a float
// GEMV, far inside the bound.
template <class S, class X, class Activations>
void check_epilogues(infuse::test::seeded_rng& rng, Activations activations) {
  using gemm::act;
  const std::int64_t rows = 37;
  const std::int64_t cols = 1088;
  for (const std::int64_t batch : {std::int64_t{3}, std::int64_t{9}}) {
    CAPTURE(batch);
    const auto gate_weights = rng.normals(static_cast<std::size_t>(rows * cols), 0.1);
    const auto up_weights = rng.normals(static_cast<std::size_t>(rows * cols), 0.1);
    const auto gate_q =
        quant::quantize<S>(host_view<const float, 2>(gate_weights.data(), {rows, cols}));
    const auto up_q =
        quant::quantize<S>(host_view<const float, 2>(up_weights.data(), {rows, cols}));
    const device_matrix<S> gate_w(gate_q);
    const device_matrix<S> up_w(up_q);
    const std::vector<X> x = rounded<X>(rng.normals(static_cast<std::size_t>(batch * cols)));
    const std::vector<float> x_float = widened(x);
    const auto bias = rng.normals(static_cast<std::size_t>(rows));
    const auto start = rng.normals(static_cast<std::size_t>(batch * rows));  // y's residual
    std::vector<std::int32_t> order(static_cast<std::size_t>(cols));
    std::iota(order.begin(), order.end(), 0);
    std::reverse(order.begin(), order.end());
    const device_buffer<X> x_device = to_device(x);
    const device_buffer<float> bias_device = to_device(bias);
    const device_buffer<std::int32_t> order_device = to_device(order);
    std::vector<float> host_gathered(static_cast<std::size_t>(batch * cols));
    device_buffer<float> device_gathered(batch * cols);
    const host_view<const float, 2> xh(x_float.data(), {batch, cols});
    const device_view<const X, 2> xd(x_device.data(), {batch, cols});

    for (const act activation : {act::none, act::silu, act::gelu}) {
      CAPTURE(static_cast<int>(activation));
      for (const bool gated : {false, true}) {
        CAPTURE(gated);
        const bool reordered = activation == act::gelu;
        std::vector<float> cpu = start;
        device_buffer<float> y_device = to_device(start);
        gemm::gemv_options host_options;
        gemm::gemv_options device_options;
        host_options.residual = cpu.data();
        device_options.residual = y_device.data();
        if (reordered) {
          host_options.input_order = order.data();
          host_options.input_workspace = host_gathered.data();
          device_options.input_order = order_device.data();
          device_options.input_workspace = device_gathered.data();
        }
        const host_view<float, 2> yh(cpu.data(), {batch, rows});
        const device_view<float, 2> yd(y_device.data(), {batch, rows});
        if (gated) {
          infuse::gated_gemv(infuse::exec::cpu{}, gate_q.view(), up_q.view(), xh, yh, activation,
                             host_options);
          infuse::gated_gemv(infuse::exec::cuda{}, gate_w.view, up_w.view, xd, yd, activation,
                             device_options, activations);
        } else {
          host_options.bias = bias.data();
          device_options.bias = bias_device.data();
          host_options.activation = device_options.activation = activation;
          infuse::gemv(infuse::exec::cpu{}, gate_q.view(), xh, yh, host_options);
          infuse::gemv(infuse::exec::cuda{}, gate_w.view, xd, yd, device_options, activations);
        }
        infuse::test::check_launch();
        const std::vector<double> expected(cpu.begin(), cpu.end());
        CHECK(infuse::reference::relative_error(y_device.to_host(), expected) <= 1e-5);
      }
    }
  }
}

TEST_CASE_TEMPLATE(
    "cuda gemv with narrow x: fused epilogues, gated_gemv and input order match the "
    "CPU body",
    X, half, bfloat16) {
  INFUSE_RANDOM(rng);
  check_epilogues<quant::int_<4, 64, quant::zero_point>, X>(rng, gemm::float_activations{});
  check_epilogues<quant::bcq<3, 64>, X>(rng, gemm::lut_activations{});
}

TEST_CASE("cuda LUT-GEMV: fused epilogues, gated_gemv and input order match the CPU body") {
  INFUSE_RANDOM(rng);
  check_epilogues<quant::bcq<2, 32>, float>(rng, gemm::lut_activations{});
}

TEST_CASE("cuda gemv with narrow x throws infuse::error on bad arguments before launching") {
  using S = quant::int_<4, 64>;
  INFUSE_RANDOM(rng);
  const auto weights = rng.normals(6 * 128, 0.1);
  const auto q = quant::quantize<S>(host_view<const float, 2>(weights.data(), {6, 128}));
  const device_matrix<S> w(q);
  const device_buffer<half> x(to_device(std::vector<half>(2 * 128 + 1, half(1.0f))));
  device_buffer<float> y(to_device(std::vector<float>(2 * 6, -7.0f)));
  const auto message = [&](device_view<const half, 2> xv) {
    try {
      infuse::gemv(infuse::exec::cuda{}, w.view, xv, device_view<float, 2>(y.data(), {2, 6}));
    } catch (const infuse::error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  CHECK(message(device_view<const half, 2>(x.data(), {2, 96})) ==
        "infuse::gemv: x.extent(1) is 96, expected 128 (k, the columns of w)");
  CHECK(message(device_view<const half, 2>(x.data(), {2, 128}, {128, 2})) ==
        "infuse::gemv: x.stride(1) is 2, expected 1 (the last dimension must be contiguous)");
  const auto* odd = reinterpret_cast<const half*>(reinterpret_cast<const char*>(x.data()) + 1);
  const std::string misaligned = message(device_view<const half, 2>(odd, {2, 128}));
  CHECK(misaligned.find("x.data()") != std::string::npos);
  CHECK(misaligned.find("aligned to 2 bytes") != std::string::npos);
  infuse::test::check_launch();
  for (const float value : y.to_host()) CHECK(value == -7.0f);  // nothing was written

  // The CUDA tables live in shared memory: lut activations need no workspace there.
  using B = quant::bcq<2, 64>;
  const auto bq = quant::quantize<B>(host_view<const float, 2>(weights.data(), {6, 128}));
  const device_matrix<B> bw(bq);
  CHECK(infuse::test::argument_of([&] {
          infuse::gemv(infuse::exec::cuda{}, bw.view,
                       device_view<const half, 2>(x.data(), {2, 128}),
                       device_view<float, 2>(y.data(), {2, 6}), {}, gemm::lut_activations{});
        }) == "(no error)");
  infuse::test::check_launch();
}

}  // namespace
