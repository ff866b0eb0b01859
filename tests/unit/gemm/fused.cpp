// The int8-activation path and the fused epilogues of infuse::gemv / infuse::gated_gemv against
// float64 references.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "infuse/gemm/cpu/gemv.hpp"
#include "infuse/quant/quant.hpp"
#include "reference/gemm.hpp"
#include "support/random.hpp"

namespace {

namespace quant = infuse::quant;
namespace gemm = infuse::gemm;
using infuse::host_view;

// x's int8 quantization as gemm/gemv.hpp documents it, written independently: per block of 32,
// s = max|x| / 127 and q = round_half_even(x / s) in float; returns s * q and the steps s.
std::vector<float> int8_round_trip(const std::vector<float>& x, std::vector<float>& steps) {
  std::vector<float> out(x.size());
  steps.assign(x.size(), 0.0f);
  for (std::size_t start = 0; start < x.size(); start += quant::block_size) {
    float amax = 0.0f;
    for (std::size_t j = start; j < start + quant::block_size; ++j)
      amax = std::max(amax, std::fabs(x[j]));
    const float s = amax / 127.0f;
    for (std::size_t j = start; j < start + quant::block_size; ++j) {
      out[j] = s > 0.0f ? s * std::nearbyint(x[j] / s) : 0.0f;
      steps[j] = s;
    }
  }
  return out;
}

enum class path { machine, portable };

// y = W x with int8 activations, batch rows of k, on the machine's path or the portable one.
template <class S>
std::vector<float> int8_product(const quant::matrix<S>& w, const std::vector<float>& x,
                                std::int64_t batch, int threads, path which) {
  std::vector<float> y(static_cast<std::size_t>(batch * w.rows), NAN);
  std::vector<std::byte> workspace(
      static_cast<std::size_t>(gemm::int8_workspace_bytes(batch, w.cols)));
  const host_view<const float, 2> xv(x.data(), {batch, w.cols});
  const host_view<float, 2> yv(y.data(), {batch, w.rows});
  const gemm::int8_activations activations{workspace.data(), std::int64_t(workspace.size())};
  if (which == path::machine) {
    infuse::gemv(infuse::exec::cpu(threads), w, xv, yv, {}, activations);
  } else {
    const infuse::gemm::cpu::detail::epilogue e{
        nullptr, gemm::act::none, false, gemm::act::none, nullptr, 0, y.data(), w.rows};
    infuse::gemm::cpu::detail::run_int8<false>(infuse::exec::cpu(threads), w,
                                               static_cast<const quant::matrix<S>*>(nullptr), xv, e,
                                               activations);
  }
  return y;
}

template <class S>
void check_int8(infuse::test::seeded_rng& rng, std::int64_t rows, std::int64_t cols,
                std::int64_t batch, int threads, path which) {
  CAPTURE(rows);
  CAPTURE(cols);
  CAPTURE(batch);
  CAPTURE(threads);
  CAPTURE(static_cast<int>(which));
  const auto weights = rng.normals(static_cast<std::size_t>(rows * cols), 0.1);
  const auto q = quant::quantize<S>(host_view<const float, 2>(weights.data(), {rows, cols}));
  const auto w = q.view();
  auto x = rng.normals(static_cast<std::size_t>(batch * cols));
  if (cols >= 64) std::fill(x.begin() + 32, x.begin() + 64, 0.0f);  // a block of zeros: s = 0
  const auto y = int8_product(w, x, batch, threads, which);
  std::vector<float> steps;
  const auto x_hat = int8_round_trip(x, steps);
  const auto exact = infuse::reference::gemv(w, x_hat, batch);
  const auto with_float_x = infuse::reference::gemv(w, x, batch);
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t n = 0; n < rows; ++n) {
      // The kernel forms sum scale (u x_hat) and sum scale zero x_hat: float summation of
      // those, and of nothing else, separates it from `exact`.
      double magnitude = 0.0;
      double x_rounding = 0.0;
      for (std::int64_t k = 0; k < cols; ++k) {
        const auto p = w.group_params(n, k / w.group_size());
        const double u = S::code(w.block(n, k / quant::block_size), int(k % quant::block_size));
        const auto at = static_cast<std::size_t>(b * cols + k);
        magnitude += std::fabs(p.scale) * (u + std::fabs(p.zero)) * std::fabs(x_hat[at]);
        x_rounding += std::fabs(w(n, k)) * 0.5 * steps[at];
      }
      const auto at = static_cast<std::size_t>(b * rows + n);
      CHECK(std::fabs(y[at] - exact[at]) <= 1e-6 * magnitude + 1e-30);
      CHECK(std::fabs(y[at] - with_float_x[at]) <= x_rounding * (1 + 1e-6) + 1e-6 * magnitude);
    }
  }
}

}  // namespace

#define INFUSE_INT8_SCHEMES                                                           \
  quant::int_<4, 128>, quant::int_<4, 32, quant::zero_point>, quant::int_<4, 96>,     \
      quant::int_<8, 64>, quant::int_<8, quant::per_channel, quant::zero_point>,      \
      quant::int_<3, 128>, quant::int_<3, 32, quant::zero_point>, quant::int_<2, 64>, \
      quant::int_<2, quant::per_channel, quant::zero_point>, quant::int_<2, 32>

TEST_CASE_TEMPLATE("int8 activations: exact up to float summation, within x's rounding", S,
                   INFUSE_INT8_SCHEMES) {
  INFUSE_RANDOM(rng);
  const std::int64_t group = S::group > 0 ? S::group : 32;
  for (const path which : {path::machine, path::portable}) {
    check_int8<S>(rng, 1, group, 1, 1, which);
    check_int8<S>(rng, 37, group, 7, 2, which);
    check_int8<S>(rng, 13, 3 * group, 8, 3, which);   // an odd block count when group is
    check_int8<S>(rng, 23, 4 * group, 19, 2, which);  // batch over 8: tiles of batch rows
    check_int8<S>(rng, rng.integer(1, 70), group * rng.integer(1, 12), rng.integer(1, 8),
                  static_cast<int>(rng.integer(1, 4)), which);
  }
}

TEST_CASE("int8 activations refuse a missing or short workspace, naming it") {
  using S = quant::int_<4, 64>;
  std::vector<float> weights(6 * 128, 0.5f);
  const auto q = quant::quantize<S>(host_view<const float, 2>(weights.data(), {6, 128}));
  std::vector<float> x(2 * 128, 1.0f);
  std::vector<float> y(2 * 6, -7.0f);
  std::vector<std::byte> workspace(static_cast<std::size_t>(gemm::int8_workspace_bytes(2, 128)));
  const auto message = [&](gemm::int8_activations activations) {
    try {
      infuse::gemv(infuse::exec::cpu{}, q.view(), host_view<const float, 2>(x.data(), {2, 128}),
                   host_view<float, 2>(y.data(), {2, 6}), {}, activations);
    } catch (const infuse::error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  CHECK(message({nullptr, 1 << 20}).find("activations.workspace is null") != std::string::npos);
  CHECK(message({workspace.data(), std::int64_t(workspace.size()) - 1})
            .find("activations.bytes is " + std::to_string(workspace.size() - 1)) !=
        std::string::npos);
  CHECK(message({workspace.data() + 1, std::int64_t(workspace.size()) - 1})
            .find("aligned to 4 bytes") != std::string::npos);
  for (const float value : y) CHECK(value == -7.0f);
  CHECK(message({workspace.data(), std::int64_t(workspace.size())}).empty());
  for (const float value : y) CHECK(value == doctest::Approx(64.0).epsilon(1e-6));
}

namespace {

double activate(gemm::act function, double v) {
  switch (function) {
    case gemm::act::silu:
      return v / (1.0 + std::exp(-v));
    case gemm::act::gelu:
      return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
    default:
      return v;
  }
}

// gemv with bias, activation and residual, or gated_gemv with residual, float or int8
// activations, against the float64 epilogue of float64 products (of x_hat for int8).
template <class S, class Activations>
void check_epilogue(infuse::test::seeded_rng& rng, std::int64_t rows, std::int64_t cols,
                    std::int64_t batch, gemm::act function, bool gated, bool bias, bool residual,
                    bool in_place) {
  CAPTURE(rows);
  CAPTURE(cols);
  CAPTURE(batch);
  CAPTURE(static_cast<int>(function));
  CAPTURE(gated);
  CAPTURE(bias);
  CAPTURE(residual);
  CAPTURE(in_place);
  constexpr bool int8_x = std::is_same_v<Activations, gemm::int8_activations>;
  const auto quantized = [&] {
    const auto weights = rng.normals(static_cast<std::size_t>(rows * cols), 0.1);
    return quant::quantize<S>(host_view<const float, 2>(weights.data(), {rows, cols}));
  };
  const auto w_gate = quantized();
  const auto w_up = quantized();
  const auto x = rng.normals(static_cast<std::size_t>(batch * cols));
  const auto biases = rng.normals(static_cast<std::size_t>(rows));
  const auto residuals = rng.normals(static_cast<std::size_t>(batch * rows));
  const std::int64_t y_stride = rows + 2;
  std::vector<float> y(static_cast<std::size_t>(batch * y_stride), NAN);
  gemm::gemv_options options;
  if (bias) options.bias = biases.data();
  if (!gated) options.activation = function;
  if (residual) {
    if (in_place) {
      for (std::int64_t b = 0; b < batch; ++b) {
        std::copy_n(residuals.begin() + b * rows, rows, y.begin() + b * y_stride);
      }
      options.residual = y.data();
      options.residual_stride = y_stride;
    } else {
      options.residual = residuals.data();
    }
  }
  std::vector<std::byte> workspace(
      static_cast<std::size_t>(gemm::int8_workspace_bytes(batch, cols)));
  Activations activations{};
  if constexpr (int8_x) activations = {workspace.data(), std::int64_t(workspace.size())};
  const host_view<const float, 2> xv(x.data(), {batch, cols});
  const host_view<float, 2> yv(y.data(), {batch, rows}, {y_stride, 1});
  if (gated) {
    infuse::gated_gemv(infuse::exec::cpu(2), w_gate.view(), w_up.view(), xv, yv, function, options,
                       activations);
  } else {
    infuse::gemv(infuse::exec::cpu(2), w_gate.view(), xv, yv, options, activations);
  }

  std::vector<float> steps;
  const auto x_used = int8_x ? int8_round_trip(x, steps) : x;
  const auto a = infuse::reference::gemv(w_gate.view(), x_used, batch);
  const auto a_magnitude = infuse::reference::gemv_magnitude(w_gate.view(), x_used, batch);
  const auto u = infuse::reference::gemv(w_up.view(), x_used, batch);
  const auto u_magnitude = infuse::reference::gemv_magnitude(w_up.view(), x_used, batch);
  // The kernel's dot products are within eps_dot of their magnitude (the zero-point terms of
  // int8 activations at most double it: |u| + |zero| <= 2 * 2^Bits); silu and gelu have slopes
  // below 1.13; the float activation functions add a few units of rounding.
  const double eps_dot = int8_x ? 1e-5 : 1e-6;
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t n = 0; n < rows; ++n) {
      const auto at = static_cast<std::size_t>(b * rows + n);
      double expected;
      double tolerance;
      if (gated) {
        expected = activate(function, a[at]) * u[at];
        tolerance =
            1.13 * eps_dot * a_magnitude[at] * (std::fabs(u[at]) + eps_dot * u_magnitude[at]) +
            std::fabs(activate(function, a[at])) * eps_dot * u_magnitude[at];
      } else {
        const double v = a[at] + (bias ? biases[static_cast<std::size_t>(n)] : 0.0);
        expected = activate(function, v);
        tolerance = 1.13 * (eps_dot * a_magnitude[at] + 1e-7 * std::fabs(v));
      }
      if (residual) expected += residuals[at];
      tolerance += 4e-7 * (std::fabs(expected) + (residual ? std::fabs(residuals[at]) : 0.0));
      const float out = y[static_cast<std::size_t>(b * y_stride + n)];
      CHECK(std::fabs(out - expected) <= tolerance);
    }
    CHECK(std::isnan(y[static_cast<std::size_t>(b * y_stride + rows)]));
  }
}

}  // namespace

TEST_CASE_TEMPLATE("fused epilogues match float64: bias, silu, gelu, residual", A,
                   gemm::float_activations, gemm::int8_activations) {
  INFUSE_RANDOM(rng);
  using S = quant::int_<4, 64, quant::zero_point>;
  for (const auto function : {gemm::act::none, gemm::act::silu, gemm::act::gelu}) {
    check_epilogue<S, A>(rng, 37, 256, 1, function, false, true, false, false);
    check_epilogue<S, A>(rng, 13, 128, 7, function, false, true, true, false);
    check_epilogue<S, A>(rng, 29, 64, 3, function, false, false, true, true);
    check_epilogue<S, A>(rng, rng.integer(1, 50), 64 * rng.integer(1, 6), rng.integer(1, 20),
                         function, false, rng.integer(0, 1) == 1, rng.integer(0, 1) == 1,
                         rng.integer(0, 1) == 1);
  }
}

TEST_CASE_TEMPLATE("gated_gemv: gate(W_gate x) * (W_up x) in one pass, against float64", A,
                   gemm::float_activations, gemm::int8_activations) {
  INFUSE_RANDOM(rng);
  using S = quant::int_<4, 128>;
  for (const auto function : {gemm::act::silu, gemm::act::gelu, gemm::act::none}) {
    check_epilogue<S, A>(rng, 1, 128, 1, function, true, false, false, false);
    check_epilogue<S, A>(rng, 41, 512, 1, function, true, false, false, false);
    check_epilogue<S, A>(rng, 17, 256, 7, function, true, false, true, false);
    check_epilogue<S, A>(rng, 23, 128, 12, function, true, false, true, true);
  }
}

TEST_CASE("gated_gemv and the epilogue refuse bad arguments, naming them") {
  using S = quant::int_<4, 64>;
  std::vector<float> weights(6 * 128, 0.5f);
  const auto q = quant::quantize<S>(host_view<const float, 2>(weights.data(), {6, 128}));
  const auto q5 = quant::quantize<S>(host_view<const float, 2>(weights.data(), {5, 128}));
  std::vector<float> x(2 * 128, 1.0f);
  std::vector<float> y(2 * 6, -7.0f);
  const host_view<const float, 2> xv(x.data(), {2, 128});
  const host_view<float, 2> yv(y.data(), {2, 6});
  const auto message = [&](auto&& call) {
    try {
      call();
    } catch (const infuse::error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  const auto cpu = infuse::exec::cpu{};
  CHECK(message([&] { infuse::gated_gemv(cpu, q.view(), q5.view(), xv, yv, gemm::act::silu); }) ==
        "infuse::gated_gemv: w_up.rows is 5, expected the rows of w_gate");
  gemm::gemv_options with_bias;
  with_bias.bias = x.data();
  CHECK(message([&] {
          infuse::gated_gemv(cpu, q.view(), q.view(), xv, yv, gemm::act::silu, with_bias);
        }).find("options.bias") != std::string::npos);
  gemm::gemv_options with_activation;
  with_activation.activation = gemm::act::gelu;
  CHECK(message([&] {
          infuse::gated_gemv(cpu, q.view(), q.view(), xv, yv, gemm::act::silu, with_activation);
        }).find("options.activation") != std::string::npos);
  CHECK(message([&] {
          infuse::gated_gemv(cpu, q.view(), q.view(), xv, yv, static_cast<gemm::act>(7));
        }).find("gate is 7") != std::string::npos);
  gemm::gemv_options short_stride;
  short_stride.residual = x.data();
  short_stride.residual_stride = 5;
  CHECK(message([&] { infuse::gemv(cpu, q.view(), xv, yv, short_stride); }) ==
        "infuse::gemv: options.residual_stride is 5, expected 0 or at least n");
  for (const float value : y) CHECK(value == -7.0f);
}
