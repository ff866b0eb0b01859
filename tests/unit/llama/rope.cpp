#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "files.hpp"
#include "llama/gguf.hpp"

namespace {

using infuse::llama::rope_pairing;

// RoPE on one head of q (float64): pair m = (first(m), second(m)) rotates by position * theta_m,
// theta_m = base^(-2m / head_dim).
std::vector<double> rope(std::vector<double> q, rope_pairing pairing, int position, double base) {
  const std::size_t half = q.size() / 2;
  for (std::size_t m = 0; m < half; ++m) {
    const std::size_t a = pairing == rope_pairing::interleaved ? 2 * m : m;
    const std::size_t b = pairing == rope_pairing::interleaved ? 2 * m + 1 : m + half;
    const double angle = position * std::pow(base, -2.0 * static_cast<double>(m) / q.size());
    const double x = q[a], y = q[b];
    q[a] = x * std::cos(angle) - y * std::sin(angle);
    q[b] = x * std::sin(angle) + y * std::cos(angle);
  }
  return q;
}

// A float32 tensor [cols, rows] (ggml order) holding `values` row-major.
infuse::llama::tensor f32_tensor(const std::vector<float>& values, std::uint64_t rows) {
  infuse::llama::tensor t;
  t.name = "w";
  t.type = infuse::llama::ggml_type::f32;
  t.dims = {values.size() / rows, rows};
  t.bytes = std::as_bytes(std::span<const float>(values));
  return t;
}

// y = W x for a row-major W of `rows` rows, per head of `head_dim`.
std::vector<double> head_of(const std::vector<float>& w, const std::vector<double>& x, int head,
                            int head_dim) {
  std::vector<double> y(head_dim);
  for (int r = 0; r < head_dim; ++r) {
    for (std::size_t c = 0; c < x.size(); ++c) {
      y[r] += static_cast<double>(w[(head * head_dim + r) * x.size() + c]) * x[c];
    }
  }
  return y;
}

}  // namespace

TEST_CASE("rope_row_order: the two directions are inverse permutations") {
  for (const std::uint64_t head_dim : {2u, 4u, 8u, 64u, 128u}) {
    const auto to_half = infuse::llama::rope_row_order(head_dim, rope_pairing::interleaved,
                                                       rope_pairing::rotate_half);
    const auto to_interleaved = infuse::llama::rope_row_order(head_dim, rope_pairing::rotate_half,
                                                              rope_pairing::interleaved);
    std::vector<bool> seen(head_dim);
    for (std::uint64_t r = 0; r < head_dim; ++r) {
      CHECK(to_interleaved[to_half[r]] == r);
      seen[to_half[r]] = true;
    }
    CHECK(std::count(seen.begin(), seen.end(), true) == static_cast<long>(head_dim));
    // Rotate-half row m is the first of pair m, stored at 2m; row m + head_dim/2 its second.
    CHECK(to_half[1] == (head_dim > 2 ? 2u : 1u));
    CHECK(to_half[head_dim / 2] == 1);
    const auto same = infuse::llama::rope_row_order(head_dim, rope_pairing::rotate_half,
                                                    rope_pairing::rotate_half);
    for (std::uint64_t r = 0; r < head_dim; ++r) CHECK(same[r] == r);
  }
  CHECK_THROWS_AS(
      (void)infuse::llama::rope_row_order(7, rope_pairing::interleaved, rope_pairing::rotate_half),
      infuse::error);
}

TEST_CASE("reordered Q/K rows give rotate-half RoPE the scores of interleaved RoPE") {
  INFUSE_RANDOM(rng);
  const int heads = 3, head_dim = 16, dim = 24;
  const double base = 10000.0;
  const auto wq = rng.normals(static_cast<std::size_t>(heads * head_dim * dim));
  const auto wk = rng.normals(static_cast<std::size_t>(heads * head_dim * dim));
  const auto q_tensor = f32_tensor(wq, heads * head_dim);
  const auto k_tensor = f32_tensor(wk, heads * head_dim);

  // The convert script's direction and back: the identity on the bytes.
  const auto half_bytes = infuse::llama::reorder_rope_rows(
      q_tensor, heads, rope_pairing::interleaved, rope_pairing::rotate_half);
  auto half_tensor = q_tensor;
  half_tensor.bytes = half_bytes;
  const auto back = infuse::llama::reorder_rope_rows(half_tensor, heads, rope_pairing::rotate_half,
                                                     rope_pairing::interleaved);
  CHECK(std::memcmp(back.data(), q_tensor.bytes.data(), back.size()) == 0);
  CHECK(std::memcmp(half_bytes.data(), q_tensor.bytes.data(), back.size()) != 0);

  std::vector<float> wq_half(wq.size()), wk_half(wk.size());
  std::memcpy(wq_half.data(), half_bytes.data(), half_bytes.size());
  const auto k_half_bytes = infuse::llama::reorder_rope_rows(
      k_tensor, heads, rope_pairing::interleaved, rope_pairing::rotate_half);
  std::memcpy(wk_half.data(), k_half_bytes.data(), k_half_bytes.size());

  const auto x = rng.normals<double>(dim);
  const auto z = rng.normals<double>(dim);
  const auto order =
      infuse::llama::rope_row_order(head_dim, rope_pairing::interleaved, rope_pairing::rotate_half);
  for (int head = 0; head < heads; ++head) {
    for (const auto& [query_position, key_position] :
         {std::pair{0, 0}, {5, 2}, {1000, 3}, {7, 7}}) {
      const auto q =
          rope(head_of(wq, x, head, head_dim), rope_pairing::interleaved, query_position, base);
      const auto k =
          rope(head_of(wk, z, head, head_dim), rope_pairing::interleaved, key_position, base);
      const auto q2 = rope(head_of(wq_half, x, head, head_dim), rope_pairing::rotate_half,
                           query_position, base);
      const auto k2 =
          rope(head_of(wk_half, z, head, head_dim), rope_pairing::rotate_half, key_position, base);
      double score = 0.0, score2 = 0.0, rotated_difference = 0.0;
      for (int r = 0; r < head_dim; ++r) {
        score += q[r] * k[r];
        score2 += q2[r] * k2[r];
        rotated_difference = std::max(rotated_difference, std::abs(q2[r] - q[order[r]]));
      }
      CHECK(rotated_difference < 1e-9);
      CHECK(score2 == doctest::Approx(score).epsilon(1e-12));
      // Without the reordering the rotate-half pairing gives other scores.
      const auto q_wrong =
          rope(head_of(wq, x, head, head_dim), rope_pairing::rotate_half, query_position, base);
      const auto k_wrong =
          rope(head_of(wk, z, head, head_dim), rope_pairing::rotate_half, key_position, base);
      double wrong = 0.0;
      for (int r = 0; r < head_dim; ++r) wrong += q_wrong[r] * k_wrong[r];
      if (query_position != key_position) CHECK(std::abs(wrong - score) > 1e-6);
    }
  }
}

TEST_CASE("use_rope_pairing reorders wq and wk of a loaded checkpoint, rows being whole blocks") {
  INFUSE_RANDOM(rng);
  const infuse::test::tiny_shape shape{
      .dim = 64, .hidden = 32, .layers = 2, .heads = 4, .kv_heads = 2, .context = 8};
  std::map<std::string, infuse::test::gguf_tensor_spec> specs;
  infuse::test::gguf_builder::field_map fields;
  const auto bytes =
      infuse::test::tiny_gguf(rng, shape, true,
                              infuse::test::test_vocabulary("\xE2\x96\x81", false, false), specs)
          .build(fields);
  auto model = infuse::llama::load_gguf(infuse::test::as_file("tiny.gguf", bytes));
  const auto original = model;
  infuse::llama::use_rope_pairing(model, rope_pairing::rotate_half);
  CHECK(model.pairing == rope_pairing::rotate_half);
  const auto order =
      infuse::llama::rope_row_order(16, rope_pairing::interleaved, rope_pairing::rotate_half);
  for (int l = 0; l < shape.layers; ++l) {
    // wq is Q8_0, wk Q4_0 in the tiny file: whole rows of blocks move.
    for (const auto& [moved, stored, heads] :
         {std::tuple{&model.layers[l].wq, &original.layers[l].wq, 4},
          std::tuple{&model.layers[l].wk, &original.layers[l].wk, 2}}) {
      const auto after = infuse::llama::to_float(*moved);
      const auto before = infuse::llama::to_float(*stored);
      const std::size_t row = moved->row_length();
      int mismatches = 0;
      for (int head = 0; head < heads; ++head) {
        for (std::size_t r = 0; r < 16; ++r) {
          mismatches += !std::equal(after.begin() + (head * 16 + r) * row,
                                    after.begin() + (head * 16 + r + 1) * row,
                                    before.begin() + (head * 16 + order[r]) * row);
        }
      }
      CHECK(mismatches == 0);
    }
    CHECK(model.layers[l].wv.bytes.data() == original.layers[l].wv.bytes.data());
  }
  infuse::llama::use_rope_pairing(model, rope_pairing::interleaved);
  for (int l = 0; l < shape.layers; ++l) {
    CHECK(infuse::llama::to_float(model.layers[l].wq) ==
          infuse::llama::to_float(original.layers[l].wq));
  }
}
