// The retrieval workload: the queries, keys and values of the lookup layer (layer 2) of the
// passkey-retrieval model of examples/llama, captured on a passkey prompt. The forward pass up to
// that layer runs on infuse's kernels as llama::session runs it (RMSNorm, one GEMV for Q, K and V,
// RoPE, causal prefill over a paged cache, the output projection and the MLP), in float.
//
// The last token is the final KEY, whose lookup query finds the token after the first KEY (the
// passkey): the one evaluation query. The observation queries are the haystack tokens before it,
// whose lookup queries are zero: a prompt that does not yet ask the question.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "infuse/attention/cpu/prefill.hpp"
#include "infuse/attention/prefill.hpp"
#include "infuse/gemm/cpu/gemv.hpp"
#include "infuse/gemm/gemv.hpp"
#include "infuse/kv/page_pool.hpp"
#include "infuse/quant/quant.hpp"
#include "infuse/sparse/dense.hpp"
#include "llama/model.hpp"
#include "llama/passkey.hpp"
#include "llama/retrieval_model.hpp"
#include "workload.hpp"

namespace infuse::eval {

namespace detail {

struct float_model {
  static constexpr const char* name = "f32";
  using weights = quant::none<float>;
  using k = quant::none<float>;
  using v = quant::none<float>;
  using layout = kv::paged<16>;
  using sparsity = sparse::dense;
};

}  // namespace detail

inline workload retrieval(std::int64_t length, std::int64_t observed, std::uint64_t seed,
                          const exec::cpu& exec) {
  namespace llama = infuse::llama;
  using config = detail::float_model;
  const llama::model<config> model(llama::retrieval::weights());
  const llama::model_config& c = model.config();
  const llama::passkey_prompt prompt = llama::make_passkey_prompt(length, seed, 0);
  const std::int64_t n = length;
  const std::int64_t dim = c.dim, hd = c.head_dim(), q_dim = model.q_dim(), kv_dim = c.kv_dim();
  const std::int64_t qkv_cols = q_dim + 2 * kv_dim;
  std::vector<float> residual(static_cast<std::size_t>(n * dim));
  std::vector<float> normed(residual.size());
  std::vector<float> qkv(static_cast<std::size_t>(n * qkv_cols));
  std::vector<float> attended(static_cast<std::size_t>(n * q_dim));
  std::vector<float> hidden(static_cast<std::size_t>(n * c.hidden_dim));
  const host_view<float, 2> x(residual.data(), {n, dim});
  const host_view<float, 2> xn(normed.data(), {n, dim});
  const host_view<float, 2> qkv_rows(qkv.data(), {n, qkv_cols});
  const std::span<const float> embedding = model.embedding();
  for (std::int64_t t = 0; t < n; ++t)
    std::copy_n(embedding.begin() + prompt.tokens[t] * dim, dim, &x(t, 0));

  // Q, K and V of layer l for every token, after RoPE, into qkv.
  const auto project = [&](int l) {
    const auto& layer = model.layers()[static_cast<std::size_t>(l)];
    llama::detail::rms_norm(exec, x, layer.attn_norm, c.rms_eps, xn);
    gemv(exec, layer.wqkv.view(), xn, qkv_rows);
    llama::detail::rope(exec, qkv_rows, 0, c.n_heads, hd, 0, c.rope_base);
    llama::detail::rope(exec, qkv_rows, q_dim, c.n_kv_heads, hd, 0, c.rope_base);
  };
  const auto heads_of = [&](std::int64_t column, std::int32_t heads) {
    return host_view<const float, 3>(qkv.data() + column, {n, heads, hd}, {qkv_cols, hd, 1});
  };

  // Layer 1: causal attention over the whole prompt, then the output projection and the MLP.
  project(0);
  using cache_type = kv::cache<config::layout, config::k, config::v>;
  cache_type cache(static_cast<std::int32_t>((n + 15) / 16), {c.n_kv_heads, c.head_dim()},
                   {c.n_kv_heads, c.head_dim()});
  const kv::sequence_id batch[1] = {cache.create()};
  cache.append(batch[0], n);
  const std::int32_t q_indptr[2] = {0, static_cast<std::int32_t>(n)};
  attention::prefill<config::layout, config::k, config::v, sparse::causal>(
      exec, heads_of(0, c.n_heads), heads_of(q_dim, c.n_kv_heads),
      heads_of(q_dim + kv_dim, c.n_kv_heads), host_view<const std::int32_t, 1>(q_indptr, {2}),
      cache.view(batch).view(), host_view<float, 3>(attended.data(), {n, c.n_heads, hd}), {});
  const auto& first = model.layers().front();
  gemv(exec, first.wo.view(), host_view<const float, 2>(attended.data(), {n, q_dim}), x,
       {.residual = x.data()});
  llama::detail::rms_norm(exec, x, first.ffn_norm, c.rms_eps, xn);
  gated_gemv(exec, first.w_gate.view(), first.w_up.view(), xn,
             host_view<float, 2>(hidden.data(), {n, c.hidden_dim}), gemm::act::silu);
  gemv(exec, first.w_down.view(), host_view<const float, 2>(hidden.data(), {n, c.hidden_dim}), x,
       {.residual = x.data()});

  // Layer 2: the lookup layer's Q, K and V are the workload.
  project(1);
  workload w;
  w.name = "retrieval";
  w.about = "layer 2 of the passkey model: the final KEY looks up the passkey";
  w.q_heads = c.n_heads;
  w.kv_heads = c.n_kv_heads;
  w.head_dim = static_cast<std::int32_t>(hd);
  w.length = n;
  w.observed = observed;
  w.steps = 1;
  w.focus = prompt.depth + 1;
  w.keys.resize(static_cast<std::size_t>(n * kv_dim));
  w.values.resize(w.keys.size());
  for (std::int64_t t = 0; t < n; ++t) {
    const float* row = qkv.data() + t * qkv_cols;
    std::copy_n(row + q_dim, kv_dim, w.keys.data() + t * kv_dim);
    std::copy_n(row + q_dim + kv_dim, kv_dim, w.values.data() + t * kv_dim);
  }
  for (std::int64_t t = n - 1 - observed; t < n; ++t) {
    const float* row = qkv.data() + t * qkv_cols;
    w.queries.insert(w.queries.end(), row, row + q_dim);
  }
  return w;
}

}  // namespace infuse::eval
