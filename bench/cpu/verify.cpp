// Chain speculative verification of 5 draft tokens per request (search::verify_chain, sampled and
// greedy), vocab 32k and 128k, batch 1 and 16, on all threads. Drafts come from rows near the
// target's, so requests accept a few tokens and then either reject (one residual: a sum and an
// inverse-CDF pass over p and q of that position) or draw the bonus token (one pass over p). The
// greedy rows see sampled drafts, which rarely match the argmax: one argmax pass per request.
// GB/s counts one read of the p and q rows of the deciding position per request, the least that
// the decision needs; the acceptance test reads are a few bytes. Every result is checked.
// smoke filter: ^verify\.chain/vocab:32000/batch:1/
#include "infuse/search/cpu/verify.hpp"

#include <benchmark/benchmark.h>

#include <cstdint>
#include <vector>

#include "support/cpu_bandwidth.hpp"
#include "support/harness.hpp"
#include "support/verify_inputs.hpp"

namespace {

namespace bench = infuse::bench;
using infuse::host_memory;
using infuse::host_view;
using infuse::search::acceptance;
using infuse::search::verify_status;

constexpr std::int64_t draft_tokens = 5;

template <acceptance Rule>
void verify_chain(benchmark::State& state) {
  const std::int64_t vocab = state.range(0);
  const std::int64_t batch = state.range(1);
  const bench::chain_inputs data = bench::make_chain_inputs(batch, draft_tokens, vocab);
  const infuse::search::chain_drafts<host_memory> in{
      host_view<const std::int32_t, 2>(data.drafts.data(), {batch, draft_tokens}),
      host_view<const float, 3>(data.q.data(), {batch, draft_tokens, vocab}),
      host_view<const float, 3>(data.p.data(), {batch, draft_tokens + 1, vocab}),
      host_view<const std::uint64_t, 1>(data.seeds.data(), {batch}),
      host_view<const std::int64_t, 1>(data.positions.data(), {batch})};
  std::vector<std::int32_t> accepted(batch), tokens(batch * (draft_tokens + 1));
  std::vector<verify_status> status(batch);
  const infuse::search::verify_result<host_memory> out{
      host_view<std::int32_t, 1>(accepted.data(), {batch}),
      host_view<std::int32_t, 2>(tokens.data(), {batch, draft_tokens + 1}),
      {},
      host_view<verify_status, 1>(status.data(), {batch})};
  const infuse::exec::cpu exec;
  std::int64_t accepted_total = 0;
  for (auto _ : state) {
    infuse::search::verify_chain<Rule>(exec, in, out);
    for (const auto count : accepted) accepted_total += count;
  }
  if (!bench::check_chain_results(state, accepted, tokens, status, vocab)) return;
  const double rows = Rule == acceptance::greedy ? 1.0 : 2.0;
  bench::set_bytes(state, rows * double(vocab) * sizeof(float) * double(batch),
                   bench::cpu::measured_bandwidth().read_gbps);
  state.counters["accepted"] = double(accepted_total) / double(state.iterations()) / double(batch);
}

void shapes(benchmark::internal::Benchmark* benchmark) {
  benchmark->ArgNames({"vocab", "batch"});
  for (const std::int64_t vocab : {32000, 128256}) {
    for (const std::int64_t batch : {1, 16}) benchmark->Args({vocab, batch});
  }
  benchmark->UseRealTime();
}

}  // namespace

BENCHMARK(verify_chain<acceptance::sampled>)->Name("verify.chain")->Apply(shapes);
BENCHMARK(verify_chain<acceptance::greedy>)->Name("verify.chain_greedy")->Apply(shapes);
