#include "infuse/search/cpu/beam.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "reference/search.hpp"
#include "support/random.hpp"

namespace {

using infuse::host_memory;
using infuse::host_view;
using infuse::search::beam_status;
using infuse::search::early_stopping;

// A small random "model": the logits after a sequence are a fixed random function of it, with
// the EOS token (0) made likely enough that hypotheses finish within a few steps.
std::vector<float> model_logits(std::uint64_t seed, const std::vector<std::int32_t>& sequence,
                                std::int64_t vocab) {
  std::uint64_t state = seed;
  for (const std::int32_t token : sequence) state = state * 0x9E3779B97F4A7C15ull + token + 1;
  std::mt19937_64 engine(state);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> logits(vocab);
  for (auto& l : logits) l = normal(engine);
  logits[0] += 1.0f;
  return logits;
}

template <int Width>
void run_against_reference(std::uint64_t seed, double alpha, early_stopping stopping) {
  constexpr std::int64_t requests = 3;
  const std::int64_t vocab = 11;
  const std::int64_t max_generated = 8;
  const int stopping_code = stopping == early_stopping::heuristic ? 0
                            : stopping == early_stopping::exact   ? 1
                                                                  : 2;
  std::vector<infuse::reference::beam_reference> refs;
  std::vector<std::vector<std::vector<std::int32_t>>> beams(requests);
  std::vector<std::vector<std::vector<std::int32_t>>> pool_sequences(requests);
  for (std::int64_t r = 0; r < requests; ++r) {
    refs.push_back({Width,
                    alpha,
                    stopping_code,
                    0,
                    max_generated,
                    std::vector<std::vector<std::int32_t>>(Width),
                    std::vector<double>(Width, -1e9),
                    {},
                    1e9,
                    false});
    refs[r].beam_scores[0] = 0.0;
    beams[r].assign(Width, {});
    pool_sequences[r].assign(Width, {});
  }
  std::vector<float> scores(requests * Width, -1e9f);  // transformers' start: only beam 0 lives
  for (std::int64_t r = 0; r < requests; ++r) scores[r * Width] = 0.0f;
  std::vector<float> pool_scores(requests * Width, 0.0f);
  std::vector<std::int32_t> pool_size(requests, 0);
  std::vector<std::uint8_t> done(requests, 0);
  for (std::int64_t step = 1; step <= max_generated; ++step) {
    CAPTURE(step);
    std::vector<float> logits;
    std::vector<std::vector<std::vector<float>>> ref_logits(requests);
    for (std::int64_t r = 0; r < requests; ++r) {
      for (int b = 0; b < Width; ++b) {
        const auto row = model_logits(seed + r, beams[r][b], vocab);
        logits.insert(logits.end(), row.begin(), row.end());
        ref_logits[r].push_back(row);
      }
    }
    std::vector<std::int32_t> parent(requests * Width), token(requests * Width);
    std::vector<std::int32_t> finished(requests * Width);
    std::vector<beam_status> status(requests);
    infuse::search::beam_params params;
    params.length_penalty = static_cast<float>(alpha);
    params.stopping = stopping;
    params.eos_token = 0;
    params.pad_token = 0;
    params.generated_length = step;
    params.max_generated_length = max_generated;
    infuse::search::beam_step<Width>(
        infuse::exec::cpu{},
        {host_view<const float, 3>(logits.data(), {requests, Width, vocab}),
         host_view<const float, 2>(scores.data(), {requests, Width})},
        params,
        {host_view<float, 2>(pool_scores.data(), {requests, Width}),
         host_view<std::int32_t, 1>(pool_size.data(), {requests}),
         host_view<std::uint8_t, 1>(done.data(), {requests})},
        {host_view<std::int32_t, 2>(parent.data(), {requests, Width}),
         host_view<std::int32_t, 2>(token.data(), {requests, Width}),
         host_view<float, 2>(scores.data(), {requests, Width}),  // in place
         host_view<std::int32_t, 2>(finished.data(), {requests, Width}),
         host_view<beam_status, 1>(status.data(), {requests})});
    for (std::int64_t r = 0; r < requests; ++r) {
      CAPTURE(r);
      CHECK(status[r] == beam_status::ok);
      const bool was_done = refs[r].done;
      refs[r].step(ref_logits[r], step);
      // The caller's bookkeeping: pool slots take their parents' sequences, beams fork.
      for (int s = 0; s < Width; ++s) {
        if (finished[r * Width + s] >= 0) pool_sequences[r][s] = beams[r][finished[r * Width + s]];
      }
      if (was_done) {
        for (int b = 0; b < Width; ++b) CHECK(parent[r * Width + b] == 0);
        continue;
      }
      std::vector<std::vector<std::int32_t>> next(Width);
      for (int b = 0; b < Width; ++b) {
        next[b] = beams[r][parent[r * Width + b]];
        next[b].push_back(token[r * Width + b]);
        CHECK(next[b] == refs[r].beams[b]);
        CHECK(scores[r * Width + b] == doctest::Approx(refs[r].beam_scores[b]).epsilon(1e-5));
      }
      beams[r] = std::move(next);
      CHECK(done[r] == (refs[r].done ? 1 : 0));
      REQUIRE(pool_size[r] == static_cast<std::int32_t>(refs[r].pool.size()));
      // Same hypotheses, in slot order here and list order there: compare as sorted sets.
      std::vector<std::pair<double, std::vector<std::int32_t>>> got, want;
      for (int s = 0; s < pool_size[r]; ++s) {
        got.emplace_back(pool_scores[r * Width + s], pool_sequences[r][s]);
        want.emplace_back(refs[r].pool[s].score, refs[r].pool[s].tokens);
      }
      std::sort(got.begin(), got.end());
      std::sort(want.begin(), want.end());
      for (std::size_t i = 0; i < got.size(); ++i) {
        CHECK(got[i].first == doctest::Approx(want[i].first).epsilon(1e-5));
        CHECK(got[i].second == want[i].second);
      }
    }
  }
}

}  // namespace

TEST_CASE("beam_step equals a float64 reference beam search over several steps") {
  INFUSE_RANDOM(rng);
  for (const double alpha : {1.0, 0.0, 2.0, -0.7}) {
    for (const auto stopping :
         {early_stopping::heuristic, early_stopping::exact, early_stopping::never}) {
      CAPTURE(alpha);
      CAPTURE(static_cast<int>(stopping));
      run_against_reference<1>(rng.engine()(), alpha, stopping);
      run_against_reference<3>(rng.engine()(), alpha, stopping);
      run_against_reference<4>(rng.engine()(), alpha, stopping);
    }
  }
}

TEST_CASE("beam_step flags NaN logits and rejects bad shapes before writing") {
  std::vector<float> logits(2 * 2 * 5, 0.0f);
  logits[2 * 5 + 3] = NAN;  // request 1, beam 0
  std::vector<float> scores = {0.0f, -1.0f, 0.0f, -1.0f};
  std::vector<float> pool_scores(4, 0.0f);
  std::vector<std::int32_t> pool_size(2, 0), parent(4, 9), token(4, 9), finished(4, 9);
  std::vector<std::uint8_t> done(2, 0);
  std::vector<beam_status> status(2);
  infuse::search::beam_params params;
  params.eos_token = 4;
  params.pad_token = 7;
  const infuse::search::beam_inputs<host_memory> in{
      host_view<const float, 3>(logits.data(), {2, 2, 5}),
      host_view<const float, 2>(scores.data(), {2, 2})};
  const infuse::search::beam_pool<host_memory> pool{
      host_view<float, 2>(pool_scores.data(), {2, 2}),
      host_view<std::int32_t, 1>(pool_size.data(), {2}),
      host_view<std::uint8_t, 1>(done.data(), {2})};
  std::vector<float> new_scores(4);
  const infuse::search::beam_outputs<host_memory> out{
      host_view<std::int32_t, 2>(parent.data(), {2, 2}),
      host_view<std::int32_t, 2>(token.data(), {2, 2}),
      host_view<float, 2>(new_scores.data(), {2, 2}),
      host_view<std::int32_t, 2>(finished.data(), {2, 2}),
      host_view<beam_status, 1>(status.data(), {2})};
  auto bad_out = out;
  bad_out.token = host_view<std::int32_t, 2>(token.data(), {2, 1});
  CHECK_THROWS_WITH_AS(infuse::search::beam_step<2>(infuse::exec::cpu{}, in, params, pool, bad_out),
                       doctest::Contains("out.token.extent(1) is 1, expected 2 (Width)"),
                       infuse::error);
  CHECK(parent[0] == 9);
  CHECK_THROWS_AS(infuse::search::beam_step<3>(infuse::exec::cpu{}, in, params, pool, out),
                  infuse::error);
  infuse::search::beam_step<2>(infuse::exec::cpu{}, in, params, pool, out);
  CHECK(status[0] == beam_status::ok);
  CHECK(status[1] == beam_status::invalid_logits);
  CHECK(token[2] == 7);
  CHECK(token[3] == 7);
  CHECK(std::isinf(new_scores[2]));
  CHECK(pool_size[1] == 0);
  // All logits equal: the candidates tie, and ties go to the lower beam, then the lower token.
  CHECK(parent[0] == 0);
  CHECK(token[0] == 0);
  CHECK(parent[1] == 0);
  CHECK(token[1] == 1);
}
