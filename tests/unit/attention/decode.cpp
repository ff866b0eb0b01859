// attention::decode on the CPU against the float64 reference, over layouts x K/V schemes, and its
// argument checks.
#include "infuse/attention/cpu/decode.hpp"

#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "infuse/attention/attention.hpp"
#include "infuse/core/float_types.hpp"
#include "infuse/quant/quant.hpp"
#include "infuse/sparse/sparse.hpp"
#include "store.hpp"
#include "support/random.hpp"

namespace {

namespace kv = infuse::kv;
namespace quant = infuse::quant;
namespace sparse = infuse::sparse;
namespace attention = infuse::attention;
using infuse::half;
using infuse::host_view;
using infuse::test::check_decode;

template <class Layout, class K, class V = K>
struct config {
  using layout = Layout;
  using k = K;
  using v = V;
};

using f32 = quant::none<float>;
using f16 = quant::none<half>;
using int8 = quant::int_<8, quant::per_channel>;
using int4 = quant::int_<4, 32>;

#define DECODE_CONFIGS                                                                      \
  config<kv::paged<16>, f32>, config<kv::paged<16>, f16>, config<kv::paged<16>, int8>,      \
      config<kv::paged<16>, int4>, config<kv::paged<16, kv::hnd>, f16>,                     \
      config<kv::paged<16, kv::hnd>, int8>, config<kv::paged<16, kv::hnd>, int4>,           \
      config<kv::paged<1>, f16>, config<kv::paged<1>, int4>, config<kv::contiguous<>, f32>, \
      config<kv::contiguous<>, int8>, config<kv::contiguous<kv::hnd>, f16>,                 \
      config<kv::contiguous<kv::hnd>, int4>, config<kv::paged<16>, int8, int4>

TEST_CASE_TEMPLATE("decode matches the float64 reference", C, DECODE_CONFIGS) {
  INFUSE_RANDOM(rng);
  using L = typename C::layout;
  using K = typename C::k;
  using V = typename C::v;
  // Lengths 0 and 1, page boundaries; groups 4, 7, 8 and 1; head dims 64, 80 and 128; a
  // sequence long enough for two split-KV chunks.
  check_decode<sparse::dense, L, K, V>(rng, {{0, 1, 15, 16, 17, 33}, 8, 2, 64}, {});
  check_decode<sparse::dense, L, K, V>(rng, {{40, 1}, 7, 1, 80}, {});
  check_decode<sparse::causal, L, K, V>(rng, {{100, 600}, 16, 2, 128}, {});
  check_decode<sparse::dense, L, K, V>(rng, {{70, 3}, 3, 3, 96}, {}, {}, 1);
}

TEST_CASE("decode over 4097 tokens, on 1 and 3 threads") {
  INFUSE_RANDOM(rng);
  for (const int threads : {1, 3}) {
    check_decode<sparse::dense, kv::paged<16>, f16, f16>(rng, {{4097}, 8, 2, 128}, {}, {}, threads);
  }
}

TEST_CASE("decode applies the scale, soft-cap and ALiBi of the options") {
  INFUSE_RANDOM(rng);
  const std::vector<float> slopes = {0.5f, 0.25f, 0.125f, 0.0625f};
  attention::options opt;
  opt.scale = 0.3f;
  opt.soft_cap = 2.0f;
  opt.alibi_slopes = slopes.data();
  check_decode<sparse::dense, kv::paged<16>, f32, f32>(rng, {{50, 700}, 4, 2, 256}, {}, opt);
}

// ---- argument checks -------------------------------------------------------------------------

struct bad_input_fixture {
  using attn = attention::attention<kv::paged<16>, f16, f16, sparse::window>;
  infuse::test::seeded_rng rng;
  infuse::test::kv_store<kv::paged<16>, f16, f16> st =
      infuse::test::make_store<kv::paged<16>, f16, f16>(rng, {20, 40}, 2, 64, 64);
  std::vector<float> q = std::vector<float>(2 * 4 * 64, 0.5f);
  std::vector<float> out = std::vector<float>(2 * 4 * 64);
  sparse::window::params window{4, 8};
  infuse::exec::cpu exec{2};
  std::vector<std::byte> workspace;

  bad_input_fixture() {
    workspace.resize(
        static_cast<std::size_t>(attn::decode_workspace_bytes(exec, 4, st.view(), window)));
  }
  void run(const attn::cache_type& cache, std::int64_t batch = 2, std::int64_t q_heads = 4,
           std::int64_t q_dim = 64, std::int64_t out_dim = 64) {
    std::fill(out.begin(), out.end(), 7.0f);
    attn::decode(exec, host_view<const float, 3>(q.data(), {batch, q_heads, q_dim}), cache,
                 host_view<float, 3>(out.data(), {batch, q_heads, out_dim}), window, {}, workspace);
  }
};

// Runs `call` and checks it throws infuse::error naming `argument`, before writing out.
#define CHECK_REJECTS(name, call)      \
  do {                                 \
    bool thrown = false;               \
    try {                              \
      call;                            \
    } catch (const infuse::error& e) { \
      thrown = true;                   \
      CHECK(e.argument() == (name));   \
      INFO(e.what());                  \
    }                                  \
    CHECK(thrown);                     \
  } while (false)

TEST_CASE_FIXTURE(bad_input_fixture, "decode rejects bad arguments before any work") {
  run(st.view());  // the valid call
  CHECK(out[0] != 7.0f);
  CHECK_REJECTS("q.extent(1)", run(st.view(), 2, 3, 64, 64));
  CHECK_REJECTS("q.extent(0)", run(st.view(), 1, 4, 64, 64));
  CHECK_REJECTS("q.extent(2)", run(st.view(), 2, 4, 32, 64));
  CHECK_REJECTS("out.extent(2)", run(st.view(), 2, 4, 64, 32));
  {
    auto cache = st.view();
    std::vector<std::int32_t> indices(st.indices);
    indices[1] = cache.pool_pages;
    cache.table.indices = indices.data();
    CHECK_REJECTS("page_table.indices[1]", run(cache));
  }
  {
    auto cache = st.view();
    std::vector<std::int32_t> last(st.last_page_len);
    last[0] = 17;  // longer than its pages
    cache.table.last_page_len = last.data();
    CHECK_REJECTS("page_table.last_page_len[0]", run(cache));
  }
  {
    auto cache = st.view();
    cache.format.slots = 8;
    CHECK_REJECTS("cache.format.slots", run(cache));
  }
  window.window = 0;
  CHECK_REJECTS("sparsity.window", run(st.view()));
  window.window = 8;
  workspace.resize(workspace.size() - 1);
  CHECK_REJECTS("workspace.size()", run(st.view()));
  CHECK(out[0] == 7.0f);  // nothing written on error
}

TEST_CASE("decode rejects a contiguous sequence longer than its run, and bad options") {
  INFUSE_RANDOM(rng);
  using attn = attention::attention<kv::contiguous<>, f32, f32>;
  auto st = infuse::test::make_store<kv::contiguous<>, f32, f32>(rng, {5, 9}, 1, 64, 64);
  std::vector<float> q(2 * 64, 1.0f), out(2 * 64);
  const infuse::exec::cpu exec(1);
  std::vector<std::byte> workspace(
      static_cast<std::size_t>(attn::decode_workspace_bytes(exec, 1, st.view(), {})));
  const auto run = [&](const attn::cache_type& cache, const attention::options& opt) {
    attn::decode(exec, host_view<const float, 3>(q.data(), {2, 1, 64}), cache,
                 host_view<float, 3>(out.data(), {2, 1, 64}), {}, opt, workspace);
  };
  run(st.view(), {});
  auto cache = st.view();
  std::vector<std::int32_t> lengths = {5, cache.format.slots + 1};
  cache.table.lengths = lengths.data();
  CHECK_REJECTS("cache.table.lengths[1]", run(cache, {}));
  attention::options opt;
  opt.soft_cap = -1.0f;
  CHECK_REJECTS("options.soft_cap", run(st.view(), opt));
  opt = {};
  opt.scale = NAN;
  CHECK_REJECTS("options.scale", run(st.view(), opt));
}

}  // namespace
