// attention::decode on exec::cuda against exec::cpu over paged<16> nhd pages: schemes f16, int8 and
// int4; policies dense and window; lengths 0, 1, 17 (a partial page), 300 and 4097
// (several split-KV chunks); groups 1, 4 and 8; head dims 64, 128 and 80 (a padded stored dim).
#include <doctest/doctest.h>

#include <vector>

#include "decode_check.cuh"
#include "decode_configs.hpp"

TEST_CASE_TEMPLATE("CUDA decode matches the CPU body (nhd)", C, DECODE_SCHEMES(infuse::kv::nhd)) {
  infuse::test::check_decode_policies<typename C::layout, typename C::k, typename C::v>();
}

TEST_CASE_TEMPLATE("CUDA decode matches the CPU body (nhd, more schemes, dense)", C,
                   DECODE_MORE_SCHEMES(infuse::kv::nhd)) {
  infuse::test::check_decode_dense<typename C::layout, typename C::k, typename C::v>();
}

TEST_CASE("CUDA decode applies the scale, soft-cap and ALiBi of the options") {
  INFUSE_RANDOM(rng);
  infuse::attention::options opt;
  opt.scale = 0.3f;
  opt.soft_cap = 2.0f;
  const std::vector<float> slopes = {0.5f, 0.25f, 0.125f, 0.0625f, 0.5f, 0.25f, 0.125f, 0.0625f};
  using layout = infuse::kv::paged<16>;
  using f16 = infuse::test::f16;
  infuse::test::check_device_decode<infuse::sparse::dense, layout, f16, f16>(
      rng, {{50, 700}, 8, 2, 256}, {}, opt, slopes);
}
