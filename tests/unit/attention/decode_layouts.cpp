// attention::decode on the CPU against the float64 reference on pages of one token and the
// contiguous layouts x K/V schemes, and a contiguous cache's argument checks. A TU apart from
// decode.cpp so that the decode instantiations build in parallel.
#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "infuse/attention/attention.hpp"
#include "infuse/attention/cpu/decode.hpp"
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
using infuse::test::decode_config;

using f32 = quant::none<float>;
using f16 = quant::none<half>;
using int8 = quant::int_<8, quant::per_channel>;
using int4 = quant::int_<4, 32>;
using contiguous_hnd = kv::contiguous<kv::hnd>;

TEST_CASE_TEMPLATE("decode on pages of one token and contiguous runs matches the float64 reference",
                   C, decode_config<kv::paged<1>, f16>,
                   decode_config<kv::paged<1>, int4, int4, sparse::causal>,
                   decode_config<kv::contiguous<>, f32, f32, sparse::causal>,
                   decode_config<kv::contiguous<>, int8>, decode_config<contiguous_hnd, f16>,
                   decode_config<contiguous_hnd, int4, int4, sparse::causal>) {
  INFUSE_RANDOM(rng);
  infuse::test::check_decode_shapes<C>(rng);
}

TEST_CASE("decode rejects a contiguous sequence longer than its run, and bad options") {
  INFUSE_RANDOM(rng);
  using attn = attention::attention<kv::contiguous<>, f32, f32>;
  auto st = infuse::test::make_store<kv::contiguous<>, f32, f32>(rng, {5, 9}, 1, 64, 64);
  std::vector<float> q(2 * 64, 1.0f), out(2 * 64);
  const infuse::exec::cpu exec(1);
  std::vector<std::byte> workspace = infuse::test::decode_workspace<attn>(exec, 1, st.view(), {});
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
