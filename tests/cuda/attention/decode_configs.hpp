// The cache configurations the CUDA attention tests run, and the shapes of the decode tests.
#pragma once

#include <vector>

#include "decode_check.cuh"
#include "infuse/core/float_types.hpp"
#include "infuse/kv/layout.hpp"
#include "infuse/quant/quant.hpp"
#include "infuse/sparse/sparse.hpp"
#include "support/random.hpp"

namespace infuse::test {

template <class Layout, class K, class V = K>
struct decode_config {
  using layout = Layout;
  using k = K;
  using v = V;
};

using f16 = quant::none<half>;
using int8 = quant::int_<8, quant::per_channel>;
using int4 = quant::int_<4, 32>;

#define DECODE_SCHEMES(order)                                                        \
  infuse::test::decode_config<infuse::kv::paged<16, order>, infuse::test::f16>,      \
      infuse::test::decode_config<infuse::kv::paged<16, order>, infuse::test::int8>, \
      infuse::test::decode_config<infuse::kv::paged<16, order>, infuse::test::int4>

// Dense, window and quest over the shapes (decode_shape: unit/attention/store.hpp): group 1 with the edge
// lengths, group 4 at dim 128, group 8 at dim 80.
template <class Layout, class K, class V>
void check_decode_policies() {
  INFUSE_RANDOM(rng);
  const decode_shape shapes[] = {
      {{0, 1, 17, 4097}, 8, 8, 64}, {{17, 300, 1}, 16, 4, 128}, {{4097, 0, 33}, 16, 2, 80}};
  for (const decode_shape& shape : shapes) {
    check_device_decode<sparse::dense, Layout, K, V>(rng, shape, {});
    check_device_decode<sparse::window, Layout, K, V>(rng, shape, {4, 100});
    check_device_decode<sparse::quest<8>, Layout, K, V>(rng, shape, {8});
  }
}

}  // namespace infuse::test
