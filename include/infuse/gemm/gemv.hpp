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
// Fused epilogue (gemv_options): y = act(W x + bias) + residual, per output, in the same pass.
// gated_gemv computes y = gate(W_gate x) * (W_up x) (SwiGLU with act::silu, GeGLU with act::gelu)
// reading both weights in one pass: row n of both in turn, x read once for the two.
//
// Activations: float by default. With gemm::int8_activations{workspace, bytes} as the last
// argument (integer schemes, CPU), x is quantized once per call to int8 per block of 32 inputs
// into the caller's workspace (gemm::int8_workspace_bytes(batch, k) bytes; nothing is allocated)
// and the products are integer dot products of the codes with x's int8:
//   s_b = max_{k in b} |x_k| / 127,  q_k = round_half_even(x_k / s_b)  (float ops; 0 when s_b = 0)
//   y_n = sum_g scale_g * (sum_{b in g} s_b * dot(u, q)_b  -  zero_g * sum_{b in g} s_b * sum(q)_b)
// Error: exact (int32 block dots) up to float summation against the float64 product of the
// dequantized weights with the dequantized x (s_b q_k); against float x it adds at most
// sum_k |W(n,k)| * s_b(k) / 2, the rounding of x. x must be finite.
//
// On CUDA x may also be half or bfloat16 (a device_view<const half, 2> or <const bfloat16, 2>):
// each value is converted to float as it is read, exactly, so the products, their sums and y are
// float. gemm::lut_activations on CUDA builds its tables in shared memory and takes no workspace.
//
// The bodies: gemm/cpu/gemv.hpp (exec::cpu); gemm/cuda/gemv.cuh (exec::cuda).
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "infuse/core/concepts.hpp"
#include "infuse/core/error.hpp"
#include "infuse/core/float_types.hpp"
#include "infuse/core/view.hpp"
#include "infuse/quant/bcq.hpp"
#include "infuse/quant/int.hpp"
#include "infuse/quant/matrix.hpp"
#include "infuse/quant/scheme.hpp"

namespace infuse::gemm {

// Activation functions of the epilogue and of the gate of gated_gemv.
enum class act {
  none,
  silu,  // v * sigmoid(v)
  gelu,  // v * Phi(v), the exact (erf) form
};

INFUSE_HOST_DEVICE INFUSE_FORCE_INLINE float apply(act function, float v) {
  switch (function) {
    case act::silu:
      return v / (1.0f + ::expf(-v));
    case act::gelu:
      return 0.5f * v * (1.0f + ::erff(v * 0.70710678118654752f));
    default:
      return v;
  }
}

// Run-time options of a product: the fused epilogue y = activation(W x + bias) + residual.
// Pointers are in the memory space of w; residual may be y itself (y += W x).
struct gemv_options {
  const float* bias = nullptr;       // (n), added to every batch row; not with gated_gemv
  act activation = act::none;        // after the bias; gated_gemv takes its gate separately
  const float* residual = nullptr;   // (batch,n) with row stride residual_stride, added last
  std::int64_t residual_stride = 0;  // 0: n
  // Inputs in another order (GPTQ act-order, quant/import.hpp): column c of w multiplies
  // x(b, input_order[c]); x is gathered through it into input_workspace, (batch,k) floats of the
  // caller's, first. Null: column c multiplies x(b, c).
  const std::int32_t* input_order = nullptr;  // (k), a permutation of 0..k-1
  float* input_workspace = nullptr;           // (batch,k), with input_order
};

// Activation policies, the last argument of gemv and gated_gemv (a compile-time choice).
struct float_activations {};
// x quantized to int8 per block of 32 (see above); the workspace is the caller's, at least
// int8_workspace_bytes(batch, k) bytes, 4-byte aligned, not shared with a concurrent call.
struct int8_activations {
  void* workspace = nullptr;
  std::int64_t bytes = 0;
};

// Bytes of workspace the int8 activations of a (batch, k) x need: int8 codes, scales, sums of
// codes and group sums per batch row, each row on a cache line, plus slack to align them.
constexpr std::int64_t int8_workspace_bytes(std::int64_t batch, std::int64_t k) {
  const std::int64_t padded_k = (k + 127) / 128 * 128;
  return 64 + batch * (3 * padded_k + (padded_k / 8 + 63) / 64 * 64);
}

// x as lookup tables for quant::bcq weights (LUT-GEMM): for every 8 inputs the 256 sums of +/-x_j
// over the sign patterns, so that each byte of a weight bit plane indexes its partial sum and no
// weight is dequantized. CPU: the workspace is the caller's, at least lut_workspace_bytes(batch, k)
// bytes, 4-byte aligned, not shared with a concurrent call. CUDA: the tables of each chunk of x
// are built in shared memory; the workspace is not used and may be null.
struct lut_activations {
  void* workspace = nullptr;
  std::int64_t bytes = 0;
};

// Bytes of workspace the tables of a (batch, k) x need: per batch row k / 8 tables of 256 floats
// and a sum per block of 32 inputs, plus slack to align them.
constexpr std::int64_t lut_workspace_bytes(std::int64_t batch, std::int64_t k) {
  return 64 + batch * (k / 8 * 256 + k / 32) * 4;
}

namespace detail {

template <class T>
inline constexpr bool always_false = false;

// The workspace an activation policy needs, and the name of the function that sizes it.
template <class Activations>
constexpr std::int64_t activation_workspace_bytes(std::int64_t batch, std::int64_t k) {
  if constexpr (std::is_same_v<Activations, int8_activations>) {
    return int8_workspace_bytes(batch, k);
  } else {
    return lut_workspace_bytes(batch, k);
  }
}
template <class Activations>
inline constexpr const char* workspace_function =
    std::is_same_v<Activations, int8_activations> ? "int8_workspace_bytes" : "lut_workspace_bytes";

// Whether the body of this memory space reads the activation workspace: the CUDA tables live in
// shared memory.
template <class Activations, class Space>
inline constexpr bool needs_activation_workspace =
    !std::is_same_v<Activations, float_activations> &&
    !(std::is_same_v<Activations, lut_activations> && std::is_same_v<Space, device_memory>);

// The element types x may have besides float: half and bfloat16, on CUDA.
template <class X>
concept narrow_activation = std::is_same_v<std::remove_const_t<X>, half> ||
    std::is_same_v<std::remove_const_t<X>, bfloat16>;

// One specialization per backend holds its kernel body: run(exec, w, x, y, options) for float
// activations and no gate; run_fused(exec, w, w_up, x, y, options, gate, activations) for
// gated_gemv (w_up non-null) and int8 activations; arguments already checked.
template <class Exec>
struct gemv_body {
  static_assert(always_false<Exec>,
                "infuse: could not find a gemv body for this execution backend (include "
                "infuse/gemm/cpu/gemv.hpp for exec::cpu); see docs/policies.md#exec-backend");
};

}  // namespace detail

// The host checks of gemv's arguments; throws infuse::error naming the first wrong one.
template <class S, class Space, class X>
void check_gemv_arguments(const quant::matrix<S, Space>& w, const view<const X, 2, Space>& x,
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
  require(reinterpret_cast<std::uintptr_t>(x.data()) % alignof(X) == 0, call, "x.data()",
          static_cast<const void*>(x.data()),
          "a pointer aligned to " + std::to_string(alignof(X)) + " bytes");
  require(reinterpret_cast<std::uintptr_t>(y.data()) % alignof(float) == 0, call, "y.data()",
          static_cast<const void*>(y.data()), "a pointer aligned to 4 bytes");
}

// The host checks of the epilogue and of the activation workspace.
template <class S, class Space, class Activations>
void check_fused_arguments(const quant::matrix<S, Space>&, std::int64_t batch, std::int64_t n,
                           std::int64_t k, const gemv_options& options,
                           const Activations& activations, std::string_view call) {
  if (options.residual != nullptr) {
    require(options.residual_stride == 0 || options.residual_stride >= n, call,
            "options.residual_stride", options.residual_stride, "0 or at least n");
    require(reinterpret_cast<std::uintptr_t>(options.residual) % alignof(float) == 0, call,
            "options.residual", static_cast<const void*>(options.residual),
            "a pointer aligned to 4 bytes");
  }
  if (options.bias != nullptr) {
    require(reinterpret_cast<std::uintptr_t>(options.bias) % alignof(float) == 0, call,
            "options.bias", static_cast<const void*>(options.bias), "a pointer aligned to 4 bytes");
  }
  require(options.activation == act::none || options.activation == act::silu ||
              options.activation == act::gelu,
          call, "options.activation", static_cast<int>(options.activation),
          "act::none, act::silu or act::gelu");
  if (options.input_order != nullptr) {
    require(options.input_workspace != nullptr, call, "options.input_workspace",
            static_cast<const void*>(options.input_workspace),
            "a pointer to batch * k floats (x gathered through options.input_order)");
    require(reinterpret_cast<std::uintptr_t>(options.input_workspace) % alignof(float) == 0, call,
            "options.input_workspace", static_cast<const void*>(options.input_workspace),
            "a pointer aligned to 4 bytes");
    if constexpr (std::is_same_v<Space, host_memory>) {  // device orders are clamped when read
      for (std::int64_t c = 0; c < k; ++c) {
        require(options.input_order[c] >= 0 && options.input_order[c] < k, call,
                "options.input_order[" + std::to_string(c) + "]", options.input_order[c],
                "an input index below k = " + std::to_string(k));
      }
    }
  }
  if constexpr (detail::needs_activation_workspace<Activations, Space>) {
    const std::string sizing = std::string(detail::workspace_function<Activations>) + "(batch, k)";
    const std::int64_t needed = detail::activation_workspace_bytes<Activations>(batch, k);
    require(activations.workspace != nullptr, call, "activations.workspace", activations.workspace,
            "a pointer to " + sizing + " bytes");
    require(reinterpret_cast<std::uintptr_t>(activations.workspace) % alignof(float) == 0, call,
            "activations.workspace", activations.workspace, "a pointer aligned to 4 bytes");
    require(activations.bytes >= needed, call, "activations.bytes", activations.bytes,
            "at least " + sizing + " = " + std::to_string(needed));
  }
}

template <class S, class Activations>
constexpr void static_check_activations() {
  static_assert(std::is_same_v<Activations, float_activations> ||
                    std::is_same_v<Activations, int8_activations> ||
                    std::is_same_v<Activations, lut_activations>,
                "infuse: gemv takes gemm::float_activations, gemm::int8_activations or "
                "gemm::lut_activations as its activation policy; see "
                "docs/policies.md#quantized-gemv");
  static_assert(!std::is_same_v<Activations, int8_activations> || quant::is_int<S>,
                "infuse: gemm::int8_activations needs an integer scheme (quant::int_) for its "
                "integer dot products; see docs/policies.md#quantized-gemv");
  static_assert(!std::is_same_v<Activations, lut_activations> || quant::is_bcq<S>,
                "infuse: gemm::lut_activations needs binary-coded weights (quant::bcq), whose "
                "bit planes index the tables; see docs/policies.md#quantized-gemv");
}

// Half and bfloat16 x: CUDA only (device memory).
template <class Space>
constexpr void static_check_narrow_activations() {
  static_assert(std::is_same_v<Space, device_memory>,
                "infuse: the CPU gemv takes float x; half and bfloat16 x are for the CUDA gemv; "
                "see docs/policies.md#quantized-gemv");
}

namespace detail {

// gemv for any element type of x; gemv's overloads below pick it.
template <class Exec, class S, class Space, class X, class Activations>
void gemv_entry(const Exec& exec, const quant::matrix<S, Space>& w, view<const X, 2, Space> x,
                view<float, 2, Space> y, const gemv_options& options, Activations activations) {
  quant::static_check_scheme<S>();
  static_check_view<Exec, 2, view<const X, 2, Space>>();
  static_check_activations<S, Activations>();
  check_gemv_arguments(w, x, y);
  if constexpr (std::is_same_v<Activations, float_activations>) {
    if (options.bias == nullptr && options.residual == nullptr && options.activation == act::none &&
        options.input_order == nullptr) {
      gemv_body<Exec>::run(exec, w, x, y, options);
      return;
    }
  }
  check_fused_arguments(w, x.extent(0), w.rows, w.cols, options, activations, "infuse::gemv");
  gemv_body<Exec>::run_fused(exec, w, static_cast<const quant::matrix<S, Space>*>(nullptr), x, y,
                             options, act::none, activations);
}

template <class Exec, class S, class Space, class X, class Activations>
void gated_gemv_entry(const Exec& exec, const quant::matrix<S, Space>& w_gate,
                      const quant::matrix<S, Space>& w_up, view<const X, 2, Space> x,
                      view<float, 2, Space> y, act gate, const gemv_options& options,
                      Activations activations) {
  constexpr std::string_view call = "infuse::gated_gemv";
  quant::static_check_scheme<S>();
  static_check_view<Exec, 2, view<const X, 2, Space>>();
  static_check_activations<S, Activations>();
  check_gemv_arguments(w_gate, x, y);
  quant::require_matrix(w_up, call, "w_up");
  require(w_up.rows == w_gate.rows, call, "w_up.rows", w_up.rows, "the rows of w_gate");
  require(w_up.cols == w_gate.cols, call, "w_up.cols", w_up.cols, "the columns of w_gate");
  require(gate == act::none || gate == act::silu || gate == act::gelu, call, "gate",
          static_cast<int>(gate), "act::none, act::silu or act::gelu");
  require(options.bias == nullptr, call, "options.bias", static_cast<const void*>(options.bias),
          "null (gated_gemv has no bias)");
  require(options.activation == act::none, call, "options.activation",
          static_cast<int>(options.activation), "act::none (the gate is its own argument)");
  check_fused_arguments(w_gate, x.extent(0), w_gate.rows, w_gate.cols, options, activations, call);
  gemv_body<Exec>::run_fused(exec, w_gate, &w_up, x, y, options, gate, activations);
}

}  // namespace detail

// y(b, n) = sum_k W(n, k) x(b, k), then the epilogue of `options`: w (n,k), x (batch,k),
// y (batch,n); x and y need a contiguous last dimension, any row stride.
template <class Exec, class S, class Space, class Activations = float_activations>
void gemv(const Exec& exec, const quant::matrix<S, Space>& w,
          std::type_identity_t<view<const float, 2, Space>> x,  // (batch,k)
          std::type_identity_t<view<float, 2, Space>> y,        // (batch,n)
          const gemv_options& options = {}, Activations activations = {}) {
  detail::gemv_entry(exec, w, x, y, options, activations);
}

// The same with x in half or bfloat16 (CUDA), converted to float as it is read.
template <class Exec, class S, class Space, detail::narrow_activation X,
          class Activations = float_activations>
void gemv(const Exec& exec, const quant::matrix<S, Space>& w, view<X, 2, Space> x,  // (batch,k)
          std::type_identity_t<view<float, 2, Space>> y,                            // (batch,n)
          const gemv_options& options = {}, Activations activations = {}) {
  static_check_narrow_activations<Space>();
  if constexpr (std::is_same_v<Space, device_memory>) {  // no second error after the assertion
    detail::gemv_entry(exec, w, view<const std::remove_const_t<X>, 2, Space>(x), y, options,
                       activations);
  }
}

// y(b, n) = gate((W_gate x)(b, n)) * (W_up x)(b, n) + residual, both weights in one pass:
// w_gate and w_up (n,k) of the same scheme, x (batch,k), y (batch,n). gate is act::silu (SwiGLU),
// act::gelu (GeGLU) or act::none (bilinear); options.bias and options.activation must be unset.
template <class Exec, class S, class Space, class Activations = float_activations>
void gated_gemv(const Exec& exec, const quant::matrix<S, Space>& w_gate,
                const quant::matrix<S, Space>& w_up,
                std::type_identity_t<view<const float, 2, Space>> x,  // (batch,k)
                std::type_identity_t<view<float, 2, Space>> y,        // (batch,n)
                act gate, const gemv_options& options = {}, Activations activations = {}) {
  detail::gated_gemv_entry(exec, w_gate, w_up, x, y, gate, options, activations);
}

// The same with x in half or bfloat16 (CUDA), converted to float as it is read.
template <class Exec, class S, class Space, detail::narrow_activation X,
          class Activations = float_activations>
void gated_gemv(const Exec& exec, const quant::matrix<S, Space>& w_gate,
                const quant::matrix<S, Space>& w_up, view<X, 2, Space> x,  // (batch,k)
                std::type_identity_t<view<float, 2, Space>> y,             // (batch,n)
                act gate, const gemv_options& options = {}, Activations activations = {}) {
  static_check_narrow_activations<Space>();
  if constexpr (std::is_same_v<Space, device_memory>) {  // no second error after the assertion
    detail::gated_gemv_entry(exec, w_gate, w_up, view<const std::remove_const_t<X>, 2, Space>(x), y,
                             gate, options, activations);
  }
}

}  // namespace infuse::gemm

namespace infuse {
using gemm::gated_gemv;
using gemm::gemv;
}  // namespace infuse
