// kv::cache::append with data on the CPU: keys and values of 8 heads x 128 dims quantized into a
// paged cache (16-token pages, nhd) in one pass, for batch 1 and 64 sequences, one token a
// sequence (a decode step) or 64 (a prefill chunk), in f16, int8 (one scale per vector), int4 and
// int2 with zero points (groups of 32). Bytes: the float K and V read plus the records written;
// counters tokens/s, written GB/s, and bytes/token of the scheme next to f16's.
// smoke filter: ^kv\.append\.int4_g32/batch:1/tokens:1/
#include "infuse/kv/kv.hpp"

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "infuse/exec/cpu.hpp"
#include "infuse/quant/quant.hpp"
#include "support/cpu_bandwidth.hpp"
#include "support/harness.hpp"

namespace {

namespace bench = infuse::bench;
namespace kv = infuse::kv;
namespace quant = infuse::quant;
using infuse::host_view;

constexpr std::int32_t heads = 8;
constexpr std::int32_t head_dim = 128;
constexpr int page_size = 16;
// Tokens a sequence may reach before the benchmark empties it (outside the timed span).
constexpr std::int64_t tokens_per_sequence = 1024;

template <class S>
constexpr double code_levels() {
  if constexpr (requires { S::max_code; }) {
    return double(S::max_code);
  } else {
    return 2048.0;  // f16: 11 significant bits
  }
}

// Head 0 of the last appended token's key, read back through the view, within one step of the
// scheme over the vector's range.
template <class Cache>
bool spot_check(Cache& cache, kv::sequence_id s, const float* key) {
  using scheme = typename Cache::k_scheme;
  const auto batch = cache.view(std::vector{s});
  const auto& view = batch.view();
  const kv::token_address at = view.locate(0, view.length(0) - 1);
  const float lo = std::min(0.0f, *std::min_element(key, key + head_dim));
  const float hi = std::max(0.0f, *std::max_element(key, key + head_dim));
  const double step = (hi - lo) / code_levels<scheme>() * 1.001;
  for (int d = 0; d < head_dim; ++d) {
    const float stored = view.format.k.value(view.format.k_codes(at.page, at.slot, 0),
                                             view.format.k_params(at.page, at.slot, 0), d);
    if (!(std::fabs(double(stored) - key[d]) <= step)) return false;
  }
  return true;
}

template <class S>
void kv_append(benchmark::State& state) {
  const std::int64_t batch = state.range(0);
  const std::int64_t tokens = state.range(1);
  const std::int64_t rows = batch * tokens;
  const auto pages = static_cast<std::int32_t>(batch * tokens_per_sequence / page_size);
  kv::cache<kv::paged<page_size>, S> cache(pages, {heads, head_dim}, {heads, head_dim});
  std::vector<kv::sequence_id> seqs(static_cast<std::size_t>(batch));
  for (auto& s : seqs) s = cache.create();
  const std::vector<std::int64_t> counts(static_cast<std::size_t>(batch), tokens);

  std::mt19937 engine(42);
  std::normal_distribution<float> normal;
  std::vector<float> k(static_cast<std::size_t>(rows * heads * head_dim));
  std::vector<float> v(k.size());
  for (float& x : k) x = normal(engine);
  for (float& x : v) x = normal(engine);
  const host_view<const float, 3> kv_k(k.data(), {rows, heads, head_dim});
  const host_view<const float, 3> kv_v(v.data(), {rows, heads, head_dim});
  const infuse::exec::cpu exec;

  for (auto _ : state) {
    if (cache.length(seqs[0]) + tokens > tokens_per_sequence) {
      state.PauseTiming();
      for (const kv::sequence_id s : seqs) cache.truncate(s, cache.length(s));
      state.ResumeTiming();
    }
    cache.append(exec, seqs, counts, kv_k, kv_v);
    benchmark::ClobberMemory();
  }
  if (!spot_check(cache, seqs.back(), k.data() + (rows - 1) * heads * head_dim)) {
    bench::report_error(state, "a stored key differs from its input by more than one step");
  }
  const double written = double(rows) * double(cache.bytes_per_token());
  const double read = double(rows) * 2.0 * heads * head_dim * sizeof(float);
  bench::set_bytes(state, read + written, bench::cpu::measured_bandwidth().read_gbps);
  state.counters["tokens/s"] =
      benchmark::Counter(double(rows), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["written GB/s"] =
      benchmark::Counter(written / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["bytes/token"] = double(cache.bytes_per_token());
  state.counters["f16 bytes/token"] = 2.0 * heads * head_dim * 2;
}

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"batch", "tokens"});
  for (const int batch : {1, 64}) {
    for (const int tokens : {1, 64}) b->Args({batch, tokens});
  }
  b->UseRealTime();
}

template <class S>
void register_scheme() {
  benchmark::RegisterBenchmark((std::string("kv.append.") + S::name).c_str(), kv_append<S>)
      ->Apply(shapes);
}

const bool registered = [] {
  register_scheme<quant::none<infuse::half>>();
  register_scheme<quant::int_<8, quant::per_channel>>();
  register_scheme<quant::int_<4, 32>>();
  register_scheme<quant::int_<2, 32, quant::zero_point>>();
  return true;
}();

}  // namespace
