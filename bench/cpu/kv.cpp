// kv::cache::append with data on the CPU: keys and values of 8 heads x 128 dims quantized into a
// paged cache (16-token pages, nhd) in one pass, for batch 1 and 64 sequences, one token a
// sequence (a decode step) or 64 (a prefill chunk), in f16, int8 (one scale per vector), int4 and
// int2 with zero points (groups of 32); KIVI's arrangement (kv::per_channel int2 / int4 keys with
// a zero point per channel and page, values per token) and ZipVL's (kv::mixed int8 / int2 records,
// a token in four important). Bytes: the float K and V read plus the records written; counters
// tokens/s, written GB/s, bytes/token (records and flag), page bytes/token (a full page's bytes
// over its tokens: KIVI's per-page groups included) and f16's bytes/token.
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

// Head 0 of the last appended token's key, read back through the view (kv::read_key), within one
// step of the scheme over the range of its group: the vector's for per-token schemes (kv::mixed
// rows are appended low), each channel's over the sequence's `rows` rows (a superset of the
// page's tokens) for kv::per_channel keys.
template <class Cache>
bool spot_check(Cache& cache, kv::sequence_id s, const float* rows, std::int64_t count) {
  using arrangement = typename Cache::k_scheme;
  const auto batch = cache.view(std::vector{s});
  const auto& view = batch.view();
  float stored[head_dim];
  kv::read_key(view, 0, view.length(0) - 1, 0, stored);
  const float* key = rows + (count - 1) * heads * head_dim;
  for (int d = 0; d < head_dim; ++d) {
    float lo = 0.0f, hi = 0.0f;
    double levels = 0;
    if constexpr (kv::is_per_channel<arrangement>) {
      for (std::int64_t r = 0; r < count; ++r) {
        lo = std::min(lo, rows[r * heads * head_dim + d]);
        hi = std::max(hi, rows[r * heads * head_dim + d]);
      }
      levels = code_levels<typename arrangement::scheme>();
    } else {
      lo = std::min(0.0f, *std::min_element(key, key + head_dim));
      hi = std::max(0.0f, *std::max_element(key, key + head_dim));
      if constexpr (kv::is_mixed<arrangement>) {
        levels = code_levels<typename arrangement::low>();
      } else {
        levels = code_levels<arrangement>();
      }
    }
    if (!(std::fabs(double(stored[d]) - key[d]) <= (hi - lo) / levels * 1.001)) return false;
  }
  return true;
}

template <class K, class V>
void kv_append(benchmark::State& state) {
  const std::int64_t batch = state.range(0);
  const std::int64_t tokens = state.range(1);
  const std::int64_t rows = batch * tokens;
  const auto pages = static_cast<std::int32_t>(batch * tokens_per_sequence / page_size);
  kv::cache<kv::paged<page_size>, K, V> cache(pages, {heads, head_dim}, {heads, head_dim});
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
  std::vector<std::uint8_t> important(static_cast<std::size_t>(rows));
  for (std::size_t r = 0; r < important.size(); ++r) important[r] = r % 4 == 3 ? 1 : 0;
  // The last row stays low: spot_check reads it at the low bit-width.
  important.back() = 0;

  for (auto _ : state) {
    if (cache.length(seqs[0]) + tokens > tokens_per_sequence) {
      state.PauseTiming();
      for (const kv::sequence_id s : seqs) cache.truncate(s, cache.length(s));
      state.ResumeTiming();
    }
    if constexpr (decltype(cache)::flagged) {
      cache.append(exec, seqs, counts, kv_k, kv_v, important);
    } else {
      cache.append(exec, seqs, counts, kv_k, kv_v);
    }
    benchmark::ClobberMemory();
  }
  if (!spot_check(cache, seqs.back(), k.data() + (rows - tokens) * heads * head_dim, tokens)) {
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
  state.counters["page bytes/token"] = double(cache.page_bytes()) / page_size;
  state.counters["f16 bytes/token"] = 2.0 * heads * head_dim * 2;
}

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"batch", "tokens"});
  for (const int batch : {1, 64}) {
    for (const int tokens : {1, 64}) b->Args({batch, tokens});
  }
  b->UseRealTime();
}

template <class K, class V = K>
void register_scheme(const std::string& name) {
  benchmark::RegisterBenchmark(("kv.append." + name).c_str(), kv_append<K, V>)->Apply(shapes);
}

template <int Bits>
using kivi_scheme = quant::int_<Bits, quant::per_channel, quant::zero_point>;
using zipvl_records =
    kv::mixed<quant::int_<8, quant::per_channel>, quant::int_<2, 32, quant::zero_point>>;

const bool registered = [] {
  register_scheme<quant::none<infuse::half>>(quant::none<infuse::half>::name);
  register_scheme<quant::int_<8, quant::per_channel>>(quant::int_<8, quant::per_channel>::name);
  register_scheme<quant::int_<4, 32>>(quant::int_<4, 32>::name);
  register_scheme<quant::int_<2, 32, quant::zero_point>>(
      quant::int_<2, 32, quant::zero_point>::name);
  register_scheme<kv::per_channel<kivi_scheme<2>>, kivi_scheme<2>>("kivi_int2");
  register_scheme<kv::per_channel<kivi_scheme<4>>, kivi_scheme<4>>("kivi_int4");
  register_scheme<zipvl_records>("zipvl_int8_int2");
  return true;
}();

}  // namespace
