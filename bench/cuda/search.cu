// search::sample and search::greedy on the GPU: top-k(50) + top-p(0.9), min-p(0.05) and greedy,
// vocab 32k, 128k and 256k, batch 1, 16 and 128 (greedy also 256), after an L2 flush, timed with
// CUDA events. Logits are normal with stddev 2.5 (as bench/cpu/search.cpp). GB/s counts one read
// of the logits; the ratio is to the measured read bandwidth. Every status is checked.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "infuse/exec/cuda.cuh"
#include "infuse/gemm/cuda/gemv.cuh"
#include "infuse/quant/quant.hpp"
#include "infuse/search/cuda/fused_head.cuh"
#include "infuse/search/cuda/sample.cuh"
#include "support/gpu.cuh"
#include "support/gpu_bandwidth.cuh"
#include "support/harness.hpp"

namespace {

namespace bench = infuse::bench;
namespace gpu = infuse::bench::gpu;
namespace s = infuse::search;
using infuse::device_buffer;
using infuse::device_memory;

template <class T>
device_buffer<T> upload(const std::vector<T>& host) {
  return device_buffer<T>(std::span<const T>(host));
}

device_buffer<float> random_logits(std::int64_t batch, std::int64_t vocab) {
  std::mt19937_64 engine(1234);
  std::normal_distribution<float> normal(0.0f, 2.5f);
  std::vector<float> logits(static_cast<std::size_t>(batch * vocab));
  for (auto& x : logits) x = normal(engine);
  return upload(logits);
}

enum class variant { top_k_top_p, min_p };

template <variant V>
void sample(benchmark::State& state) {
  using set =
      std::conditional_t<V == variant::top_k_top_p, s::filters<s::filter::top_k, s::filter::top_p>,
                         s::filters<s::filter::min_p>>;
  const std::int64_t vocab = state.range(0);
  const std::int64_t batch = state.range(1);
  const device_buffer<float> logits = random_logits(batch, vocab);
  std::vector<std::int32_t> request(static_cast<std::size_t>(batch));
  std::vector<std::int64_t> position(static_cast<std::size_t>(batch), 100);
  std::vector<std::uint64_t> seed(static_cast<std::size_t>(batch));
  for (std::int64_t b = 0; b < batch; ++b) {
    request[static_cast<std::size_t>(b)] = static_cast<std::int32_t>(b);
    seed[static_cast<std::size_t>(b)] = static_cast<std::uint64_t>(b) * 7919u + 1u;
  }
  const auto d_request = upload(request);
  const auto d_position = upload(position);
  const auto d_seed = upload(seed);
  const auto top_k = upload(std::vector<std::int32_t>(static_cast<std::size_t>(batch), 50));
  const auto top_p = upload(std::vector<float>(static_cast<std::size_t>(batch), 0.9f));
  const auto min_p = upload(std::vector<float>(static_cast<std::size_t>(batch), 0.05f));
  s::sample_params<device_memory, set> params;
  params.seed = d_seed.as_view();
  if constexpr (V == variant::top_k_top_p) {
    params.top_k = top_k.as_view();
    params.top_p = top_p.as_view();
  } else {
    params.min_p = min_p.as_view();
  }
  device_buffer<std::int32_t> token(batch);
  device_buffer<float> logprob(batch);
  device_buffer<s::row_status> status(batch);
  const s::sample_outputs<device_memory> out{
      token.as_view(), logprob.as_view(), status.as_view(), {}, {}};
  gpu::owned_stream stream;
  const infuse::exec::cuda exec(stream);
  const device_buffer<std::byte> workspace(s::sample_workspace_bytes<set>(exec, batch, vocab));
  const s::sample_rows<device_memory> rows{d_request.as_view(), d_position.as_view()};
  gpu::time_iterations(state, stream, [&] {
    s::sample<set>(exec, logits.as_view({batch, vocab}), rows, params, out, workspace.as_view());
  });
  exec.synchronize();
  const auto host_status = status.to_host();
  for (std::int64_t b = 0; b < batch; ++b) {
    if (host_status[static_cast<std::size_t>(b)] != s::row_status::ok) {
      bench::report_error(state, "row " + std::to_string(b) + " has status " +
                                     std::to_string(static_cast<int>(host_status[b])));
      return;
    }
  }
  bench::set_bytes(state, double(vocab) * sizeof(float) * double(batch),
                   gpu::measured_bandwidth().read_gbps);
}

void greedy(benchmark::State& state) {
  const std::int64_t vocab = state.range(0);
  const std::int64_t batch = state.range(1);
  const device_buffer<float> logits = random_logits(batch, vocab);
  device_buffer<std::int32_t> token(batch);
  device_buffer<float> logprob(batch);
  device_buffer<s::row_status> status(batch);
  const s::sample_outputs<device_memory> out{
      token.as_view(), logprob.as_view(), status.as_view(), {}, {}};
  gpu::owned_stream stream;
  const infuse::exec::cuda exec(stream);
  gpu::time_iterations(state, stream, [&] {
    s::greedy(exec, logits.as_view({batch, vocab}), out);
  });
  exec.synchronize();
  const auto host_status = status.to_host();
  for (std::int64_t b = 0; b < batch; ++b) {
    if (host_status[static_cast<std::size_t>(b)] != s::row_status::ok) {
      bench::report_error(state, "row " + std::to_string(b) + " is not ok");
      return;
    }
  }
  bench::set_bytes(state, double(vocab) * sizeof(float) * double(batch),
                   gpu::measured_bandwidth().read_gbps);
}

void shapes(benchmark::internal::Benchmark* benchmark,
            std::initializer_list<std::int64_t> batches) {
  benchmark->ArgNames({"vocab", "batch"});
  for (const std::int64_t vocab : {32000, 128256, 256000}) {
    for (const std::int64_t batch : batches) benchmark->Args({vocab, batch});
  }
  benchmark->UseManualTime();
}

void sample_shapes(benchmark::internal::Benchmark* benchmark) {
  shapes(benchmark, {1, 16, 128});
}
void greedy_shapes(benchmark::internal::Benchmark* benchmark) {
  shapes(benchmark, {1, 16, 128, 256});
}

}  // namespace

BENCHMARK(sample<variant::top_k_top_p>)->Name("sample.top_k_top_p")->Apply(sample_shapes);
BENCHMARK(sample<variant::min_p>)->Name("sample.min_p")->Apply(sample_shapes);
BENCHMARK(greedy)->Name("sample.greedy")->Apply(greedy_shapes);

// ---- the LM head fused with sampling --------------------------------------------------------
// search::sample_from_head (top-k 50 + top-p 0.9) against gemv into logits followed by sample, on
// a 128256 x 4096 int4 (group 128) head, batch 1. GB/s: the head's codes and scales and the hidden
// state; the ratio is to the measured read bandwidth.

namespace {

void search_head(benchmark::State& state) {
  namespace quant = infuse::quant;
  using scheme = quant::int_<4, 128>;
  const bool fused = state.range(0) == 1;
  const std::int64_t vocab = 128256, hidden = 4096, batch = 1;
  const quant::matrix<scheme> shape{nullptr, nullptr, nullptr, vocab, hidden};
  std::mt19937_64 engine(42);
  std::vector<std::uint8_t> host_codes(
      static_cast<std::size_t>(vocab * shape.blocks_per_row() * scheme::block_bytes));
  for (auto& code : host_codes) code = static_cast<std::uint8_t>(engine());
  const auto codes = upload(host_codes);
  const auto scales = upload(std::vector<float>(
      static_cast<std::size_t>(shape.group_count() * scheme::scales_per_group), 0.01f));
  std::normal_distribution<float> normal;
  std::vector<float> host_x(static_cast<std::size_t>(batch * hidden));
  for (auto& v : host_x) v = normal(engine);
  const auto x = upload(host_x);
  const quant::matrix<scheme, device_memory> w{codes.as_view().data(), scales.as_view().data(),
                                               nullptr, vocab, hidden};
  const auto request = upload(std::vector<std::int32_t>(batch, 0));
  const auto position = upload(std::vector<std::int64_t>(batch, 0));
  const auto seed = upload(std::vector<std::uint64_t>(1, 7));
  const auto top_k = upload(std::vector<std::int32_t>(1, 50));
  const auto top_p = upload(std::vector<float>(1, 0.9f));
  using set = s::filters<s::filter::top_k, s::filter::top_p>;
  s::sample_params<device_memory, set> params;
  params.seed = seed.as_view();
  params.top_k = top_k.as_view();
  params.top_p = top_p.as_view();
  const s::sample_rows<device_memory> rows{request.as_view(), position.as_view()};
  device_buffer<std::int32_t> token(batch);
  device_buffer<float> logprob(batch), logits(batch * vocab);
  device_buffer<s::row_status> status(batch);
  const s::sample_outputs<device_memory> out{
      token.as_view(), logprob.as_view(), status.as_view(), {}, {}};
  gpu::owned_stream stream;
  const infuse::exec::cuda exec(stream);
  device_buffer<std::byte> workspace(std::max(s::head_workspace_bytes<set>(exec, batch, vocab),
                                              s::sample_workspace_bytes<set>(exec, batch, vocab)));
  const auto xv = x.as_view({batch, hidden});
  gpu::time_iterations(state, stream, [&] {
    if (fused) {
      s::sample_from_head(exec, w, xv, rows, params, out, workspace.as_view());
    } else {
      infuse::gemv(exec, w, xv, logits.as_view({batch, vocab}));
      s::sample(exec, logits.as_view({batch, vocab}), rows, params, out, workspace.as_view());
    }
  });
  exec.synchronize();
  if (status.to_host()[0] != s::row_status::ok) {
    bench::report_error(state, "the row is not ok");
    return;
  }
  bench::set_bytes(state,
                   double(quant::storage_bytes<scheme>(vocab, hidden)) + 4.0 * double(hidden),
                   gpu::measured_bandwidth().read_gbps);
}

}  // namespace

BENCHMARK(search_head)
    ->Name("sample.head_top_k_top_p")
    ->ArgNames({"fused"})
    ->Arg(1)
    ->Arg(0)
    ->UseManualTime();
