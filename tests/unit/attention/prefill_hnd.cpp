// attention::prefill on the CPU, paged HND layout: every K/V scheme under every sparsity against
// the float64 reference on both walks of the body, and int8 keys with int4 values. A TU of its
// own so that the prefill instantiations build in parallel.
#include <doctest/doctest.h>

#include "infuse/kv/layout.hpp"
#include "prefill_store.hpp"
#include "support/random.hpp"

namespace {

namespace kv = infuse::kv;
namespace quant = infuse::quant;
using infuse::test::check_prefill;
using infuse::test::prefill_path;

using paged_hnd = kv::paged<16, kv::hnd>;

}  // namespace

TEST_CASE_TEMPLATE(
    "attention::prefill, paged HND: matches float64 attention over the stored K/V, and stores "
    "the new K/V as encode() does",
    Config, INFUSE_PREFILL_COMBINATIONS(paged_hnd)) {
  INFUSE_RANDOM(rng);
  infuse::test::check_prefill_shapes<Config>(rng);
}

TEST_CASE("attention::prefill, paged HND: int8 keys with int4 values, on one thread") {
  INFUSE_RANDOM(rng);
  using keys = quant::int_<8, quant::per_channel>;
  using values = quant::int_<4, 32>;
  using causal = infuse::sparse::causal;
  check_prefill<paged_hnd, keys, values, causal>(
      rng, {{rng.integer(0, 40), 0}, {40, 7}, 2, 2, 96, 256, prefill_path::tiles}, 1);
  check_prefill<paged_hnd, keys, values, causal>(
      rng, {{rng.integer(0, 40), 300}, {7, 3}, 2, 2, 96, 256, prefill_path::few_queries}, 1);
}
