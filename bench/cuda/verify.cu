// Chain speculative verification of 5 draft tokens per request on the GPU (search::verify_chain,
// sampled and greedy), vocab 32k and 128k, batch 1, 16, 64 and 128, after an L2 flush, timed with
// CUDA events. Inputs as in bench/cpu/verify.cpp: drafts from rows near the target's. GB/s counts
// one read of the p and q rows of the deciding position per request. Every result is checked.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "infuse/exec/cuda.cuh"
#include "infuse/search/cuda/verify.cuh"
#include "support/gpu.cuh"
#include "support/gpu_bandwidth.cuh"
#include "support/harness.hpp"

namespace {

namespace bench = infuse::bench;
namespace gpu = infuse::bench::gpu;
using infuse::device_buffer;
using infuse::device_memory;
using infuse::device_view;
using infuse::search::acceptance;
using infuse::search::verify_status;

constexpr std::int64_t draft_tokens = 5;

// p rows e^N(0, 2) normalised, q = p times a uniform jitter in [0.7, 1.3], renormalised; drafts
// drawn from q.
struct chain_buffers {
  device_buffer<float> q, p;
  device_buffer<std::int32_t> drafts;
  device_buffer<std::uint64_t> seeds;
  device_buffer<std::int64_t> positions;
};

chain_buffers make_chain(std::int64_t batch, std::int64_t vocab) {
  std::mt19937_64 engine(1234);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::uniform_real_distribution<float> jitter(0.7f, 1.3f);
  std::vector<float> q, p, row(vocab);
  std::vector<std::int32_t> drafts;
  std::vector<std::uint64_t> seeds;
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t i = 0; i <= draft_tokens; ++i) {
      double total = 0.0;
      for (auto& w : row) total += (w = std::exp(normal(engine)));
      for (auto& w : row) w = static_cast<float>(w / total);
      p.insert(p.end(), row.begin(), row.end());
      if (i == draft_tokens) continue;
      total = 0.0;
      for (auto& w : row) total += (w *= jitter(engine));
      for (auto& w : row) w = static_cast<float>(w / total);
      q.insert(q.end(), row.begin(), row.end());
      drafts.push_back(std::discrete_distribution<std::int32_t>(row.begin(), row.end())(engine));
    }
    seeds.push_back(engine());
  }
  const std::vector<std::int64_t> positions(batch, 100);
  return {device_buffer<float>(std::span<const float>(q)),
          device_buffer<float>(std::span<const float>(p)),
          device_buffer<std::int32_t>(std::span<const std::int32_t>(drafts)),
          device_buffer<std::uint64_t>(std::span<const std::uint64_t>(seeds)),
          device_buffer<std::int64_t>(std::span<const std::int64_t>(positions))};
}

template <acceptance Rule>
void verify_chain(benchmark::State& state) {
  const std::int64_t vocab = state.range(0);
  const std::int64_t batch = state.range(1);
  const chain_buffers data = make_chain(batch, vocab);
  const infuse::search::chain_drafts<device_memory> in{
      data.drafts.as_view({batch, draft_tokens}), data.q.as_view({batch, draft_tokens, vocab}),
      data.p.as_view({batch, draft_tokens + 1, vocab}), data.seeds.as_view(),
      data.positions.as_view()};
  device_buffer<std::int32_t> accepted(batch), tokens(batch * (draft_tokens + 1));
  device_buffer<verify_status> status(batch);
  const infuse::search::verify_result<device_memory> out{
      accepted.as_view(), tokens.as_view({batch, draft_tokens + 1}), {}, status.as_view()};
  gpu::owned_stream stream;
  const infuse::exec::cuda exec(stream);
  gpu::event_timer timer(stream);
  gpu::l2_flush flush;
  for (auto _ : state) {
    flush.run(stream);
    state.SetIterationTime(
        timer.seconds([&] { infuse::search::verify_chain<Rule>(exec, in, out); }));
  }
  exec.synchronize();
  const auto host_accepted = accepted.to_host();
  const auto host_tokens = tokens.to_host();
  const auto host_status = status.to_host();
  double accepted_total = 0.0;
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::int32_t last = host_tokens[b * (draft_tokens + 1) + host_accepted[b]];
    if (host_status[b] != verify_status::ok || last < 0 || last >= vocab) {
      bench::report_error(state, "request " + std::to_string(b) + " has status " +
                                     std::to_string(static_cast<int>(host_status[b])) +
                                     " and final token " + std::to_string(last));
      return;
    }
    accepted_total += host_accepted[b];
  }
  const double rows = Rule == acceptance::greedy ? 1.0 : 2.0;
  bench::set_bytes(state, rows * double(vocab) * sizeof(float) * double(batch),
                   gpu::measured_bandwidth().read_gbps);
  state.counters["accepted"] = accepted_total / double(batch);
}

void shapes(benchmark::internal::Benchmark* benchmark) {
  benchmark->ArgNames({"vocab", "batch"});
  for (const std::int64_t vocab : {32000, 128256}) {
    for (const std::int64_t batch : {1, 16, 64, 128}) benchmark->Args({vocab, batch});
  }
  benchmark->UseManualTime();
}

}  // namespace

BENCHMARK(verify_chain<acceptance::sampled>)->Name("verify.chain")->Apply(shapes);
BENCHMARK(verify_chain<acceptance::greedy>)->Name("verify.chain_greedy")->Apply(shapes);
