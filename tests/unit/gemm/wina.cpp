// gemm::wina_gemv against the float64 product over the inputs that pass WINA's test
// |x_i| * ||W(:, i)|| >= threshold, per batch row, with the epilogue; threshold 0 is the dense
// product; bad input is refused by name before anything is written.
#include "infuse/gemm/cpu/wina.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "infuse/quant/quant.hpp"
#include "support/errors.hpp"
#include "support/random.hpp"

namespace {

namespace quant = infuse::quant;
namespace gemm = infuse::gemm;
using infuse::host_view;

template <class S>
void check_wina(infuse::test::seeded_rng& rng, std::int64_t k, std::int64_t n, std::int64_t batch,
                double share, int threads) {
  CAPTURE(k);
  CAPTURE(n);
  CAPTURE(batch);
  CAPTURE(share);
  // W^T (k, n), columns of W with norms spread over two orders of magnitude.
  std::vector<float> w_t_values = rng.normals(static_cast<std::size_t>(k * n), 0.1);
  for (std::int64_t i = 0; i < k; ++i) {
    const double spread = std::exp(rng.uniform(-2.3, 2.3));
    for (std::int64_t j = 0; j < n; ++j) w_t_values[static_cast<std::size_t>(i * n + j)] *= spread;
  }
  const auto q = quant::quantize<S>(host_view<const float, 2>(w_t_values.data(), {k, n}));
  const auto w_t = q.view();
  const auto norms = gemm::wina_column_norms(w_t);
  const auto x = rng.normals(static_cast<std::size_t>(batch * k));
  const auto residual = rng.normals(static_cast<std::size_t>(batch * n));
  // The threshold that keeps about `share` of the (batch row, input) pairs.
  std::vector<float> scores;
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t i = 0; i < k; ++i) {
      scores.push_back(std::fabs(x[static_cast<std::size_t>(b * k + i)]) *
                       norms[static_cast<std::size_t>(i)]);
    }
  }
  std::sort(scores.begin(), scores.end());
  const float threshold =
      share >= 1.0 ? 0.0f
                   : scores[static_cast<std::size_t>((1.0 - share) * double(scores.size() - 1))];

  std::vector<float> y(static_cast<std::size_t>(batch * n), NAN);
  std::vector<std::byte> workspace(
      static_cast<std::size_t>(gemm::wina_workspace_bytes(batch, k, n, threads)));
  gemm::wina_gemv(infuse::exec::cpu(threads), w_t, norms,
                  host_view<const float, 2>(x.data(), {batch, k}),
                  host_view<float, 2>(y.data(), {batch, n}), threshold,
                  {.activation = gemm::act::silu, .residual = residual.data()}, workspace);

  double worst = 0.0;
  std::int64_t kept = 0;
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t j = 0; j < n; ++j) {
      double dot = 0.0;
      double magnitude = 0.0;
      for (std::int64_t i = 0; i < k; ++i) {
        const float xi = x[static_cast<std::size_t>(b * k + i)];
        // The test in float, as the kernel makes it: a threshold equal to a score keeps it.
        if (std::fabs(xi) * norms[static_cast<std::size_t>(i)] < threshold) continue;
        kept += j == 0;
        dot += double(w_t(i, j)) * xi;
        magnitude += std::fabs(double(w_t(i, j)) * xi);
      }
      const double silu = dot / (1.0 + std::exp(-dot));
      const double want = silu + residual[static_cast<std::size_t>(b * n + j)];
      const double got = y[static_cast<std::size_t>(b * n + j)];
      worst = std::max(worst, std::fabs(got - want) / (magnitude + std::fabs(want) + 1e-30));
    }
  }
  CHECK(worst <= 1e-6);
  if (share < 1.0) CHECK(double(kept) <= share * double(batch * k) + double(batch) + 1.0);
}

}  // namespace

TEST_CASE_TEMPLATE("wina_gemv equals the float64 product over the inputs that pass", S,
                   quant::int_<4, 128>, quant::int_<8, 32, quant::zero_point>,
                   quant::none<infuse::half>) {
  INFUSE_RANDOM(rng);
  const std::int64_t group = S::group > 0 ? S::group : 32;
  check_wina<S>(rng, 1, group, 1, 1.0, 1);            // one input, dense
  check_wina<S>(rng, 37, 4 * group, 1, 0.35, 2);      // odd k, 65% of inputs skipped
  check_wina<S>(rng, 64, 5 * group, 7, 0.5, 2);       // batch 7: union of the rows' inputs
  check_wina<S>(rng, 100, 1024 + group, 11, 0.2, 3);  // outputs past one chunk, two batch tiles
}

TEST_CASE("wina_gemv refuses bad input by name and writes nothing") {
  using S = quant::int_<4, 32>;
  std::vector<float> values(16 * 64, 0.25f);
  const auto q = quant::quantize<S>(host_view<const float, 2>(values.data(), {16, 64}));
  const auto norms = gemm::wina_column_norms(q.view());
  std::vector<float> x(2 * 16, 1.0f), y(2 * 64, -7.0f);
  std::vector<std::byte> workspace(static_cast<std::size_t>(
      gemm::wina_workspace_bytes(2, 16, 64, infuse::exec::cpu{}.threads())));
  const auto run = [&](std::span<const float> n, float threshold, std::span<std::byte> ws,
                       std::int64_t x_cols) {
    return infuse::test::argument_of([&] {
      gemm::wina_gemv(infuse::exec::cpu{}, q.view(), n,
                      host_view<const float, 2>(x.data(), {2, x_cols}),
                      host_view<float, 2>(y.data(), {2, 64}), threshold, {}, ws);
    });
  };
  CHECK(run(std::span(norms).first(15), 0.1f, workspace, 16) == "norms");
  CHECK(run(norms, -1.0f, workspace, 16) == "threshold");
  CHECK(run(norms, NAN, workspace, 16) == "threshold");
  CHECK(run(norms, 0.1f, std::span(workspace).first(workspace.size() - 1), 16) ==
        "workspace.size()");
  CHECK(run(norms, 0.1f, workspace, 8) == "x.extent(1)");
  for (const float value : y) CHECK(value == -7.0f);
  CHECK(run(norms, 0.1f, workspace, 16) == "(no error)");
}
