// search::sample and search::greedy on the CPU: top-k(50) + top-p(0.9), top-p(0.9) alone,
// min-p(0.05) and greedy over vocabularies of 32k, 128k and 256k tokens, batch 1 and 16. Bytes:
// the logits read once. Then the LM head fused with sampling against gemv followed by sample.
// smoke filter: ^search\.greedy/vocab:32000/batch:1/
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "infuse/exec/cpu.hpp"
#include "infuse/gemm/cpu/gemv.hpp"
#include "infuse/quant/quant.hpp"
#include "infuse/search/cpu/fused_head.hpp"
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

// ---- the LM head fused with sampling --------------------------------------------------------
// search::sample_from_head (greedy_from_head) against gemv into a logits buffer followed by
// sample (greedy), on a 128256 x 4096 int4 (group 128) head, batch 1, 2 threads. Bytes: the
// head's codes and scales and the hidden state (what either must read); counter "vs_unfused":
// the time of gemv + sample measured in the same run over this benchmark's time.
namespace {

namespace quant = infuse::quant;
using head_scheme = quant::int_<4, 128>;

// Random codes with scales of 0.01: logits of a few units, as a trained head gives.
const quant::quantized<head_scheme>& random_head(std::int64_t vocab, std::int64_t hidden) {
  static quant::quantized<head_scheme> q;
  if (q.rows != vocab || q.cols != hidden) {
    q.rows = vocab;
    q.cols = hidden;
    const quant::matrix<head_scheme> shape{nullptr, nullptr, nullptr, vocab, hidden};
    q.codes.resize(std::size_t(vocab * shape.blocks_per_row() * head_scheme::block_bytes));
    std::mt19937_64 engine(42);
    for (auto& code : q.codes) code = static_cast<std::uint8_t>(engine());
    q.scales.assign(std::size_t(shape.group_count() * head_scheme::scales_per_group), 0.01f);
  }
  return q;
}

enum class head_variant { top_k_top_p, greedy };

template <head_variant V>
void search_head(benchmark::State& state) {
  const bool fused = state.range(0) == 1;
  const std::int64_t vocab = 128256, hidden = 4096, rows = 1;
  const auto& q = random_head(vocab, hidden);
  std::mt19937 engine(3);
  std::normal_distribution<float> normal;
  std::vector<float> x(std::size_t(rows * hidden)), logits(std::size_t(rows * vocab));
  for (auto& v : x) v = normal(engine);
  std::vector<std::int32_t> request(rows, 0), top_k(rows, 50), token(rows), fused_token(rows);
  std::vector<std::int64_t> position(rows, 0);
  std::vector<std::uint64_t> seed(rows, 7);
  std::vector<float> top_p(rows, 0.9f), logprob(rows);
  std::vector<s::row_status> status(rows);
  using set = s::filters<s::filter::top_k, s::filter::top_p>;
  s::sample_params<host_memory, set> params;
  params.seed = {seed.data(), {rows}};
  params.top_k = {top_k.data(), {rows}};
  params.top_p = {top_p.data(), {rows}};
  const s::sample_rows<host_memory> row_map{{request.data(), {rows}}, {position.data(), {rows}}};
  const infuse::exec::cpu exec(2);
  const host_view<const float, 2> xv(x.data(), {rows, hidden});
  const host_view<float, 2> yv(logits.data(), {rows, vocab});
  std::vector<std::byte> head_scratch(std::size_t(s::head_workspace_bytes<set>(exec, rows, vocab)));
  std::vector<std::byte> sample_scratch(
      std::size_t(s::sample_workspace_bytes<set>(exec, rows, vocab)));
  const host_view<std::byte, 1> head_ws(head_scratch.data(), {std::int64_t(head_scratch.size())});
  const host_view<std::byte, 1> sample_ws(sample_scratch.data(),
                                          {std::int64_t(sample_scratch.size())});
  const auto outputs = [&](std::vector<std::int32_t>& t) {
    return s::sample_outputs<host_memory>{
        {t.data(), {rows}}, {logprob.data(), {rows}}, {status.data(), {rows}}, {}, {}};
  };
  const auto run_unfused = [&] {
    infuse::gemv(exec, q.view(), xv, yv);
    if constexpr (V == head_variant::greedy) {
      s::greedy(exec, host_view<const float, 2>(yv), outputs(token));
    } else {
      s::sample<set>(exec, host_view<const float, 2>(yv), row_map, params, outputs(token),
                     sample_ws);
    }
  };
  const auto run_fused = [&] {
    if constexpr (V == head_variant::greedy) {
      s::greedy_from_head(exec, q.view(), xv, outputs(fused_token), head_ws);
    } else {
      s::sample_from_head(exec, q.view(), xv, row_map, params, outputs(fused_token), head_ws);
    }
  };
  // The unfused sequence's time in this run: the best of a few calls.
  double unfused_seconds = 1e30;
  for (int i = 0; i < 5; ++i) {
    const auto start = std::chrono::steady_clock::now();
    run_unfused();
    unfused_seconds =
        std::min(unfused_seconds,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  for (auto _ : state) {
    if (fused) {
      run_fused();
    } else {
      run_unfused();
    }
    benchmark::ClobberMemory();
    ++position[0];
  }
  run_unfused();
  run_fused();
  if (token != fused_token || status[0] != s::row_status::ok) {
    bench::report_error(state, "the fused head picked token " + std::to_string(fused_token[0]) +
                                   ", gemv + sample token " + std::to_string(token[0]));
    return;
  }
  bench::set_bytes(state, double(q.bytes()) + 4.0 * double(rows * hidden),
                   bench::cpu::measured_bandwidth().read_gbps);
  bench::set_flops(state, 2.0 * double(vocab * hidden * rows));
  state.counters["vs_unfused"] =
      benchmark::Counter(unfused_seconds * double(state.iterations()), benchmark::Counter::kIsRate);
}

void head_modes(benchmark::internal::Benchmark* benchmark) {
  benchmark->ArgNames({"fused"})->Arg(1)->Arg(0)->UseRealTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK(search_head<head_variant::top_k_top_p>)
    ->Name("search.head_top_k_top_p")
    ->Apply(head_modes);
BENCHMARK(search_head<head_variant::greedy>)->Name("search.head_greedy")->Apply(head_modes);

}  // namespace
