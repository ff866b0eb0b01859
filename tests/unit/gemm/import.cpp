// GPTQ (with and without act-order) and AWQ checkpoint tensors repacked by quant::from_gptq /
// from_awq: every weight equal to the checkpoint's scale * (code - zero), and gemv through the
// act-order input permutation equal to the float64 product with the checkpoint's weights.
#include "infuse/quant/import.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <tuple>
#include <vector>

#include "infuse/gemm/cpu/gemv.hpp"
#include "support/errors.hpp"
#include "support/random.hpp"

namespace {

namespace quant = infuse::quant;
using infuse::half;
using infuse::host_view;
using infuse::test::argument_of;

constexpr int group = 32;

// A checkpoint's tensors and the weights they stand for.
struct checkpoint {
  std::int64_t k;
  std::int64_t n;
  std::vector<std::int32_t> qweight;
  std::vector<std::int32_t> qzeros;
  std::vector<half> scales;
  std::vector<std::int32_t> g_idx;  // GPTQ act-order only
  std::vector<double> weights;      // (n, k): scale * (code - zero) of input k's group
};

void put_nibble(std::int32_t& word, int i, std::uint32_t value) {
  word = static_cast<std::int32_t>(static_cast<std::uint32_t>(word) | (value << (4 * i)));
}

// GPTQ tensors of random codes, zeros and scales; with act_order the inputs of a group are a
// random subset (g_idx[perm[i]] = i / G), as desc_act quantization leaves them.
checkpoint random_gptq(infuse::test::seeded_rng& rng, std::int64_t k, std::int64_t n,
                       bool act_order) {
  const std::int64_t groups = k / group;
  checkpoint c{k, n, {}, {}, {}, {}, {}};
  c.qweight.assign(static_cast<std::size_t>(k / 8 * n), 0);
  c.qzeros.assign(static_cast<std::size_t>(groups * (n / 8)), 0);
  std::vector<std::int32_t> group_of(static_cast<std::size_t>(k));
  for (std::int64_t i = 0; i < k; ++i)
    group_of[static_cast<std::size_t>(i)] = std::int32_t(i / group);
  if (act_order) {
    std::vector<std::int32_t> perm(static_cast<std::size_t>(k));
    std::iota(perm.begin(), perm.end(), 0);
    std::mt19937 engine(static_cast<std::uint32_t>(rng.bits32()));
    std::shuffle(perm.begin(), perm.end(), engine);
    for (std::int64_t i = 0; i < k; ++i) {
      group_of[static_cast<std::size_t>(perm[static_cast<std::size_t>(i)])] =
          std::int32_t(i / group);
    }
    c.g_idx = group_of;
  }
  std::vector<std::uint32_t> zeros(static_cast<std::size_t>(groups * n));
  for (std::int64_t g = 0; g < groups; ++g) {
    for (std::int64_t row = 0; row < n; ++row) {
      const auto zero = static_cast<std::uint32_t>(rng.integer(1, 15));
      zeros[static_cast<std::size_t>(g * n + row)] = zero;
      put_nibble(c.qzeros[static_cast<std::size_t>(g * (n / 8) + row / 8)], int(row % 8), zero - 1);
      c.scales.push_back(half(static_cast<float>(rng.uniform(0.01, 0.1))));
    }
  }
  c.weights.resize(static_cast<std::size_t>(n * k));
  for (std::int64_t i = 0; i < k; ++i) {
    const std::int64_t g = group_of[static_cast<std::size_t>(i)];
    for (std::int64_t row = 0; row < n; ++row) {
      const auto code = static_cast<std::uint32_t>(rng.integer(0, 15));
      put_nibble(c.qweight[static_cast<std::size_t>(i / 8 * n + row)], int(i % 8), code);
      c.weights[static_cast<std::size_t>(row * k + i)] =
          static_cast<double>(static_cast<float>(c.scales[static_cast<std::size_t>(g * n + row)])) *
          (double(code) - double(zeros[static_cast<std::size_t>(g * n + row)]));
    }
  }
  return c;
}

// AWQ tensors: outputs packed in the nibble order {0, 2, 4, 6, 1, 3, 5, 7}.
checkpoint random_awq(infuse::test::seeded_rng& rng, std::int64_t k, std::int64_t n) {
  constexpr int order[8] = {0, 2, 4, 6, 1, 3, 5, 7};
  const std::int64_t groups = k / group;
  checkpoint c{k, n, {}, {}, {}, {}, {}};
  c.qweight.assign(static_cast<std::size_t>(k * (n / 8)), 0);
  c.qzeros.assign(static_cast<std::size_t>(groups * (n / 8)), 0);
  std::vector<std::uint32_t> zeros(static_cast<std::size_t>(groups * n));
  for (std::int64_t g = 0; g < groups; ++g) {
    for (std::int64_t word = 0; word < n / 8; ++word) {
      for (int p = 0; p < 8; ++p) {
        const auto zero = static_cast<std::uint32_t>(rng.integer(0, 15));
        zeros[static_cast<std::size_t>(g * n + word * 8 + order[p])] = zero;
        put_nibble(c.qzeros[static_cast<std::size_t>(g * (n / 8) + word)], p, zero);
      }
    }
    for (std::int64_t row = 0; row < n; ++row) {
      c.scales.push_back(half(static_cast<float>(rng.uniform(0.01, 0.1))));
    }
  }
  c.weights.resize(static_cast<std::size_t>(n * k));
  for (std::int64_t i = 0; i < k; ++i) {
    const std::int64_t g = i / group;
    for (std::int64_t word = 0; word < n / 8; ++word) {
      for (int p = 0; p < 8; ++p) {
        const std::int64_t row = word * 8 + order[p];
        const auto code = static_cast<std::uint32_t>(rng.integer(0, 15));
        put_nibble(c.qweight[static_cast<std::size_t>(i * (n / 8) + word)], p, code);
        c.weights[static_cast<std::size_t>(row * k + i)] =
            static_cast<double>(
                static_cast<float>(c.scales[static_cast<std::size_t>(g * n + row)])) *
            (double(code) - double(zeros[static_cast<std::size_t>(g * n + row)]));
      }
    }
  }
  return c;
}

// The repacked matrix holds the checkpoint's weights exactly (column c is input order[c]), and
// gemv through the order equals the float64 product with them.
void check_import(infuse::test::seeded_rng& rng, const checkpoint& c,
                  const quant::imported<group>& imported, std::int64_t batch) {
  const auto w = imported.weights.view();
  REQUIRE(w.rows == c.n);
  REQUIRE(w.cols == c.k);
  const auto input = [&](std::int64_t col) {
    return imported.input_order.empty() ? col : imported.input_order[static_cast<std::size_t>(col)];
  };
  int wrong = 0;
  for (std::int64_t row = 0; row < c.n; ++row) {
    for (std::int64_t col = 0; col < c.k; ++col) {
      wrong += double(w(row, col)) != c.weights[static_cast<std::size_t>(row * c.k + input(col))];
    }
  }
  CHECK(wrong == 0);

  const auto x = rng.normals(static_cast<std::size_t>(batch * c.k));
  std::vector<float> y(static_cast<std::size_t>(batch * c.n));
  std::vector<float> gathered(static_cast<std::size_t>(batch * c.k));
  infuse::gemm::gemv_options options;
  if (!imported.input_order.empty()) {
    options.input_order = imported.input_order.data();
    options.input_workspace = gathered.data();
  }
  infuse::gemv(infuse::exec::cpu(2), w, host_view<const float, 2>(x.data(), {batch, c.k}),
               host_view<float, 2>(y.data(), {batch, c.n}), options);
  double worst = 0.0;
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t row = 0; row < c.n; ++row) {
      double want = 0.0;
      double magnitude = 0.0;
      for (std::int64_t i = 0; i < c.k; ++i) {
        const double term = c.weights[static_cast<std::size_t>(row * c.k + i)] *
                            x[static_cast<std::size_t>(b * c.k + i)];
        want += term;
        magnitude += std::fabs(term);
      }
      worst = std::max(worst, std::fabs(y[static_cast<std::size_t>(b * c.n + row)] - want) /
                                  std::max(magnitude, 1e-30));
    }
  }
  CHECK(worst <= 1e-6);
}

}  // namespace

TEST_CASE("GPTQ tensors repack exactly, and gemv reads x through the act-order permutation") {
  INFUSE_RANDOM(rng);
  for (const bool act_order : {false, true}) {
    CAPTURE(act_order);
    for (const auto& [k, n, batch] :
         {std::tuple<std::int64_t, std::int64_t, std::int64_t>{32, 8, 1},
          std::tuple<std::int64_t, std::int64_t, std::int64_t>{256, 40, 3},
          std::tuple<std::int64_t, std::int64_t, std::int64_t>{128 * rng.integer(1, 4), 24, 7}}) {
      const checkpoint c = random_gptq(rng, k, n, act_order);
      const auto imported = quant::from_gptq<group>(c.qweight, c.qzeros, c.scales, c.g_idx, k, n);
      CHECK(imported.input_order.empty() == !act_order);
      check_import(rng, c, imported, batch);
    }
  }
}

TEST_CASE("AWQ tensors repack exactly, outputs in AWQ's nibble order") {
  INFUSE_RANDOM(rng);
  for (const auto& [k, n, batch] : {std::tuple{32, 8, 1}, std::tuple{256, 40, 5}}) {
    const checkpoint c = random_awq(rng, k, n);
    check_import(rng, c, quant::from_awq<group>(c.qweight, c.qzeros, c.scales, k, n), batch);
  }
}

TEST_CASE("GPTQ and AWQ import and the input order refuse bad input, naming it") {
  INFUSE_RANDOM(rng);
  const checkpoint c = random_gptq(rng, 64, 16, true);
  const auto gptq = [&](std::vector<std::int32_t> g_idx, std::int64_t k) {
    return argument_of(
        [&] { (void)quant::from_gptq<group>(c.qweight, c.qzeros, c.scales, g_idx, k, 16); });
  };
  CHECK(gptq(c.g_idx, 64) == "(no error)");
  CHECK(gptq(c.g_idx, 48) == "k");
  CHECK(gptq(c.g_idx, 128) == "qweight");
  auto short_group = c.g_idx;
  short_group[std::size_t(std::find(short_group.begin(), short_group.end(), 0) -
                          short_group.begin())] = 1;
  CHECK(gptq(short_group, 64) == "g_idx");
  auto out_of_range = c.g_idx;
  out_of_range[5] = 2;
  CHECK(gptq(out_of_range, 64) == "g_idx[5]");
  CHECK(argument_of([&] {
          const std::span<const half> scales(c.scales.data(), c.scales.size() - 1);
          (void)quant::from_awq<group>(c.qweight, c.qzeros, scales, 64, 16);
        }) == "scales");
  CHECK(argument_of([&] { (void)quant::from_awq<group>(c.qweight, c.qzeros, c.scales, 64, 12); }) ==
        "n");

  const auto imported = quant::from_gptq<group>(c.qweight, c.qzeros, c.scales, c.g_idx, 64, 16);
  std::vector<float> x(64, 1.0f), y(16, -7.0f), gathered(64);
  auto order = imported.input_order;
  const auto run = [&](const std::int32_t* input_order, float* workspace) {
    return argument_of([&] {
      infuse::gemv(infuse::exec::cpu{}, imported.weights.view(),
                   host_view<const float, 2>(x.data(), {1, 64}),
                   host_view<float, 2>(y.data(), {1, 16}),
                   {.input_order = input_order, .input_workspace = workspace});
    });
  };
  CHECK(run(order.data(), nullptr) == "options.input_workspace");
  order[9] = 64;
  CHECK(run(order.data(), gathered.data()) == "options.input_order[9]");
  for (const float value : y) CHECK(value == -7.0f);
  order[9] = imported.input_order[9];
  CHECK(run(order.data(), gathered.data()) == "(no error)");
}
