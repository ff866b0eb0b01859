// Speculative decoding in the Llama runner: a cheap draft model proposes `gamma` tokens one at a
// time, the target model scores them all in one pass (a prefill of the new tokens over its cache,
// giving gamma + 1 next-token distributions), and search::verify_chain keeps the longest prefix
// the target agrees with plus one token of its own. The emitted tokens are distributed exactly as
// the target's own (greedy: equal to them), whatever the draft proposes; a better draft only
// makes the steps longer.
//
// Self-speculative decoding uses one set of float weights for both: the draft quantized hard, the
// target as it is served, e.g.
//
//   struct draft  { ...; using weights = quant::int_<2, 32, quant::zero_point>; /* int2 KV */ };
//   struct target { ...; using weights = quant::int_<8, quant::per_channel>;    /* int8 KV */ };
//   const llama::model<draft> small(weights);
//   const llama::model<target> large(weights);
//   llama::speculative<draft, target> pair(small, large, exec, capacity, 4);
//   pair.start(prompt);
//   while (...) for (std::int32_t token : pair.step(temperature, seed)) ...;
//
// One step, with both caches holding the L tokens before the last emitted token t:
//   draft   takes t (with the last draft token of the step before, in one pass, when every one
//           was accepted and the draft never saw it), then proposes d_1..d_gamma, drawing each
//           from its own distribution q_i (its argmax at temperature 0);
//   target  scores t, d_1..d_gamma at once: p_1..p_{gamma+1};
//   verify  accepts d_1..d_a (a <= gamma) and emits a + 1 tokens (lossless rule, verify.hpp);
//   both    drop the rejected tokens from their caches (session::truncate), so they hold the
//           L + 1 + a tokens before the step's last emitted token.
// Temperature 0 verifies greedily: the target rows are the one-hot of the target's argmax
// (search::greedy, as session::greedy picks). Above 0, p and q are the softmax of the logits over
// the temperature; the draft draws through session::sample (top_p 1), whose integer weights match
// q up to 2^-40 of mass. Randomness is keyed by the caller's seed and the position of each token:
// the draft's draws (salt::sample) and the verification's (salt::verify, salt::residual) never
// share a random number.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "infuse/core/error.hpp"
#include "infuse/core/view.hpp"
#include "infuse/exec/cpu.hpp"
#include "infuse/search/cpu/sample.hpp"
#include "infuse/search/cpu/verify.hpp"
#include "infuse/search/sample.hpp"
#include "infuse/search/verify.hpp"
#include "model.hpp"

namespace infuse::llama {

// What the steps so far did: verifications of the target, draft tokens proposed and accepted.
struct speculative_stats {
  std::int64_t steps = 0;
  std::int64_t drafted = 0;
  std::int64_t accepted = 0;
  std::int64_t emitted = 0;
  // Wall time of the draft's passes (one per drafted token), and of the target's side of the
  // steps: scoring, verification and truncation.
  double draft_seconds = 0;
  double target_seconds = 0;

  // Accepted draft tokens per proposed one.
  [[nodiscard]] double acceptance_rate() const {
    return drafted > 0 ? double(accepted) / double(drafted) : 0.0;
  }
};

template <class DraftConfig, class TargetConfig>
class speculative {
 public:
  // A sequence of up to `capacity` tokens, drafted by `draft` and verified by `target` (both must
  // outlive it; any two models over one vocabulary), `gamma` draft tokens a step. Throws
  // infuse::error naming the argument: gamma outside 1..64, different vocabularies, a capacity
  // the sessions refuse.
  speculative(const model<DraftConfig>& draft, const model<TargetConfig>& target,
              const exec::cpu& exec, std::int64_t capacity, int gamma)
      : draft_(checked(draft, target, gamma), exec, capacity),
        target_(target, exec, capacity),
        exec_(exec),
        gamma_(gamma),
        vocab_(target.config().vocab_size) {
    const auto rows = static_cast<std::size_t>(gamma + 1);
    drafts_.resize(rows);
    draft_probs_.resize(rows * static_cast<std::size_t>(vocab_));
    target_probs_.resize(rows * static_cast<std::size_t>(vocab_));
    emitted_.resize(rows);
  }

  // Takes a prompt: all but its last token go into both caches, the last waits for the first
  // step. Throws infuse::error for a second start, an empty prompt, a token outside the
  // vocabulary or a prompt that does not fit the capacity.
  void start(std::span<const std::int32_t> prompt) {
    constexpr std::string_view call = "infuse::llama::speculative::start";
    require(!started_, call, "start()", "called before", "one start per sequence");
    require(!prompt.empty(), call, "prompt.size()", 0, "at least 1 token");
    require(std::ssize(prompt) <= target_.capacity(), call, "prompt.size()", prompt.size(),
            "at most the capacity " + std::to_string(target_.capacity()));
    const std::int32_t last = prompt.back();
    require(last >= 0 && last < vocab_, call, "prompt.back()", last,
            "a token of the vocabulary, 0 to " + std::to_string(vocab_ - 1));
    if (prompt.size() > 1) {
      const auto before = prompt.first(prompt.size() - 1);
      draft_.prefill(before);  // checks the tokens before changing anything
      target_.prefill(before);
    }
    pending_ = {last};
    started_ = true;
  }

  // One step: drafts up to gamma tokens (fewer when the capacity runs out), verifies them and
  // returns the emitted tokens (the accepted drafts, then the target's own token). Temperature 0
  // is greedy; `seed` keys every random draw. Throws infuse::error before any work when start()
  // has not run, the temperature is negative or not finite, or the cache is full.
  std::span<const std::int32_t> step(float temperature, std::uint64_t seed) {
    constexpr std::string_view call = "infuse::llama::speculative::step";
    require(started_, call, "start()", "not called", "a prompt given to start() first");
    require(temperature >= 0.0f && std::isfinite(temperature), call, "temperature", temperature,
            "a finite value >= 0 (0: greedy)");
    const std::int64_t room = target_.capacity() - target_.length();
    require(room >= 1, call, "capacity", target_.capacity(),
            "room for one more token (the sequence is full)");
    const int gamma = static_cast<int>(std::min<std::int64_t>(gamma_, room - 1));
    const bool greedy = temperature == 0.0f;
    const std::int64_t position = target_.length() + 1;  // of the first draft token
    const auto drafting = std::chrono::steady_clock::now();

    // Draft: the pending tokens in one pass (two, the last proposal and the target's token, when
    // every proposal was accepted: one prefill costs about one decode step), then gamma
    // proposals, each fed back but the last.
    std::span<const float> logits =
        pending_.size() == 1 ? draft_.decode(pending_.front()) : draft_.prefill(pending_);
    for (int i = 0; i < gamma; ++i) {
      if (greedy) {
        drafts_[std::size_t(i)] = draft_.greedy();
      } else {
        softmax(logits, temperature, draft_row(i));
        drafts_[std::size_t(i)] = draft_.sample(temperature, 1.0f, seed);
      }
      if (i + 1 < gamma) logits = draft_.decode(drafts_[std::size_t(i)]);
    }

    // Target: the last emitted token and the drafts in one pass.
    const auto scoring = std::chrono::steady_clock::now();
    scored_.assign(1, pending_.back());
    scored_.insert(scored_.end(), drafts_.begin(), drafts_.begin() + gamma);
    const host_view<const float, 2> scores = target_.score(scored_);
    if (greedy) {
      one_hot_argmax(scores);
    } else {
      for (int i = 0; i <= gamma; ++i) softmax(row(scores, i), temperature, target_row(i));
    }

    const std::int32_t accepted = verify(gamma, greedy, seed, position);
    const std::span<const std::int32_t> emitted(emitted_.data(), std::size_t(accepted) + 1);

    // Both caches keep the step's input token and the accepted drafts. The draft took in all
    // its proposals but the last: when every one was accepted, that last one is still to come.
    target_.truncate(gamma - accepted);
    const bool draft_missed_last = accepted == gamma && gamma > 0;
    if (!draft_missed_last) draft_.truncate(std::max(gamma - 1, 0) - accepted);
    pending_.clear();
    if (draft_missed_last) pending_.push_back(drafts_[std::size_t(gamma - 1)]);
    pending_.push_back(emitted.back());

    const std::chrono::duration<double> drafted = scoring - drafting;
    const std::chrono::duration<double> scored = std::chrono::steady_clock::now() - scoring;
    stats_.draft_seconds += drafted.count();
    stats_.target_seconds += scored.count();
    ++stats_.steps;
    stats_.drafted += gamma;
    stats_.accepted += accepted;
    stats_.emitted += accepted + 1;
    return emitted;
  }

  // start(prompt), then steps until `count` tokens came out; returns the first `count` of them.
  std::vector<std::int32_t> generate(std::span<const std::int32_t> prompt, std::int64_t count,
                                     float temperature, std::uint64_t seed) {
    require(count >= 1 && std::ssize(prompt) + count <= target_.capacity(),
            "infuse::llama::speculative::generate", "count", count,
            "1 to the capacity left after the prompt");
    start(prompt);
    std::vector<std::int32_t> tokens;
    while (std::ssize(tokens) < count) {
      const auto emitted = step(temperature, seed);
      tokens.insert(tokens.end(), emitted.begin(), emitted.end());
    }
    tokens.resize(static_cast<std::size_t>(count));
    return tokens;
  }

  [[nodiscard]] const speculative_stats& stats() const { return stats_; }
  [[nodiscard]] int gamma() const { return gamma_; }
  // Tokens in the target's cache: everything before the last emitted token.
  [[nodiscard]] std::int64_t length() const { return target_.length(); }
  [[nodiscard]] const session<DraftConfig>& draft() const { return draft_; }
  [[nodiscard]] const session<TargetConfig>& target() const { return target_; }

 private:
  static const model<DraftConfig>& checked(const model<DraftConfig>& draft,
                                           const model<TargetConfig>& target, int gamma) {
    constexpr std::string_view call = "infuse::llama::speculative";
    require(gamma >= 1 && gamma <= 64, call, "gamma", gamma, "1 to 64 draft tokens a step");
    require(draft.config().vocab_size == target.config().vocab_size, call,
            "draft.config().vocab_size", draft.config().vocab_size,
            "the target's vocab_size " + std::to_string(target.config().vocab_size));
    return draft;
  }

  [[nodiscard]] std::span<float> draft_row(int i) {
    return {draft_probs_.data() + std::size_t(i) * std::size_t(vocab_), std::size_t(vocab_)};
  }
  [[nodiscard]] std::span<float> target_row(int i) {
    return {target_probs_.data() + std::size_t(i) * std::size_t(vocab_), std::size_t(vocab_)};
  }
  [[nodiscard]] static std::span<const float> row(host_view<const float, 2> rows, int i) {
    return {&rows(i, 0), std::size_t(rows.extent(1))};
  }

  // probs = softmax(logits / temperature), the sum in double.
  static void softmax(std::span<const float> logits, float temperature, std::span<float> probs) {
    const float top = *std::max_element(logits.begin(), logits.end());
    double sum = 0.0;
    for (std::size_t x = 0; x < logits.size(); ++x) {
      probs[x] = std::exp((logits[x] - top) / temperature);
      sum += probs[x];
    }
    const auto scale = static_cast<float>(1.0 / sum);
    for (float& p : probs) p *= scale;
  }

  // Target rows for greedy verification: 1 at each row's search::greedy token, 0 elsewhere, so
  // verification agrees with session::greedy even where two logits round to one probability.
  void one_hot_argmax(host_view<const float, 2> scores) {
    const std::int64_t rows = scores.extent(0);
    argmax_.resize(static_cast<std::size_t>(rows));
    logprob_.resize(static_cast<std::size_t>(rows));
    status_.resize(static_cast<std::size_t>(rows));
    search::greedy(
        exec_, scores,
        search::sample_outputs<host_memory>{
            {argmax_.data(), {rows}}, {logprob_.data(), {rows}}, {status_.data(), {rows}}, {}, {}});
    std::fill(target_probs_.begin(), target_probs_.end(), 0.0f);
    for (std::int64_t i = 0; i < rows; ++i) {
      require(status_[std::size_t(i)] == search::row_status::ok, "infuse::llama::speculative::step",
              "target logits", static_cast<int>(status_[std::size_t(i)]),
              "finite logits (row_status::ok)");
      target_row(static_cast<int>(i))[std::size_t(argmax_[std::size_t(i)])] = 1.0f;
    }
  }

  // search::verify_chain over the step's rows; returns the accepted count, emitted_ holds the
  // emitted tokens.
  std::int32_t verify(int gamma, bool greedy, std::uint64_t seed, std::int64_t position) {
    const std::int64_t n = gamma;
    const search::chain_drafts<host_memory> in{{drafts_.data(), {1, n}},
                                               {draft_probs_.data(), {1, n, vocab_}},
                                               {target_probs_.data(), {1, n + 1, vocab_}},
                                               {&seed, {1}},
                                               {&position, {1}}};
    std::int32_t accepted = 0;
    search::verify_status status = search::verify_status::ok;
    const search::verify_result<host_memory> out{
        {&accepted, {1}}, {emitted_.data(), {1, n + 1}}, {}, {&status, {1}}};
    if (greedy) {
      search::verify_chain<search::acceptance::greedy>(exec_, in, out);
    } else {
      search::verify_chain<search::acceptance::sampled>(exec_, in, out);
    }
    require(status == search::verify_status::ok, "infuse::llama::speculative::step", "logits",
            static_cast<int>(status), "finite logits (verify_status::ok)");
    return accepted;
  }

  session<DraftConfig> draft_;
  session<TargetConfig> target_;
  exec::cpu exec_;
  int gamma_;
  std::int32_t vocab_;
  bool started_ = false;
  std::vector<std::int32_t> pending_;       // tokens emitted or drafted that the draft has not seen
  std::vector<std::int32_t> drafts_;        // (gamma) d_1..d_gamma
  std::vector<std::int32_t> scored_;        // (gamma + 1) what the target scores
  std::vector<float> draft_probs_;          // (gamma, vocab) q_1..q_gamma (sampling only)
  std::vector<float> target_probs_;         // (gamma + 1, vocab) p_1..p_{gamma+1}
  std::vector<std::int32_t> emitted_;       // (gamma + 1)
  std::vector<std::int32_t> argmax_;        // (gamma + 1) greedy only
  std::vector<float> logprob_;              // (gamma + 1)
  std::vector<search::row_status> status_;  // (gamma + 1)
  speculative_stats stats_;
};

}  // namespace infuse::llama
