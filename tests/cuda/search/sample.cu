// search::sample and search::greedy on CUDA against the exact integer definition
// (reference::exact_sample, which the CPU body matches token for token in tests/unit/search):
// the same token, log-probability bits and status for every filter set, random rows of vocab
// 1000, 32000 and 128256 and many keys; device-side parameter checks; host argument checks; greedy.
// (The CPU body itself is built with Highway for the host's SIMD target, which nvcc's front end
// cannot compile, so the comparison goes through the reference.)
#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "infuse/search/cuda/sample.cuh"
#include "reference/sampling.hpp"
#include "support/cuda.cuh"
#include "support/random.hpp"

namespace {

namespace s = infuse::search;
using namespace infuse::reference::filter_sets;
using infuse::device_buffer;
using infuse::device_memory;
using infuse::reference::sampling_case;

template <class T>
device_buffer<T> upload(const std::vector<T>& host) {
  return device_buffer<T>(std::span<const T>(host));
}

// A random case for the filters in Set: logits of the given shape (0 normal stddev 3, 1 flat
// stddev 0.3, 2 small integers: many ties, 3 normal with a few -inf), parameters per filter.
template <class Set>
sampling_case random_case(infuse::test::seeded_rng& rng, std::int64_t vocab, int shape) {
  sampling_case c;
  c.logits.resize(std::size_t(vocab));
  for (auto& x : c.logits) {
    x = shape == 1   ? float(rng.normal(0.0, 0.3))
        : shape == 2 ? float(rng.integer(-3, 3))
                     : float(rng.normal(0.0, 3.0));
    if (shape == 3 && rng.uniform() < 0.01) x = -INFINITY;
  }
  if constexpr (Set::template has<s::filter::temperature>) c.temperature = rng.uniform(0.3, 1.6);
  if constexpr (Set::template has<s::filter::top_k>) {
    c.top_k = rng.uniform() < 0.5 ? 50 : rng.integer(-1, vocab + 10);
  }
  if constexpr (Set::template has<s::filter::top_p>)
    c.top_p = rng.uniform() < 0.1 ? 1.0 : rng.uniform(0.05, 0.99);
  if constexpr (Set::template has<s::filter::min_p>) c.min_p = rng.uniform(0.0, 0.2);
  infuse::reference::random_token_filters<Set>(rng, vocab, 0.05, 0.02, c);
  return c;
}

// One call's inputs on the device: one request per case, `per_request` rows per request at
// different positions, each row its own copy of the request's logits.
template <class Set>
struct device_batch {
  std::int64_t requests, rows, vocab;
  std::vector<std::int32_t> request;
  std::vector<std::int64_t> position;
  std::vector<std::uint64_t> seed;
  device_buffer<float> logits, temperature, top_p, min_p, presence, frequency, repetition,
      bias_values;
  device_buffer<std::int32_t> d_request, top_k, penalty_offsets, penalty_tokens, penalty_counts,
      bias_offsets, bias_tokens;
  device_buffer<std::int64_t> d_position;
  device_buffer<std::uint64_t> d_seed;
  device_buffer<std::uint32_t> bitmask;
  device_buffer<std::int32_t> token;
  device_buffer<float> logprob;
  device_buffer<s::row_status> status;
  device_buffer<std::byte> workspace;
  s::sample_params<device_memory, Set> params;

  device_batch(infuse::test::seeded_rng& rng, const std::vector<sampling_case>& cases,
               std::int64_t per_request)
      : requests(std::ssize(cases)),
        rows(requests * per_request),
        vocab(std::ssize(cases.front().logits)) {
    std::vector<float> all_logits, temps, ps, mins, pres, freqs, reps, biases;
    std::vector<std::int32_t> ks, p_offsets{0}, p_tokens, p_counts, b_offsets{0}, b_tokens;
    std::vector<std::uint32_t> masks;
    for (std::int64_t q = 0; q < requests; ++q) {
      const sampling_case& c = cases[std::size_t(q)];
      seed.push_back((std::uint64_t{rng.bits32()} << 32) | rng.bits32());
      temps.push_back(float(c.temperature));
      ks.push_back(std::int32_t(c.top_k));
      ps.push_back(float(c.top_p));
      mins.push_back(float(c.min_p));
      pres.push_back(float(c.presence));
      freqs.push_back(float(c.frequency));
      reps.push_back(float(c.repetition));
      for (std::int64_t w = 0; w < (vocab + 31) / 32; ++w) {
        masks.push_back(c.bitmask.empty() ? ~0u : c.bitmask[std::size_t(w)]);
      }
      p_tokens.insert(p_tokens.end(), c.penalty_tokens.begin(), c.penalty_tokens.end());
      p_counts.insert(p_counts.end(), c.penalty_counts.begin(), c.penalty_counts.end());
      p_offsets.push_back(std::int32_t(p_tokens.size()));
      b_tokens.insert(b_tokens.end(), c.bias_tokens.begin(), c.bias_tokens.end());
      biases.insert(biases.end(), c.bias_values.begin(), c.bias_values.end());
      b_offsets.push_back(std::int32_t(b_tokens.size()));
    }
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int64_t q = r % requests;  // interleaved, so neighbours differ
      request.push_back(std::int32_t(q));
      position.push_back(std::int64_t(rng.integer(0, 1 << 30)));
      const auto& x = cases[std::size_t(q)].logits;
      all_logits.insert(all_logits.end(), x.begin(), x.end());
    }
    logits = upload(all_logits);
    d_request = upload(request);
    d_position = upload(position);
    d_seed = upload(seed);
    temperature = upload(temps);
    top_k = upload(ks);
    top_p = upload(ps);
    min_p = upload(mins);
    presence = upload(pres);
    frequency = upload(freqs);
    repetition = upload(reps);
    bitmask = upload(masks);
    penalty_offsets = upload(p_offsets);
    penalty_tokens = upload(p_tokens);
    penalty_counts = upload(p_counts);
    bias_offsets = upload(b_offsets);
    bias_tokens = upload(b_tokens);
    bias_values = upload(biases);
    token = device_buffer<std::int32_t>(rows);
    logprob = device_buffer<float>(rows);
    status = device_buffer<s::row_status>(rows);
    workspace =
        device_buffer<std::byte>(s::sample_workspace_bytes<Set>(infuse::exec::cuda{}, rows, vocab));
    params.seed = d_seed.as_view();
    if constexpr (Set::template has<s::filter::temperature>)
      params.temperature = temperature.as_view();
    if constexpr (Set::template has<s::filter::top_k>) params.top_k = top_k.as_view();
    if constexpr (Set::template has<s::filter::top_p>) params.top_p = top_p.as_view();
    if constexpr (Set::template has<s::filter::min_p>) params.min_p = min_p.as_view();
    if constexpr (Set::template has<s::filter::token_bitmask>) {
      params.bitmask = bitmask.as_view({requests, (vocab + 31) / 32});
    }
    if constexpr (Set::template has<s::filter::penalties>) {
      params.penalty_offsets = penalty_offsets.as_view();
      params.penalty_tokens = penalty_tokens.as_view();
      params.penalty_counts = penalty_counts.as_view();
      params.presence_penalty = presence.as_view();
      params.frequency_penalty = frequency.as_view();
      params.repetition_penalty = repetition.as_view();
    }
    if constexpr (Set::template has<s::filter::logit_bias>) {
      params.bias_offsets = bias_offsets.as_view();
      params.bias_tokens = bias_tokens.as_view();
      params.bias_values = bias_values.as_view();
    }
  }

  infuse::device_view<const float, 2> logits_view() const { return logits.as_view({rows, vocab}); }
  s::sample_rows<device_memory> sample_rows() const {
    return {d_request.as_view(), d_position.as_view()};
  }
  s::sample_outputs<device_memory> outputs() const {
    return {token.as_view(), logprob.as_view(), status.as_view(), {}, {}};
  }
  void run() const {
    const infuse::exec::cuda exec;
    s::sample<Set>(exec, logits_view(), sample_rows(), params, outputs(), workspace.as_view());
    exec.synchronize();
  }
};

}  // namespace

TEST_CASE_TEMPLATE("search::sample on CUDA matches the exact definition bit for bit", Set, t_only,
                   k_only, p_only, k_and_p, m_only, k_p_m, masked, penalized, biased, everything) {
  INFUSE_RANDOM(rng);
  for (const std::int64_t vocab : {1000, 32000, 128256}) {
    const std::int64_t requests = vocab > 100000 ? 4 : 8;
    std::vector<sampling_case> cases;
    for (std::int64_t q = 0; q < requests; ++q) {
      cases.push_back(random_case<Set>(rng, vocab, int(q % 4)));
    }
    const device_batch<Set> b(rng, cases, vocab > 100000 ? 4 : 16);
    b.run();
    const auto token = b.token.to_host();
    const auto logprob = b.logprob.to_host();
    const auto status = b.status.to_host();
    for (std::int64_t r = 0; r < b.rows; ++r) {
      const std::int32_t q = b.request[std::size_t(r)];
      const auto want = infuse::reference::exact_sample(
          cases[std::size_t(q)], s::detail::sample_bits(b.seed[std::size_t(q)],
                                                        std::uint64_t(b.position[std::size_t(r)])));
      INFO("vocab " << vocab << ", row " << r << ", request " << q);
      REQUIRE(int(status[std::size_t(r)]) == want.status);
      REQUIRE(token[std::size_t(r)] == want.token);
      CHECK(std::bit_cast<std::uint32_t>(logprob[std::size_t(r)]) ==
            std::bit_cast<std::uint32_t>(want.logprob));
    }
  }
}

TEST_CASE("search::sample on CUDA: NaN, no allowed token, +inf, greedy rows, top-n") {
  INFUSE_RANDOM(rng);
  using set = s::filters<s::filter::temperature, s::filter::top_k, s::filter::token_bitmask>;
  const std::int64_t vocab = 3000;
  std::vector<sampling_case> cases(5);
  for (auto& c : cases) c = random_case<set>(rng, vocab, 0);
  cases[0].logits[1234] = NAN;                                      // nan_logits
  std::fill(cases[1].bitmask.begin(), cases[1].bitmask.end(), 0u);  // nothing allowed
  std::fill(cases[2].logits.begin(), cases[2].logits.end(), -INFINITY);
  cases[3].logits[17] = cases[3].logits[2900] = INFINITY;  // uniform over the allowed +inf
  cases[3].bitmask[0] |= 1u << 17;
  cases[3].bitmask[2900 / 32] |= 1u << (2900 % 32);
  cases[4].temperature = 0.0;  // greedy
  device_batch<set> b(rng, cases, 8);
  const std::int64_t top_n = 4;
  device_buffer<std::int32_t> top_tokens(b.rows * top_n);
  device_buffer<float> top_logprobs(b.rows * top_n);
  auto out = b.outputs();
  out.top_tokens = top_tokens.as_view({b.rows, top_n});
  out.top_logprobs = top_logprobs.as_view({b.rows, top_n});
  const infuse::exec::cuda exec;
  s::sample<set>(exec, b.logits_view(), b.sample_rows(), b.params, out, b.workspace.as_view());
  exec.synchronize();
  const auto token = b.token.to_host();
  const auto status = b.status.to_host();
  const auto tops = top_tokens.to_host();
  const auto top_lp = top_logprobs.to_host();
  for (std::int64_t r = 0; r < b.rows; ++r) {
    const std::int32_t q = b.request[std::size_t(r)];
    const auto want = infuse::reference::exact_sample(
        cases[std::size_t(q)],
        s::detail::sample_bits(b.seed[std::size_t(q)], std::uint64_t(b.position[std::size_t(r)])));
    INFO("row " << r << ", request " << q);
    REQUIRE(int(status[std::size_t(r)]) == want.status);
    CHECK(token[std::size_t(r)] == want.token);
    CHECK(token[std::size_t(r)] >= 0);
    CHECK(token[std::size_t(r)] < vocab);
    const std::int32_t* row_top = &tops[std::size_t(r * top_n)];
    const float* row_lp = &top_lp[std::size_t(r * top_n)];
    if (want.status != 0) {
      for (std::int64_t j = 0; j < top_n; ++j) CHECK(row_top[j] == -1);
      continue;
    }
    if (q == 3) CHECK((token[std::size_t(r)] == 17 || token[std::size_t(r)] == 2900));
    if (q == 4) {  // greedy: the point mass
      CHECK(row_top[0] == want.token);
      CHECK(row_lp[0] == 0.0f);
      for (std::int64_t j = 1; j < top_n; ++j) CHECK(row_top[j] == -1);
      continue;
    }
    for (std::int64_t j = 1; j < top_n; ++j) {
      if (row_top[j] < 0) continue;
      CHECK(row_lp[j] <= row_lp[j - 1]);
    }
    CHECK(row_lp[0] >= want.logprob);  // the most likely kept token first
  }
}

TEST_CASE("search::sample on CUDA flags parameter values it reads on the device") {
  INFUSE_RANDOM(rng);
  using set = s::filters<s::filter::temperature, s::filter::top_p, s::filter::penalties>;
  std::vector<sampling_case> cases(4);
  for (auto& c : cases) c = random_case<set>(rng, 500, 0);
  cases[0].top_p = 0.0;         // outside (0, 1]
  cases[1].temperature = -1.0;  // negative
  cases[2].repetition = 0.0;    // not > 0
  device_batch<set> b(rng, cases, 2);
  b.run();
  const auto status = b.status.to_host();
  const auto token = b.token.to_host();
  for (std::int64_t r = 0; r < b.rows; ++r) {
    const std::int32_t q = b.request[std::size_t(r)];
    INFO("row " << r << ", request " << q);
    CHECK((status[std::size_t(r)] == s::row_status::invalid_parameter) == (q < 3));
    CHECK(token[std::size_t(r)] >= 0);
  }
  // A request index and a penalty token out of range.
  std::vector<std::int32_t> bad_request(std::size_t(b.rows), 0);
  bad_request[1] = 99;
  b.d_request = upload(bad_request);
  std::vector<std::int32_t> tokens = b.penalty_tokens.to_host();
  const std::vector<std::int32_t> offsets = b.penalty_offsets.to_host();
  REQUIRE(offsets[1] > 0);
  tokens[0] = 500;  // request 0's first token: beyond the vocabulary
  b.penalty_tokens = upload(tokens);
  auto params = b.params;
  params.penalty_tokens = b.penalty_tokens.as_view();
  const infuse::exec::cuda exec;
  s::sample<set>(exec, b.logits_view(), b.sample_rows(), params, b.outputs(),
                 b.workspace.as_view());
  exec.synchronize();
  const auto flagged = b.status.to_host();
  CHECK(flagged[0] == s::row_status::invalid_parameter);  // request 0, bad token
  CHECK(flagged[1] == s::row_status::invalid_parameter);  // request 99
}

TEST_CASE("search::sample on CUDA rejects malformed arguments before launching") {
  INFUSE_RANDOM(rng);
  using set = s::filters<s::filter::temperature, s::filter::logit_bias>;
  std::vector<sampling_case> cases(2);
  for (auto& c : cases) c = random_case<set>(rng, 700, 0);
  device_batch<set> b(rng, cases, 2);
  const infuse::exec::cuda exec;
  const std::vector<std::int32_t> sentinel(std::size_t(b.rows), -7);
  b.token = upload(sentinel);
  // A workspace one byte short.
  const auto needed = s::sample_workspace_bytes<set>(exec, b.rows, b.vocab);
  REQUIRE(needed > 0);
  CHECK_THROWS_AS(s::sample<set>(exec, b.logits_view(), b.sample_rows(), b.params, b.outputs(),
                                 b.workspace.as_view({needed - 1})),
                  infuse::error);
  // Outputs of the wrong length.
  auto short_out = b.outputs();
  short_out.token = b.token.as_view({b.rows - 1});
  CHECK_THROWS_AS(s::sample<set>(exec, b.logits_view(), b.sample_rows(), b.params, short_out,
                                 b.workspace.as_view()),
                  infuse::error);
  // Parameters of the wrong length.
  auto params = b.params;
  params.temperature = b.temperature.as_view({1});
  CHECK_THROWS_AS(s::sample<set>(exec, b.logits_view(), b.sample_rows(), params, b.outputs(),
                                 b.workspace.as_view()),
                  infuse::error);
  CHECK_THROWS_AS(s::greedy(exec, b.logits_view(), short_out), infuse::error);
  exec.synchronize();
  CHECK(b.token.to_host() == sentinel);  // nothing written
}

TEST_CASE("search::greedy on CUDA: the lowest-id maximum, NaN and -inf rows") {
  INFUSE_RANDOM(rng);
  for (const std::int64_t vocab : {1, 1000, 128256}) {
    const std::int64_t rows = 12;
    std::vector<float> logits(std::size_t(rows * vocab));
    for (auto& x : logits) x = float(rng.integer(-50, 50)) * 0.25f;  // ties
    if (vocab > 1) logits[std::size_t(1 * vocab + vocab / 2)] = NAN;
    for (std::int64_t t = 0; t < vocab; ++t) logits[std::size_t(2 * vocab + t)] = -INFINITY;
    logits[std::size_t(3 * vocab + vocab - 1)] = INFINITY;
    const auto d_logits = upload(logits);
    device_buffer<std::int32_t> token(rows);
    device_buffer<float> logprob(rows);
    device_buffer<s::row_status> status(rows);
    const infuse::exec::cuda exec;
    s::greedy(exec, d_logits.as_view({rows, vocab}),
              s::sample_outputs<device_memory>{
                  token.as_view(), logprob.as_view(), status.as_view(), {}, {}});
    exec.synchronize();
    const auto got = token.to_host();
    const auto got_status = status.to_host();
    const auto got_logprob = logprob.to_host();
    for (std::int64_t r = 0; r < rows; ++r) {
      INFO("vocab " << vocab << ", row " << r);
      const float* x = &logits[std::size_t(r * vocab)];
      bool nan = false;
      std::int32_t best = 0;
      for (std::int64_t t = 0; t < vocab; ++t) {
        nan = nan || std::isnan(x[t]);
        if (x[t] > x[best]) best = std::int32_t(t);
      }
      const s::row_status want = nan                    ? s::row_status::nan_logits
                                 : x[best] == -INFINITY ? s::row_status::no_token_allowed
                                                        : s::row_status::ok;
      CHECK(got_status[std::size_t(r)] == want);
      CHECK(got[std::size_t(r)] == (want == s::row_status::ok ? best : 0));
      if (want == s::row_status::ok) CHECK(got_logprob[std::size_t(r)] == 0.0f);
    }
  }
}
