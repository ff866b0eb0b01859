// attention::decode and prefill dispatch on the backend: a device-memory call checks its
// arguments on the host (the host copy of the table included) before its body runs, and sizes
// the workspace from max_length the same way on every backend. A recording backend over
// "device" memory stands in for exec::cuda: its bodies count their runs and read nothing, so the
// device views may point anywhere (here: host arrays the checks must not need). And the CPU
// body given a workspace sized by max_length computes the same as with the exact size.
#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "infuse/attention/attention.hpp"
#include "infuse/attention/cpu/decode.hpp"
#include "infuse/attention/prefill.hpp"
#include "infuse/quant/quant.hpp"
#include "infuse/sparse/sparse.hpp"
#include "store.hpp"
#include "support/random.hpp"

namespace {

namespace kv = infuse::kv;
namespace quant = infuse::quant;
namespace sparse = infuse::sparse;
namespace attention = infuse::attention;
using infuse::device_view;
using infuse::host_view;

// A backend over device memory whose bodies only count their runs.
struct recording_backend {
  using memory_space = infuse::device_memory;
  static constexpr std::string_view name = "recording";
  void synchronize() const {}
};

struct recorded {
  int decodes = 0;
  int prefills = 0;
  std::int64_t longest = -1;  // the longest length the last plan was given
};
recorded runs;

// The plan: a byte per token of the longest sequence.
struct recording_plan {
  std::int64_t bytes;
};

}  // namespace

namespace infuse::attention::detail {

template <>
struct decode_planner<recording_backend> {
  template <class Layout, class K, class V, class Sparsity, class LengthOf>
  static recording_plan plan(const recording_backend&, std::int64_t,
                             const kv::cache_view<Layout, K, V, device_memory>& cache,
                             const typename Sparsity::params&, LengthOf length_of,
                             std::int64_t longest) {
    for (std::int32_t s = 0; s < cache.sequences(); ++s) CHECK(length_of(s) <= longest);
    runs.longest = longest;
    return {longest};
  }
};

template <>
struct decode_body<recording_backend> {
  template <class Layout, class K, class V, class Sparsity, class... Optional>
  static void run(const recording_backend&, device_view<const float, 3>,
                  const kv::cache_view<Layout, K, V, device_memory>&, device_view<float, 3>,
                  const typename Sparsity::params&, const options&, std::span<std::byte>,
                  const recording_plan&, const Optional&...) {
    ++runs.decodes;
  }
};

template <>
struct prefill_body<recording_backend> {
  template <class Sparsity, class Layout, class K, class V>
  static void run(const recording_backend&, device_view<const float, 3>,
                  device_view<const float, 3>, device_view<const float, 3>,
                  device_view<const std::int32_t, 1>,
                  const kv::cache_view<Layout, K, V, device_memory>&, device_view<float, 3>,
                  const typename Sparsity::params&, const options&, device_view<float, 2>) {
    ++runs.prefills;
  }
};

}  // namespace infuse::attention::detail

namespace {

using layout = kv::paged<16>;
using f32 = quant::none<float>;
using attn = attention::attention<layout, f32, f32, sparse::window>;
using device_cache = attention::device_cache<layout, f32, f32>;

// The store's cache as a device call takes it: the same pointers labelled device memory, and
// the table once more as the host copy.
device_cache as_device(const attn::cache_type& host) {
  device_cache d;
  d.view.pages = host.pages;
  d.view.pool_pages = host.pool_pages;
  d.view.format = host.format;
  d.view.table = host.table;
  d.view.key_min = host.key_min;
  d.view.key_max = host.key_max;
  d.view.mass = host.mass;
  d.table = host.table;
  return d;
}

TEST_CASE("a device decode checks everything on the host before its body runs") {
  INFUSE_RANDOM(rng);
  auto st = infuse::test::make_store<layout, f32, f32>(rng, {5, 40}, 2, 64, 64);
  const device_cache cache = as_device(st.view());
  std::vector<float> q(2 * 4 * 64), out(2 * 4 * 64), lse(2 * 4), weights(2 * 4 * 40);
  const recording_backend exec;
  const sparse::window::params window{2, 8};
  CHECK(attn::decode_workspace_bytes(exec, 4, cache, window) == 40);
  CHECK(attn::decode_workspace_bytes(exec, 4, cache, window, 1000) == 1000);
  std::vector<std::byte> workspace(40);
  const auto run = [&](const device_cache& c, std::int64_t q_heads, std::int64_t dim,
                       std::int64_t tokens, std::size_t workspace_bytes,
                       const sparse::window::params& p) {
    attn::decode(exec, device_view<const float, 3>(q.data(), {2, q_heads, dim}), c,
                 device_view<float, 3>(out.data(), {2, q_heads, 64}), p, {},
                 std::span<std::byte>(workspace.data(), workspace_bytes),
                 attention::device_lse_output{device_view<float, 2>(lse.data(), {2, q_heads})},
                 attention::device_token_weights{
                     device_view<float, 3>(weights.data(), {2, q_heads, tokens})});
  };
  runs = {};
  run(cache, 4, 64, 40, 40, window);
  CHECK(runs.decodes == 1);
  CHECK(runs.longest == 40);

  CHECK_REJECTS("q.extent(1)", run(cache, 3, 64, 40, 40, window));
  CHECK_REJECTS("q.extent(2)", run(cache, 4, 63, 40, 40, window));
  CHECK_REJECTS("weights.extent(2)", run(cache, 4, 64, 39, 40, window));
  CHECK_REJECTS("workspace.size()", run(cache, 4, 64, 40, 39, window));
  CHECK_REJECTS("sparsity.window", run(cache, 4, 64, 40, 40, {2, 0}));
  // The host copy of the table is what the host checks: a page outside the pool, a last page
  // longer than a page, a different batch.
  std::vector<std::int32_t> indices = st.indices;
  device_cache bad = cache;
  indices.back() = st.pool_pages;
  bad.table.indices = indices.data();
  CHECK_REJECTS("page_table.indices[" + std::to_string(indices.size() - 1) + "]",
                run(bad, 4, 64, 40, 40, window));
  std::vector<std::int32_t> last = st.last_page_len;
  last[1] = 17;
  bad = cache;
  bad.table.last_page_len = last.data();
  CHECK_REJECTS("page_table.last_page_len[1]", run(bad, 4, 64, 40, 40, window));
  bad = cache;
  bad.view.table.sequences = 1;
  CHECK_REJECTS("cache.view.table.sequences", run(bad, 4, 64, 40, 40, window));
  CHECK(runs.decodes == 1);  // no rejected call reached the body
}

TEST_CASE("a device prefill checks its arguments on the host and leaves q_indptr unread") {
  INFUSE_RANDOM(rng);
  auto st = infuse::test::make_store<layout, f32, f32>(rng, {5, 40}, 2, 64, 64);
  const device_cache cache = as_device(st.view());
  const std::int64_t rows = 7;
  std::vector<float> q(rows * 4 * 64), k(rows * 2 * 64), v(rows * 2 * 64), out(rows * 4 * 64);
  // Entries the host would reject: on the device the kernels clamp them, the host never reads.
  std::vector<std::int32_t> q_indptr = {5, -1, 1000};
  const recording_backend exec;
  const auto run = [&](const device_cache& c, std::int64_t q_heads, std::int64_t k_rows,
                       std::int64_t indptr_size) {
    attention::prefill<layout, f32, f32, sparse::causal>(
        exec, device_view<const float, 3>(q.data(), {rows, q_heads, 64}),
        device_view<const float, 3>(k.data(), {k_rows, 2, 64}),
        device_view<const float, 3>(v.data(), {rows, 2, 64}),
        device_view<const std::int32_t, 1>(q_indptr.data(), {indptr_size}), c,
        device_view<float, 3>(out.data(), {rows, q_heads, 64}), {});
  };
  runs = {};
  run(cache, 4, rows, 3);
  CHECK(runs.prefills == 1);
  CHECK_REJECTS("q.extent(1)", run(cache, 3, rows, 3));
  CHECK_REJECTS("k.extent(0)", run(cache, 4, rows - 1, 3));
  CHECK_REJECTS("q_indptr.extent(0)", run(cache, 4, rows, 2));
  std::vector<std::int32_t> indices = st.indices;
  indices.front() = -1;
  device_cache bad = cache;
  bad.table.indices = indices.data();
  CHECK_REJECTS("page_table.indices[0]", run(bad, 4, rows, 3));
  CHECK(runs.prefills == 1);
}

TEST_CASE("the CPU decode with a workspace sized by max_length equals the exact one") {
  INFUSE_RANDOM(rng);
  using dense = attention::attention<layout, f32, f32>;
  auto st = infuse::test::make_store<layout, f32, f32>(rng, {1, 600, 17}, 2, 64, 64);
  const auto cache = st.view();
  const infuse::exec::cpu exec(2);
  const std::int64_t exact = dense::decode_workspace_bytes(exec, 4, cache, {});
  const std::int64_t bound = dense::decode_workspace_bytes(exec, 4, cache, {}, 600);
  CHECK(bound > exact);  // every sequence taken as 600 tokens long
  CHECK(dense::decode_workspace_bytes(exec, 4, cache, {}, 0) < exact);
  const std::vector<float> q = rng.normals(3 * 4 * 64);
  const auto decode = [&](std::int64_t bytes) {
    std::vector<float> out(3 * 4 * 64), lse(3 * 4);
    std::vector<std::byte> workspace(static_cast<std::size_t>(bytes), std::byte{0xff});
    dense::decode(exec, host_view<const float, 3>(q.data(), {3, 4, 64}), cache,
                  host_view<float, 3>(out.data(), {3, 4, 64}), {}, {}, workspace,
                  attention::lse_output{host_view<float, 2>(lse.data(), {3, 4})});
    out.insert(out.end(), lse.begin(), lse.end());
    return out;
  };
  CHECK(decode(bound) == decode(exact));
  CHECK_REJECTS("workspace.size()", decode(exact - 1));
}

}  // namespace
