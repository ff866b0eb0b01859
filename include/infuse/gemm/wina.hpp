// gemm::wina_gemv: the product with WINA sparse activation (Chen et al., "WINA: Weight Informed
// Neuron Activation for Accelerating Large Language Model Inference", 2025): input i takes part
// only when |x_i| * ||W(:, i)||_2 reaches the threshold, and the weights of the inputs that do not
// are never read. See docs/policies.md#wina-sparse-activation.
//
//   auto w_t = quant::quantize<quant::int_<4, 128>>(w_transposed);  // W^T: (k, n)
//   auto norms = gemm::wina_column_norms(w_t.view());                // once, with the weights
//   gemm::wina_gemv(exec, w_t.view(), norms, x, y, threshold, {}, workspace);
//
// W is stored transposed (quant::matrix of W^T, (k, n): row i holds the weights input i meets, its
// groups along the outputs), so an input's weights are one contiguous row and skipping an input
// skips its bytes: the product reads only the rows of the inputs that pass. For a batch, an input
// passes if it passes for any row, and each batch row multiplies only its own passing inputs:
//   y(b, :) = sum_{i : |x(b,i)| ||W(:,i)|| >= threshold} x(b, i) W(:, i), then the epilogue.
// Threshold 0 keeps every input (the dense product).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "infuse/core/error.hpp"
#include "infuse/core/view.hpp"
#include "infuse/gemm/gemv.hpp"
#include "infuse/quant/matrix.hpp"

namespace infuse::gemm {

// ||W(:, i)||_2 for every input i, from the stored (dequantized) weights of W^T (k, n).
template <class S>
std::vector<float> wina_column_norms(const quant::matrix<S, host_memory>& w_t) {
  quant::require_matrix(w_t, "infuse::gemm::wina_column_norms", "w_t");
  std::vector<float> norms(static_cast<std::size_t>(w_t.rows));
  for (std::int64_t i = 0; i < w_t.rows; ++i) {
    double sum = 0.0;
    for (std::int64_t n = 0; n < w_t.cols; ++n) {
      const double v = w_t(i, n);
      sum += v * v;
    }
    norms[static_cast<std::size_t>(i)] = static_cast<float>(std::sqrt(sum));
  }
  return norms;
}

// Batch rows a product takes at once.
inline constexpr int wina_batch_tile = 8;

// Bytes of workspace a (batch, k) x (k, n) product needs on `threads` threads
// (exec::cpu::threads()): the passing inputs, x masked per batch row, and each thread's sums of a
// batch tile.
constexpr std::int64_t wina_workspace_bytes(std::int64_t batch, std::int64_t k, std::int64_t n,
                                            int threads) {
  return 64 + k * 4 + batch * k * 4 + std::int64_t{threads} * wina_batch_tile * n * 4;
}

namespace detail {

struct wina_workspace_layout {
  std::int32_t* passing;  // (k)
  float* masked;          // (batch, k): x(b, i), 0 where input i does not pass for row b
  float* accumulators;    // (threads, wina_batch_tile, n)

  wina_workspace_layout(std::byte* workspace, std::int64_t batch, std::int64_t k) {
    auto* base =
        reinterpret_cast<std::byte*>((reinterpret_cast<std::uintptr_t>(workspace) + 63) / 64 * 64);
    passing = reinterpret_cast<std::int32_t*>(base);
    masked = reinterpret_cast<float*>(base + k * 4);
    accumulators = masked + batch * k;
  }
};

template <class Exec>
struct wina_body {
  static_assert(always_false<Exec>,
                "infuse: could not find a wina_gemv body for this execution backend (include "
                "infuse/gemm/cpu/wina.hpp for exec::cpu); see docs/policies.md#exec-backend");
};
}  // namespace detail

// y (batch, n) = the WINA product of x (batch, k) with W, w_t = W^T (k, n); norms (k) from
// wina_column_norms; options: bias, activation, residual (not input_order); workspace of at least
// wina_workspace_bytes(batch, k, n, exec.threads()) bytes.
template <class Exec, class S>
void wina_gemv(const Exec& exec, const quant::matrix<S, host_memory>& w_t,
               std::span<const float> norms, host_view<const float, 2> x, host_view<float, 2> y,
               float threshold, const gemv_options& options, std::span<std::byte> workspace) {
  constexpr std::string_view call = "infuse::gemm::wina_gemv";
  quant::static_check_scheme<S>();
  quant::require_matrix(w_t, call, "w_t");
  require(x.extent(0) >= 1, call, "batch", x.extent(0), "at least 1 (the rows of x, x.extent(0))");
  require_view(x, call, "x", {any_extent, {w_t.rows, "k, the rows of w_t"}});
  require_view(y, call, "y",
               {{x.extent(0), "batch, the rows of x"}, {w_t.cols, "n, the columns of w_t"}});
  require(std::ssize(norms) == w_t.rows, call, "norms", norms.size(),
          "one norm per input, k = " + std::to_string(w_t.rows));
  require(std::isfinite(threshold) && threshold >= 0.0f, call, "threshold", threshold,
          "a finite value at least 0");
  require(options.input_order == nullptr, call, "options.input_order",
          static_cast<const void*>(options.input_order), "null (WINA takes inputs in order)");
  check_fused_arguments(w_t, x.extent(0), w_t.cols, w_t.rows, options, float_activations{}, call);
  const std::int64_t needed = wina_workspace_bytes(x.extent(0), w_t.rows, w_t.cols, exec.threads());
  require(workspace.data() != nullptr, call, "workspace",
          static_cast<const void*>(workspace.data()),
          "a pointer to wina_workspace_bytes(batch, k, n, exec.threads()) bytes");
  require(std::ssize(workspace) >= needed, call, "workspace.size()", workspace.size(),
          "at least wina_workspace_bytes(batch, k, n, exec.threads()) = " + std::to_string(needed));
  detail::wina_body<Exec>::run(exec, w_t, norms, x, y, threshold, options, workspace);
}

}  // namespace infuse::gemm
