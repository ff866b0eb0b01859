// search::sample and search::greedy on the CPU: top-k(50) + top-p(0.9), top-p(0.9) alone,
// min-p(0.05) and greedy
// over vocabularies of 32k, 128k and 256k tokens, batch 1 and 16. Bytes: the logits read once.
// smoke filter: ^search\.greedy/vocab:32000/batch:1/
#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "infuse/exec/cpu.hpp"
#include "infuse/search/cpu/sample.hpp"
#include "support/cpu_bandwidth.hpp"
#include "support/harness.hpp"

namespace {

namespace bench = infuse::bench;
namespace s = infuse::search;
using infuse::host_memory;
using infuse::host_view;

enum class variant { top_k_top_p, top_p, min_p, greedy };

template <variant V>
void search_sample(benchmark::State& state) {
  const std::int64_t vocab = state.range(0);
  const std::int64_t rows = state.range(1);
  std::mt19937 engine(42);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> logits(rows * vocab);
  for (auto& x : logits) x = normal(engine);
  std::vector<std::int32_t> request(rows), top_k(rows, 50), token(rows);
  std::vector<std::int64_t> position(rows);
  std::vector<std::uint64_t> seed(rows, 7);
  std::vector<float> top_p(rows, 0.9f), min_p(rows, 0.05f), logprob(rows);
  std::vector<s::row_status> status(rows);
  for (std::int64_t r = 0; r < rows; ++r) request[r] = std::int32_t(r);
  const host_view<const float, 2> view(logits.data(), {rows, vocab});
  const s::sample_rows<host_memory> row_map{{request.data(), {rows}}, {position.data(), {rows}}};
  const s::sample_outputs<host_memory> out{
      {token.data(), {rows}}, {logprob.data(), {rows}}, {status.data(), {rows}}, {}, {}};
  // Batch 1 runs on one thread (the latency of one row); larger batches on all.
  const infuse::exec::cpu exec(rows == 1 ? 1 : 0);
  // Sized for the widest filter set here (the CPU's size does not depend on the filters).
  using all = s::filters<s::filter::top_k, s::filter::top_p, s::filter::min_p>;
  std::vector<std::byte> workspace(std::size_t(s::sample_workspace_bytes<all>(exec, rows, vocab)));
  const infuse::host_view<std::byte, 1> scratch(workspace.data(),
                                                {std::int64_t(workspace.size())});
  std::int64_t sum = 0;
  for (auto _ : state) {
    if constexpr (V == variant::greedy) {
      s::greedy(exec, view, out);
    } else if constexpr (V == variant::top_k_top_p) {
      using set = s::filters<s::filter::top_k, s::filter::top_p>;
      s::sample_params<host_memory, set> params;
      params.seed = {seed.data(), {rows}};
      params.top_k = {top_k.data(), {rows}};
      params.top_p = {top_p.data(), {rows}};
      s::sample<set>(exec, view, row_map, params, out, scratch);
    } else if constexpr (V == variant::top_p) {
      using set = s::filters<s::filter::top_p>;
      s::sample_params<host_memory, set> params;
      params.seed = {seed.data(), {rows}};
      params.top_p = {top_p.data(), {rows}};
      s::sample<set>(exec, view, row_map, params, out, scratch);
    } else {
      using set = s::filters<s::filter::min_p>;
      s::sample_params<host_memory, set> params;
      params.seed = {seed.data(), {rows}};
      params.min_p = {min_p.data(), {rows}};
      s::sample<set>(exec, view, row_map, params, out, scratch);
    }
    for (std::int64_t r = 0; r < rows; ++r) {
      sum += token[r];
      ++position[r];
    }
  }
  for (std::int64_t r = 0; r < rows; ++r) {
    if (status[r] != s::row_status::ok || token[r] < 0 || token[r] >= vocab) {
      bench::report_error(state, "row " + std::to_string(r) + " has status " +
                                     std::to_string(int(status[r])) + ", token " +
                                     std::to_string(token[r]));
      return;
    }
  }
  if (sum < 0) bench::report_error(state, "negative token sum");
  bench::set_bytes(state, double(rows * vocab) * sizeof(float),
                   bench::cpu::measured_bandwidth().read_gbps);
}

void shapes(benchmark::internal::Benchmark* benchmark) {
  benchmark->ArgNames({"vocab", "batch"});
  for (const std::int64_t vocab : {32000, 128256, 256000}) {
    for (const std::int64_t batch : {1, 16}) benchmark->Args({vocab, batch});
  }
  benchmark->UseRealTime()->Unit(benchmark::kMicrosecond);
}

BENCHMARK(search_sample<variant::top_k_top_p>)->Name("search.top_k_top_p")->Apply(shapes);
BENCHMARK(search_sample<variant::top_p>)->Name("search.top_p")->Apply(shapes);
BENCHMARK(search_sample<variant::min_p>)->Name("search.min_p")->Apply(shapes);
BENCHMARK(search_sample<variant::greedy>)->Name("search.greedy")->Apply(shapes);

}  // namespace
