// Prefill attention on the CPU when a few new tokens attend to a long cached prefix, as the
// verification step of speculative decoding does: 1, 5 and 16 new tokens (causal) over 1k, 4k
// and 16k cached tokens; 32 query heads over 8 KV heads, head dim 128, pages of 16, K and V int8
// per token and head. The anchor, run first at each context: decode attention of one token over
// the same cache. Counters: "per_decode", this row's time over the anchor's at the same context
// (the target of the few-query path: 5 new tokens at most ~1.5 decode steps), and "roofline",
// the K/V bytes read (codes and scales of every cached token, once) over the read bandwidth
// measured in the same run. The new tokens' K and V are written into the cache on every call.
// smoke filter: ^attention_prefill\.(decode|prefill)/context:1024/new:(1|5)/
#include <benchmark/benchmark.h>

#include <array>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "infuse/attention/attention.hpp"
#include "infuse/attention/cpu/decode.hpp"
#include "infuse/attention/cpu/prefill.hpp"
#include "infuse/attention/prefill.hpp"
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
namespace attention = infuse::attention;
using infuse::host_view;

constexpr std::int32_t q_heads = 32;
constexpr std::int32_t kv_heads = 8;
constexpr std::int32_t head_dim = 128;
constexpr std::int64_t most_new = 16;
using layout = kv::paged<16>;
using scheme = quant::int_<8, quant::per_channel>;
using cache_type = kv::cache<layout, scheme, scheme>;

std::vector<float> normals(std::mt19937& engine, std::int64_t count) {
  std::normal_distribution<float> normal;
  std::vector<float> x(static_cast<std::size_t>(count));
  for (float& value : x) value = normal(engine);
  return x;
}

// One sequence of `context` random cached tokens, with room for most_new more; one lives at a
// time.
struct store {
  cache_type cache;
  kv::sequence_id sequence;
  std::int64_t context;

  explicit store(std::int64_t tokens)
      : cache(static_cast<std::int32_t>((tokens + most_new) / layout::page_size + 1),
              {kv_heads, head_dim}, {kv_heads, head_dim}),
        sequence(cache.create()),
        context(tokens) {
    std::mt19937 engine(5);
    const std::vector<float> k = normals(engine, tokens * kv_heads * head_dim);
    const std::vector<float> v = normals(engine, tokens * kv_heads * head_dim);
    const std::array<kv::sequence_id, 1> seqs{sequence};
    const std::array<std::int64_t, 1> counts{tokens};
    cache.append(infuse::exec::cpu(), seqs, counts,
                 host_view<const float, 3>(k.data(), {tokens, kv_heads, head_dim}),
                 host_view<const float, 3>(v.data(), {tokens, kv_heads, head_dim}));
  }
};

store& shared_store(std::int64_t context) {
  static std::unique_ptr<store> current;
  if (!current || current->context != context) {
    current.reset();
    current = std::make_unique<store>(context);
  }
  return *current;
}

// Seconds per decode call, by context: the anchor of "per_decode".
std::map<std::int64_t, double>& decode_seconds() {
  static std::map<std::int64_t, double> seconds;
  return seconds;
}

// Appends `fresh` slots, times `call` over the cache of context + fresh tokens, and sets the
// counters; the slots are given back after.
template <class Call>
void measure(benchmark::State& state, std::int64_t fresh, bool anchor, Call&& call) {
  const std::int64_t context = state.range(0);
  store& st = shared_store(context);
  st.cache.append(st.sequence, fresh);
  const std::array<kv::sequence_id, 1> seqs{st.sequence};
  const auto batch = st.cache.view(seqs);
  std::vector<float> out(static_cast<std::size_t>(fresh * q_heads * head_dim));
  const host_view<float, 3> ov(out.data(), {fresh, q_heads, head_dim});
  const auto begin = std::chrono::steady_clock::now();
  for (auto _ : state) {
    call(batch.view(), ov);
    benchmark::ClobberMemory();
  }
  const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - begin;
  st.cache.truncate(st.sequence, fresh);
  for (const float x : out) {
    if (!std::isfinite(x)) {
      bench::report_error(state, "a non-finite output");
      break;
    }
  }
  const auto& f = batch.view().format;
  bench::set_bytes(state,
                   double(context + fresh) * double(f.k.bytes_per_token() + f.v.bytes_per_token()),
                   bench::cpu::measured_bandwidth().read_gbps);
  const double per_call = elapsed.count() / double(std::max<std::int64_t>(1, state.iterations()));
  if (anchor) decode_seconds()[context] = per_call;
  if (const auto found = decode_seconds().find(context); found != decode_seconds().end()) {
    state.counters["per_decode"] = per_call / found->second;
  }
}

void decode(benchmark::State& state) {
  using attn = attention::attention<layout, scheme, scheme, sparse::dense>;
  std::mt19937 engine(3);
  const std::vector<float> q = normals(engine, q_heads * head_dim);
  const infuse::exec::cpu exec;
  std::vector<std::byte> workspace;
  measure(state, 1, true, [&](const auto& cache, host_view<float, 3> out) {
    if (workspace.empty()) {
      workspace.resize(
          static_cast<std::size_t>(attn::decode_workspace_bytes(exec, q_heads, cache, {})));
    }
    attn::decode(exec, host_view<const float, 3>(q.data(), {1, q_heads, head_dim}), cache, out, {},
                 {}, workspace);
  });
}

void prefill(benchmark::State& state) {
  const std::int64_t fresh = state.range(1);
  std::mt19937 engine(3);
  const std::vector<float> q = normals(engine, fresh * q_heads * head_dim);
  const std::vector<float> k = normals(engine, fresh * kv_heads * head_dim);
  const std::vector<float> v = normals(engine, fresh * kv_heads * head_dim);
  const std::int32_t q_indptr[2] = {0, static_cast<std::int32_t>(fresh)};
  const infuse::exec::cpu exec;
  measure(state, fresh, false, [&](const auto& cache, host_view<float, 3> out) {
    attention::prefill<layout, scheme, scheme, sparse::causal>(
        exec, host_view<const float, 3>(q.data(), {fresh, q_heads, head_dim}),
        host_view<const float, 3>(k.data(), {fresh, kv_heads, head_dim}),
        host_view<const float, 3>(v.data(), {fresh, kv_heads, head_dim}),
        host_view<const std::int32_t, 1>(q_indptr, {2}), cache, out, {});
  });
}

const bool registered = [] {
  for (const int context : {1024, 4096, 16384}) {
    // The anchor first, so that every prefill row at this context finds it.
    benchmark::RegisterBenchmark("attention_prefill.decode", decode)
        ->ArgNames({"context", "new"})
        ->Args({context, 1})
        ->UseRealTime();
    benchmark::RegisterBenchmark("attention_prefill.prefill", prefill)
        ->ArgNames({"context", "new"})
        ->Args({context, 1})
        ->Args({context, 5})
        ->Args({context, 16})
        ->UseRealTime();
  }
  return true;
}();

}  // namespace
