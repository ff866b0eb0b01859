// Chain speculative verification of 5 draft tokens per request on the GPU (search::verify_chain,
// sampled and greedy), vocab 32k and 128k, batch 1, 16, 64 and 128, after an L2 flush, timed with
// CUDA events. Inputs as in bench/cpu/verify.cpp (support/verify_inputs.hpp): drafts from rows
// near the target's. GB/s counts one read of the p and q rows of the deciding position per
// request. Every result is checked.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <span>

#include "infuse/exec/cuda.cuh"
#include "infuse/search/cuda/verify.cuh"
#include "support/gpu.cuh"
#include "support/gpu_bandwidth.cuh"
#include "support/harness.hpp"
#include "support/verify_inputs.hpp"

namespace {

namespace bench = infuse::bench;
namespace gpu = infuse::bench::gpu;
using infuse::device_buffer;
using infuse::device_memory;
using infuse::device_view;
using infuse::search::acceptance;
using infuse::search::verify_status;

constexpr std::int64_t draft_tokens = 5;

// The inputs of bench::make_chain_inputs (support/verify_inputs.hpp), in device memory.
struct chain_buffers {
  explicit chain_buffers(const bench::chain_inputs& host)
      : q(std::span<const float>(host.q)),
        p(std::span<const float>(host.p)),
        drafts(std::span<const std::int32_t>(host.drafts)),
        seeds(std::span<const std::uint64_t>(host.seeds)),
        positions(std::span<const std::int64_t>(host.positions)) {}
  device_buffer<float> q, p;
  device_buffer<std::int32_t> drafts;
  device_buffer<std::uint64_t> seeds;
  device_buffer<std::int64_t> positions;
};

template <acceptance Rule>
void verify_chain(benchmark::State& state) {
  const std::int64_t vocab = state.range(0);
  const std::int64_t batch = state.range(1);
  const chain_buffers data(bench::make_chain_inputs(batch, draft_tokens, vocab));
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
  gpu::time_iterations(state, stream, [&] { infuse::search::verify_chain<Rule>(exec, in, out); });
  exec.synchronize();
  const auto host_accepted = accepted.to_host();
  const auto host_tokens = tokens.to_host();
  const auto host_status = status.to_host();
  if (!bench::check_chain_results(state, host_accepted, host_tokens, host_status, vocab)) return;
  double accepted_total = 0.0;
  for (const auto count : host_accepted) accepted_total += count;
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
