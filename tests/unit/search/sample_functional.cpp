// search::sample and search::greedy on the CPU, beyond the distributions: large vocabularies,
// batch invariance, log-probabilities, greedy ties, non-finite logits and argument checks.
#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "infuse/exec/cpu.hpp"
#include "infuse/search/cpu/sample.hpp"
#include "reference/sampling.hpp"
#include "support/random.hpp"

namespace {

namespace s = infuse::search;
using infuse::host_memory;
using infuse::host_view;
using filters_kp = s::filters<s::filter::temperature, s::filter::top_k, s::filter::top_p>;

// A batch of `rows` rows (each its own request) with per-request top_k / top_p / temperature.
struct kp_batch {
  std::int64_t rows, vocab;
  std::vector<float> logits;
  std::vector<std::int32_t> request;
  std::vector<std::int64_t> position;
  std::vector<std::uint64_t> seed;
  std::vector<float> temperature, top_p;
  std::vector<std::int32_t> top_k;
  std::vector<std::int32_t> token;
  std::vector<float> logprob;
  std::vector<s::row_status> status;
  std::vector<std::int32_t> top_tokens;
  std::vector<float> top_logprobs;
  std::int64_t top_n = 0;
  std::int64_t workspace_shortfall = 0;  // bytes fewer than sample_workspace_bytes to pass

  kp_batch(std::int64_t rows, std::int64_t vocab)
      : rows(rows), vocab(vocab), logits(rows * vocab), request(rows), position(rows), seed(rows),
        temperature(rows, 1.0f), top_p(rows, 1.0f), top_k(rows, 0), token(rows, -7),
        logprob(rows), status(rows) {
    for (std::int64_t r = 0; r < rows; ++r) {
      request[r] = std::int32_t(r);
      position[r] = 100 + r;
      seed[r] = 0xabcdef + std::uint64_t(r) * 7919;
    }
  }

  void run(infuse::exec::cpu exec = infuse::exec::cpu{}) {
    s::sample_params<host_memory, filters_kp> params;
    params.seed = {seed.data(), {rows}};
    params.temperature = {temperature.data(), {rows}};
    params.top_k = {top_k.data(), {rows}};
    params.top_p = {top_p.data(), {rows}};
    top_tokens.assign(rows * top_n, -9);
    top_logprobs.assign(rows * top_n, 9.0f);
    s::sample_outputs<host_memory> out{{token.data(), {rows}},
                                       {logprob.data(), {rows}},
                                       {status.data(), {rows}},
                                       {top_tokens.data(), {rows, top_n}},
                                       {top_logprobs.data(), {rows, top_n}}};
    std::vector<std::byte> workspace(
        std::size_t(s::sample_workspace_bytes<filters_kp>(exec, rows, vocab)));
    s::sample<filters_kp>(exec, host_view<const float, 2>(logits.data(), {rows, vocab}),
                          {{request.data(), {rows}}, {position.data(), {rows}}}, params, out,
                          {workspace.data(), {std::int64_t(workspace.size()) - workspace_shortfall}});
  }

  infuse::reference::sampling_case reference_case(std::int64_t r) const {
    infuse::reference::sampling_case c;
    c.logits.assign(logits.begin() + r * vocab, logits.begin() + (r + 1) * vocab);
    c.temperature = temperature[r];
    c.top_k = top_k[r];
    c.top_p = top_p[r];
    return c;
  }
};

}  // namespace

TEST_CASE("search::sample on large vocabularies: kept token, log-probability, top-n") {
  INFUSE_RANDOM(rng);
  for (const std::int64_t vocab : {32000, 128256, 151936}) {
    CAPTURE(vocab);
    kp_batch b(6, vocab);
    for (auto& x : b.logits) x = float(rng.normal(0.0, 3.0));
    const std::int32_t ks[] = {50, 0, 1, 1000, std::int32_t(vocab) + 5, 0};
    const float ps[] = {0.9f, 0.8f, 1.0f, 0.95f, 0.7f, 1.0f};
    for (std::int64_t r = 0; r < b.rows; ++r) {
      b.top_k[r] = ks[r];
      b.top_p[r] = ps[r];
      b.temperature[r] = float(rng.uniform(0.5, 1.5));
    }
    b.top_n = 5;
    b.run();
    for (std::int64_t r = 0; r < b.rows; ++r) {
      CAPTURE(r);
      const auto c = b.reference_case(r);
      REQUIRE(b.status[r] == s::row_status::ok);
      REQUIRE(b.token[r] >= 0);
      REQUIRE(b.token[r] < vocab);
      // A top-p cut within float32 rounding of a running mass may keep one token more or less
      // than the float64 reference: such a row is checked for range only.
      if (infuse::reference::top_p_near_boundary(c, 2e-6)) continue;
      const auto p = infuse::reference::filtered_distribution(c);
      CHECK(p[b.token[r]] > 0.0);
      CHECK(b.logprob[r] == doctest::Approx(std::log(p[b.token[r]])).epsilon(1e-4));
      // top-n: the most likely kept tokens, most likely first, with their log-probabilities.
      const auto order = infuse::reference::by_decreasing_logit(infuse::reference::adjusted_logits(c));
      for (std::int64_t j = 0; j < b.top_n; ++j) {
        const std::int32_t expected = p[order[j]] > 0 ? order[j] : -1;
        CHECK(b.top_tokens[r * b.top_n + j] == expected);
        if (expected >= 0) {
          CHECK(b.top_logprobs[r * b.top_n + j] ==
                doctest::Approx(std::log(p[expected])).epsilon(1e-4));
        } else {
          CHECK(b.top_logprobs[r * b.top_n + j] == -INFINITY);
        }
      }
    }
    // top_k = 1 is greedy.
    CHECK(b.token[2] == infuse::reference::by_decreasing_logit(
                            infuse::reference::adjusted_logits(b.reference_case(2)))[0]);
  }
}

TEST_CASE("search::sample is batch invariant and thread-count invariant") {
  INFUSE_RANDOM(rng);
  const std::int64_t vocab = 5000;
  kp_batch b(16, vocab);
  for (auto& x : b.logits) x = float(rng.normal(0.0, 2.0));
  for (std::int64_t r = 0; r < b.rows; ++r) {
    b.top_k[r] = std::int32_t(rng.integer(0, 200));
    b.top_p[r] = float(rng.uniform(0.3, 1.0));
  }
  b.run(infuse::exec::cpu(2));
  const auto tokens = b.token;
  // Row 5 alone, in a batch of one, and the batch reversed on one thread.
  kp_batch one(1, vocab);
  std::copy(b.logits.begin() + 5 * vocab, b.logits.begin() + 6 * vocab, one.logits.begin());
  one.seed[0] = b.seed[5];
  one.position[0] = b.position[5];
  one.top_k[0] = b.top_k[5];
  one.top_p[0] = b.top_p[5];
  one.run();
  CHECK(one.token[0] == tokens[5]);
  kp_batch reversed(16, vocab);
  for (std::int64_t r = 0; r < 16; ++r) {
    const std::int64_t from = 15 - r;
    std::copy(b.logits.begin() + from * vocab, b.logits.begin() + (from + 1) * vocab,
              reversed.logits.begin() + r * vocab);
    reversed.seed[r] = b.seed[from];
    reversed.position[r] = b.position[from];
    reversed.top_k[r] = b.top_k[from];
    reversed.top_p[r] = b.top_p[from];
  }
  reversed.run(infuse::exec::cpu(1));
  for (std::int64_t r = 0; r < 16; ++r) CHECK(reversed.token[r] == tokens[15 - r]);
  // A different position draws again: over 16 rows at least two tokens change.
  for (auto& p : b.position) p += 1000;
  b.run();
  std::int64_t changed = 0;
  for (std::int64_t r = 0; r < 16; ++r) changed += b.token[r] != tokens[r];
  CHECK(changed >= 2);
}

TEST_CASE("search::sample: temperature 0 is greedy, ties of top_k are all kept") {
  kp_batch b(2, 100);
  for (std::int64_t t = 0; t < 100; ++t) b.logits[t] = float(t % 10);  // maxima 9 at 9, 19, ..
  b.temperature[0] = 0.0f;
  for (std::int64_t t = 0; t < 100; ++t) b.logits[100 + t] = 1.0f;  // all equal
  b.top_k[1] = 3;  // every token ties with the 3rd largest: all kept, uniform
  b.run();
  CHECK(b.token[0] == 9);
  CHECK(b.logprob[0] == 0.0f);
  CHECK(b.status[1] == s::row_status::ok);
  CHECK(b.logprob[1] == doctest::Approx(std::log(0.01)).epsilon(1e-5));
}

TEST_CASE("search::sample and greedy: NaN, infinities and masks that allow nothing") {
  const std::int64_t vocab = 70;
  kp_batch b(4, vocab);
  for (std::int64_t i = 0; i < 4 * vocab; ++i) b.logits[i] = float(i % 7);
  b.logits[0 * vocab + 33] = NAN;
  for (std::int64_t t = 0; t < vocab; ++t) b.logits[1 * vocab + t] = -INFINITY;
  b.logits[2 * vocab + 40] = INFINITY;
  b.logits[2 * vocab + 50] = INFINITY;
  b.logits[3 * vocab + 3] = 1e38f;
  b.temperature[3] = 1e-3f;  // overflows to +inf after scaling: the maximum still wins
  b.top_k[0] = 5;
  b.run();
  CHECK(b.status[0] == s::row_status::nan_logits);
  CHECK(b.token[0] == 0);
  CHECK(std::isnan(b.logprob[0]));
  CHECK(b.status[1] == s::row_status::no_token_allowed);
  CHECK(b.token[1] == 0);
  CHECK(b.status[2] == s::row_status::ok);
  CHECK((b.token[2] == 40 || b.token[2] == 50));
  CHECK(b.logprob[2] == doctest::Approx(std::log(0.5)));
  CHECK(b.token[3] == 3);

  // greedy: ties to the lower id, NaN and all -inf flagged.
  std::vector<float> logits(3 * vocab, 0.0f);
  logits[17] = 2.0f;
  logits[60] = 2.0f;
  logits[vocab + 5] = NAN;
  for (std::int64_t t = 0; t < vocab; ++t) logits[2 * vocab + t] = -INFINITY;
  std::vector<std::int32_t> token(3, -7);
  std::vector<float> logprob(3);
  std::vector<s::row_status> status(3);
  s::greedy(infuse::exec::cpu{}, host_view<const float, 2>(logits.data(), {3, vocab}),
            s::sample_outputs<host_memory>{{token.data(), {3}},
                                           {logprob.data(), {3}},
                                           {status.data(), {3}},
                                           {},
                                           {}});
  CHECK(token[0] == 17);
  CHECK(status[0] == s::row_status::ok);
  CHECK(status[1] == s::row_status::nan_logits);
  CHECK(token[1] == 0);
  CHECK(status[2] == s::row_status::no_token_allowed);
}

TEST_CASE("search::greedy: argmax of random rows with strides, lower id on ties") {
  INFUSE_RANDOM(rng);
  const std::int64_t rows = 9, vocab = 1000, stride = 1024;
  std::vector<float> logits(rows * stride, NAN);  // the padding is never read
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t t = 0; t < vocab; ++t) logits[r * stride + t] = float(rng.integer(-50, 50));
  }
  std::vector<std::int32_t> token(rows);
  std::vector<float> logprob(rows);
  std::vector<s::row_status> status(rows);
  s::greedy(infuse::exec::cpu{}, host_view<const float, 2>(logits.data(), {rows, vocab}, {stride, 1}),
            s::sample_outputs<host_memory>{{token.data(), {rows}},
                                           {logprob.data(), {rows}},
                                           {status.data(), {rows}},
                                           {},
                                           {}});
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* row = logits.data() + r * stride;
    CHECK(token[r] == std::max_element(row, row + vocab) - row);
    CHECK(status[r] == s::row_status::ok);
  }
}

TEST_CASE("search::sample rejects bad arguments before writing anything") {
  const auto expect_error = [](auto&& change, const std::string& argument) {
    kp_batch b(2, 64);
    change(b);
    CAPTURE(argument);
    try {
      b.run();
      FAIL("no infuse::error");
    } catch (const infuse::error& e) {
      CHECK(e.argument() == argument);
    }
    CHECK(b.token[0] == -7);
    CHECK(b.token[1] == -7);
  };
  expect_error([](kp_batch& b) { b.top_p[1] = 0.0f; }, "params.top_p[1]");
  expect_error([](kp_batch& b) { b.top_p[0] = 1.5f; }, "params.top_p[0]");
  expect_error([](kp_batch& b) { b.temperature[1] = -1.0f; }, "params.temperature[1]");
  expect_error([](kp_batch& b) { b.temperature[0] = NAN; }, "params.temperature[0]");
  expect_error([](kp_batch& b) { b.request[1] = 2; }, "rows.request[1]");
  expect_error([](kp_batch& b) { b.workspace_shortfall = 1; }, "workspace.extent(0)");
}

TEST_CASE("search::sample_workspace_bytes: per thread, and enough for any smaller batch") {
  const infuse::exec::cpu two(2), one(1);
  const auto bytes = [](const infuse::exec::cpu& exec, std::int64_t rows, std::int64_t vocab) {
    return s::sample_workspace_bytes<filters_kp>(exec, rows, vocab);
  };
  CHECK(bytes(two, 0, 1000) == 0);
  CHECK(bytes(two, 1, 1000) == bytes(one, 5, 1000));
  CHECK(bytes(two, 5, 1000) > bytes(one, 5, 1000));
  CHECK(bytes(two, 5, 1000) == bytes(two, 64, 1000));
  CHECK(bytes(one, 1, 2000) > bytes(one, 1, 1000));
  CHECK_THROWS_WITH_AS(bytes(one, 1, 0), doctest::Contains("vocab"), infuse::error);
  CHECK_THROWS_WITH_AS(bytes(one, -1, 10), doctest::Contains("rows"), infuse::error);
  // A workspace sized for 16 rows serves a call with 3, at any alignment.
  kp_batch b(3, 1000);
  b.workspace_shortfall = -1000;
  CHECK_NOTHROW(b.run(infuse::exec::cpu(2)));
}

TEST_CASE("search::sample checks the shapes of outputs and lists") {
  std::vector<float> logits(2 * 64, 0.0f);
  std::vector<std::int32_t> request{0, 0}, token(1), offsets{0, 2}, tokens{5, 3}, counts{1, 1};
  std::vector<std::int64_t> position{0, 1};
  std::vector<std::uint64_t> seed{1};
  std::vector<float> logprob(2), factors{0.0f};
  std::vector<float> repetition{1.0f};
  std::vector<s::row_status> status(2);
  using set = s::filters<s::filter::penalties>;
  s::sample_params<host_memory, set> params;
  params.seed = {seed.data(), {1}};
  params.penalty_offsets = {offsets.data(), {2}};
  params.penalty_tokens = {tokens.data(), {2}};
  params.penalty_counts = {counts.data(), {2}};
  params.presence_penalty = {factors.data(), {1}};
  params.frequency_penalty = {factors.data(), {1}};
  params.repetition_penalty = {repetition.data(), {1}};
  const s::sample_rows<host_memory> rows{{request.data(), {2}}, {position.data(), {2}}};
  const host_view<const float, 2> view(logits.data(), {2, 64});
  s::sample_outputs<host_memory> out{{token.data(), {1}}, {logprob.data(), {2}},
                                     {status.data(), {2}}, {}, {}};
  std::vector<std::byte> workspace(
      std::size_t(s::sample_workspace_bytes<set>(infuse::exec::cpu{}, 2, 64)));
  const host_view<std::byte, 1> scratch(workspace.data(), {std::int64_t(workspace.size())});
  CHECK_THROWS_WITH_AS(s::sample<set>(infuse::exec::cpu{}, view, rows, params, out, scratch),
                       doctest::Contains("out.token.extent(0) is 1, expected 2"), infuse::error);
  token.resize(2);
  out.token = {token.data(), {2}};
  CHECK_THROWS_WITH_AS(s::sample<set>(infuse::exec::cpu{}, view, rows, params, out, scratch),
                       doctest::Contains("params.penalty_tokens[1]"), infuse::error);
  tokens = {3, 5};
  CHECK_NOTHROW(s::sample<set>(infuse::exec::cpu{}, view, rows, params, out, scratch));
}
