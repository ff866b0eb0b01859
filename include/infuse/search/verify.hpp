// Speculative verification: draft tokens checked against the target model's probabilities so that
// the emitted tokens are distributed exactly as the target model's own samples (lossless).
//
// Chain (Leviathan et al. 2023; Chen et al. 2023): draft tokens d_1..d_n drawn from the draft rows
// q_1..q_n; d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection
// one token is drawn from the residual normalize(max(0, p_i - q_i)); when all n are accepted, a
// bonus token is drawn from p_{n+1}. The caller truncates its KV cache to the accepted count.
//
// Tree (SpecInfer's multi-step speculative sampling, Miao et al. 2024): node 0 is the last
// verified token, node v > 0 a draft token whose parent is parents[v] < v. The children of a node
// were drawn independently from that node's draft row q_v. At node v the children are tried in
// index order, each accepted with probability min(1, r(t) / q_v(t)), where r starts as p_v and
// becomes normalize(max(0, r - q_v)) after each rejection; the first accepted child becomes the
// next node, and when all are rejected (or v is a leaf) one token is drawn from r. The chain is
// the tree whose node i has the single child i + 1. Without scratch memory: after k rejections
// r is proportional to max(0, p - a_k q) with a_0 = 0, a_{k+1} = a_k + S_k, S_k = sum of that
// (S_0 = 1), so each rejection costs one pass over the row to find S_{k+1}.
//
// Greedy: a child is accepted when its token is the argmax of p_v (ties to the lower id); the
// first mismatch emits that argmax.
//
// Randomness: the acceptance test of the j-th child (in index order) of a node at depth k uses
// random_uniform({seed, position + k, salt::verify}, j), the final draw at that node
// random_uniform({seed, position + k, salt::residual}), where `position` is the position of the
// first draft token. A final draw is an inverse-CDF walk over the row with the sum in float64, so
// CPU and CUDA, which sum in different orders, pick the same token unless the uniform falls within
// float64 rounding of a boundary between two tokens (odds of about 1e-16 per draw).
//
// Rows hold probabilities (each sums to 1 up to float rounding; a final draw normalises by the sum
// it computes). A request whose rows hold NaN, +inf or negative values where they are read gets
// status verify_status::invalid_probability, a draft token outside [0, vocab) gets
// invalid_token; either way its accepted count is 0 and its emitted tokens are -1.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "infuse/core/config.hpp"
#include "infuse/core/error.hpp"
#include "infuse/core/view.hpp"
#include "infuse/search/random.hpp"

namespace infuse::search {

enum class verify_status : std::uint8_t {
  ok = 0,
  invalid_probability = 1,  // NaN, +inf or a negative probability among those read
  invalid_token = 2,        // a draft token outside [0, vocab)
};

// Which acceptance rule a verification applies.
enum class acceptance {
  sampled,  // min(1, p / q) with residual resampling: lossless for sampling
  greedy,   // the draft token must be the target's argmax: lossless for greedy decoding
};

// The inputs of a chain verification of `batch` requests with n draft tokens each.
template <class Space>
struct chain_drafts {
  view<const std::int32_t, 2, Space> tokens;     // (batch,n)        d_1..d_n
  view<const float, 3, Space> draft_probs;       // (batch,n,vocab)  q_1..q_n; greedy: unused
  view<const float, 3, Space> target_probs;      // (batch,n+1,vocab) p_1..p_{n+1}
  view<const std::uint64_t, 1, Space> seeds;     // (batch)          per request
  view<const std::int64_t, 1, Space> positions;  // (batch)          position of d_1
};

// The inputs of a tree verification of `batch` requests with `nodes` nodes each (node 0 the root).
template <class Space>
struct tree_drafts {
  view<const std::int32_t, 2, Space> parents;    // (batch,nodes)       parents[0] = -1, < v
  view<const std::int32_t, 2, Space> tokens;     // (batch,nodes)       tokens[0] unused
  view<const float, 3, Space> draft_probs;       // (batch,nodes,vocab) q_v: drew v's children
  view<const float, 3, Space> target_probs;      // (batch,nodes,vocab) p_v: the token after v
  view<const std::uint64_t, 1, Space> seeds;     // (batch)
  view<const std::int64_t, 1, Space> positions;  // (batch)             position of depth 1
};

// The outputs, per request: the accepted count (for the KV cache's truncate), the emitted tokens
// (accepted + 1 of them, then -1), the accepted nodes (tree only: node ids, then -1; a chain may
// pass an empty view) and the status.
template <class Space>
struct verify_result {
  view<std::int32_t, 1, Space> accepted;  // (batch)
  view<std::int32_t, 2, Space> tokens;    // (batch,n+1) chain, (batch,nodes) tree
  view<std::int32_t, 2, Space> path;      // (batch,nodes) tree; chain: empty
  view<verify_status, 1, Space> status;   // (batch)
};

namespace detail {

// The rows of one request of a chain or a tree, as verify_walk reads them: node v's draft token is
// tokens(request, v - FirstToken), a chain's tokens holding d_1.. from node 1 on and a tree's
// holding every node (the root's unused).
template <class Drafts, std::int64_t FirstToken>
struct request_rows {
  const Drafts* in;
  std::int64_t request;
  INFUSE_HOST_DEVICE const float* target(std::int64_t v) const {
    return &in->target_probs(request, v, 0);
  }
  INFUSE_HOST_DEVICE const float* draft(std::int64_t v) const {
    return &in->draft_probs(request, v, 0);
  }
  INFUSE_HOST_DEVICE std::int32_t token(std::int64_t v) const {
    return in->tokens(request, v - FirstToken);
  }
};

template <class Space>
using chain_rows = request_rows<chain_drafts<Space>, 1>;
template <class Space>
using tree_rows = request_rows<tree_drafts<Space>, 0>;

// Records emitted tokens (and, for a tree, the accepted nodes) of one request; `active` is false
// in the threads of a CUDA block that only help with the passes.
template <class Space>
struct emit_into {
  const verify_result<Space>* out;
  std::int64_t request;
  bool active;
  INFUSE_HOST_DEVICE void operator()(std::int32_t k, std::int64_t node, std::int32_t token) const {
    if (!active) return;
    out->tokens(request, k) = token;
    if (node >= 0 && out->path.size() > 0) out->path(request, k) = static_cast<std::int32_t>(node);
  }
};

// The residual weight of token x: p(x) for a = 0, else max(0, p(x) - a q(x)). Computed with an
// explicit fma so both backends round identically; NaN passes through, so a sum detects it.
INFUSE_HOST_DEVICE inline double residual_weight(float p, const float* q_row, std::int64_t x,
                                                 double a) {
  if (a == 0.0) return p;
  const double weight = fma(-a, static_cast<double>(q_row[x]), static_cast<double>(p));
  return weight < 0.0 ? 0.0 : weight;
}

INFUSE_HOST_DEVICE inline bool valid_probability(float value) {
  return value >= 0.0f && value < INFINITY;
}

// The children of node v: the chain's single next node, or a scan of the parent indices.
struct chain_children {
  std::int64_t draft_count;
  // The first child of `node` after `previous` (-1 to start); -1 when there is none.
  INFUSE_HOST_DEVICE std::int64_t next(std::int64_t node, std::int64_t previous) const {
    return previous < 0 && node < draft_count ? node + 1 : -1;
  }
};

struct tree_children {
  const std::int32_t* parents;  // (nodes)
  std::int64_t nodes;
  INFUSE_HOST_DEVICE std::int64_t next(std::int64_t node, std::int64_t previous) const {
    for (std::int64_t c = (previous < 0 ? node : previous) + 1; c < nodes; ++c) {
      if (parents[c] == node) return c;
    }
    return -1;
  }
};

struct verify_outcome {
  std::int32_t accepted;  // accepted draft tokens
  verify_status status;
};

// Sets the emitted tokens (and the accepted nodes, when out has them) of one request to -1.
template <class Space>
INFUSE_HOST_DEVICE void clear_emitted(const verify_result<Space>& out, std::int64_t request) {
  const bool with_path = out.path.size() > 0;
  for (std::int64_t k = 0; k < out.tokens.extent(1); ++k) {
    out.tokens(request, k) = -1;
    if (with_path) out.path(request, k) = -1;
  }
}

// Writes the outcome of one request's walk: its accepted count and status, and on a bad status
// clears what the walk emitted before it stopped.
template <class Space>
INFUSE_HOST_DEVICE void store_outcome(const verify_result<Space>& out, std::int64_t request,
                                      const verify_outcome& outcome) {
  if (outcome.status != verify_status::ok) clear_emitted(out, request);
  out.accepted(request) = outcome.accepted;
  out.status(request) = outcome.status;
}

// The walk shared by both backends and by the chain and the tree. `Rows` gives the rows of a node:
//   target(v), draft(v): pointers to the vocab probabilities of node v,
//   token(c): the draft token of node c;
// `Ops` the passes over a row, sequential on the CPU, block-wide on CUDA (every thread of the block
// runs the walk, the passes broadcast their results):
//   residual_sum(p, q, a) = sum_x residual_weight(p(x), q, x, a),
//   residual_pick(p, q, a, target) = the first x whose running sum exceeds target (the last x of
//   positive weight when rounding leaves none),
//   argmax(p): the lowest id of the largest p (-1 when NaN or a negative value is read);
// `emit(k, node, token)` records the k-th emitted token (node -1 for the final one).
template <bool Greedy, class Children, class Rows, class Ops, class Emit>
INFUSE_HOST_DEVICE verify_outcome verify_walk(const Children& children, const Rows& rows,
                                              const Ops& ops, std::int64_t vocab,
                                              std::uint64_t seed, std::uint64_t position,
                                              Emit&& emit) {
  std::int64_t node = 0;
  std::int32_t depth = 0;
  for (;;) {
    const float* p = rows.target(node);
    std::int64_t next = -1;
    double a = 0.0;    // the residual is max(0, p - a q) ...
    double sum = 1.0;  // ... and sums to this
    std::int32_t greedy_token = -1;
    if constexpr (Greedy) {
      greedy_token = ops.argmax(p);
      if (greedy_token < 0) return {0, verify_status::invalid_probability};
    }
    const float* q = nullptr;
    std::uint32_t rank = 0;
    for (std::int64_t child = children.next(node, -1); child >= 0;
         child = children.next(node, child), ++rank) {
      const std::int32_t token = rows.token(child);
      if (token < 0 || token >= vocab) return {0, verify_status::invalid_token};
      if constexpr (Greedy) {
        if (token == greedy_token) {
          next = child;
          break;
        }
      } else {
        q = rows.draft(node);
        const float p_token = p[token];
        const float q_token = q[token];
        if (!valid_probability(p_token) || !valid_probability(q_token)) {
          return {0, verify_status::invalid_probability};
        }
        const float u = random_uniform({seed, position + depth, salt::verify}, rank);
        // accept with probability min(1, r(t) / q(t)) = residual(t) / (sum q(t))
        if (static_cast<double>(u) * q_token * sum < residual_weight(p_token, q, token, a)) {
          next = child;
          break;
        }
        a += sum;
        sum = ops.residual_sum(p, q, a);
        if (!(sum < INFINITY)) return {0, verify_status::invalid_probability};
        if (sum <= 0.0) {  // p <= a q everywhere: only rounding gets here; fall back to p
          a = 0.0;
          sum = 1.0;
        }
      }
    }
    if (next >= 0) {
      emit(depth, next, rows.token(next));
      node = next;
      ++depth;
      continue;
    }
    std::int32_t token = greedy_token;
    if constexpr (!Greedy) {
      if (a == 0.0) sum = ops.residual_sum(p, q, 0.0);  // the bonus draw normalises p itself
      if (!(sum > 0.0 && sum < INFINITY)) return {0, verify_status::invalid_probability};
      const float v = random_uniform({seed, position + depth, salt::residual});
      token = ops.residual_pick(p, q, a, static_cast<double>(v) * sum);
    }
    emit(depth, -1, token);
    return {depth, verify_status::ok};
  }
}

// The sequential passes over one row, for the CPU and for tests.
struct sequential_row_ops {
  std::int64_t vocab;

  INFUSE_HOST_DEVICE double residual_sum(const float* p, const float* q, double a) const {
    double sum = 0.0;
    for (std::int64_t x = 0; x < vocab; ++x) {
      if (!(p[x] >= 0.0f) || (a != 0.0 && !(q[x] >= 0.0f))) return NAN;
      sum += residual_weight(p[x], q, x, a);
    }
    return sum;
  }

  INFUSE_HOST_DEVICE std::int32_t residual_pick(const float* p, const float* q, double a,
                                                double target) const {
    double running = 0.0;
    std::int32_t last_positive = 0;
    for (std::int64_t x = 0; x < vocab; ++x) {
      const double weight = residual_weight(p[x], q, x, a);
      if (weight <= 0.0) continue;
      running += weight;
      last_positive = static_cast<std::int32_t>(x);
      if (running > target) return last_positive;
    }
    return last_positive;
  }

  INFUSE_HOST_DEVICE std::int32_t argmax(const float* p) const {
    std::int32_t best = 0;
    for (std::int64_t x = 0; x < vocab; ++x) {
      if (!(p[x] >= 0.0f)) return -1;  // NaN or negative
      if (p[x] > p[best]) best = static_cast<std::int32_t>(x);
    }
    return vocab > 0 ? best : -1;
  }
};

// ---- host-side checks, shared by the backends
// ----------------------------------------------------

inline constexpr const char* verify_chain_call = "infuse::search::verify_chain";
inline constexpr const char* verify_tree_call = "infuse::search::verify_tree";

struct verify_shape {
  std::int64_t batch;
  std::int64_t length;  // draft tokens (chain) or nodes (tree)
  std::int64_t vocab;
};

// The checks both verifications share, after their token arrays: the probability rows, with
// `target_rows` rows per request (as many as the emitted tokens) and `draft_rows`, the per-request
// arrays and the outputs (out.path for a tree only). Returns the vocab.
template <acceptance Rule, class Drafts, class Space>
std::int64_t require_rows_and_outputs(const char* call, const Drafts& in,
                                      const verify_result<Space>& out, std::int64_t batch,
                                      expected_extent target_rows, expected_extent draft_rows) {
  require_view(in.target_probs, call, "in.target_probs",
               {{batch, "the batch"}, target_rows, any_extent});
  const std::int64_t vocab = in.target_probs.extent(2);
  require(vocab > 0 || batch == 0, call, "in.target_probs.extent(2)", vocab, "a positive vocab");
  if constexpr (Rule == acceptance::sampled) {
    require_view(in.draft_probs, call, "in.draft_probs",
                 {{batch, "the batch"}, draft_rows, {vocab, "vocab"}});
  }
  const std::int64_t emitted = target_rows.value;
  require_view(in.seeds, call, "seeds", {{batch, "the batch"}}, stride_rule::any);
  require_view(in.positions, call, "positions", {{batch, "the batch"}}, stride_rule::any);
  require_view(out.accepted, call, "out.accepted", {{batch, "the batch"}}, stride_rule::any);
  require_view(out.status, call, "out.status", {{batch, "the batch"}}, stride_rule::any);
  require_view(out.tokens, call, "out.tokens", {{batch, "the batch"}, {emitted, "emitted tokens"}},
               stride_rule::any);
  if constexpr (std::is_same_v<Drafts, tree_drafts<Space>>) {
    require_view(out.path, call, "out.path", {{batch, "the batch"}, {emitted, "nodes"}},
                 stride_rule::any);
  }
  return vocab;
}

template <acceptance Rule, class Space>
verify_shape require_chain(const chain_drafts<Space>& in, const verify_result<Space>& out) {
  const char* call = verify_chain_call;
  const std::int64_t batch = in.tokens.extent(0);
  const std::int64_t n = in.tokens.extent(1);
  require_view(in.tokens, call, "in.tokens", {any_extent, any_extent}, stride_rule::any);
  return {batch, n,
          require_rows_and_outputs<Rule>(call, in, out, batch, {n + 1, "draft tokens + 1"},
                                         {n, "draft tokens"})};
}

template <acceptance Rule, class Space>
verify_shape require_tree(const tree_drafts<Space>& in, const verify_result<Space>& out) {
  const char* call = verify_tree_call;
  const std::int64_t batch = in.parents.extent(0);
  const std::int64_t nodes = in.parents.extent(1);
  require_view(in.parents, call, "in.parents", {any_extent, any_extent}, stride_rule::contiguous);
  require(nodes > 0 || batch == 0, call, "in.parents.extent(1)", nodes, "at least the root");
  require_view(in.tokens, call, "in.tokens", {{batch, "the batch"}, {nodes, "nodes"}},
               stride_rule::any);
  return {batch, nodes,
          require_rows_and_outputs<Rule>(call, in, out, batch, {nodes, "nodes"},
                                         {nodes, "nodes"})};
}

}  // namespace detail

}  // namespace infuse::search
