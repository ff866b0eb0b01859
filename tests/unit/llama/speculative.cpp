#include "llama/speculative.hpp"

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <infuse/infuse.hpp>
#include <span>
#include <vector>

#include "llama/model.hpp"
#include "llama/passkey.hpp"
#include "llama/retrieval_model.hpp"
#include "reference/sampling.hpp"
#include "support/random.hpp"

namespace {

namespace llama = infuse::llama;
namespace quant = infuse::quant;

// The self-speculative pair of the demo: an int2 draft and an int8 target over one set of weights.
struct int2_draft {
  static constexpr const char* name = "int2 draft";
  using weights = quant::int_<2, 32, quant::zero_point>;
  using k = quant::int_<2, 32, quant::zero_point>;
  using v = quant::int_<2, 32, quant::zero_point>;
  using layout = infuse::kv::paged<16>;
  using sparsity = infuse::sparse::dense;
};

struct int8_target {
  static constexpr const char* name = "int8 target";
  using weights = quant::int_<8, quant::per_channel>;
  using k = quant::int_<8, quant::per_channel>;
  using v = quant::int_<8, quant::per_channel>;
  using layout = infuse::kv::paged<8>;
  using sparsity = infuse::sparse::dense;
};

struct shape {
  int dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab;
  double logit_scale;  // the spread of the logits: larger, the more peaked the distributions
};

// A model with random weights (grouped-query attention, a live MLP) of the given shape.
llama::float_weights random_weights(infuse::test::seeded_rng& rng, const shape& s) {
  llama::float_weights w;
  llama::model_config& c = w.config;
  c.dim = s.dim;
  c.hidden_dim = s.hidden_dim;
  c.n_layers = s.n_layers;
  c.n_heads = s.n_heads;
  c.n_kv_heads = s.n_kv_heads;
  c.vocab_size = s.vocab;
  c.context_length = 1024;
  c.rope_base = 10000.0f;
  const auto matrix = [&](std::int64_t rows, std::int64_t cols, double scale = 1.0) {
    return rng.normals<float>(static_cast<std::size_t>(rows * cols),
                              scale / std::sqrt(double(cols)));
  };
  const std::vector<float> norm(static_cast<std::size_t>(c.dim), 1.0f);
  w.embedding = rng.normals<float>(static_cast<std::size_t>(c.vocab_size * c.dim));
  for (int l = 0; l < c.n_layers; ++l) {
    w.layers.push_back({norm, matrix(c.dim, c.dim), matrix(c.kv_dim(), c.dim),
                        matrix(c.kv_dim(), c.dim), matrix(c.dim, c.dim), norm,
                        matrix(c.hidden_dim, c.dim), matrix(c.hidden_dim, c.dim),
                        matrix(c.dim, c.hidden_dim)});
  }
  w.output_norm = norm;
  w.output = matrix(c.vocab_size, c.dim, s.logit_scale);
  return w;
}

std::vector<std::int32_t> random_tokens(infuse::test::seeded_rng& rng, std::size_t count,
                                        int vocab) {
  std::vector<std::int32_t> tokens(count);
  for (auto& token : tokens) token = static_cast<std::int32_t>(rng.integer(0, vocab - 1));
  return tokens;
}

// The target's own greedy generation: prefill, then one decode step per token.
template <class Config>
std::vector<std::int32_t> greedy_generation(const llama::model<Config>& model,
                                            const std::vector<std::int32_t>& prompt,
                                            std::int64_t count) {
  llama::session<Config> session(model, infuse::exec::cpu(1), std::int64_t(prompt.size()) + count);
  session.prefill(prompt);
  std::vector<std::int32_t> tokens{session.greedy()};
  while (std::ssize(tokens) < count) {
    session.decode(tokens.back());
    tokens.push_back(session.greedy());
  }
  return tokens;
}

constexpr shape greedy_shape{64, 96, 2, 4, 2, 48, 4.0};

}  // namespace

TEST_CASE_TEMPLATE("llama speculative: greedy output equals the target's own greedy decoding",
                   Draft, int2_draft, int8_target) {
  INFUSE_RANDOM(rng);
  const llama::float_weights weights = random_weights(rng, greedy_shape);
  const llama::model<Draft> draft(weights);
  const llama::model<int8_target> target(weights);
  const auto prompt = random_tokens(rng, 21, greedy_shape.vocab);
  constexpr std::int64_t count = 40;
  const auto expected = greedy_generation(target, prompt, count);
  for (const int gamma : {1, 4}) {
    // The capacity fits exactly: the last steps draft fewer tokens, the very last none.
    llama::speculative<Draft, int8_target> pair(draft, target, infuse::exec::cpu(1),
                                                std::int64_t(prompt.size()) + count, gamma);
    INFO("gamma " << gamma);
    CHECK(pair.generate(prompt, count, 0.0f, rng.seed()) == expected);
    const llama::speculative_stats& stats = pair.stats();
    CHECK(stats.emitted >= count);
    CHECK(stats.emitted == stats.steps + stats.accepted);
    CHECK(stats.accepted <= stats.drafted);
    CHECK(pair.length() == stats.emitted + std::int64_t(prompt.size()) - 1);
    CHECK(pair.draft().length() <= pair.length() + 1);
    if constexpr (std::is_same_v<Draft, int8_target>) {
      CHECK(stats.acceptance_rate() > 0.95);  // the same model: only rounding disagrees
    } else {
      // A random model at int2 guesses some tokens, not all: both outcomes of a step occur.
      MESSAGE("int2 draft acceptance " << stats.acceptance_rate() << " at gamma " << gamma);
      CHECK(stats.accepted > 0);
      CHECK(stats.accepted < stats.drafted);
    }
  }
}

TEST_CASE("llama speculative: the retrieval model's passkey through the int2 / int8 pair") {
  INFUSE_RANDOM(rng);
  const llama::float_weights weights = llama::retrieval::weights();
  const llama::model<int2_draft> draft(weights);
  const llama::model<int8_target> target(weights);
  const auto prompt = llama::make_passkey_prompt(120, rng.seed(), 0);
  INFO("depth " << prompt.depth << ", passkey " << prompt.answer);
  constexpr std::int64_t count = 8;
  const auto expected = greedy_generation(target, prompt.tokens, count);
  CHECK(expected.front() == prompt.answer);
  llama::speculative<int2_draft, int8_target> pair(draft, target, infuse::exec::cpu(1),
                                                   std::int64_t(prompt.tokens.size()) + count, 4);
  CHECK(pair.generate(prompt.tokens, count, 0.0f, 1) == expected);
  MESSAGE("retrieval model, int2 draft acceptance " << pair.stats().acceptance_rate());
}

// One step at temperature 1: its first token must follow the target's distribution p. The
// draft's own first proposal follows q, which differs: what a step that accepted every draft
// token (min(1, p/q) replaced by 1) would emit. The same test must reject it.
TEST_CASE("llama speculative: sampled tokens follow the target's distribution (G test)") {
  INFUSE_RANDOM(rng);
  constexpr shape tiny{32, 32, 1, 2, 1, 12, 2.0};
  const llama::float_weights weights = random_weights(rng, tiny);
  const llama::model<int2_draft> draft(weights);
  const llama::model<int8_target> target(weights);
  const infuse::exec::cpu exec(1);
  std::vector<std::int32_t> prompt;

  const auto distribution = [&](auto& session) {
    session.prefill(prompt);
    const std::span<const float> logits = session.logits();
    const double top = *std::max_element(logits.begin(), logits.end());
    std::vector<double> p(logits.size());
    double sum = 0;
    for (std::size_t x = 0; x < p.size(); ++x) sum += p[x] = std::exp(double(logits[x]) - top);
    for (double& value : p) value /= sum;
    return p;
  };
  // A prompt after which draft and target differ enough for the accept-all variant to show.
  std::vector<double> p;
  double distance = 0;
  for (int attempt = 0; attempt < 20 && distance <= 0.1; ++attempt) {
    prompt = random_tokens(rng, 5, tiny.vocab);
    llama::session<int8_target> target_alone(target, exec, 16);
    llama::session<int2_draft> draft_alone(draft, exec, 16);
    p = distribution(target_alone);
    const std::vector<double> q = distribution(draft_alone);
    distance = 0;
    for (std::size_t x = 0; x < p.size(); ++x) distance += std::abs(p[x] - q[x]) / 2;
  }
  INFO("total variation between draft and target " << distance);
  REQUIRE(distance > 0.1);

  constexpr int draws = 2500;
  std::vector<std::int64_t> emitted(p.size()), proposed(p.size());
  const std::uint64_t base = rng.seed();
  for (int i = 0; i < draws; ++i) {
    const std::uint64_t seed = base + std::uint64_t(i);
    llama::speculative<int2_draft, int8_target> pair(draft, target, exec, 16, 3);
    pair.start(prompt);
    ++emitted[std::size_t(pair.step(1.0f, seed).front())];
    // The draft's first proposal, drawn as the step draws it (position of the first draft token).
    llama::session<int2_draft> alone(draft, exec, 16);
    alone.prefill(prompt);
    ++proposed[std::size_t(alone.sample(1.0f, 1.0f, seed))];
  }
  const auto fit = infuse::reference::g_test(emitted, p);
  INFO("G " << fit.statistic << " over " << fit.bins << " bins, critical " << fit.critical);
  CHECK_FALSE(fit.rejects());
  const auto planted = infuse::reference::g_test(proposed, p);
  INFO("accept-all G " << planted.statistic << ", critical " << planted.critical);
  CHECK(planted.rejects());
}

TEST_CASE("llama speculative: bad input throws infuse::error naming the argument") {
  INFUSE_RANDOM(rng);
  const llama::float_weights weights = random_weights(rng, greedy_shape);
  const llama::model<int2_draft> draft(weights);
  const llama::model<int8_target> target(weights);
  const infuse::exec::cpu exec(1);
  using pair_type = llama::speculative<int2_draft, int8_target>;
  // The argument an infuse::error from `call` names.
  const auto argument = [](auto&& call) -> std::string {
    try {
      call();
    } catch (const infuse::error& e) {
      return e.argument();
    }
    return "no error";
  };
  CHECK(argument([&] { pair_type(draft, target, exec, 40, 0); }) == "gamma");
  CHECK(argument([&] { pair_type(draft, target, exec, 40, 65); }) == "gamma");
  llama::float_weights other = random_weights(rng, {64, 96, 2, 4, 2, 40, 1.0});
  const llama::model<int2_draft> other_vocab(other);
  CHECK(argument([&] { pair_type(other_vocab, target, exec, 40, 4); }) ==
        "draft.config().vocab_size");
  CHECK(argument([&] { pair_type(draft, target, exec, 0, 4); }) == "capacity");

  pair_type pair(draft, target, exec, 40, 4);
  CHECK(argument([&] { (void)pair.step(0.0f, 1); }) == "start()");
  CHECK(argument([&] { pair.start(std::vector<std::int32_t>{}); }) == "prompt.size()");
  CHECK(argument([&] { pair.start(std::vector<std::int32_t>{1, 2, 48}); }) == "prompt.back()");
  CHECK(argument([&] { pair.start(std::vector<std::int32_t>{1, 48, 2}); }) == "tokens[1]");
  CHECK(argument([&] { pair.start(std::vector<std::int32_t>(41, 1)); }) == "prompt.size()");
  CHECK(pair.length() == 0);
  CHECK(pair.draft().length() == 0);
  pair.start(std::vector<std::int32_t>{1, 2, 3});
  CHECK(argument([&] { pair.start(std::vector<std::int32_t>{1}); }) == "start()");
  CHECK(argument([&] { (void)pair.step(-1.0f, 1); }) == "temperature");
  CHECK(argument([&] { (void)pair.step(NAN, 1); }) == "temperature");
  CHECK(pair.length() == 2);
  // Fill the sequence: then a step has no room left.
  while (pair.length() < 40) (void)pair.step(0.0f, 1);
  CHECK(argument([&] { (void)pair.step(0.0f, 1); }) == "capacity");

  llama::session<int8_target> session(target, exec, 10);
  session.prefill(std::vector<std::int32_t>{1, 2, 3});
  CHECK(argument([&] { session.truncate(4); }) == "tokens");
  CHECK(argument([&] { session.truncate(-1); }) == "tokens");
  CHECK(argument([&] { (void)session.score(std::vector<std::int32_t>(8, 1)); }) == "tokens.size()");
  CHECK(session.length() == 3);
}
