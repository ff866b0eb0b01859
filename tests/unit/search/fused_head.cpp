// search::sample_from_head and greedy_from_head on the CPU: the same token, log-probability,
// status and top-n outputs as gemv into a logits buffer followed by sample (or greedy), over many
// keys, shapes (vocabularies below, at and off the tile size; 1, 7 and 9 rows), schemes,
// activations and filters; non-finite logits, ties at the k-th largest logit, and argument checks.
#include "infuse/search/cpu/fused_head.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "infuse/exec/cpu.hpp"
#include "infuse/gemm/cpu/gemv.hpp"
#include "infuse/quant/quant.hpp"
#include "reference/sampling.hpp"
#include "support/errors.hpp"
#include "support/random.hpp"

namespace {

namespace s = infuse::search;
namespace quant = infuse::quant;
namespace gemm = infuse::gemm;
using namespace infuse::reference::filter_sets;
using infuse::host_memory;
using infuse::host_view;
using infuse::test::seeded_rng;

constexpr std::int64_t hidden_size = 256;

// A head, hidden states and (when Int8) the int8 activations' workspace.
template <class S>
struct head {
  quant::quantized<S> w;
  std::vector<float> hidden;
  std::int64_t rows;

  head(std::vector<float> weights, std::int64_t vocab, std::vector<float> x)
      : w(quant::quantize<S>(host_view<const float, 2>(weights.data(), {vocab, hidden_size}))),
        hidden(std::move(x)),
        rows(std::int64_t(hidden.size()) / hidden_size) {}

  host_view<const float, 2> x() const { return {hidden.data(), {rows, hidden_size}}; }
};

template <class S>
head<S> random_head(seeded_rng& rng, std::int64_t vocab, std::int64_t rows) {
  // Logits of a few units: hidden ~ N(0, 1), weights ~ N(0, 3 / sqrt(hidden)).
  return head<S>(rng.normals(std::size_t(vocab * hidden_size), 3.0 / std::sqrt(hidden_size)), vocab,
                 rng.normals(std::size_t(rows * hidden_size)));
}

// Requests (one per row) with parameters for whichever filters Set holds. `fusable` keeps them
// in the fused range: temperature 0 or a top_k in [1, max_fused_top_k] below the vocabulary.
template <class Set>
struct requests {
  std::vector<std::int32_t> request, top_k, penalty_offsets, penalty_tokens, penalty_counts,
      bias_offsets, bias_tokens;
  std::vector<std::int64_t> position;
  std::vector<std::uint64_t> seed;
  std::vector<float> temperature, top_p, min_p, presence, frequency, repetition, bias_values;
  std::vector<std::uint32_t> bitmask;
  s::sample_params<host_memory, Set> params;

  requests(seeded_rng& rng, std::int64_t rows, std::int64_t vocab, bool fusable) {
    const std::int64_t words = (vocab + 31) / 32;
    penalty_offsets.push_back(0);
    bias_offsets.push_back(0);
    for (std::int64_t r = 0; r < rows; ++r) {
      request.push_back(std::int32_t(r));
      position.push_back(rng.integer(0, 1 << 20));
      seed.push_back(rng.engine()());
      temperature.push_back(rng.uniform() < 0.2 ? 0.0f : float(rng.uniform(0.3, 1.5)));
      const std::int64_t k_limit = std::clamp<std::int64_t>(vocab - 1, 1, s::max_fused_top_k);
      top_k.push_back(std::int32_t(fusable || rng.uniform() < 0.7 ? rng.integer(1, k_limit)
                                                                  : rng.integer(-1, vocab + 5)));
      if (fusable && vocab == 1) {  // no top-k below the vocabulary: greedy only
        temperature.back() = 0.0f;
        top_k.back() = 1;
      }
      top_p.push_back(rng.uniform() < 0.3 ? 1.0f : float(rng.uniform(0.05, 1.0)));
      min_p.push_back(rng.uniform() < 0.3 ? 0.0f : float(rng.uniform(0.0, 0.3)));
      const bool none_allowed = rng.uniform() < 0.1;
      for (std::int64_t w = 0; w < words; ++w) {
        bitmask.push_back(none_allowed ? 0u : rng.bits32() | rng.bits32());  // 3/4 allowed
      }
      for (std::int64_t t = rng.integer(0, 5); t < vocab; t += rng.integer(1, 40)) {
        penalty_tokens.push_back(std::int32_t(t));
        penalty_counts.push_back(std::int32_t(rng.integer(1, 3)));
        if (rng.uniform() < 0.5) {
          bias_tokens.push_back(std::int32_t(t));
          bias_values.push_back(float(rng.normal(0.0, 2.0)));
        }
      }
      penalty_offsets.push_back(std::int32_t(penalty_tokens.size()));
      bias_offsets.push_back(std::int32_t(bias_tokens.size()));
      presence.push_back(float(rng.uniform(0.0, 1.0)));
      frequency.push_back(float(rng.uniform(0.0, 0.5)));
      repetition.push_back(float(rng.uniform(0.8, 1.3)));
    }
    const std::int64_t n = rows;
    params.seed = {seed.data(), {n}};
    if constexpr (Set::template has<s::filter::temperature>) {
      params.temperature = {temperature.data(), {n}};
    }
    if constexpr (Set::template has<s::filter::top_k>) params.top_k = {top_k.data(), {n}};
    if constexpr (Set::template has<s::filter::top_p>) params.top_p = {top_p.data(), {n}};
    if constexpr (Set::template has<s::filter::min_p>) params.min_p = {min_p.data(), {n}};
    if constexpr (Set::template has<s::filter::token_bitmask>) {
      params.bitmask = {bitmask.data(), {n, words}};
    }
    if constexpr (Set::template has<s::filter::penalties>) {
      const std::int64_t entries = std::ssize(penalty_tokens);
      params.penalty_offsets = {penalty_offsets.data(), {n + 1}};
      params.penalty_tokens = {penalty_tokens.data(), {entries}};
      params.penalty_counts = {penalty_counts.data(), {entries}};
      params.presence_penalty = {presence.data(), {n}};
      params.frequency_penalty = {frequency.data(), {n}};
      params.repetition_penalty = {repetition.data(), {n}};
    }
    if constexpr (Set::template has<s::filter::logit_bias>) {
      params.bias_offsets = {bias_offsets.data(), {n + 1}};
      params.bias_tokens = {bias_tokens.data(), {std::int64_t(bias_tokens.size())}};
      params.bias_values = {bias_values.data(), {std::int64_t(bias_values.size())}};
    }
  }

  s::sample_rows<host_memory> rows() const {
    const std::int64_t n = std::ssize(request);
    return {{request.data(), {n}}, {position.data(), {n}}};
  }
};

// Outputs of one call, with room for the top-n lists.
struct results {
  static constexpr std::int64_t top_n = 4;
  std::vector<std::int32_t> token, top_tokens;
  std::vector<float> logprob, top_logprobs;
  std::vector<s::row_status> status;

  explicit results(std::int64_t rows)
      : token(rows, -7),
        top_tokens(rows * top_n, -7),
        logprob(rows, 7.0f),
        top_logprobs(rows * top_n, 7.0f),
        status(rows, s::row_status::invalid_parameter) {}

  s::sample_outputs<host_memory> view() {
    const std::int64_t n = std::ssize(token);
    return {{token.data(), {n}},
            {logprob.data(), {n}},
            {status.data(), {n}},
            {top_tokens.data(), {n, top_n}},
            {top_logprobs.data(), {n, top_n}}};
  }
};

bool same_float(float a, float b) {
  return std::memcmp(&a, &b, sizeof a) == 0 || (a != a && b != b);
}

void check_same(const results& fused, const results& unfused) {
  for (std::size_t r = 0; r < fused.token.size(); ++r) {
    INFO("row " << r);
    CHECK(fused.status[r] == unfused.status[r]);
    CHECK(fused.token[r] == unfused.token[r]);
    CHECK(same_float(fused.logprob[r], unfused.logprob[r]));
  }
  CHECK(fused.top_tokens == unfused.top_tokens);
  for (std::size_t i = 0; i < fused.top_logprobs.size(); ++i) {
    CHECK(same_float(fused.top_logprobs[i], unfused.top_logprobs[i]));
  }
}

// The int8 activations' workspace when Activations asks for one.
template <class Activations>
struct activations_storage {
  std::vector<float> bytes;
  Activations policy;

  explicit activations_storage(std::int64_t rows) {
    if constexpr (std::is_same_v<Activations, gemm::int8_activations>) {
      const std::int64_t size = gemm::int8_workspace_bytes(rows, hidden_size);
      bytes.resize(std::size_t(size / 4 + 1));
      policy = {bytes.data(), size};
    }
  }
};

template <class Set>
std::vector<std::byte> workspace(const infuse::exec::cpu& exec, std::int64_t rows,
                                 std::int64_t vocab) {
  return std::vector<std::byte>(std::size_t(s::head_workspace_bytes<Set>(exec, rows, vocab)));
}

host_view<std::byte, 1> view_of(std::vector<std::byte>& bytes) {
  return {bytes.data(), {std::int64_t(bytes.size())}};
}

// sample_from_head and gemv + sample on the same arguments; their outputs must match.
template <class Set, class S, class Activations = gemm::float_activations>
void compare(const infuse::exec::cpu& exec, const head<S>& h, const requests<Set>& q) {
  const std::int64_t vocab = h.w.rows;
  activations_storage<Activations> fused_acts(h.rows), unfused_acts(h.rows);
  results fused(h.rows), unfused(h.rows);
  auto scratch = workspace<Set>(exec, h.rows, vocab);
  s::sample_from_head(exec, h.w.view(), h.x(), q.rows(), q.params, fused.view(), view_of(scratch),
                      fused_acts.policy);
  std::vector<float> logits(std::size_t(h.rows * vocab));
  const host_view<float, 2> y(logits.data(), {h.rows, vocab});
  gemm::gemv(exec, h.w.view(), h.x(), y, {}, unfused_acts.policy);
  std::vector<std::byte> sample_scratch(
      std::size_t(s::sample_workspace_bytes<Set>(exec, h.rows, vocab)));
  s::sample(exec, host_view<const float, 2>(y), q.rows(), q.params, unfused.view(),
            view_of(sample_scratch));
  check_same(fused, unfused);
}

template <class S, class Activations = gemm::float_activations>
void compare_greedy(const infuse::exec::cpu& exec, const head<S>& h) {
  const std::int64_t vocab = h.w.rows;
  activations_storage<Activations> fused_acts(h.rows), unfused_acts(h.rows);
  results fused(h.rows), unfused(h.rows);
  auto scratch = workspace<s::filters<>>(exec, h.rows, vocab);
  s::greedy_from_head(exec, h.w.view(), h.x(), fused.view(), view_of(scratch), fused_acts.policy);
  std::vector<float> logits(std::size_t(h.rows * vocab));
  const host_view<float, 2> y(logits.data(), {h.rows, vocab});
  gemm::gemv(exec, h.w.view(), h.x(), y, {}, unfused_acts.policy);
  s::greedy(exec, host_view<const float, 2>(y), unfused.view());
  check_same(fused, unfused);
}

template <class Set>
bool fuses(const requests<Set>& q, std::int64_t vocab) {
  return s::detail::cpu_head::fusable_call(q.rows(), &q.params, std::ssize(q.request), vocab);
}

using fused_sets = s::filters<filter::temperature, filter::top_k, filter::top_p, filter::min_p,
                              filter::token_bitmask>;
using k_masked = s::filters<filter::temperature, filter::top_k, filter::token_bitmask>;

}  // namespace

TYPE_TO_STRING_AS("top_k+top_p+min_p+bitmask", fused_sets);
TYPE_TO_STRING_AS("top_k+bitmask", k_masked);

TEST_CASE_TEMPLATE("sample_from_head: the fused pass picks gemv + sample's token", Set, k_only,
                   k_and_p, k_p_m, k_masked, fused_sets) {
  INFUSE_RANDOM(rng);
  // Vocabularies below, at and off the tile of 512 rows; one and two batch tiles of 8 rows.
  const std::pair<std::int64_t, std::int64_t> shapes[] = {{1, 1},    {37, 7},   {512, 1}, {512, 9},
                                                          {1100, 7}, {2600, 1}, {2600, 7}};
  for (const auto& [vocab, rows] : shapes) {
    const auto h = random_head<quant::int_<4, 32>>(rng, vocab, rows);
    for (const int threads : {1, 2, 3}) {
      INFO("vocab " << vocab << ", rows " << rows << ", threads " << threads);
      const infuse::exec::cpu exec(threads);
      for (int draw = 0; draw < 3; ++draw) {
        const requests<Set> q(rng, rows, vocab, true);
        REQUIRE(fuses(q, vocab));
        compare(exec, h, q);
      }
    }
  }
}

TEST_CASE_TEMPLATE("sample_from_head: schemes and int8 activations", S, quant::int_<4, 32>,
                   quant::int_<8, 128>, quant::int_<4, 128, quant::zero_point>,
                   quant::none<float>) {
  INFUSE_RANDOM(rng);
  const infuse::exec::cpu exec(2);
  for (const std::int64_t rows : {1, 7}) {
    const auto h = random_head<S>(rng, 1300, rows);
    for (int draw = 0; draw < 4; ++draw) {
      const requests<k_p_m> q(rng, rows, 1300, true);
      compare(exec, h, q);
      if constexpr (quant::is_int<S>) {
        compare<k_p_m, S, gemm::int8_activations>(exec, h, q);
      }
    }
    compare_greedy(exec, h);
    if constexpr (quant::is_int<S>) {
      compare_greedy<S, gemm::int8_activations>(exec, h);
    }
  }
}

TEST_CASE_TEMPLATE("sample_from_head: rows without a top-k limit and listed filters fall back", Set,
                   t_only, p_only, m_only, masked, penalized, biased, everything, fused_sets) {
  INFUSE_RANDOM(rng);
  const infuse::exec::cpu exec(2);
  for (const std::int64_t vocab : {37, 1100}) {
    for (const std::int64_t rows : {1, 7}) {
      const auto h = random_head<quant::int_<4, 32>>(rng, vocab, rows);
      for (int draw = 0; draw < 4; ++draw) compare(exec, h, requests<Set>(rng, rows, vocab, false));
    }
  }
}

TEST_CASE("greedy_from_head: greedy's token") {
  INFUSE_RANDOM(rng);
  for (const std::int64_t vocab : {1, 37, 512, 2600}) {
    for (const std::int64_t rows : {1, 7, 9}) {
      compare_greedy(infuse::exec::cpu(2), random_head<quant::int_<4, 32>>(rng, vocab, rows));
    }
  }
}

TEST_CASE("sample_from_head: ties at the k-th largest logit") {
  INFUSE_RANDOM(rng);
  const infuse::exec::cpu exec(2);
  // Rows of w from a few distinct vectors: thousands of equal logits, more than a top-k buffer
  // keeps (the call recomputes), and runs of a few hundred (the buffers keep them).
  for (const std::int64_t distinct : {1, 3, 12}) {
    const std::int64_t vocab = 3000;
    const auto basis = rng.normals(std::size_t(distinct * hidden_size));
    std::vector<float> weights;
    for (std::int64_t t = 0; t < vocab; ++t) {
      const std::int64_t pick = rng.integer(0, distinct - 1);
      weights.insert(weights.end(), basis.begin() + pick * hidden_size,
                     basis.begin() + (pick + 1) * hidden_size);
    }
    const head<quant::int_<8, 32>> h(weights, vocab, rng.normals(std::size_t(7 * hidden_size)));
    for (int draw = 0; draw < 6; ++draw) compare(exec, h, requests<k_p_m>(rng, 7, vocab, true));
    compare_greedy(exec, h);
  }
}

TEST_CASE("sample_from_head: NaN logits give sample's status") {
  INFUSE_RANDOM(rng);
  const infuse::exec::cpu exec(2);
  const std::int64_t vocab = 1100;
  auto weights = rng.normals(std::size_t(vocab * hidden_size), 0.2);
  weights[std::size_t(777 * hidden_size + 5)] = NAN;  // token 777's logit is NaN in every row
  auto x = rng.normals(std::size_t(3 * hidden_size));
  const head<quant::none<float>> one_token(weights, vocab, x);
  weights[std::size_t(777 * hidden_size + 5)] = 0.0f;
  x[std::size_t(hidden_size + 9)] = NAN;  // row 1: every logit NaN
  const head<quant::none<float>> one_row(weights, vocab, x);
  for (const auto* h : {&one_token, &one_row}) {
    const requests<k_p_m> q(rng, 3, vocab, true);
    compare(exec, *h, q);
    compare_greedy(exec, *h);
    results out(3);
    auto scratch = workspace<k_p_m>(exec, 3, vocab);
    s::sample_from_head(exec, h->w.view(), h->x(), q.rows(), q.params, out.view(),
                        view_of(scratch));
    for (std::int64_t r = 0; r < 3; ++r) {
      const bool nan_row = h == &one_token || r == 1;
      CHECK((out.status[r] == s::row_status::nan_logits) == nan_row);
      if (nan_row) {
        CHECK(out.token[r] == 0);
        CHECK(std::isnan(out.logprob[r]));
      }
    }
  }
}

TEST_CASE("sample_from_head: a row with no allowed token") {
  INFUSE_RANDOM(rng);
  const infuse::exec::cpu exec(2);
  const auto h = random_head<quant::int_<4, 32>>(rng, 600, 2);
  requests<k_masked> q(rng, 2, 600, true);
  std::fill(q.bitmask.begin(), q.bitmask.begin() + (600 + 31) / 32, 0u);  // row 0
  compare(exec, h, q);
  results out(2);
  auto scratch = workspace<k_masked>(exec, 2, 600);
  s::sample_from_head(exec, h.w.view(), h.x(), q.rows(), q.params, out.view(), view_of(scratch));
  CHECK(out.status[0] == s::row_status::no_token_allowed);
  CHECK(out.token[0] == 0);
}

TEST_CASE("sample_from_head: bad arguments throw before anything is written") {
  INFUSE_RANDOM(rng);
  using infuse::test::argument_of;
  const infuse::exec::cpu exec(2);
  const std::int64_t vocab = 700, rows = 3;
  const auto h = random_head<quant::int_<4, 32>>(rng, vocab, rows);
  const requests<k_p_m> q(rng, rows, vocab, true);
  results out(rows);
  auto scratch = workspace<k_p_m>(exec, rows, vocab);
  const auto call = [&](auto w, host_view<const float, 2> x, const auto& params,
                        s::sample_outputs<host_memory> o, host_view<std::byte, 1> ws) {
    return argument_of([&] { s::sample_from_head(exec, w, x, q.rows(), params, o, ws); });
  };
  const auto good_out = out.view();
  CHECK(call(h.w.view(), h.x(), q.params, good_out, view_of(scratch)) == "(no error)");
  out = results(rows);

  auto null_codes = h.w.view();
  null_codes.codes = nullptr;
  CHECK(call(null_codes, h.x(), q.params, out.view(), view_of(scratch)) == "w.codes");
  const host_view<const float, 2> wrong_width(h.hidden.data(), {rows, hidden_size / 2});
  CHECK(call(h.w.view(), wrong_width, q.params, out.view(), view_of(scratch)) ==
        "hidden.extent(1)");
  const host_view<const float, 2> no_rows(h.hidden.data(), {0, hidden_size});
  CHECK(call(h.w.view(), no_rows, q.params, out.view(), view_of(scratch)) == "hidden.extent(0)");
  const host_view<const float, 2> null_hidden(nullptr, {rows, hidden_size});
  CHECK(call(h.w.view(), null_hidden, q.params, out.view(), view_of(scratch)) == "hidden.data()");
  auto short_out = out.view();
  short_out.token = {out.token.data(), {rows - 1}};
  CHECK(call(h.w.view(), h.x(), q.params, short_out, view_of(scratch)) == "out.token.extent(0)");
  const host_view<std::byte, 1> small(scratch.data(), {std::int64_t(scratch.size()) - 1});
  CHECK(call(h.w.view(), h.x(), q.params, out.view(), small) == "workspace.extent(0)");
  auto bad_p = q.params;
  std::vector<float> top_p(std::size_t(rows), 1.5f);
  bad_p.top_p = {top_p.data(), {rows}};
  CHECK(call(h.w.view(), h.x(), bad_p, out.view(), view_of(scratch)) == "params.top_p[0]");
  auto bad_rows = q;
  bad_rows.request[1] = 9;
  CHECK(argument_of([&] {
          s::sample_from_head(exec, h.w.view(), h.x(), bad_rows.rows(), q.params, out.view(),
                              view_of(scratch));
        }) == "rows.request[1]");
  const results untouched(rows);
  CHECK(out.token == untouched.token);
  CHECK(out.top_tokens == untouched.top_tokens);
  CHECK(out.status == untouched.status);
  CHECK(argument_of([&] {
          s::greedy_from_head(exec, h.w.view(), h.x(), out.view(),
                              host_view<std::byte, 1>(scratch.data(), {0}));
        }) == "workspace.extent(0)");
  CHECK(argument_of([&] {
          s::sample_from_head(exec, h.w.view(), h.x(), q.rows(), q.params, out.view(),
                              view_of(scratch), gemm::int8_activations{nullptr, 0});
        }) == "activations.workspace");
  CHECK(out.token == untouched.token);
}
