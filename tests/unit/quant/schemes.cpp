#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "infuse/quant/quant.hpp"
#include "support/random.hpp"

namespace {

namespace quant = infuse::quant;
using infuse::host_view;

std::vector<float> random_matrix(infuse::test::seeded_rng& rng, std::int64_t rows,
                                 std::int64_t cols) {
  std::vector<float> w = rng.normals(static_cast<std::size_t>(rows * cols));
  // Rows of different magnitudes and an outlier, as real weight matrices have.
  for (std::int64_t r = 0; r < rows; ++r) {
    const float row_scale = static_cast<float>(std::exp(rng.uniform(-3.0, 2.0)));
    for (std::int64_t c = 0; c < cols; ++c) w[static_cast<std::size_t>(r * cols + c)] *= row_scale;
  }
  w[static_cast<std::size_t>(rng.integer(0, rows * cols - 1))] *= 8.0f;
  return w;
}

template <class S>
quant::quantized<S> quantize_vector(const std::vector<float>& w, std::int64_t rows,
                                    std::int64_t cols, quant::quantize_options options = {}) {
  return quant::quantize<S>(host_view<const float, 2>(w.data(), {rows, cols}), options);
}

template <class S>
double squared_error(const quant::quantized<S>& q, const std::vector<float>& w) {
  const auto m = q.view();
  double error = 0.0;
  for (std::int64_t r = 0; r < m.rows; ++r) {
    for (std::int64_t c = 0; c < m.cols; ++c) {
      const double diff = double(m(r, c)) - w[static_cast<std::size_t>(r * m.cols + c)];
      error += diff * diff;
    }
  }
  return error;
}

// The 32 codes of a block, through code().
template <class S>
std::vector<std::uint32_t> codes_of(const std::uint8_t* block) {
  std::vector<std::uint32_t> codes(quant::block_size);
  for (int j = 0; j < quant::block_size; ++j)
    codes[static_cast<std::size_t>(j)] = S::code(block, j);
  return codes;
}

}  // namespace

// ---- packed layouts, byte by byte as documented in quant/int.hpp and quant/bcq.hpp ----------

TEST_CASE("int8, int4, int3, int2 blocks have the documented byte layout") {
  INFUSE_RANDOM(rng);
  std::uint32_t codes[quant::block_size];
  std::uint8_t block[32];

  for (auto& u : codes) u = static_cast<std::uint32_t>(rng.integer(0, 255));
  quant::int_<8, 32>::pack(codes, block);
  for (int j = 0; j < 32; ++j) CHECK(block[j] == codes[j]);

  for (auto& u : codes) u = static_cast<std::uint32_t>(rng.integer(0, 15));
  quant::int_<4, 32>::pack(codes, block);
  for (int j = 0; j < 16; ++j) CHECK(block[j] == (codes[j] | (codes[j + 16] << 4)));

  for (auto& u : codes) u = static_cast<std::uint32_t>(rng.integer(0, 3));
  quant::int_<2, 32>::pack(codes, block);
  for (int j = 0; j < 8; ++j) {
    CHECK(block[j] ==
          (codes[j] | (codes[j + 8] << 2) | (codes[j + 16] << 4) | (codes[j + 24] << 6)));
  }

  for (auto& u : codes) u = static_cast<std::uint32_t>(rng.integer(0, 7));
  quant::int_<3, 32>::pack(codes, block);
  std::uint32_t high_word = 0;
  for (int j = 0; j < 32; ++j) high_word |= ((codes[j] >> 2) & 1u) << j;
  for (int j = 0; j < 8; ++j) {
    CHECK(block[j] == ((codes[j] & 3) | ((codes[j + 8] & 3) << 2) | ((codes[j + 16] & 3) << 4) |
                       ((codes[j + 24] & 3) << 6)));
  }
  const std::uint32_t stored_word =
      block[8] | (block[9] << 8) | (block[10] << 16) | (std::uint32_t{block[11]} << 24);
  CHECK(stored_word == high_word);
}

TEST_CASE_TEMPLATE("code() reads back what pack() wrote", S, quant::int_<8, 32>, quant::int_<4, 64>,
                   quant::int_<3, 128>, quant::int_<2, 32>, quant::bcq<1, 32>, quant::bcq<3, 64>,
                   quant::bcq<4, 128>, quant::fp8<infuse::fp8_e4m3>, quant::none<infuse::half>,
                   quant::none<float>) {
  INFUSE_RANDOM(rng);
  constexpr int code_bits = S::block_bytes * 8 / quant::block_size;
  std::uint32_t codes[quant::block_size];
  for (auto& u : codes) {
    u = code_bits == 32 ? rng.bits32()
                        : static_cast<std::uint32_t>(rng.integer(0, (1ll << code_bits) - 1));
  }
  std::vector<std::uint8_t> block(S::block_bytes);
  S::pack(codes, block.data());
  CHECK(codes_of<S>(block.data()) == std::vector<std::uint32_t>(codes, codes + 32));
}

TEST_CASE("bcq planes: bit j of plane i is the sign of input j") {
  using S = quant::bcq<2, 32>;
  std::uint32_t codes[quant::block_size] = {};
  codes[0] = 1;   // +1, -1
  codes[9] = 2;   // -1, +1
  codes[31] = 3;  // +1, +1
  std::uint8_t block[S::block_bytes];
  S::pack(codes, block);
  const std::uint8_t expected[8] = {0x01, 0x00, 0x00, 0x80, 0x00, 0x02, 0x00, 0x80};
  for (int b = 0; b < 8; ++b) CHECK(block[b] == expected[b]);
  const float scales[3] = {0.5f, 0.25f, 1.0f};
  const auto p = S::group_params(scales, 0);
  CHECK(quant::dequantize<S>(block, 0, p) == 1.0f + 0.5f - 0.25f);
  CHECK(quant::dequantize<S>(block, 9, p) == 1.0f - 0.5f + 0.25f);
  CHECK(quant::dequantize<S>(block, 31, p) == 1.0f + 0.5f + 0.25f);
  CHECK(quant::dequantize<S>(block, 1, p) == 1.0f - 0.5f - 0.25f);
}

TEST_CASE("the dequantization formulas of the integer schemes") {
  std::uint32_t codes[quant::block_size] = {};
  codes[3] = 0;
  codes[4] = 15;
  codes[5] = 9;
  std::uint8_t block[16];
  quant::int_<4, 32>::pack(codes, block);
  const float scale = 0.5f;
  const auto symmetric = quant::int_<4, 32>::group_params(&scale, 0);
  CHECK(quant::dequantize<quant::int_<4, 32>>(block, 3, symmetric) == -4.0f);
  CHECK(quant::dequantize<quant::int_<4, 32>>(block, 4, symmetric) == 3.5f);
  const auto with_zero = quant::int_<4, 32, quant::zero_point>::group_params(&scale, 9);
  CHECK(quant::dequantize<quant::int_<4, 32, quant::zero_point>>(block, 5, with_zero) == 0.0f);
  CHECK(quant::dequantize<quant::int_<4, 32, quant::zero_point>>(block, 4, with_zero) == 3.0f);
}

// ---- quantize, then dequantize ------------------------------------------------------------------

TEST_CASE_TEMPLATE("round to nearest: every integer weight within half a step", S,
                   quant::int_<8, 32>, quant::int_<4, 128>, quant::int_<4, 64, quant::zero_point>,
                   quant::int_<3, 32>, quant::int_<3, 128, quant::zero_point>,
                   quant::int_<2, 64, quant::zero_point>, quant::int_<2, 32>,
                   quant::int_<8, quant::per_channel, quant::zero_point>,
                   quant::int_<4, quant::per_channel>) {
  INFUSE_RANDOM(rng);
  const std::int64_t rows = rng.integer(1, 9);
  const std::int64_t cols = 128 * rng.integer(1, 3);
  const auto w = random_matrix(rng, rows, cols);
  const auto q = quantize_vector<S>(w, rows, cols);
  const auto m = q.view();
  CHECK(q.codes.size() == static_cast<std::size_t>(rows * cols / 32 * S::block_bytes));
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t c = 0; c < cols; ++c) {
      const float scale = m.scales[m.group_index(r, c / m.group_size())];
      const double error = std::fabs(double(m(r, c)) - w[static_cast<std::size_t>(r * cols + c)]);
      // Half a step, plus the float rounding of w / scale and of scale * (u - zero).
      CHECK(error <= 0.5 * scale * (1 + 1e-5) + 1e-6 * std::fabs(m(r, c)));
    }
  }
}

TEST_CASE_TEMPLATE("fp8 round to nearest: within half an FP8 step of the scaled weight", S,
                   quant::fp8<infuse::fp8_e4m3>, quant::fp8<infuse::fp8_e5m2, 32>,
                   quant::fp8<infuse::fp8_e4m3, quant::per_channel>) {
  INFUSE_RANDOM(rng);
  using format = infuse::float_format<typename S::format>;
  const std::int64_t rows = rng.integer(1, 6);
  const std::int64_t cols = 64 * rng.integer(1, 3);
  const auto w = random_matrix(rng, rows, cols);
  const auto q = quantize_vector<S>(w, rows, cols);
  const auto m = q.view();
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t c = 0; c < cols; ++c) {
      const double scale = m.scales[m.group_index(r, c / m.group_size())];
      const double scaled = w[static_cast<std::size_t>(r * cols + c)] / scale;
      // The FP8 spacing at |scaled|: epsilon times its binade, min_subnormal at the bottom.
      const double binade =
          std::exp2(std::floor(std::log2(std::max(std::fabs(scaled), double(format::min_normal)))));
      const double step = binade * format::epsilon;
      CHECK(std::fabs(double(m(r, c)) / scale - scaled) <= 0.5 * step * (1 + 1e-6));
    }
  }
}

TEST_CASE("none: float is exact, half and bfloat16 round to nearest") {
  INFUSE_RANDOM(rng);
  const auto w = random_matrix(rng, 3, 64);
  const auto exact = quantize_vector<quant::none<float>>(w, 3, 64);
  const auto halves = quantize_vector<quant::none<infuse::half>>(w, 3, 64);
  const auto brains = quantize_vector<quant::none<infuse::bfloat16>>(w, 3, 64);
  for (std::int64_t i = 0; i < 3 * 64; ++i) {
    const float value = w[static_cast<std::size_t>(i)];
    CHECK(exact.view()(i / 64, i % 64) == value);
    CHECK(halves.view()(i / 64, i % 64) == float(infuse::half(value)));
    CHECK(brains.view()(i / 64, i % 64) == float(infuse::bfloat16(value)));
  }
  CHECK(exact.scales.empty());
}

TEST_CASE("bcq: the error falls as bit planes are added") {
  INFUSE_RANDOM(rng);
  const std::int64_t rows = 4;
  const std::int64_t cols = 256;
  const auto w = rng.normals(static_cast<std::size_t>(rows * cols));
  const double errors[] = {
      squared_error(quantize_vector<quant::bcq<1, 128>>(w, rows, cols), w),
      squared_error(quantize_vector<quant::bcq<2, 128>>(w, rows, cols), w),
      squared_error(quantize_vector<quant::bcq<3, 128>>(w, rows, cols), w),
      squared_error(quantize_vector<quant::bcq<4, 128>>(w, rows, cols), w),
  };
  double norm = 0.0;
  for (const float value : w) norm += double(value) * value;
  CHECK(errors[0] < 0.5 * norm);
  for (int b = 1; b < 4; ++b) {
    INFO("bits " << b + 1);
    CHECK(errors[b] < 0.7 * errors[b - 1]);
  }
}

TEST_CASE_TEMPLATE("clip search never does worse than round to nearest", S, quant::int_<4, 128>,
                   quant::int_<3, 64, quant::zero_point>, quant::int_<2, 32, quant::zero_point>,
                   quant::fp8<infuse::fp8_e5m2, 32>) {
  INFUSE_RANDOM(rng);
  // Heavy tails, where clipping pays: cubes of normals. 64 rows keep the ratio within about 0.006
  // of its mean (0.93 at 3 bits, the smallest gain), so 0.96 fails only when the search gains nothing.
  const std::int64_t rows = 64;
  const std::int64_t cols = 256;
  std::vector<float> w = rng.normals(static_cast<std::size_t>(rows * cols));
  for (float& value : w) value = value * value * value;
  const double nearest = squared_error(quantize_vector<S>(w, rows, cols), w);
  const double searched =
      squared_error(quantize_vector<S>(w, rows, cols, {quant::rounding::clip_search, 0.3f, 15}), w);
  CHECK(searched <= nearest);
  if constexpr (!std::is_same_v<S, quant::fp8<infuse::fp8_e5m2, 32>>) {
    CHECK(searched < 0.96 * nearest);  // a real gain on heavy tails at 4 bits and below
  }
}

TEST_CASE_TEMPLATE("dequantize_block gives the 32 weights dequantize gives", S, quant::int_<3, 32>,
                   quant::int_<4, 64, quant::zero_point>, quant::bcq<3, 32>,
                   quant::fp8<infuse::fp8_e4m3, 32>, quant::none<infuse::bfloat16>) {
  INFUSE_RANDOM(rng);
  const auto w = random_matrix(rng, 2, 64);
  const auto q = quantize_vector<S>(w, 2, 64);
  const auto m = q.view();
  for (std::int64_t r = 0; r < 2; ++r) {
    for (std::int64_t b = 0; b < 2; ++b) {
      float block[quant::block_size];
      const auto p = m.group_params(r, b * 32 / m.group_size());
      quant::dequantize_block<S>(m.block(r, b), p, block);
      for (int j = 0; j < 32; ++j) CHECK(block[j] == m(r, b * 32 + j));
    }
  }
}

// ---- sizes, names, bad input ------------------------------------------------------------------

TEST_CASE("storage bytes count codes, scales and zero points exactly") {
  CHECK(quant::storage_bytes<quant::int_<4, 128>>(4096, 4096) == 4096 * 4096 / 2 + 4096 * 32 * 4);
  CHECK(quant::storage_bytes<quant::int_<4, 128, quant::zero_point>>(4096, 4096) ==
        4096 * 4096 / 2 + 4096 * 32 * 5);
  CHECK(quant::storage_bytes<quant::int_<3, 64>>(10, 128) == 10 * 4 * 12 + 10 * 2 * 4);
  CHECK(quant::storage_bytes<quant::int_<2, quant::per_channel>>(10, 128) == 10 * 32 + 10 * 4);
  CHECK(quant::storage_bytes<quant::fp8<infuse::fp8_e4m3>>(10, 128) == 10 * 128 + 4);
  CHECK(quant::storage_bytes<quant::bcq<3, 128>>(2, 256) == 2 * 8 * 12 + 2 * 2 * 4 * 4);
  CHECK(quant::storage_bytes<quant::none<infuse::half>>(3, 64) == 3 * 64 * 2);
  CHECK(quant::bits_per_weight<quant::int_<4, 128>>(4096) == doctest::Approx(4.25));
  CHECK(quant::bits_per_weight<quant::int_<8, 32, quant::zero_point>>(4096) ==
        doctest::Approx(8 + 40.0 / 32));
  INFUSE_RANDOM(rng);
  const auto w = random_matrix(rng, 3, 256);
  const auto q = quantize_vector<quant::int_<3, 64, quant::zero_point>>(w, 3, 256);
  CHECK(std::int64_t(q.codes.size() + q.scales.size() * 4 + q.zeros.size()) == q.bytes());
}

TEST_CASE("scheme names") {
  CHECK(std::string(quant::int_<4, 128>::name) == "int4_g128");
  CHECK(std::string(quant::int_<3, quant::per_channel, quant::zero_point>::name) == "int3_ch_zp");
  CHECK(std::string(quant::fp8<infuse::fp8_e4m3>::name) == "fp8_e4m3_t");
  CHECK(std::string(quant::fp8<infuse::fp8_e5m2, 64>::name) == "fp8_e5m2_g64");
  CHECK(std::string(quant::bcq<2, 32>::name) == "bcq2_g32");
  CHECK(std::string(quant::none<infuse::bfloat16>::name) == "bf16");
}

TEST_CASE("quantize refuses shapes and options the scheme cannot hold, naming the argument") {
  std::vector<float> w(4 * 192, 1.0f);
  const auto failure = [&](auto scheme, std::int64_t cols, quant::quantize_options options = {}) {
    try {
      quant::quantize<decltype(scheme)>(host_view<const float, 2>(w.data(), {4, cols}), options);
    } catch (const infuse::error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  CHECK(failure(quant::int_<4, 32>{}, 100) ==
        "infuse::quant::quantize: k is 100, expected a positive multiple of 32 (the block size)");
  CHECK(failure(quant::int_<4, 128>{}, 192) ==
        "infuse::quant::quantize: k is 192, expected a multiple of the group size 128");
  CHECK(failure(quant::int_<4, 64>{}, 192).empty());
  CHECK(failure(quant::int_<4, 64>{}, 192, {quant::rounding::clip_search, 1.5f, 4}) ==
        "infuse::quant::quantize: options.min_clip is 1.5, expected a ratio in (0, 1)");
  CHECK(failure(quant::int_<4, 64>{}, 0).find("k is 0") != std::string::npos);
  const std::string null_message = [&] {
    try {
      quant::quantize<quant::int_<4, 32>>(host_view<const float, 2>(nullptr, {2, 64}));
    } catch (const infuse::error& e) {
      return std::string(e.what());
    }
    return std::string();
  }();
  CHECK(null_message.find("w.data() is null") != std::string::npos);
}

TEST_CASE("a zero group quantizes to zeros, a constant group exactly") {
  std::vector<float> w(2 * 32, 0.0f);
  for (int c = 0; c < 32; ++c) w[static_cast<std::size_t>(32 + c)] = 3.0f;
  const auto symmetric = quantize_vector<quant::int_<4, 32>>(w, 2, 32);
  const auto asymmetric = quantize_vector<quant::int_<4, 32, quant::zero_point>>(w, 2, 32);
  const auto binary = quantize_vector<quant::bcq<2, 32>>(w, 2, 32);
  for (int c = 0; c < 32; ++c) {
    CHECK(symmetric.view()(0, c) == 0.0f);
    CHECK(asymmetric.view()(0, c) == 0.0f);
    CHECK(binary.view()(0, c) == 0.0f);
    CHECK(symmetric.view()(1, c) == doctest::Approx(3.0f));
    CHECK(asymmetric.view()(1, c) == doctest::Approx(3.0f));
    CHECK(binary.view()(1, c) == 3.0f);
  }
}

static_assert(quant::scheme<quant::int_<2, 64, quant::zero_point>>);
static_assert(!quant::scheme<int>);
static_assert(!quant::scheme<quant::stored_group<quant::int_<4, 32>>>);
