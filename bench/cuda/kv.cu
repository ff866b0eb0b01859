// kv::cache on device memory (kv::device_pages): append and compaction, Llama-sized heads (8 KV
// heads of 128 dims for K and V), pages of 16 tokens, per K/V scheme, timed with CUDA events.
//
// kv.append/SCHEME/batch:B  one decode step: a token appended to each of B sequences (of 1000
//   tokens before the step), quantized into its slots with its keys folded into the page bounds.
//   After each timed step the token is truncated again (untimed), so every step is the same.
//   GB/s counts the bytes that must move: the float K and V rows read, the records written, the
//   token's attention mass zeroed, and the key bounds of each page written read and written once;
//   roofline divides by the measured device copy bandwidth (bytes read plus bytes written, as
//   this count is). tokens/s counts appended tokens; bytes_per_token is the scheme's exact cost
//   beside the f16 row's.
// kv.compact/SCHEME/tokens:N/batch:B  B sequences of N tokens keep every other token (positions
//   chosen on the host, as kv::retain::select hands them over): the kept records and mass move to
//   the front on the device, the key bounds are recomputed and the freed pages released. The
//   sequences are rebuilt (untimed) before each step. s_per_1000_tokens is the time per 1000
//   tokens of the sequences before compaction.
// After the loop each row checks the sequences' lengths and that every launch succeeded.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "infuse/exec/cuda.cuh"
#include "infuse/kv/cuda/cache.cuh"
#include "infuse/quant/quant.hpp"
#include "support/gpu.cuh"
#include "support/gpu_bandwidth.cuh"
#include "support/harness.hpp"

namespace {

namespace bench = infuse::bench;
namespace gpu = infuse::bench::gpu;
namespace kv = infuse::kv;
namespace quant = infuse::quant;
using infuse::device_buffer;

constexpr std::int32_t heads = 8;
constexpr std::int32_t head_dim = 128;
constexpr std::int64_t prefix = 1000;  // tokens of each sequence before an append step

template <class KScheme, class VScheme>
using device_cache = kv::cache<kv::paged<16>, KScheme, VScheme, kv::device_pages>;

// `rows` random K (or V) rows of heads x head_dim floats, in device memory.
device_buffer<float> random_rows(std::int64_t rows, std::uint64_t seed) {
  std::mt19937_64 engine(seed);
  std::normal_distribution<float> normal;
  std::vector<float> values(static_cast<std::size_t>(rows * heads * head_dim));
  for (float& x : values) x = normal(engine);
  return device_buffer<float>(std::span<const float>(values));
}

// Appends `tokens` rows to each of `seqs`, from k and v (at least that many rows).
template <class Cache>
void append_rows(Cache& cache, const infuse::exec::cuda& exec,
                 std::span<const kv::sequence_id> seqs, std::int64_t tokens,
                 const device_buffer<float>& k, const device_buffer<float>& v) {
  const std::vector<std::int64_t> counts(seqs.size(), tokens);
  const std::int64_t rows = tokens * std::ssize(seqs);
  cache.append(exec, seqs, counts, k.as_view({rows, heads, head_dim}),
               v.as_view({rows, heads, head_dim}));
}

template <class Cache>
void check_lengths(benchmark::State& state, const Cache& cache,
                   std::span<const kv::sequence_id> seqs, std::int64_t expected,
                   const infuse::exec::cuda& exec) {
  exec.synchronize();
  for (const kv::sequence_id s : seqs) {
    if (cache.length(s) != expected) {
      bench::report_error(state, "sequence " + std::to_string(s) + " holds " +
                                     std::to_string(cache.length(s)) + " tokens, expected " +
                                     std::to_string(expected));
      return;
    }
  }
}

template <class KScheme, class VScheme>
void append(benchmark::State& state) {
  using cache_type = device_cache<KScheme, VScheme>;
  const std::int64_t batch = state.range(0);
  const gpu::owned_stream stream;
  const infuse::exec::cuda exec(stream);
  const auto pages = static_cast<std::int32_t>(batch * (prefix / 16 + 2));
  cache_type cache(pages, {heads, head_dim}, {heads, head_dim}, kv::device_pages{exec});
  std::vector<kv::sequence_id> seqs;
  for (std::int64_t b = 0; b < batch; ++b) seqs.push_back(cache.create());
  {
    const device_buffer<float> k = random_rows(prefix * batch, 1);
    const device_buffer<float> v = random_rows(prefix * batch, 2);
    append_rows(cache, exec, seqs, prefix, k, v);
  }
  const device_buffer<float> k = random_rows(batch, 3);
  const device_buffer<float> v = random_rows(batch, 4);
  gpu::event_timer timer(stream);
  gpu::l2_flush flush;
  for (auto _ : state) {
    flush.run(stream);
    state.SetIterationTime(timer.seconds([&] { append_rows(cache, exec, seqs, 1, k, v); }));
    for (const kv::sequence_id s : seqs) cache.truncate(s, 1);
  }
  check_lengths(state, cache, seqs, prefix, exec);
  const double channels = double(heads) * head_dim;
  const double bytes_per_step =
      double(batch) * (2 * channels * sizeof(float) + double(cache.bytes_per_token()) +
                       heads * sizeof(float) + 2 * 2 * channels * sizeof(float));
  bench::set_bytes(state, bytes_per_step, gpu::measured_bandwidth().copy_gbps);
  state.counters["tokens/s"] =
      benchmark::Counter(double(batch), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["bytes_per_token"] = double(cache.bytes_per_token());
}

template <class KScheme, class VScheme>
void compact(benchmark::State& state) {
  using cache_type = device_cache<KScheme, VScheme>;
  const std::int64_t tokens = state.range(0);
  const std::int64_t batch = state.range(1);
  const gpu::owned_stream stream;
  const infuse::exec::cuda exec(stream);
  const auto pages = static_cast<std::int32_t>(batch * (tokens / 16 + 1));
  cache_type cache(pages, {heads, head_dim}, {heads, head_dim}, kv::device_pages{exec});
  const device_buffer<float> k = random_rows(tokens * batch, 5);
  const device_buffer<float> v = random_rows(tokens * batch, 6);
  std::vector<std::int32_t> kept_indptr{0};
  std::vector<std::int32_t> kept;
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int32_t t = 0; t < tokens; t += 2) kept.push_back(t);
    kept_indptr.push_back(static_cast<std::int32_t>(kept.size()));
  }
  std::vector<kv::sequence_id> seqs;
  gpu::event_timer timer(stream);
  gpu::l2_flush flush;
  for (auto _ : state) {
    for (const kv::sequence_id s : seqs) cache.free(s);
    seqs.clear();
    for (std::int64_t b = 0; b < batch; ++b) seqs.push_back(cache.create());
    append_rows(cache, exec, seqs, tokens, k, v);
    flush.run(stream);
    state.SetIterationTime(timer.seconds([&] { cache.compact(exec, seqs, kept_indptr, kept); }));
  }
  check_lengths(state, cache, seqs, (tokens + 1) / 2, exec);
  state.counters["s_per_1000_tokens"] = benchmark::Counter(
      double(tokens * batch) / 1000.0,
      benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

void append_batches(benchmark::internal::Benchmark* benchmark) {
  benchmark->ArgNames({"batch"});
  for (const std::int64_t batch : {1, 64}) benchmark->Args({batch});
  benchmark->UseManualTime();
}

void compact_shapes(benchmark::internal::Benchmark* benchmark) {
  benchmark->ArgNames({"tokens", "batch"});
  for (const std::int64_t tokens : {1024, 8192}) {
    for (const std::int64_t batch : {1, 16}) benchmark->Args({tokens, batch});
  }
  benchmark->UseManualTime();
}

// The schemes of the rows (named apart from CUDA's vector types int4 and the like).
namespace scheme {
using f16 = quant::none<infuse::half>;
using int8 = quant::int_<8, 32>;
using int4 = quant::int_<4, 32>;
using int2_zp = quant::int_<2, 32, quant::zero_point>;
}  // namespace scheme

}  // namespace

BENCHMARK(append<scheme::f16, scheme::f16>)->Name("kv.append/f16")->Apply(append_batches);
BENCHMARK(append<scheme::int8, scheme::int8>)->Name("kv.append/int8_g32")->Apply(append_batches);
BENCHMARK(append<scheme::int4, scheme::int4>)->Name("kv.append/int4_g32")->Apply(append_batches);
BENCHMARK(append<scheme::int2_zp, scheme::int2_zp>)
    ->Name("kv.append/int2_g32_zp")
    ->Apply(append_batches);
BENCHMARK(compact<scheme::f16, scheme::f16>)->Name("kv.compact/f16")->Apply(compact_shapes);
BENCHMARK(compact<scheme::int4, scheme::int4>)->Name("kv.compact/int4_g32")->Apply(compact_shapes);
