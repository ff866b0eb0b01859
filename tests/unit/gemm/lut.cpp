// LUT-GEMV (gemm::lut_activations) for quant::bcq weights against the float64 product of the
// dequantized weights, with the fused epilogues, and its workspace checks.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "infuse/gemm/cpu/gemv.hpp"
#include "infuse/quant/quant.hpp"
#include "reference/gemm.hpp"
#include "support/errors.hpp"
#include "support/random.hpp"

namespace {

namespace quant = infuse::quant;
namespace gemm = infuse::gemm;
using infuse::host_view;

template <class S>
void check_lut(infuse::test::seeded_rng& rng, std::int64_t rows, std::int64_t cols,
               std::int64_t batch, int threads, bool gated) {
  CAPTURE(rows);
  CAPTURE(cols);
  CAPTURE(batch);
  CAPTURE(gated);
  const auto weights = rng.normals(static_cast<std::size_t>(rows * cols), 0.1);
  const auto up_weights = rng.normals(static_cast<std::size_t>(rows * cols), 0.1);
  const auto q = quant::quantize<S>(host_view<const float, 2>(weights.data(), {rows, cols}));
  const auto q_up = quant::quantize<S>(host_view<const float, 2>(up_weights.data(), {rows, cols}));
  const auto x = rng.normals(static_cast<std::size_t>(batch * cols));
  const auto bias = rng.normals(static_cast<std::size_t>(rows));
  std::vector<std::byte> workspace(
      static_cast<std::size_t>(gemm::lut_workspace_bytes(batch, cols)));
  const gemm::lut_activations tables{workspace.data(), std::ssize(workspace)};
  std::vector<float> y(static_cast<std::size_t>(batch * rows), NAN);
  const infuse::exec::cpu exec(threads);
  const host_view<const float, 2> xv(x.data(), {batch, cols});
  const host_view<float, 2> yv(y.data(), {batch, rows});
  if (gated) {
    infuse::gated_gemv(exec, q.view(), q_up.view(), xv, yv, gemm::act::none, {}, tables);
  } else {
    infuse::gemv(exec, q.view(), xv, yv, {.bias = bias.data()}, tables);
  }

  const auto ref = infuse::reference::gemv(q.view(), x, batch);
  const auto ref_up = infuse::reference::gemv(q_up.view(), x, batch);
  const auto magnitude = infuse::reference::lut_magnitude(q.view(), x, batch);
  const auto magnitude_up = infuse::reference::lut_magnitude(q_up.view(), x, batch);
  double worst = 0.0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const std::size_t n = i % static_cast<std::size_t>(rows);
    // Gated with no gate: y = (W x) (U x); its rounding scales with both magnitudes.
    const double want = gated ? ref[i] * ref_up[i] : ref[i] + bias[n];
    const double scale =
        gated ? magnitude[i] * std::fabs(ref_up[i]) + std::fabs(ref[i]) * magnitude_up[i]
              : magnitude[i] + std::fabs(bias[n]);
    worst = std::max(worst, std::fabs(y[i] - want) / std::max(scale, 1e-30));
  }
  CHECK(worst <= 1e-6);
}

}  // namespace

TEST_CASE_TEMPLATE("LUT-GEMV of bcq weights matches the float64 product of the dequantized weights",
                   S, quant::bcq<1, 32>, quant::bcq<2, 64>, quant::bcq<3, 128>,
                   quant::bcq<4, quant::per_channel>) {
  INFUSE_RANDOM(rng);
  const std::int64_t group = S::group > 0 ? S::group : 32;
  check_lut<S>(rng, 1, group, 1, 1, false);   // K of one group
  check_lut<S>(rng, 37, group, 7, 2, false);  // odd N, batch 7
  check_lut<S>(rng, 13, 4 * group, 8, 3, true);
  check_lut<S>(rng, 21, 2 * group, 19, 2, false);  // batch tiles of 8, 8 and 3
  for (int trial = 0; trial < 3; ++trial) {
    check_lut<S>(rng, rng.integer(1, 70) | 1, group * rng.integer(1, 12), rng.integer(1, 8),
                 static_cast<int>(rng.integer(1, 4)), trial == 2);
  }
}

TEST_CASE("LUT-GEMV refuses a missing, misaligned or short workspace, and writes nothing") {
  using S = quant::bcq<2, 32>;
  std::vector<float> weights(6 * 64, 0.5f);
  const auto q = quant::quantize<S>(host_view<const float, 2>(weights.data(), {6, 64}));
  std::vector<float> x(2 * 64, 1.0f);
  std::vector<float> y(2 * 6, -7.0f);
  const auto bytes = gemm::lut_workspace_bytes(2, 64);
  std::vector<std::byte> workspace(static_cast<std::size_t>(bytes) + 1);
  const auto run = [&](gemm::lut_activations tables) {
    infuse::gemv(infuse::exec::cpu{}, q.view(), host_view<const float, 2>(x.data(), {2, 64}),
                 host_view<float, 2>(y.data(), {2, 6}), {}, tables);
  };
  using infuse::test::argument_of;
  CHECK(argument_of([&] { run({nullptr, bytes}); }) == "activations.workspace");
  CHECK(argument_of([&] { run({workspace.data() + 1, bytes}); }) == "activations.workspace");
  CHECK(argument_of([&] { run({workspace.data(), bytes - 1}); }) == "activations.bytes");
  for (const float value : y) CHECK(value == -7.0f);
  CHECK(argument_of([&] { run({workspace.data(), bytes}); }) == "(no error)");
}
