// Decode attention on the CPU: 32 query heads over 8 KV heads, head dim 128, pages of 16 tokens
// (heads-major; one tokens-major row for comparison);
// contexts 1k, 4k, 16k and 32k tokens; batch 1 and 16. K/V as f16, int8 (one scale per vector)
// and int4 (one scale per 32 dims), the integer ones also with int8 queries
// (options::int8_query: the _q8 rows); Quest reading 1/16 of the pages at 32k. Bytes counted: the
// K/V codes and scales of the tokens read (the query and output are negligible). Counters:
// "roofline", the share of the read bandwidth measured in the same run, and "speedup", the time of
// f16 dense at the same context and batch (run first) over this row's.
// smoke filter: ^attention\.f16_dense/context:1024/batch:1/
#include "infuse/attention/attention.hpp"

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "infuse/attention/cpu/decode.hpp"
#include "infuse/core/float_types.hpp"
#include "infuse/kv/page_pool.hpp"
#include "infuse/quant/quant.hpp"
#include "infuse/sparse/sparse.hpp"
#include "support/cpu_bandwidth.hpp"
#include "support/harness.hpp"

namespace {

namespace bench = infuse::bench;
namespace kv = infuse::kv;
namespace quant = infuse::quant;
namespace sparse = infuse::sparse;
using infuse::half;
using infuse::half_at_least;
using infuse::half_at_most;
using infuse::host_view;

constexpr std::int32_t q_heads = 32;
constexpr std::int32_t kv_heads = 8;
constexpr std::int32_t head_dim = 128;
constexpr int page = 16;
// Heads-major pages: one head's 16 vectors are contiguous, as a per-head walk reads them; the
// _nhd row reads tokens-major pages, where a head's vectors lie a token's width apart.
using hnd = kv::paged<page, kv::hnd>;
using nhd = kv::paged<page, kv::nhd>;

// A pool of random pages: codes random (f16 codes kept below 2 in magnitude), every scale 0.02,
// key bounds around each page's keys; sequences own scattered pages. One store lives at a time.
template <class Layout, class S>
struct store {
  kv::cache_view<Layout, S, S> view{};
  std::vector<std::uint64_t, kv::page_allocator<std::uint64_t>> bytes;  // as a page_pool holds them
  std::vector<std::int32_t> indptr, indices, last;
  std::vector<half, kv::page_allocator<half>> key_min, key_max;  // as page_metadata holds them

  store(std::int64_t context, std::int64_t batch) {
    auto& f = view.format;
    f.k = {kv_heads, head_dim};
    f.v = {kv_heads, head_dim};
    f.slots = page;
    const std::int64_t pages_per_sequence = context / page;
    const auto pool = static_cast<std::int32_t>(pages_per_sequence * batch);
    bytes.resize(static_cast<std::size_t>(pool * f.page_bytes() / 8));
    std::mt19937_64 engine(11);
    for (auto& word : bytes) word = engine();
    auto* base = reinterpret_cast<std::uint8_t*>(bytes.data());
    for (std::int32_t p = 0; p < pool; ++p) {
      std::uint8_t* pg = base + p * f.page_bytes();
      if constexpr (S::scales_per_group == 0) {
        // Half codes: clear the top exponent bit (|x| < 2, never Inf or NaN).
        auto* words = reinterpret_cast<std::uint16_t*>(pg);
        for (std::int64_t i = 0; i < f.page_bytes() / 2; ++i) words[i] &= 0xBBFF;
      } else {
        for (const auto& [at, records] : {std::pair{f.k_params_offset(), f.v_codes_offset()},
                                          std::pair{f.v_params_offset(), f.page_bytes()}}) {
          auto* scales = reinterpret_cast<float*>(pg + at);
          for (std::int64_t i = 0; i < (records - at) / 4; ++i) scales[i] = 0.02f;
        }
      }
    }
    std::vector<std::int32_t> order(static_cast<std::size_t>(pool));
    for (std::int32_t i = 0; i < pool; ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), engine);
    indices = order;
    for (std::int64_t b = 0; b <= batch; ++b)
      indptr.push_back(static_cast<std::int32_t>(b * pages_per_sequence));
    last.assign(static_cast<std::size_t>(batch), page);
    std::normal_distribution<float> normal;
    key_min.resize(static_cast<std::size_t>(pool) * kv_heads * head_dim);
    key_max.resize(key_min.size());
    for (std::size_t i = 0; i < key_min.size(); ++i) {
      const float center = normal(engine);
      key_min[i] = half_at_most(center - 1.0f);
      key_max[i] = half_at_least(center + 1.0f);
    }
    view.pages = base;
    view.pool_pages = pool;
    view.table = {indptr.data(), indices.data(), last.data(), static_cast<std::int32_t>(batch)};
    view.key_min = key_min.data();
    view.key_max = key_max.data();
  }
};

template <class Layout, class S>
store<Layout, S>& shared_store(std::int64_t context, std::int64_t batch) {
  static std::unique_ptr<store<Layout, S>> current;
  static std::pair<std::int64_t, std::int64_t> shape{-1, -1};
  if (shape != std::pair{context, batch}) {
    current.reset();
    current = std::make_unique<store<Layout, S>>(context, batch);
    shape = {context, batch};
  }
  return *current;
}

// Seconds per call of f16 dense, by (context, batch): the baseline of "speedup".
std::map<std::pair<std::int64_t, std::int64_t>, double>& f16_dense_seconds() {
  static std::map<std::pair<std::int64_t, std::int64_t>, double> seconds;
  return seconds;
}

template <class Layout, class S, class Sparsity>
void decode(benchmark::State& state, typename Sparsity::params params,
            std::int64_t pages_read_divisor, const infuse::attention::options& opt = {}) {
  const std::int64_t context = state.range(0);
  const std::int64_t batch = state.range(1);
  auto& st = shared_store<Layout, S>(context, batch);
  using attn = infuse::attention::attention<Layout, S, S, Sparsity>;
  if constexpr (!std::is_same_v<Sparsity, sparse::dense>)
    params.pages = context / page / pages_read_divisor;
  std::mt19937 engine(3);
  std::normal_distribution<float> normal;
  std::vector<float> q(static_cast<std::size_t>(batch * q_heads * head_dim));
  for (float& x : q) x = normal(engine);
  std::vector<float> out(q.size());
  const infuse::exec::cpu exec;
  std::vector<std::byte> workspace(
      static_cast<std::size_t>(attn::decode_workspace_bytes(exec, q_heads, st.view, params)));
  const host_view<const float, 3> qv(q.data(), {batch, q_heads, head_dim});
  const host_view<float, 3> ov(out.data(), {batch, q_heads, head_dim});
  const auto begin = std::chrono::steady_clock::now();
  for (auto _ : state) {
    attn::decode(exec, qv, st.view, ov, params, opt, workspace);
    benchmark::ClobberMemory();
  }
  const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - begin;
  for (const float x : out) {
    if (!std::isfinite(x)) {
      bench::report_error(state, "a non-finite output");
      break;
    }
  }
  const double tokens = double(batch) * double(context) / double(pages_read_divisor);
  const auto& f = st.view.format;
  bench::set_bytes(state, tokens * double(f.k.bytes_per_token() + f.v.bytes_per_token()),
                   bench::cpu::measured_bandwidth().read_gbps);
  const double per_call = elapsed.count() / double(std::max<std::int64_t>(1, state.iterations()));
  auto& baseline = f16_dense_seconds();
  if constexpr (std::is_same_v<Layout, hnd> && std::is_same_v<S, quant::none<infuse::half>> &&
                std::is_same_v<Sparsity, sparse::dense>) {
    baseline[{context, batch}] = per_call;
  }
  if (const auto found = baseline.find({context, batch}); found != baseline.end()) {
    state.counters["speedup"] = found->second / per_call;
  }
}

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"context", "batch"});
  for (const int context : {1024, 4096, 16384, 32768}) {
    for (const int batch : {1, 16}) b->Args({context, batch});
  }
  b->UseRealTime();
}

template <class Layout, class S>
void register_dense(const std::string& name, infuse::attention::options opt = {}) {
  benchmark::RegisterBenchmark(("attention." + name).c_str(), [=](benchmark::State& state) {
    decode<Layout, S, sparse::dense>(state, {}, 1, opt);
  })->Apply(shapes);
}

// The integer options: int8 queries, and int8 weights too.
infuse::attention::options int8_options(bool weights) {
  infuse::attention::options opt;
  opt.int8_query = true;
  opt.int8_weights = weights;
  return opt;
}

const bool registered = [] {
  register_dense<hnd, quant::none<infuse::half>>("f16_dense");
  register_dense<hnd, quant::int_<8, quant::per_channel>>("int8_dense");
  register_dense<hnd, quant::int_<4, 32>>("int4_dense");
  register_dense<hnd, quant::int_<8, quant::per_channel>>("int8_dense_q8", int8_options(false));
  register_dense<hnd, quant::int_<8, quant::per_channel>>("int8_dense_q8w8", int8_options(true));
  register_dense<hnd, quant::int_<4, 32>>("int4_dense_q8", int8_options(false));
  register_dense<hnd, quant::int_<4, 32>>("int4_dense_q8w8", int8_options(true));
  register_dense<nhd, quant::none<infuse::half>>("f16_dense_nhd");
  benchmark::RegisterBenchmark("attention.f16_quest_1of16",
                               [](benchmark::State& state) {
                                 decode<hnd, quant::none<infuse::half>, sparse::quest<1>>(state, {},
                                                                                          16);
                               })
      ->ArgNames({"context", "batch"})
      ->Args({32768, 1})
      ->Args({32768, 16})
      ->UseRealTime();
  return true;
}();

}  // namespace
