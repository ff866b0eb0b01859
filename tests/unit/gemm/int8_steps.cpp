// The int8-activation kernel at the shapes of decoding: x's workspace as the kernel lays it out,
// groups of one and of several steps, many passes of rows (the next pass fetched ahead), gated
// pairs, against float64 references.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "infuse/gemm/cpu/gemv.hpp"
#include "infuse/quant/quant.hpp"
#include "reference/gemm.hpp"
#include "support/random.hpp"

namespace {

namespace quant = infuse::quant;
namespace gemm = infuse::gemm;
namespace cpu = infuse::gemm::cpu::detail;
using infuse::host_view;

// Block b's step s = max |x| / 127 and codes round_half_even(x / s), as gemm/gemv.hpp documents.
float block_step(const float* block) {
  float amax = 0.0f;
  for (int j = 0; j < quant::block_size; ++j) amax = std::max(amax, std::fabs(block[j]));
  return amax / 127.0f;
}
int block_code(float value, float step) {
  return step > 0.0f ? static_cast<int>(std::nearbyint(value / step)) : 0;
}

// Every entry of one batch row's workspace: codes in the kernel's order, scales, lane sums (the
// VNNI layout) and group sums.
template <int Bits, bool Vnni>
void check_layout(const std::vector<float>& x, std::int64_t group_size) {
  const auto k = static_cast<std::int64_t>(x.size());
  CAPTURE(k);
  CAPTURE(group_size);
  std::vector<std::byte> workspace(static_cast<std::size_t>(gemm::int8_workspace_bytes(2, k)),
                                   std::byte{0x5A});  // not zero: the padding must be written
  const auto layout = cpu::int8_x_layout::of(workspace.data(), k);
  cpu::quantize_activations<Bits, Vnni>(x.data(), k, group_size, layout, 1);
  const cpu::int8_x_row row = layout.row(1);
  constexpr int per_step = cpu::step_blocks<Bits>;
  constexpr int step_values = per_step * quant::block_size;
  std::vector<double> group_sums(static_cast<std::size_t>(k / group_size), 0.0);
  std::vector<int> expected_q(static_cast<std::size_t>(layout.padded_k), 0);
  for (std::int64_t blk = 0; blk < layout.padded_k / quant::block_size; ++blk) {
    const bool present = blk < k / quant::block_size;
    const float step = present ? block_step(&x[static_cast<std::size_t>(blk * 32)]) : 0.0f;
    const std::int64_t t = blk / per_step;
    const int in_step = static_cast<int>(blk % per_step);
    int sum = 0;
    for (int j = 0; j < quant::block_size; ++j) {
      const int q = present ? block_code(x[static_cast<std::size_t>(blk * 32 + j)], step) : 0;
      sum += q;
      const std::int64_t at = Vnni ? t * step_values + cpu::step_position<Bits>(in_step, j)
                                   : blk * quant::block_size + j;
      expected_q[static_cast<std::size_t>(at)] = q;
    }
    if (present) group_sums[static_cast<std::size_t>(blk * 32 / group_size)] += double(step) * sum;
    if constexpr (Vnni) {
      for (int l = 0; l < 16; ++l) {
        if (cpu::step_lane_block<Bits>(l) == in_step) CHECK(row.scales[t * 16 + l] == step);
      }
    } else {
      CHECK(row.scales[blk] == step);
    }
  }
  for (std::int64_t i = 0; i < layout.padded_k; ++i) {
    CHECK(int(row.q[i]) == expected_q[static_cast<std::size_t>(i)]);
  }
  if constexpr (Vnni) {
    // Lane l of a step: bytes 4l..4l+3 of each vector of 64 codes.
    for (std::int64_t t = 0; t < layout.padded_k / step_values; ++t) {
      for (int l = 0; l < 16; ++l) {
        int sum = 0;
        for (int v = 0; v < step_values; v += 64) {
          for (int i = 0; i < 4; ++i)
            sum += expected_q[static_cast<std::size_t>(t * step_values + v + 4 * l + i)];
        }
        CHECK(row.lane_sums[t * 16 + l] == -sum);
      }
    }
  }
  for (std::size_t g = 0; g < group_sums.size(); ++g) {
    CHECK(row.group_sums[g] == doctest::Approx(group_sums[g]).epsilon(1e-6).scale(1.0));
  }
}

// x with its int8 rounding applied (s * q per block), the x the kernel multiplies exactly.
std::vector<float> int8_rounded(const std::vector<float>& x) {
  std::vector<float> out(x.size());
  for (std::size_t start = 0; start < x.size(); start += quant::block_size) {
    const float step = block_step(&x[start]);
    for (std::size_t j = start; j < start + quant::block_size; ++j) {
      out[j] = step * static_cast<float>(block_code(x[j], step));
    }
  }
  return out;
}

// gemv (or gated_gemv with silu, w_up of its own) with int8 activations on `threads` threads,
// against the float64 product of the dequantized weights with the rounded x: exact up to float
// summation of the lane and group sums.
template <class S>
void check_product(infuse::test::seeded_rng& rng, std::int64_t rows, std::int64_t cols,
                   std::int64_t batch, int threads, bool gated) {
  CAPTURE(rows);
  CAPTURE(cols);
  CAPTURE(batch);
  CAPTURE(threads);
  CAPTURE(gated);
  const auto random_matrix = [&] {
    const auto weights = rng.normals(static_cast<std::size_t>(rows * cols), 0.1);
    return quant::quantize<S>(host_view<const float, 2>(weights.data(), {rows, cols}));
  };
  const auto w = random_matrix();
  const auto w_up = random_matrix();
  auto x = rng.normals(static_cast<std::size_t>(batch * cols));
  std::fill_n(x.begin(), quant::block_size, 0.0f);  // a block of zeros: step 0
  std::vector<float> y(static_cast<std::size_t>(batch * rows), NAN);
  std::vector<std::byte> workspace(
      static_cast<std::size_t>(gemm::int8_workspace_bytes(batch, cols)));
  const gemm::int8_activations activations{workspace.data(), std::int64_t(workspace.size())};
  const host_view<const float, 2> xv(x.data(), {batch, cols});
  const host_view<float, 2> yv(y.data(), {batch, rows});
  const infuse::exec::cpu exec(threads);
  if (gated) {
    infuse::gated_gemv(exec, w.view(), w_up.view(), xv, yv, gemm::act::silu, {}, activations);
  } else {
    infuse::gemv(exec, w.view(), xv, yv, {}, activations);
  }
  const auto x_hat = int8_rounded(x);
  const auto a = infuse::reference::gemv(w.view(), x_hat, batch);
  const auto a_magnitude = infuse::reference::gemv_magnitude(w.view(), x_hat, batch);
  const auto u = infuse::reference::gemv(w_up.view(), x_hat, batch);
  const auto u_magnitude = infuse::reference::gemv_magnitude(w_up.view(), x_hat, batch);
  // |u - zero| <= 2^Bits times the scale: the magnitudes bound the float sums' rounding.
  const double eps = 1e-6 * (1 << S::bits);
  for (std::size_t at = 0; at < y.size(); ++at) {
    if (gated) {
      const double gate = a[at] / (1.0 + std::exp(-a[at]));
      const double tolerance =
          1.13 * eps * a_magnitude[at] * (std::fabs(u[at]) + eps * u_magnitude[at]) +
          std::fabs(gate) * eps * u_magnitude[at] + 1e-6 * std::fabs(gate * u[at]);
      CHECK(std::fabs(y[at] - gate * u[at]) <= tolerance);
    } else {
      CHECK(std::fabs(y[at] - a[at]) <= eps * a_magnitude[at]);
    }
  }
}

}  // namespace

#define INFUSE_STEP_SCHEMES                                                             \
  quant::int_<4, 128>, quant::int_<4, 256>, quant::int_<8, 64>, quant::int_<8, 128>,    \
      quant::int_<3, 128>, quant::int_<2, 128>, quant::int_<2, 256, quant::zero_point>, \
      quant::int_<4, 128, quant::zero_point>, quant::int_<4, 32>,                       \
      quant::int_<8, quant::per_channel>

TEST_CASE_TEMPLATE("int8 activations: the workspace holds x's codes, scales and sums in order", S,
                   quant::int_<8, 64>, quant::int_<4, 128>, quant::int_<3, 128>,
                   quant::int_<2, 32>) {
  INFUSE_RANDOM(rng);
  for (const std::int64_t k : {std::int64_t{32}, std::int64_t{128}, std::int64_t{160},
                               std::int64_t{2048}, 32 * rng.integer(1, 80)}) {
    auto x = rng.normals(static_cast<std::size_t>(k), 3.0);
    std::fill_n(x.begin(), quant::block_size, 0.0f);  // step 0
    x[static_cast<std::size_t>(k - 1)] = -50.0f;      // the largest magnitude negative
    check_layout<S::bits, false>(x, quant::block_size);
    if constexpr (cpu::has_vnni) check_layout<S::bits, true>(x, quant::block_size);
  }
}

TEST_CASE_TEMPLATE("int8 activations at decoding shapes: exact up to float summation", S,
                   INFUSE_STEP_SCHEMES) {
  INFUSE_RANDOM(rng);
  const std::int64_t group = S::group > 0 ? S::group : 128;
  check_product<S>(rng, 67, 2048, 1, 2, false);  // 16 passes of 4 rows and 3 single rows
  check_product<S>(rng, 24, 4 * group, 1, 1, true);
  check_product<S>(rng, 9, 2 * group, 2, 2, false);
  check_product<S>(rng, rng.integer(1, 40), group * rng.integer(1, 6), rng.integer(1, 9),
                   static_cast<int>(rng.integer(1, 3)), rng.integer(0, 1) == 1);
}
