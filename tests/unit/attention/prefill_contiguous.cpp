// attention::prefill on the CPU, contiguous layout: every K/V scheme under every sparsity against
// the float64 reference on both walks of the body; and pages of one token, where every token
// starts a page, for every K/V scheme. A TU of its own so that the prefill instantiations build
// in parallel.
#include <doctest/doctest.h>

#include "infuse/kv/layout.hpp"
#include "prefill_store.hpp"
#include "support/random.hpp"

namespace {

namespace kv = infuse::kv;

}  // namespace

TEST_CASE_TEMPLATE(
    "attention::prefill, contiguous: matches float64 attention over the stored K/V, and stores "
    "the new K/V as encode() does",
    Config, INFUSE_PREFILL_COMBINATIONS(kv::contiguous<>)) {
  INFUSE_RANDOM(rng);
  infuse::test::check_prefill_shapes<Config>(rng);
}

TEST_CASE_TEMPLATE(
    "attention::prefill, pages of one token: matches float64 attention over the stored K/V, and "
    "stores the new K/V as encode() does",
    Config, INFUSE_PREFILL_SCHEMES(kv::paged<1>, infuse::sparse::causal)) {
  INFUSE_RANDOM(rng);
  infuse::test::check_prefill_shapes<Config>(rng);
}
