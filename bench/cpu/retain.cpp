// KV retention on the CPU: compaction (kv::retain::compact) of 8 sequences of 3,000 tokens, each
// keeping 1,000 scattered tokens of its last 2,000 (8 KV heads x 128 dims, page 16, K and V in
// f16 and in int4 g32, with attention mass); the same through kv::cache::compact with KIVI's
// arrangement (kv::per_channel int2 keys with a zero point, int2 values per token), whose moved
// keys are read back and re-quantized per page; and heavy_hitter selection over 32k tokens.
// Compaction bytes: each kept token's records and mass read once and written once (KIVI: its
// K codes and V records and mass, the pages' K groups left out); "roofline" is against the
// measured copy bandwidth, and "s/1k_tokens" the time per 1,000 moved tokens.
// Selection bytes: the mass read once.
// smoke filter: ^retain\.heavy_hitter/tokens:32768/
#include "infuse/kv/retain.hpp"

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "infuse/exec/cpu.hpp"
#include "infuse/kv/cpu/compact.hpp"
#include "infuse/kv/kv.hpp"
#include "infuse/quant/quant.hpp"
#include "support/cpu_bandwidth.hpp"
#include "support/harness.hpp"

namespace {

namespace bench = infuse::bench;
namespace kv = infuse::kv;
namespace retain = infuse::kv::retain;
namespace quant = infuse::quant;
using infuse::host_view;

constexpr int page_size = 16;
constexpr std::int32_t heads = 8;
constexpr std::int32_t head_dim = 128;

// A paged cache of `sequences` x `length` tokens with random bytes, pages in order.
template <class Scheme>
struct paged_store {
  using view_type = kv::cache_view<kv::paged<page_size>, Scheme, Scheme>;
  typename view_type::format_type format{{heads, head_dim}, {heads, head_dim}, page_size};
  std::vector<std::uint8_t> pages;
  std::vector<float> mass;
  std::vector<std::int32_t> indptr{0}, indices, last_page_len;

  paged_store(std::int32_t sequences, std::int64_t length, bool with_pages, std::mt19937& engine) {
    const std::int64_t per_sequence = (length + page_size - 1) / page_size;
    for (std::int32_t s = 0; s < sequences; ++s) {
      for (std::int64_t p = 0; p < per_sequence; ++p)
        indices.push_back(std::int32_t(indices.size()));
      indptr.push_back(std::int32_t(indices.size()));
      last_page_len.push_back(std::int32_t((length - 1) % page_size + 1));
    }
    if (with_pages) {
      pages.resize(indices.size() * std::size_t(format.page_bytes()));
      for (auto& byte : pages) byte = std::uint8_t(engine());
    }
    std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
    mass.resize(indices.size() * page_size * heads);
    for (auto& m : mass) m = uniform(engine);
  }

  view_type view() {
    view_type v;
    v.pages = pages.empty() ? nullptr : pages.data();
    v.pool_pages = std::int32_t(indices.size());
    v.format = format;
    v.table = {indptr.data(), indices.data(), last_page_len.data(),
               std::int32_t(last_page_len.size())};
    v.mass = mass.data();
    return v;
  }
};

// Per sequence, `keep` ascending positions drawn from [length - 2 keep, length), as a CSR pair
// (indptr, positions): the destinations 0..keep-1 are never a source, so every compaction makes
// the same moves.
inline std::pair<std::vector<std::int32_t>, std::vector<std::int32_t>> kept_positions(
    std::int32_t sequences, std::int64_t length, std::int64_t keep, std::mt19937& engine) {
  std::vector<std::int32_t> kept_indptr{0}, kept;
  for (std::int32_t s = 0; s < sequences; ++s) {
    std::vector<std::int32_t> candidates(2 * keep);
    std::iota(candidates.begin(), candidates.end(), std::int32_t(length - 2 * keep));
    std::shuffle(candidates.begin(), candidates.end(), engine);
    candidates.resize(keep);
    std::sort(candidates.begin(), candidates.end());
    kept.insert(kept.end(), candidates.begin(), candidates.end());
    kept_indptr.push_back(std::int32_t(kept.size()));
  }
  return {kept_indptr, kept};
}

template <class Scheme>
void retain_compact(benchmark::State& state) {
  constexpr std::int32_t sequences = 8;
  constexpr std::int64_t length = 3000;
  constexpr std::int64_t keep = 1000;
  std::mt19937 engine(42);
  paged_store<Scheme> store(sequences, length, true, engine);
  const auto view = store.view();
  // Every iteration makes the same moves (kept_positions), so the result is checked at the end.
  std::vector<std::int32_t> sequence_ids(sequences);
  std::iota(sequence_ids.begin(), sequence_ids.end(), 0);
  const auto [kept_indptr, kept] = kept_positions(sequences, length, keep, engine);
  std::vector<std::int64_t> new_lengths(sequences);
  const infuse::exec::cpu exec;
  for (auto _ : state) {
    retain::compact(exec, view, host_view<const std::int32_t, 1>(sequence_ids.data(), {sequences}),
                    host_view<const std::int32_t, 1>(kept_indptr.data(), {sequences + 1}),
                    host_view<const std::int32_t, 1>(kept.data(), {std::int64_t(kept.size())}),
                    host_view<std::int64_t, 1>(new_lengths.data(), {sequences}));
  }
  const auto& f = view.format;
  for (std::int32_t s = 0; s < sequences; ++s) {
    if (new_lengths[s] != keep) {
      bench::report_error(state, "sequence " + std::to_string(s) + " has new length " +
                                     std::to_string(new_lengths[s]));
      return;
    }
    for (std::int64_t j = 0; j < keep; j += 37) {
      const auto to = view.locate(s, j);
      const auto from = view.locate(s, kept[std::size_t(s * keep + j)]);
      for (std::int32_t h = 0; h < heads; ++h) {
        if (!std::equal(f.v_codes(from.page, from.slot, h),
                        f.v_codes(from.page, from.slot, h) + f.v.code_bytes(),
                        f.v_codes(to.page, to.slot, h))) {
          bench::report_error(state, "token " + std::to_string(j) + " of sequence " +
                                         std::to_string(s) + " was not moved");
          return;
        }
      }
    }
  }
  const double tokens = double(sequences) * keep;
  const double token_bytes = double(f.k.bytes_per_token() + f.v.bytes_per_token()) + 4.0 * heads;
  bench::set_bytes(state, 2.0 * tokens * token_bytes, bench::cpu::measured_bandwidth().copy_gbps);
  state.counters["s/1k_tokens"] = benchmark::Counter(
      tokens / 1000.0, benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

// The same kept positions as retain_compact, on a kv::cache of KIVI's arrangement: each iteration
// compacts a fresh copy of the filled cache (the copy outside the timed span).
void retain_compact_kivi(benchmark::State& state) {
  constexpr std::int32_t sequences = 8;
  constexpr std::int64_t length = 3000;
  constexpr std::int64_t keep = 1000;
  using kivi = quant::int_<2, quant::per_channel, quant::zero_point>;
  using cache_type = kv::cache<kv::paged<page_size>, kv::per_channel<kivi>, kivi>;
  std::mt19937 engine(42);
  const auto pages = static_cast<std::int32_t>(sequences * ((length + page_size - 1) / page_size));
  cache_type filled(pages, {heads, head_dim}, {heads, head_dim});
  std::vector<kv::sequence_id> ids(sequences);
  for (auto& id : ids) id = filled.create();
  {
    std::normal_distribution<float> normal;
    std::vector<float> k(std::size_t(sequences * length * heads * head_dim));
    std::vector<float> v(k.size());
    for (float& x : k) x = normal(engine);
    for (float& x : v) x = normal(engine);
    const std::vector<std::int64_t> counts(sequences, length);
    const std::int64_t rows = sequences * length;
    filled.append(infuse::exec::cpu{}, ids, counts,
                  host_view<const float, 3>(k.data(), {rows, heads, head_dim}),
                  host_view<const float, 3>(v.data(), {rows, heads, head_dim}));
  }
  const auto [kept_indptr, kept] = kept_positions(sequences, length, keep, engine);
  const infuse::exec::cpu exec;
  cache_type cache = filled;
  for (auto _ : state) {
    state.PauseTiming();
    cache = filled;
    state.ResumeTiming();
    cache.compact(exec, ids, kept_indptr, kept);
  }
  for (const kv::sequence_id s : ids) {
    if (cache.length(s) != keep) {
      bench::report_error(state, "sequence " + std::to_string(s) + " has new length " +
                                     std::to_string(cache.length(s)));
      return;
    }
  }
  const auto& f = cache.format();
  const double tokens = double(sequences) * keep;
  const double token_bytes = double(f.k.bytes_per_token() + f.v.bytes_per_token()) + 4.0 * heads;
  bench::set_bytes(state, 2.0 * tokens * token_bytes, bench::cpu::measured_bandwidth().copy_gbps);
  state.counters["s/1k_tokens"] = benchmark::Counter(
      tokens / 1000.0, benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

void retain_heavy_hitter(benchmark::State& state) {
  const std::int64_t length = state.range(0);
  std::mt19937 engine(7);
  paged_store<quant::none<infuse::half>> store(1, length, false, engine);
  const auto view = store.view();
  const retain::heavy_hitter<> rule{length / 8, 256};
  std::int64_t checksum = 0;
  for (auto _ : state) {
    const std::vector<std::int32_t> kept = retain::select(rule, view, 0);
    checksum += std::ssize(kept) - rule.budget + kept.back() - (length - 1);
  }
  if (checksum != 0) bench::report_error(state, "selection kept the wrong number of tokens");
  bench::set_bytes(state, double(length) * heads * sizeof(float),
                   bench::cpu::measured_bandwidth().read_gbps);
}

BENCHMARK(retain_compact<quant::none<infuse::half>>)
    ->Name("retain.compact_f16/tokens:8000")
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(retain_compact<quant::int_<4, 32>>)
    ->Name("retain.compact_int4_g32/tokens:8000")
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(retain_compact_kivi)
    ->Name("retain.compact_kivi_int2/tokens:8000")
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(retain_heavy_hitter)
    ->Name("retain.heavy_hitter")
    ->ArgNames({"tokens"})
    ->Arg(32768)
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace
