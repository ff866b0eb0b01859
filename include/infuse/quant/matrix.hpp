// quant::matrix<Scheme, Space>: a non-owning view of a quantized (rows, cols) matrix, and
// quant::quantize<Scheme>(w, options), which quantizes a float matrix on the host into an owning
// quant::quantized<Scheme>. See docs/policies.md#quantization-schemes.
//
//   auto q = infuse::quant::quantize<quant::int_<4, 128>>(w);   // w: host_view<const float, 2>
//   infuse::gemv(exec, q.view(), x, y);
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "infuse/core/config.hpp"
#include "infuse/core/error.hpp"
#include "infuse/core/memory.hpp"
#include "infuse/core/view.hpp"
#include "infuse/quant/scheme.hpp"

namespace infuse::quant {

// The shape rules every scheme shares; throws infuse::error naming `cols` as `k`.
template <class S>
void require_shape(std::string_view call, std::int64_t rows, std::int64_t cols) {
  require(rows >= 0, call, "n", rows, "a nonnegative row count");
  require(cols > 0 && cols % block_size == 0, call, "k", cols,
          "a positive multiple of " + std::to_string(block_size) + " (the block size)");
  if constexpr (S::group > 0) {
    require(cols % S::group == 0, call, "k", cols,
            "a multiple of the group size " + std::to_string(S::group));
  }
}

template <class S, class Space = host_memory>
struct matrix {
  static_assert(scheme<S>,
                "infuse: quant::matrix takes a quantization scheme; see "
                "docs/policies.md#quantization-schemes");
  using scheme_type = S;
  using memory_space = Space;
  using params = typename S::params;

  const std::uint8_t* codes = nullptr;  // (rows, cols/32, block_bytes)
  const float* scales = nullptr;        // (groups, scales_per_group)
  const std::uint8_t* zeros = nullptr;  // (groups), when S::has_zero
  std::int64_t rows = 0;
  std::int64_t cols = 0;

  INFUSE_HOST_DEVICE constexpr std::int64_t blocks_per_row() const { return cols / block_size; }
  // Inputs per group: the whole row per channel, the whole matrix (per row: cols) per tensor.
  INFUSE_HOST_DEVICE constexpr std::int64_t group_size() const {
    return S::group > 0 ? S::group : cols;
  }
  INFUSE_HOST_DEVICE constexpr std::int64_t groups_per_row() const { return cols / group_size(); }
  INFUSE_HOST_DEVICE constexpr std::int64_t group_count() const {
    return S::group == per_tensor ? 1 : rows * groups_per_row();
  }
  INFUSE_HOST_DEVICE constexpr const std::uint8_t* block(std::int64_t row, std::int64_t b) const {
    return codes + (row * blocks_per_row() + b) * S::block_bytes;
  }
  // The stored index of group g (0 .. groups_per_row()) of `row`.
  INFUSE_HOST_DEVICE constexpr std::int64_t group_index(std::int64_t row, std::int64_t g) const {
    return S::group == per_tensor ? 0 : row * groups_per_row() + g;
  }
  INFUSE_HOST_DEVICE params group_params(std::int64_t row, std::int64_t g) const {
    const std::int64_t index = group_index(row, g);
    return S::group_params(scales + index * S::scales_per_group,
                           S::has_zero ? zeros[index] : std::uint8_t{0});
  }
  // W(row, k), one element.
  INFUSE_HOST_DEVICE float operator()(std::int64_t row, std::int64_t k) const {
    return dequantize<S>(block(row, k / block_size), static_cast<int>(k % block_size),
                         group_params(row, k / group_size()));
  }
};

// Host checks of a matrix argument: shape rules, and non-null pointers for what the scheme stores.
template <class S, class Space>
void require_matrix(const matrix<S, Space>& w, std::string_view call,
                    std::string_view argument = "w") {
  require_shape<S>(call, w.rows, w.cols);
  const std::string name(argument);
  if (w.rows == 0) return;
  require(w.codes != nullptr, call, name + ".codes", w.codes, "a pointer to the packed codes");
  if constexpr (S::scales_per_group > 0) {
    require(w.scales != nullptr, call, name + ".scales", w.scales, "a pointer to the scales");
  }
  if constexpr (S::has_zero) {
    require(w.zeros != nullptr, call, name + ".zeros", w.zeros, "a pointer to the zero points");
  }
}

// The owning host container quantize() returns.
template <class S>
struct quantized {
  std::vector<std::uint8_t> codes;
  std::vector<float> scales;
  std::vector<std::uint8_t> zeros;
  std::int64_t rows = 0;
  std::int64_t cols = 0;

  [[nodiscard]] matrix<S, host_memory> view() const {
    return {codes.data(), scales.data(), zeros.empty() ? nullptr : zeros.data(), rows, cols};
  }
  [[nodiscard]] std::int64_t bytes() const { return storage_bytes<S>(rows, cols); }
};

namespace detail {

// Quantizes the values of one group (gathered in `values`, in input order) with the group's fit,
// writing its codes block after block through `block_of(b)`; returns the squared error.
template <class S, class BlockOf>
double quantize_group(const std::vector<float>& values, const stored_group<S>& stored,
                      BlockOf&& block_of, bool write) {
  const auto p = S::group_params(stored.scales, stored.zero);
  double error = 0.0;
  const std::int64_t blocks = static_cast<std::int64_t>(values.size()) / block_size;
  for (std::int64_t b = 0; b < blocks; ++b) {
    std::uint32_t codes[block_size];
    for (int j = 0; j < block_size; ++j) {
      const float w = values[static_cast<std::size_t>(b * block_size + j)];
      codes[j] = S::encode(w, p);
      const double diff = static_cast<double>(S::value(codes[j], p)) - w;
      error += diff * diff;
    }
    if (write) S::pack(codes, block_of(b));
  }
  return error;
}

}  // namespace detail

// Quantizes w (rows, cols) on the host. Round to nearest fits each group's range; clip_search
// also tries options.clip_steps ratios of that range down to options.min_clip and keeps the one
// with the least squared error of the group's dequantized weights. Throws infuse::error for a
// shape the scheme cannot hold (cols not a multiple of 32 and of the group: "k") or bad options.
template <class S>
quantized<S> quantize(host_view<const float, 2> w, const quantize_options& options = {}) {
  static_check_scheme<S>();
  constexpr std::string_view call = "infuse::quant::quantize";
  require_view(w, call, "w", {any_extent, any_extent}, stride_rule::unit_inner);
  require_shape<S>(call, w.extent(0), w.extent(1));
  const bool search = options.method == rounding::clip_search;
  if (search) {
    require(options.clip_steps >= 2, call, "options.clip_steps", options.clip_steps,
            "at least 2 ratios to search");
    require(options.min_clip > 0.0f && options.min_clip < 1.0f, call, "options.min_clip",
            options.min_clip, "a ratio in (0, 1)");
  }

  quantized<S> out;
  out.rows = w.extent(0);
  out.cols = w.extent(1);
  const matrix<S, host_memory> shape{nullptr, nullptr, nullptr, out.rows, out.cols};
  out.codes.resize(static_cast<std::size_t>(out.rows * shape.blocks_per_row() * S::block_bytes));
  out.scales.resize(static_cast<std::size_t>(shape.group_count() * S::scales_per_group));
  if constexpr (S::has_zero) out.zeros.resize(static_cast<std::size_t>(shape.group_count()));
  if (out.rows == 0) return out;

  // A group is a run of whole blocks: within one row, or every row (per tensor).
  const std::int64_t group_rows = S::group == per_tensor ? out.rows : 1;
  const std::int64_t group_cols = shape.group_size();
  std::vector<float> values(static_cast<std::size_t>(group_rows * group_cols));
  for (std::int64_t row = 0; row < out.rows; row += group_rows) {
    for (std::int64_t g = 0; g < shape.groups_per_row(); ++g) {
      for (std::int64_t r = 0; r < group_rows; ++r) {
        for (std::int64_t c = 0; c < group_cols; ++c) {
          values[static_cast<std::size_t>(r * group_cols + c)] = w(row + r, g * group_cols + c);
        }
      }
      // Blocks of a group are consecutive in the codes: per tensor they run over all rows.
      std::uint8_t* first_block =
          out.codes.data() +
          (row * shape.blocks_per_row() + g * (group_cols / block_size)) * S::block_bytes;
      const auto block_of = [&](std::int64_t b) { return first_block + b * S::block_bytes; };
      auto best = S::fit(values.data(), group_rows * group_cols, 1.0f);
      if (search) {
        double best_error = detail::quantize_group<S>(values, best, block_of, false);
        for (int step = 1; step < options.clip_steps; ++step) {
          const float clip = 1.0f - (1.0f - options.min_clip) * static_cast<float>(step) /
                                        static_cast<float>(options.clip_steps - 1);
          const auto candidate = S::fit(values.data(), group_rows * group_cols, clip);
          const double error = detail::quantize_group<S>(values, candidate, block_of, false);
          if (error < best_error) {
            best_error = error;
            best = candidate;
          }
        }
      }
      detail::quantize_group<S>(values, best, block_of, true);
      const std::int64_t index = shape.group_index(row, g);
      for (int s = 0; s < S::scales_per_group; ++s) {
        out.scales[static_cast<std::size_t>(index * S::scales_per_group + s)] = best.scales[s];
      }
      if constexpr (S::has_zero) out.zeros[static_cast<std::size_t>(index)] = best.zero;
    }
  }
  return out;
}

}  // namespace infuse::quant
