// The LM head fused with sampling: logits = hidden W^T by the quantized GEMV of gemm/gemv.hpp, and
// the token of each row drawn by search::sample's rules, without writing the logits to memory.
//
//   namespace s = infuse::search;
//   using filters = s::filters<s::filter::temperature, s::filter::top_k, s::filter::top_p>;
//   std::vector<std::byte> scratch(s::head_workspace_bytes<filters>(exec, rows, vocab));
//   s::sample_from_head(exec, w, hidden, {row_request, row_position}, params, out,
//                       {scratch.data(), {n}});  // in place of gemv(w, hidden, logits) + sample
//
// w is the head (vocab,hidden) in any quant::scheme, hidden (rows,hidden) float; the rows, the
// parameters and the outputs are those of sample<Set> (sample.hpp), so a caller switches with one
// line. Optionally, as for gemv, gemm::int8_activations{workspace, bytes} as the last argument.
//
// Exactness: the token, log-probability, status and top-n outputs are those of
// gemv(exec, w, hidden, logits) followed by sample<Set>(exec, logits, ...) with the same
// parameters and activations, bit for bit: the fused pass calls the same row kernel with the same
// batch tiles, so each logit is the same float, and the sampling rules are exact integer functions
// of the logits (sample.hpp).
//
// Where the logits go (CPU). The vocabulary is cut into tiles of rows; each thread computes a
// tile's logits into a small buffer and leaves per batch row a summary: the maximum with its
// lowest-id argmax, a NaN flag, the allowed-token count and, for top-k rows, the tokens
// at or above a running k-th-largest bound (a superset of the row's top-k set, ties included).
// Greedy rows (temperature 0) and top-k rows (0 < top_k < vocab, top_k <= max_fused_top_k) are
// decided from the summaries alone. A call falls back to writing the whole logits into the
// workspace and sampling them with sample<Set> when
//   - Set holds penalties or logit_bias (decided at compile time),
//   - a row samples from the whole vocabulary (temperature > 0 without a top-k limit: temperature
//     alone, top_p or min_p without top_k), or has top_k > max_fused_top_k,
//   - more than a few hundred tokens tie at a running k-th-largest bound (the summary cannot hold
//     the ties; the call then recomputes the logits).
// The result is the same either way; only the memory traffic differs. token_bitmask is fused.
// The CUDA body (search/cuda/fused_head.cuh) takes the path through the logits for every call.
//
// Bad input: as gemv and sample, infuse::error names the argument before anything is written.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "infuse/core/concepts.hpp"
#include "infuse/core/error.hpp"
#include "infuse/core/view.hpp"
#include "infuse/gemm/gemv.hpp"
#include "infuse/quant/matrix.hpp"
#include "infuse/quant/scheme.hpp"
#include "infuse/search/sample.hpp"

namespace infuse::search {

// The largest top_k that the fused pass decides from its summaries; rows above it fall back.
inline constexpr std::int32_t max_fused_top_k = 256;

namespace detail {

inline constexpr const char* head_call = "infuse::search::sample_from_head";

// The body on one backend: specialized by search/cpu/fused_head.hpp (exec::cpu) and
// search/cuda/fused_head.cuh (exec::cuda).
template <class Exec>
struct head_body {
  static_assert(sizeof(Exec) == 0,
                "infuse: could not find a search::sample_from_head body for this backend: include "
                "infuse/search/cpu/fused_head.hpp (exec::cpu) or infuse/search/cuda/fused_head.cuh "
                "(exec::cuda); see docs/policies.md#decoding-search");
};

// Whether a Set can be fused at all: penalties and biases change logits named in lists, which
// the fused pass does not apply (such calls always take the fallback).
template <class Set>
inline constexpr bool fusable_filters =
    !Set::template has<filter::penalties> && !Set::template has<filter::logit_bias>;

// Host checks of the head and the hidden states (those of gemv, named for this call).
template <class S, class Space>
void validate_head(const quant::matrix<S, Space>& w, const view<const float, 2, Space>& hidden) {
  quant::require_matrix(w, head_call, "w");
  require(w.rows >= 1 && w.rows < max_vocab, head_call, "w.rows", w.rows,
          "a vocabulary of 1 to 2^23 - 1 tokens (the rows of w)");
  require(hidden.extent(0) >= 1, head_call, "hidden.extent(0)", hidden.extent(0), "at least 1 row");
  require_view(hidden, head_call, "hidden", {any_extent, {w.cols, "the columns of w"}});
  // The row kernels read codes of unquantized weights as floats or halves, and scales as floats.
  constexpr std::uintptr_t code_alignment =
      S::block_bytes % 4 == 0 && S::block_bytes >= 4 * quant::block_size   ? 4
      : S::block_bytes % 2 == 0 && S::block_bytes >= 2 * quant::block_size ? 2
                                                                           : 1;
  require(reinterpret_cast<std::uintptr_t>(w.codes) % code_alignment == 0, head_call, "w.codes",
          static_cast<const void*>(w.codes),
          "a pointer aligned to " + std::to_string(code_alignment) + " bytes");
  require(reinterpret_cast<std::uintptr_t>(w.scales) % alignof(float) == 0, head_call, "w.scales",
          static_cast<const void*>(w.scales), "a pointer aligned to 4 bytes");
  require(reinterpret_cast<std::uintptr_t>(hidden.data()) % alignof(float) == 0, head_call,
          "hidden.data()", static_cast<const void*>(hidden.data()), "a pointer aligned to 4 bytes");
}

template <class Exec, class Set, class S, class Space, class Activations>
constexpr void static_check_head() {
  quant::static_check_scheme<S>();
  gemm::static_check_activations<S, Activations>();
  static_check_sample<Exec, Set, view<const float, 2, Space>, Space>();
}

// The logits' shape, for the checks of sample that read only extents (never the elements).
template <class Space>
view<const float, 2, Space> logits_shape(const view<const float, 2, Space>& hidden,
                                         std::int64_t vocab) {
  return {hidden.data(), {hidden.extent(0), vocab}};
}

// The path through logits, the same on every backend: the logits (rows,vocab) at the start of
// the workspace (64-byte aligned), sample's workspace after them.
inline std::int64_t logits_bytes(std::int64_t rows, std::int64_t vocab) {
  return (rows * vocab * std::int64_t{sizeof(float)} + 63) / 64 * 64;
}
template <class Set, class Exec>
std::int64_t through_logits_bytes(const Exec& exec, std::int64_t rows, std::int64_t vocab) {
  return logits_bytes(rows, vocab) + sample_workspace_bytes<Set>(exec, rows, vocab);
}
// gemv into the workspace, then sample (greedy when params is null). `base`: 64-byte aligned.
template <class Set, class Exec, class S, class Space, class Activations>
void sample_through_logits(const Exec& exec, const quant::matrix<S, Space>& w,
                           const view<const float, 2, Space>& hidden,
                           const sample_rows<Space>& rows, const sample_params<Space, Set>* params,
                           const sample_outputs<Space>& out, std::byte* base,
                           const Activations& activations) {
  const std::int64_t batch = hidden.extent(0);
  const view<float, 2, Space> logits(reinterpret_cast<float*>(base), {batch, w.rows});
  gemm::gemv(exec, w, hidden, logits, {}, activations);
  if (params == nullptr) {
    greedy(exec, view<const float, 2, Space>(logits), out);
    return;
  }
  const std::int64_t bytes = sample_workspace_bytes<Set>(exec, batch, w.rows);
  search::sample(exec, view<const float, 2, Space>(logits), rows, *params, out,
                 view<std::byte, 1, Space>(base + logits_bytes(batch, w.rows), {bytes}));
}

// The workspace's first 64-byte boundary (device pointers too: only the address is used).
inline std::byte* aligned_base(std::byte* workspace) {
  return workspace + (64 - reinterpret_cast<std::uintptr_t>(workspace) % 64) % 64;
}

template <class Space>
void validate_workspace(const view<std::byte, 1, Space>& workspace, std::int64_t needed) {
  require(workspace.extent(0) >= needed, head_call, "workspace.extent(0)", workspace.extent(0),
          "at least " + std::to_string(needed) + " bytes (search::head_workspace_bytes)");
  require_view(workspace, head_call, "workspace", {any_extent});
}

}  // namespace detail

// The bytes of workspace that sample_from_head<Set> (and greedy_from_head, with any Set) needs on
// `exec` for up to `rows` rows and a head of `vocab` rows. It covers the fallback (the logits and
// sample's own workspace), so one buffer serves every call with at most `rows` rows.
template <class Set, class Exec>
std::int64_t head_workspace_bytes(const Exec& exec, std::int64_t rows, std::int64_t vocab) {
  static_assert(detail::is_filters<Set>,
                "infuse: search::sample_from_head takes its filters as one search::filters<...> "
                "argument; see docs/policies.md#decoding-search");
  constexpr const char* call = "infuse::search::head_workspace_bytes";
  require(rows >= 0, call, "rows", rows, "a nonnegative row count");
  require(vocab >= 1 && vocab < detail::max_vocab, call, "vocab", vocab,
          "a vocabulary of 1 to 2^23 - 1 tokens");
  return detail::head_body<Exec>::template workspace_bytes<Set>(exec, rows, vocab);
}

// Samples one token per row of the logits hidden W^T (never stored; see the top of this file)
// under sample<Set>'s rules. Throws infuse::error before writing anything when an argument is
// malformed.
template <class Set, class Exec, class S, class Space, class Activations = gemm::float_activations>
void sample_from_head(const Exec& exec, const quant::matrix<S, Space>& w,
                      std::type_identity_t<view<const float, 2, Space>> hidden,  // (rows,hidden)
                      const sample_rows<Space>& rows, const sample_params<Space, Set>& params,
                      const sample_outputs<Space>& out, const view<std::byte, 1, Space>& workspace,
                      Activations activations = {}) {
  detail::static_check_head<Exec, Set, S, Space, Activations>();
  detail::validate_head(w, hidden);
  detail::validate_sample(detail::logits_shape(hidden, w.rows), rows, params, out);
  gemm::check_fused_arguments(w, hidden.extent(0), w.rows, w.cols, gemm::gemv_options{},
                              activations, detail::head_call);
  detail::validate_workspace(workspace, head_workspace_bytes<Set>(exec, hidden.extent(0), w.rows));
  detail::head_body<Exec>::template sample<Set>(exec, w, hidden, rows, &params, out, workspace,
                                                activations);
}

// The most likely token of each row of hidden W^T, as search::greedy; the workspace is
// head_workspace_bytes<filters<>>(exec, rows, vocab) bytes.
template <class Exec, class S, class Space, class Activations = gemm::float_activations>
void greedy_from_head(const Exec& exec, const quant::matrix<S, Space>& w,
                      std::type_identity_t<view<const float, 2, Space>> hidden,  // (rows,hidden)
                      const sample_outputs<Space>& out, const view<std::byte, 1, Space>& workspace,
                      Activations activations = {}) {
  using none = filters<>;
  detail::static_check_head<Exec, none, S, Space, Activations>();
  detail::validate_head(w, hidden);
  const std::int64_t row_count = hidden.extent(0);
  require_view(out.token, detail::head_call, "out.token", {{row_count, "rows"}});
  require_view(out.logprob, detail::head_call, "out.logprob", {{row_count, "rows"}});
  require_view(out.status, detail::head_call, "out.status", {{row_count, "rows"}});
  if (out.top_tokens.size() > 0 || out.top_logprobs.size() > 0) {
    require_view(out.top_tokens, detail::head_call, "out.top_tokens",
                 {{row_count, "rows"}, any_extent});
    require_view(out.top_logprobs, detail::head_call, "out.top_logprobs",
                 {{row_count, "rows"}, {out.top_tokens.extent(1), "out.top_tokens.extent(1)"}});
  }
  gemm::check_fused_arguments(w, row_count, w.rows, w.cols, gemm::gemv_options{}, activations,
                              detail::head_call);
  detail::validate_workspace(workspace, head_workspace_bytes<none>(exec, row_count, w.rows));
  detail::head_body<Exec>::template sample<none>(
      exec, w, hidden, sample_rows<Space>{},
      static_cast<const sample_params<Space, none>*>(nullptr), out, workspace, activations);
}

}  // namespace infuse::search
