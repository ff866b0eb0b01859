// infuse::gemv: y = W x with W quantized (any quant::scheme), x and y float, on one backend.
//
//   auto w = infuse::quant::quantize<infuse::quant::int_<4, 128>>(weights);  // (n,k)
//   infuse::gemv(infuse::exec::cpu{}, w.view(), x, y);  // x: (batch,k), y: (batch,n)
//
// Batch 1 to 8 runs as a GEMV: every row of W is read once for all batch rows of x. Larger batches
// run as a GEMM: rows of W in tiles that stay in cache while every batch tile of x passes over
// them, so W is read from memory once per call. The arguments are checked first, on the host,
// and nothing is written when one is wrong (infuse::error names it).
//
// The bodies: gemm/cpu/gemv.hpp (exec::cpu); the CUDA body goes to gemm/cuda/.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include "infuse/core/concepts.hpp"
#include "infuse/core/error.hpp"
#include "infuse/core/view.hpp"
#include "infuse/quant/matrix.hpp"
#include "infuse/quant/scheme.hpp"

namespace infuse::gemm {

// Run-time options of a product (the epilogues join here).
struct gemv_options {};

namespace detail {

template <class T>
inline constexpr bool always_false = false;

// One specialization per backend holds its kernel body: run(exec, w, x, y, options), arguments
// already checked.
template <class Exec>
struct gemv_body {
  static_assert(always_false<Exec>,
                "infuse: could not find a gemv body for this execution backend (include "
                "infuse/gemm/cpu/gemv.hpp for exec::cpu); see docs/policies.md#exec-backend");
};

}  // namespace detail

// The host checks of gemv's arguments; throws infuse::error naming the first wrong one.
template <class S, class Space>
void check_gemv_arguments(const quant::matrix<S, Space>& w, const view<const float, 2, Space>& x,
                          const view<float, 2, Space>& y) {
  constexpr std::string_view call = "infuse::gemv";
  quant::require_matrix(w, call, "w");
  require(x.extent(0) >= 1, call, "batch", x.extent(0), "at least 1 (the rows of x, x.extent(0))");
  require_view(x, call, "x", {any_extent, {w.cols, "k, the columns of w"}});
  require_view(y, call, "y", {{x.extent(0), "batch, the rows of x"}, {w.rows, "n, the rows of w"}});
  // Codes of unquantized float or half weights are read as such: they must be aligned for it.
  constexpr std::uintptr_t code_alignment =
      S::block_bytes % 4 == 0 && S::block_bytes >= 4 * quant::block_size   ? 4
      : S::block_bytes % 2 == 0 && S::block_bytes >= 2 * quant::block_size ? 2
                                                                           : 1;
  require(reinterpret_cast<std::uintptr_t>(w.codes) % code_alignment == 0, call, "w.codes",
          static_cast<const void*>(w.codes),
          "a pointer aligned to " + std::to_string(code_alignment) + " bytes");
  require(reinterpret_cast<std::uintptr_t>(w.scales) % alignof(float) == 0, call, "w.scales",
          static_cast<const void*>(w.scales), "a pointer aligned to 4 bytes");
  require(reinterpret_cast<std::uintptr_t>(x.data()) % alignof(float) == 0, call, "x.data()",
          static_cast<const void*>(x.data()), "a pointer aligned to 4 bytes");
  require(reinterpret_cast<std::uintptr_t>(y.data()) % alignof(float) == 0, call, "y.data()",
          static_cast<const void*>(y.data()), "a pointer aligned to 4 bytes");
}

// y(b, n) = sum_k W(n, k) x(b, k): w (n,k), x (batch,k), y (batch,n); x and y need a contiguous
// last dimension, any row stride.
template <class Exec, class S, class Space>
void gemv(const Exec& exec, const quant::matrix<S, Space>& w,
          std::type_identity_t<view<const float, 2, Space>> x,  // (batch,k)
          std::type_identity_t<view<float, 2, Space>> y,        // (batch,n)
          const gemv_options& options = {}) {
  quant::static_check_scheme<S>();
  static_check_view<Exec, 2, view<const float, 2, Space>>();
  check_gemv_arguments(w, x, y);
  detail::gemv_body<Exec>::run(exec, w, x, y, options);
}

}  // namespace infuse::gemm

namespace infuse {
using gemm::gemv;
}  // namespace infuse
