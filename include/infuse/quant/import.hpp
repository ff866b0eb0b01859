// GPTQ and AWQ 4-bit checkpoints as quant::int_<4, G, zero_point>, repacked without
// re-quantizing: the codes move into infuse's blocks, fp16 scales widen to float, zero points are
// read as each format stores them. See docs/policies.md#quantization-schemes.
//
//   auto w = quant::from_gptq<128>(qweight, qzeros, scales, g_idx, k, n);
//   infuse::gemv(exec, w.weights.view(), x, y, {.input_order = w.input_order.data(),
//                                               .input_workspace = scratch.data()});
//
// GPTQ: qweight int32 (K/8, N): bits 4i..4i+3 of qweight[k/8][n] hold the code of input
//       k = 8*(k/8) + i of output n; qzeros int32 (K/G, N/8): nibble i of qzeros[g][n/8] holds
//       the zero of output 8*(n/8) + i, stored minus one (the original packer's convention;
//       gptq_zeros::stored for checkpoints that store the zero itself); scales fp16 (K/G, N);
//       g_idx int32 (K): the group of input k. Without act-order g_idx[k] = k / G. With act-order
//       (desc_act) a group's inputs are scattered: the repacked matrix takes its columns in
//       group order (a stable sort of g_idx), so each group is G consecutive columns again, and
//       input_order[c] names the input that column c multiplies: gemv reads x through it.
// AWQ:  qweight int32 (K, N/8): nibble p of qweight[k][n/8] holds output 8*(n/8) + order[p],
//       order = {0, 2, 4, 6, 1, 3, 5, 7}; qzeros int32 (K/G, N/8) in the same nibble order, the
//       zero stored as is; scales fp16 (K/G, N). Inputs keep their order.
// In both, w = scale * (code - zero).
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include "infuse/core/error.hpp"
#include "infuse/core/float_types.hpp"
#include "infuse/quant/int.hpp"
#include "infuse/quant/matrix.hpp"

namespace infuse::quant {

enum class gptq_zeros {
  minus_one,  // stored = zero - 1 (the original GPTQ packer)
  stored,     // the zero itself
};

// A repacked checkpoint matrix: weights (N, K) and, when its inputs were reordered, the input
// each column multiplies (empty: column c multiplies input c).
template <int Group>
struct imported {
  quantized<int_<4, Group, zero_point>> weights;
  std::vector<std::int32_t> input_order;
};

namespace detail {

inline std::uint32_t nibble(std::uint32_t word, int i) {
  return (word >> (4 * i)) & 15u;
}

// Writes the 4-bit code u of (row n, column c) into an int4 split block matrix.
inline void put_int4(std::vector<std::uint8_t>& codes, std::int64_t k, std::int64_t n,
                     std::int64_t c, std::uint32_t u) {
  constexpr int block_bytes = int_<4, 32>::block_bytes;
  const std::int64_t j = c % block_size;
  std::uint8_t& byte = codes[static_cast<std::size_t>(
      (n * (k / block_size) + c / block_size) * block_bytes + j % 16)];
  byte = static_cast<std::uint8_t>(j < 16 ? (byte & 0xF0u) | u : (byte & 0x0Fu) | (u << 4));
}

template <int Group>
void require_import_shape(std::string_view call, std::int64_t k, std::int64_t n) {
  static_assert(Group > 0 && Group % block_size == 0,
                "infuse: GPTQ and AWQ import takes a group size that is a multiple of 32; see "
                "docs/policies.md#quantization-schemes");
  require(k > 0 && k % Group == 0, call, "k", k,
          "a positive multiple of the group size " + std::to_string(Group));
  require(n > 0 && n % 8 == 0, call, "n", n, "a positive multiple of 8 (outputs per int32)");
}

inline void require_size(std::string_view call, std::string_view name, std::size_t size,
                         std::int64_t expected, std::string_view shape) {
  require(static_cast<std::int64_t>(size) == expected, call, name, size,
          std::to_string(expected) + " elements, " + std::string(shape));
}

// An (n, k) int4 matrix with zeroed codes, its scales widened and its zero points read from the
// (K/G, N/8) words of qzeros: output `row` in nibble nibble_of(row) of its word, plus zero_offset.
template <int Group, class NibbleOf>
quantized<int_<4, Group, zero_point>> int4_shell(std::span<const std::int32_t> qzeros,
                                                 std::span<const half> scales, std::int64_t k,
                                                 std::int64_t n, NibbleOf&& nibble_of,
                                                 std::uint32_t zero_offset) {
  const std::int64_t groups = k / Group;
  quantized<int_<4, Group, zero_point>> w;
  w.rows = n;
  w.cols = k;
  w.codes.assign(static_cast<std::size_t>(storage_bytes<int_<4, Group>>(n, k)), 0);
  w.scales.resize(static_cast<std::size_t>(n * groups));
  w.zeros.resize(static_cast<std::size_t>(n * groups));
  for (std::int64_t g = 0; g < groups; ++g) {
    for (std::int64_t row = 0; row < n; ++row) {
      const auto word =
          static_cast<std::uint32_t>(qzeros[static_cast<std::size_t>(g * (n / 8) + row / 8)]);
      w.scales[static_cast<std::size_t>(row * groups + g)] =
          static_cast<float>(scales[static_cast<std::size_t>(g * n + row)]);
      w.zeros[static_cast<std::size_t>(row * groups + g)] =
          static_cast<std::uint8_t>((nibble(word, nibble_of(row)) + zero_offset) & 15u);
    }
  }
  return w;
}

}  // namespace detail

template <int Group>
imported<Group> from_gptq(std::span<const std::int32_t> qweight,
                          std::span<const std::int32_t> qzeros, std::span<const half> scales,
                          std::span<const std::int32_t> g_idx, std::int64_t k, std::int64_t n,
                          gptq_zeros zeros = gptq_zeros::minus_one) {
  constexpr std::string_view call = "infuse::quant::from_gptq";
  detail::require_import_shape<Group>(call, k, n);
  const std::int64_t groups = k / Group;
  detail::require_size(call, "qweight", qweight.size(), k / 8 * n, "(K/8, N)");
  detail::require_size(call, "qzeros", qzeros.size(), groups * (n / 8), "(K/G, N/8)");
  detail::require_size(call, "scales", scales.size(), groups * n, "(K/G, N)");
  require(g_idx.empty() || std::ssize(g_idx) == k, call, "g_idx", g_idx.size(),
          "empty (no act-order) or K = " + std::to_string(k) + " group indices");
  // Columns in group order; every group must hold exactly Group inputs.
  std::vector<std::int32_t> order(static_cast<std::size_t>(k));
  std::iota(order.begin(), order.end(), 0);
  if (!g_idx.empty()) {
    std::vector<std::int64_t> count(static_cast<std::size_t>(groups), 0);
    for (std::int64_t i = 0; i < k; ++i) {
      const std::int32_t g = g_idx[static_cast<std::size_t>(i)];
      require(g >= 0 && g < groups, call, "g_idx[" + std::to_string(i) + "]", g,
              "a group index below K/G = " + std::to_string(groups));
      ++count[static_cast<std::size_t>(g)];
    }
    for (std::int64_t g = 0; g < groups; ++g) {
      require(count[static_cast<std::size_t>(g)] == Group, call, "g_idx",
              count[static_cast<std::size_t>(g)],
              "exactly " + std::to_string(Group) + " inputs in group " + std::to_string(g));
    }
    std::stable_sort(order.begin(), order.end(), [&](std::int32_t a, std::int32_t b) {
      return g_idx[static_cast<std::size_t>(a)] < g_idx[static_cast<std::size_t>(b)];
    });
  }
  imported<Group> out{
      detail::int4_shell<Group>(
          qzeros, scales, k, n, [](std::int64_t row) { return static_cast<int>(row % 8); },
          zeros == gptq_zeros::minus_one ? 1u : 0u),
      {}};
  auto& w = out.weights;
  for (std::int64_t c = 0; c < k; ++c) {
    const std::int64_t input = order[static_cast<std::size_t>(c)];
    for (std::int64_t row = 0; row < n; ++row) {
      const auto word =
          static_cast<std::uint32_t>(qweight[static_cast<std::size_t>(input / 8 * n + row)]);
      detail::put_int4(w.codes, k, row, c, detail::nibble(word, static_cast<int>(input % 8)));
    }
  }
  if (!g_idx.empty()) out.input_order = std::move(order);
  return out;
}

template <int Group>
imported<Group> from_awq(std::span<const std::int32_t> qweight,
                         std::span<const std::int32_t> qzeros, std::span<const half> scales,
                         std::int64_t k, std::int64_t n) {
  constexpr std::string_view call = "infuse::quant::from_awq";
  detail::require_import_shape<Group>(call, k, n);
  const std::int64_t groups = k / Group;
  detail::require_size(call, "qweight", qweight.size(), k * (n / 8), "(K, N/8)");
  detail::require_size(call, "qzeros", qzeros.size(), groups * (n / 8), "(K/G, N/8)");
  detail::require_size(call, "scales", scales.size(), groups * n, "(K/G, N)");
  // Nibble p of a word holds output 8 * (n / 8) + awq_order[p]; nibble_of is its inverse.
  static constexpr int nibble_of[8] = {0, 4, 1, 5, 2, 6, 3, 7};
  const auto nibble_in_word = [](std::int64_t row) { return nibble_of[row % 8]; };
  imported<Group> out{detail::int4_shell<Group>(qzeros, scales, k, n, nibble_in_word, 0u), {}};
  auto& w = out.weights;
  for (std::int64_t c = 0; c < k; ++c) {
    for (std::int64_t row = 0; row < n; ++row) {
      const auto word =
          static_cast<std::uint32_t>(qweight[static_cast<std::size_t>(c * (n / 8) + row / 8)]);
      detail::put_int4(w.codes, k, row, c, detail::nibble(word, nibble_in_word(row)));
    }
  }
  return out;
}

}  // namespace infuse::quant
