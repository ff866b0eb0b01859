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
struct device_decode_config {
  using layout = Layout;
  using k = K;
  using v = V;
};

using f16 = quant::none<half>;
using int8 = quant::int_<8, quant::per_channel>;
using int4 = quant::int_<4, 32>;

// Schemes that decode reads with other lane maps or the other walk (attention/cuda/decode.cuh):
// K and V of different schemes (fp8 K over bf16 V: 8 lanes of a token's 16 read K), float (4 dims
// a slice), zero points and groups of 64, and 2-bit codes (attend.cuh's walk).
#define DECODE_MORE_SCHEMES(order)                                                               \
  infuse::test::device_decode_config<                                                            \
      infuse::kv::paged<16, order>,                                                              \
      infuse::quant::fp8<infuse::fp8_e4m3, infuse::quant::per_channel>,                          \
      infuse::quant::none<infuse::bfloat16>>,                                                    \
      infuse::test::device_decode_config<infuse::kv::contiguous<order>,                          \
                                         infuse::quant::none<float>>,                            \
      infuse::test::device_decode_config<infuse::kv::paged<16, order>,                           \
                                         infuse::quant::int_<4, 64, infuse::quant::zero_point>,  \
                                         infuse::quant::int_<8, 32, infuse::quant::zero_point>>, \
      infuse::test::device_decode_config<infuse::kv::paged<16, order>,                           \
                                         infuse::quant::int_<2, 32, infuse::quant::zero_point>>

#define DECODE_SCHEMES(order)                                                               \
  infuse::test::device_decode_config<infuse::kv::paged<16, order>, infuse::test::f16>,      \
      infuse::test::device_decode_config<infuse::kv::paged<16, order>, infuse::test::int8>, \
      infuse::test::device_decode_config<infuse::kv::paged<16, order>, infuse::test::int4>

// Dense, window and quest over the shapes (decode_shape: unit/attention/store.hpp): group 1 with
// the edge lengths, group 4 at dim 128, group 8 at dim 80, group 4 at dim 256 (a token over all 32
// lanes).
template <class Layout, class K, class V>
void check_decode_policies() {
  INFUSE_RANDOM(rng);
  const decode_shape shapes[] = {{{0, 1, 17, 4097}, 8, 8, 64},
                                 {{17, 300, 1}, 16, 4, 128},
                                 {{4097, 0, 33}, 16, 2, 80},
                                 {{31, 513}, 4, 1, 256}};
  for (const decode_shape& shape : shapes) {
    check_device_decode<sparse::dense, Layout, K, V>(rng, shape, {});
    check_device_decode<sparse::window, Layout, K, V>(rng, shape, {4, 100});
    check_device_decode<sparse::quest<8>, Layout, K, V>(rng, shape, {8});
  }
}

// Dense decode over groups 7 and 1 (a pass with an idle row; one row), head dims 128, 96 and 64,
// lengths 0, 1, a page's 16 and 17, 4097.
template <class Layout, class K, class V>
void check_decode_dense() {
  INFUSE_RANDOM(rng);
  const decode_shape shapes[] = {
      {{16, 4097, 1}, 14, 2, 128}, {{0, 17, 300}, 7, 1, 96}, {{33, 1}, 2, 2, 64}};
  for (const decode_shape& shape : shapes) {
    check_device_decode<sparse::dense, Layout, K, V>(rng, shape, {});
  }
}

}  // namespace infuse::test
