// One step of beam search with Hugging Face transformers' semantics (BeamSearchScorer and
// BeamHypotheses), for `Width` beams per request:
//   1. scores of every continuation: beam_score + log_softmax(logits of the beam);
//   2. the top 2 Width of them over all the request's beams (top 2 Width per beam, then merged;
//      ties go to the lower beam, then the lower token);
//   3. in that order: a candidate ending in EOS among the first Width goes to the pool of finished
//      hypotheses with score sum_logprobs / generated_length^length_penalty (an EOS candidate
//      ranked Width or later is dropped); the others become the new beams until there are Width;
//   4. the request is done when the pool is full and
//      early_stopping::exact ("True"):      always;
//      early_stopping::heuristic ("False"): worst pool score >= best / generated_length^alpha;
//      early_stopping::never ("never"):     worst pool score >= best / max_generated_length^alpha
//                                           when alpha > 0, else as heuristic,
//      with `best` the best candidate's sum of log-probabilities. A done request's beams get
//      parent 0, the pad token and score 0 (transformers pads them alike).
// transformers' lengths: generated_length = cur_len - decoder_prompt_len, where cur_len counts the
// token chosen at this step; max_generated_length = max_length - decoder_prompt_len.
//
// The pool is the caller's memory: Width scores and a size per request. A new hypothesis fills
// the next free slot, or, when the pool is full and it beats the worst score, replaces the worst
// (the lowest slot among equal worst). finished_parent(slot) tells the caller which beam's
// sequence (without the EOS) to store at that slot: -1 where no hypothesis arrived this step.
// The returned parent of each new beam tells the caller which KV pages to fork.
//
// Bad input: NaN or +inf logits in any beam of a request set its status to
// beam_status::invalid_logits and leave the request untouched except for its outputs (parents
// 0..Width-1, the pad token, scores -inf, no finished hypotheses).
#pragma once

#include <cmath>
#include <cstdint>

#include "infuse/core/config.hpp"
#include "infuse/core/math.hpp"
#include "infuse/core/view.hpp"

namespace infuse::search {

enum class early_stopping {
  heuristic,  // transformers' early_stopping=False
  exact,      // early_stopping=True
  never,      // early_stopping="never"
};

enum class beam_status : std::uint8_t {
  ok = 0,
  invalid_logits = 1,
};

struct beam_params {
  float length_penalty = 1.0f;
  early_stopping stopping = early_stopping::heuristic;
  std::int32_t eos_token = -1;  // -1: none
  std::int32_t pad_token = 0;
  std::int64_t generated_length = 1;      // including this step's token
  std::int64_t max_generated_length = 1;  // for early_stopping::never
};

template <class Space>
struct beam_inputs {
  view<const float, 3, Space> logits;       // (requests,Width,vocab)
  view<const float, 2, Space> beam_scores;  // (requests,Width) sums of log-probabilities
};

// The pool of finished hypotheses, read and updated in place.
template <class Space>
struct beam_pool {
  view<float, 2, Space> scores;       // (requests,Width) length-penalised scores
  view<std::int32_t, 1, Space> size;  // (requests)
  view<std::uint8_t, 1, Space> done;  // (requests) 1 once the request is done
};

template <class Space>
struct beam_outputs {
  view<std::int32_t, 2, Space> parent;           // (requests,Width) beam each new beam extends
  view<std::int32_t, 2, Space> token;            // (requests,Width)
  view<float, 2, Space> score;                   // (requests,Width) may alias beam_scores
  view<std::int32_t, 2, Space> finished_parent;  // (requests,Width) per pool slot, -1 if none
  view<beam_status, 1, Space> status;            // (requests)
};

namespace detail {

struct beam_candidate {
  float score;  // a logit while selecting within a beam, then the sum of log-probabilities
  std::int32_t beam;
  std::int32_t token;
};

INFUSE_HOST_DEVICE inline bool better(const beam_candidate& a, const beam_candidate& b) {
  if (a.score != b.score) return a.score > b.score;
  if (a.beam != b.beam) return a.beam < b.beam;
  return a.token < b.token;
}

// The best K candidates seen, sorted best first; empty entries have token -1 and score -inf.
template <int K>
struct top_candidates {
  beam_candidate best[K];

  INFUSE_HOST_DEVICE top_candidates() {
    for (int i = 0; i < K; ++i) best[i] = {-INFINITY, 0x7fffffff, -1};
  }

  INFUSE_HOST_DEVICE void add(const beam_candidate& c) {
    if (!better(c, best[K - 1])) return;
    int i = K - 1;
    for (; i > 0 && better(c, best[i - 1]); --i) best[i] = best[i - 1];
    best[i] = c;
  }
};

// One pass over a beam's logits: its log-sum-exp and its top K logits.
template <int K>
struct beam_row_state {
  softmax_state<log_base::e> softmax;
  top_candidates<K> top;
  bool invalid = false;

  INFUSE_HOST_DEVICE void add(float logit, std::int32_t beam, std::int32_t token) {
    if (!(logit < INFINITY)) {
      invalid = true;
      return;
    }
    softmax.add(logit);
    top.add({logit, beam, token});
  }
};

// Penalised score of a finished hypothesis.
INFUSE_HOST_DEVICE inline float penalised(float sum_logprobs, std::int64_t length, float alpha) {
  return sum_logprobs / powf(static_cast<float>(length), alpha);
}

// Steps 3 and 4 for one request, from its top 2 Width candidates (sorted best first, scores
// already sums of log-probabilities). `Pool` and `Out` index the request's rows.
template <int Width, class Pool, class Out>
INFUSE_HOST_DEVICE void beam_merge(const top_candidates<2 * Width>& top, const beam_params& params,
                                   const Pool& pool, const Out& out) {
  for (int slot = 0; slot < Width; ++slot) out.finished_parent(slot) = -1;
  if (pool.done() != 0) {
    for (int b = 0; b < Width; ++b) {
      out.parent(b) = 0;
      out.token(b) = params.pad_token;
      out.score(b) = 0.0f;
    }
    return;
  }
  int beams = 0;
  for (int rank = 0; rank < 2 * Width && beams < Width; ++rank) {
    const beam_candidate& c = top.best[rank];
    if (c.token < 0) break;  // fewer candidates than 2 Width (a tiny vocabulary)
    if (c.token == params.eos_token) {
      if (rank >= Width) continue;
      const float score = penalised(c.score, params.generated_length, params.length_penalty);
      std::int32_t size = pool.size();
      int slot = size;
      if (size == Width) {
        slot = 0;
        for (int s = 1; s < Width; ++s) {
          if (pool.score(s) < pool.score(slot)) slot = s;
        }
        if (!(score > pool.score(slot))) continue;
      } else {
        pool.size() = ++size;
      }
      pool.score(slot) = score;
      out.finished_parent(slot) = c.beam;
    } else {
      out.parent(beams) = c.beam;
      out.token(beams) = c.token;
      out.score(beams) = c.score;
      ++beams;
    }
  }
  for (; beams < Width; ++beams) {  // only with fewer than 2 Width tokens in the vocabulary
    out.parent(beams) = 0;
    out.token(beams) = params.pad_token;
    out.score(beams) = -INFINITY;
  }
  if (pool.size() < Width) return;
  bool done = params.stopping == early_stopping::exact;
  if (!done) {
    float worst = pool.score(0);
    for (int s = 1; s < Width; ++s) worst = fminf(worst, pool.score(s));
    const std::int64_t length =
        params.stopping == early_stopping::never && params.length_penalty > 0.0f
            ? params.max_generated_length
            : params.generated_length;
    done = worst >= penalised(top.best[0].score, length, params.length_penalty);
  }
  if (done) pool.done() = 1;
}

// A request's rows of the pool and the outputs, for beam_merge.
template <class Space>
struct beam_request_pool {
  const beam_pool<Space>* pool;
  std::int64_t request;
  INFUSE_HOST_DEVICE float& score(int slot) const { return pool->scores(request, slot); }
  INFUSE_HOST_DEVICE std::int32_t& size() const { return pool->size(request); }
  INFUSE_HOST_DEVICE std::uint8_t& done() const { return pool->done(request); }
};

template <class Space>
struct beam_request_outputs {
  const beam_outputs<Space>* out;
  std::int64_t request;
  INFUSE_HOST_DEVICE std::int32_t& parent(int b) const { return out->parent(request, b); }
  INFUSE_HOST_DEVICE std::int32_t& token(int b) const { return out->token(request, b); }
  INFUSE_HOST_DEVICE float& score(int b) const { return out->score(request, b); }
  INFUSE_HOST_DEVICE std::int32_t& finished_parent(int s) const {
    return out->finished_parent(request, s);
  }
};

// The invalid-logits outputs of a request (see the header comment).
template <int Width, class Out>
INFUSE_HOST_DEVICE void beam_invalid(const beam_params& params, const Out& out) {
  for (int b = 0; b < Width; ++b) {
    out.parent(b) = b;
    out.token(b) = params.pad_token;
    out.score(b) = -INFINITY;
    out.finished_parent(b) = -1;
  }
}

// The shape checks of beam_step, shared by the backends.
template <int Width, class Space>
void require_beam_step(const beam_inputs<Space>& in, const beam_params& params,
                       const beam_pool<Space>& pool, const beam_outputs<Space>& out) {
  constexpr const char* call = "infuse::search::beam_step";
  const std::int64_t requests = in.logits.extent(0);
  require_view(in.logits, call, "in.logits", {any_extent, {Width, "Width"}, any_extent});
  const std::int64_t vocab = in.logits.extent(2);
  require(vocab > 0 && vocab <= 2147483647, call, "in.logits.extent(2)", vocab,
          "a vocab in [1, 2^31 - 1]");
  const expected_extent rows{requests, "requests"};
  const expected_extent width{Width, "Width"};
  require_view(in.beam_scores, call, "in.beam_scores", {rows, width}, stride_rule::any);
  require_view(pool.scores, call, "pool.scores", {rows, width}, stride_rule::any);
  require_view(pool.size, call, "pool.size", {rows}, stride_rule::any);
  require_view(pool.done, call, "pool.done", {rows}, stride_rule::any);
  require_view(out.parent, call, "out.parent", {rows, width}, stride_rule::any);
  require_view(out.token, call, "out.token", {rows, width}, stride_rule::any);
  require_view(out.score, call, "out.score", {rows, width}, stride_rule::any);
  require_view(out.finished_parent, call, "out.finished_parent", {rows, width}, stride_rule::any);
  require_view(out.status, call, "out.status", {rows}, stride_rule::any);
  require(params.generated_length >= 1, call, "params.generated_length", params.generated_length,
          "at least 1 (the tokens generated, this step's included)");
  require(params.stopping != early_stopping::never || params.length_penalty <= 0.0f ||
              params.max_generated_length >= 1,
          call, "params.max_generated_length", params.max_generated_length,
          "at least 1 with early_stopping::never and a positive length penalty");
  require(std::isfinite(params.length_penalty), call, "params.length_penalty",
          params.length_penalty, "a finite exponent");
}

}  // namespace detail

}  // namespace infuse::search
