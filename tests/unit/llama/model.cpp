#include "llama/model.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <infuse/infuse.hpp>
#include <infuse/sparse/sparse.hpp>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "files.hpp"
#include "llama/gguf.hpp"
#include "llama/passkey.hpp"
#include "llama/retrieval_model.hpp"
#include "reference/compare.hpp"
#include "reference/llama.hpp"
#include "support/random.hpp"

namespace {

namespace llama = infuse::llama;
namespace quant = infuse::quant;

struct f32_dense {
  static constexpr const char* name = "f32";
  using weights = quant::none<float>;
  using k = quant::none<float>;
  using v = quant::none<float>;
  using layout = infuse::kv::paged<16>;
  using sparsity = infuse::sparse::dense;
};

struct int8_dense {
  static constexpr const char* name = "int8";
  using weights = quant::int_<8, quant::per_channel>;
  using k = quant::int_<8, quant::per_channel>;
  using v = quant::int_<8, quant::per_channel>;
  using layout = infuse::kv::paged<8, infuse::kv::hnd>;
  using sparsity = infuse::sparse::dense;
};

template <class Sparsity>
struct int8_sparse {
  static constexpr const char* name = "int8 sparse";
  using weights = quant::int_<8, quant::per_channel>;
  using k = quant::int_<8, quant::per_channel>;
  using v = quant::int_<8, quant::per_channel>;
  using layout = infuse::kv::paged<16>;
  using sparsity = Sparsity;
};

std::int64_t argmax(std::span<const double> values) {
  return std::max_element(values.begin(), values.end()) - values.begin();
}

// A small model with random weights, grouped-query attention and a live MLP.
llama::float_weights random_model(infuse::test::seeded_rng& rng) {
  llama::float_weights w;
  llama::model_config& c = w.config;
  c.dim = 64;
  c.hidden_dim = 96;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.vocab_size = 40;
  c.context_length = 256;
  c.rope_base = 10000.0f;
  const auto matrix = [&](std::int64_t rows, std::int64_t cols) {
    return rng.normals<float>(static_cast<std::size_t>(rows * cols), 1.0 / std::sqrt(double(cols)));
  };
  const auto norm = [&] {
    std::vector<float> weight(static_cast<std::size_t>(c.dim));
    for (auto& value : weight) value = static_cast<float>(rng.uniform(0.5, 1.5));
    return weight;
  };
  w.embedding = rng.normals<float>(static_cast<std::size_t>(c.vocab_size * c.dim));
  for (int l = 0; l < c.n_layers; ++l) {
    w.layers.push_back({norm(), matrix(c.dim, c.dim), matrix(c.kv_dim(), c.dim),
                        matrix(c.kv_dim(), c.dim), matrix(c.dim, c.dim), norm(),
                        matrix(c.hidden_dim, c.dim), matrix(c.hidden_dim, c.dim),
                        matrix(c.dim, c.hidden_dim)});
  }
  w.output_norm = norm();
  w.output = matrix(c.vocab_size, c.dim);
  return w;
}

// Prefills all of `tokens` but the last in chunks of `chunk`, decodes the last, and checks both
// logits against the float64 reference; then hands the session to `then`.
template <class Config, class Then = void (*)(llama::session<Config>&)>
void check_against_reference(
    const llama::float_weights& weights, const std::vector<std::int32_t>& tokens,
    std::int64_t chunk, double tolerance, Then then = [](llama::session<Config>&) {}) {
  const llama::model<Config> model(weights);
  llama::session<Config> session(model, infuse::exec::cpu(2), 1000, {}, chunk);
  const std::vector<std::int32_t> prompt(tokens.begin(), tokens.end() - 1);
  const auto prefill_logits = session.prefill(prompt);
  CHECK(infuse::reference::relative_error(
            prefill_logits, std::span<const double>(infuse::reference::llama_last_logits(
                                weights, prompt))) < tolerance);
  const auto decode_logits = session.decode(tokens.back());
  CHECK(infuse::reference::relative_error(
            decode_logits, std::span<const double>(
                               infuse::reference::llama_last_logits(weights, tokens))) < tolerance);
  CHECK(session.length() == static_cast<std::int64_t>(tokens.size()));
  then(session);
}

}  // namespace

TEST_CASE("llama reference: the retrieval model finds 10 of 10 passkeys at 2048 tokens") {
  INFUSE_RANDOM(rng);
  const llama::float_weights weights = llama::retrieval::weights();
  for (std::uint64_t trial = 0; trial < 10; ++trial) {
    const auto prompt = llama::make_passkey_prompt(2048, rng.seed(), trial);
    const auto logits = infuse::reference::llama_last_logits(weights, prompt.tokens);
    INFO("trial " << trial << ", depth " << prompt.depth << ", passkey " << prompt.answer);
    CHECK(argmax(logits) == prompt.answer);
    std::vector<double> others = logits;
    others[static_cast<std::size_t>(prompt.answer)] = -INFINITY;
    CHECK(logits[static_cast<std::size_t>(prompt.answer)] -
              *std::max_element(others.begin(), others.end()) >
          10.0);
  }
}

TEST_CASE("llama runner: prompts are exactly repeatable and well formed") {
  const auto a = llama::make_passkey_prompt(100, 7, 3);
  const auto b = llama::make_passkey_prompt(100, 7, 3);
  CHECK(a.tokens == b.tokens);
  CHECK(a.tokens != llama::make_passkey_prompt(100, 7, 4).tokens);
  CHECK(a.tokens[static_cast<std::size_t>(a.depth)] == llama::retrieval::key_token);
  CHECK(a.tokens[static_cast<std::size_t>(a.depth + 1)] == a.answer);
  CHECK(a.tokens.back() == llama::retrieval::key_token);
  CHECK(std::count(a.tokens.begin(), a.tokens.end(), llama::retrieval::key_token) == 2);
  CHECK_THROWS_AS(llama::make_passkey_prompt(2, 7, 0), infuse::error);
}

TEST_CASE_TEMPLATE("llama runner: logits of a random model match the float64 reference", Config,
                   f32_dense, int8_dense) {
  INFUSE_RANDOM(rng);
  const llama::float_weights weights = random_model(rng);
  std::vector<std::int32_t> tokens(77);
  for (auto& token : tokens)
    token = static_cast<std::int32_t>(rng.integer(0, weights.config.vocab_size - 1));
  // int8 weights and KV: about 1% error per product, compounded over two layers.
  const double tolerance = std::is_same_v<Config, f32_dense> ? 1e-4 : 0.1;
  check_against_reference<Config>(weights, tokens, 32, tolerance);
}

TEST_CASE_TEMPLATE("llama runner: the retrieval model answers the passkey", Config, f32_dense,
                   int8_dense) {
  INFUSE_RANDOM(rng);
  const llama::float_weights weights = llama::retrieval::weights();
  const auto prompt = llama::make_passkey_prompt(200, rng.seed(), 0);
  INFO("depth " << prompt.depth << ", passkey " << prompt.answer);
  check_against_reference<Config>(weights, prompt.tokens, 64, 1e-3, [&](auto& session) {
    CHECK(session.greedy() == prompt.answer);
    // A margin of ~16 in the logits: sampling at temperature 1 still names the passkey.
    CHECK(session.sample(0.0f, 1.0f, rng.seed()) == prompt.answer);
    CHECK(session.sample(1.0f, 0.9f, rng.seed()) == prompt.answer);
    CHECK_THROWS_AS((void)session.sample(-1.0f, 0.9f, 1), infuse::error);
  });
}

TEST_CASE("llama runner: a GGUF checkpoint runs through load_weights and matches the reference") {
  INFUSE_RANDOM(rng);
  const auto vocab = infuse::test::test_vocabulary("\xE2\x96\x81");
  std::map<std::string, infuse::test::gguf_tensor_spec> specs;
  infuse::test::gguf_builder::field_map fields;
  const infuse::test::tiny_shape shape{64, 96, 2, 4, 2, 128};
  const auto bytes = infuse::test::tiny_gguf(rng, shape, false, vocab, specs).build(fields);
  llama::checkpoint file = llama::load_gguf(infuse::test::as_file("tiny.gguf", bytes));
  const llama::float_weights weights = llama::load_weights(file);
  CHECK(weights.config.dim == 64);
  CHECK(weights.layers[0].w_down.size() == 64u * 96u);
  std::vector<std::int32_t> tokens(20);
  for (auto& token : tokens) token = static_cast<std::int32_t>(rng.integer(0, vocab.size() - 1));
  check_against_reference<f32_dense>(weights, tokens, 8, 1e-4);
}

// The passkey sits early in a 400-token prompt: a decode step that sees only the last 32 tokens
// (and 4 sinks) cannot name it; one that reads the 4 pages of highest key bound can.
TEST_CASE("llama runner: decode attention follows the configuration's sparsity policy") {
  INFUSE_RANDOM(rng);
  const llama::float_weights weights = llama::retrieval::weights();
  std::uint64_t trial = 0;
  llama::passkey_prompt prompt = llama::make_passkey_prompt(400, rng.seed(), trial);
  while (prompt.depth > 300) prompt = llama::make_passkey_prompt(400, rng.seed(), ++trial);
  INFO("depth " << prompt.depth << ", passkey " << prompt.answer);
  const std::span<const std::int32_t> haystack =
      std::span<const std::int32_t>(prompt.tokens).first(prompt.tokens.size() - 1);

  using window = int8_sparse<infuse::sparse::window>;
  const llama::model<window> windowed(weights);
  llama::session<window> short_sight(windowed, infuse::exec::cpu(2), 400,
                                     {.sink = 4, .window = 32});
  short_sight.prefill(haystack);
  short_sight.decode(prompt.tokens.back());
  CHECK(short_sight.greedy() != prompt.answer);

  using quest = int8_sparse<infuse::sparse::quest<4>>;
  const llama::model<quest> paged(weights);
  llama::session<quest> bounded(paged, infuse::exec::cpu(2), 400);
  bounded.prefill(haystack);
  bounded.decode(prompt.tokens.back());
  CHECK(bounded.greedy() == prompt.answer);
}

TEST_CASE("llama runner: bad input throws infuse::error before any work") {
  const llama::float_weights weights = llama::retrieval::weights();
  const llama::model<f32_dense> model(weights);
  llama::session<f32_dense> session(model, infuse::exec::cpu(1), 40);
  const std::vector<std::int32_t> too_long(41, 1);
  CHECK_THROWS_AS(session.prefill(too_long), infuse::error);
  CHECK_THROWS_AS(session.prefill(std::vector<std::int32_t>{}), infuse::error);
  CHECK_THROWS_AS(session.prefill(std::vector<std::int32_t>{1, 256}), infuse::error);
  CHECK_THROWS_AS(session.decode(-1), infuse::error);
  CHECK(session.length() == 0);
  session.prefill(std::vector<std::int32_t>(40, 3));
  CHECK_THROWS_AS(session.decode(1), infuse::error);  // the cache is full
  CHECK(session.length() == 40);
  CHECK_THROWS_AS(llama::session<f32_dense>(model, infuse::exec::cpu(1), 0), infuse::error);

  llama::float_weights odd_heads = weights;
  odd_heads.config.n_heads = 7;  // 512 / 7: no whole head dim
  CHECK_THROWS_AS(llama::model<f32_dense>{odd_heads}, infuse::error);
  llama::float_weights short_wk = weights;
  short_wk.layers[1].wk.resize(short_wk.layers[1].wk.size() - 512);  // one head dim row short
  CHECK_THROWS_AS(llama::model<f32_dense>{short_wk}, infuse::error);
  llama::float_weights no_layer = weights;
  no_layer.layers.pop_back();
  CHECK_THROWS_AS(llama::model<f32_dense>{no_layer}, infuse::error);
}
