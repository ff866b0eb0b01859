// attention::decode on the CPU against the float64 reference on paged<16> layouts x K/V schemes,
// over 4097 tokens and with the options, and its argument checks.
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
using infuse::test::decode_config;

using f32 = quant::none<float>;
using f16 = quant::none<half>;
using int8 = quant::int_<8, quant::per_channel>;
using int4 = quant::int_<4, 32>;
using paged_hnd = kv::paged<16, kv::hnd>;

// decode_layouts.cpp runs the other layouts.
TEST_CASE_TEMPLATE("decode on paged<16> matches the float64 reference", C,
                   decode_config<kv::paged<16>, f32>,
                   decode_config<kv::paged<16>, f16, f16, sparse::causal>,
                   decode_config<kv::paged<16>, int8>, decode_config<kv::paged<16>, int4>,
                   decode_config<kv::paged<16>, int8, int4>, decode_config<paged_hnd, f16>,
                   decode_config<paged_hnd, int8, int8, sparse::causal>,
                   decode_config<paged_hnd, int4>) {
  INFUSE_RANDOM(rng);
  infuse::test::check_decode_shapes<C>(rng);
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
    workspace = infuse::test::decode_workspace<attn>(exec, 4, st.view(), window);
  }
  void run(const attn::cache_type& cache, std::int64_t batch = 2, std::int64_t q_heads = 4,
           std::int64_t q_dim = 64, std::int64_t out_dim = 64) {
    std::fill(out.begin(), out.end(), 7.0f);
    attn::decode(exec, host_view<const float, 3>(q.data(), {batch, q_heads, q_dim}), cache,
                 host_view<float, 3>(out.data(), {batch, q_heads, out_dim}), window, {}, workspace);
  }
};

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

}  // namespace
