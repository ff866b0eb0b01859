// kv::cache::append from half K and V rows: the cache holds exactly what appending the floats the
// halves stand for gives (pages, key bounds, mass), for quantized and unquantized schemes, strided
// rows included; and it is checked like the float append.
#include <doctest/doctest.h>

#include <cstdint>
#include <vector>

#include "infuse/core/float_types.hpp"
#include "infuse/exec/cpu.hpp"
#include "infuse/kv/kv.hpp"
#include "infuse/quant/quant.hpp"
#include "support/errors.hpp"
#include "support/random.hpp"

namespace kv = infuse::kv;
namespace quant = infuse::quant;
using infuse::half;
using infuse::host_view;
using infuse::test::argument_of;

namespace {

template <class Layout, class KScheme, class VScheme>
struct setup {
  using cache = kv::cache<Layout, KScheme, VScheme>;
};

}  // namespace

TEST_CASE_TEMPLATE(
    "kv::cache::append from half rows equals the append of their float values", Setup,
    setup<kv::paged<16>, quant::int_<4, 32>, quant::none<half>>,
    setup<kv::paged<1, kv::hnd>, quant::int_<2, quant::per_channel, quant::zero_point>,
          quant::int_<8, 32>>) {
  using cache_type = typename Setup::cache;
  INFUSE_RANDOM(rng);
  constexpr std::int32_t k_heads = 2, k_dim = 96, v_heads = 3, v_dim = 40;
  cache_type from_half(128, {k_heads, k_dim}, {v_heads, v_dim});
  cache_type from_float(128, {k_heads, k_dim}, {v_heads, v_dim});
  const std::vector<kv::sequence_id> seqs{from_half.create(), from_half.create()};
  from_float.create();
  from_float.create();
  const infuse::exec::cpu exec;
  for (int step = 0; step < 3; ++step) {
    const std::vector<std::int64_t> counts{rng.integer(0, 20), rng.integer(1, 20)};
    const std::int64_t rows = counts[0] + counts[1];
    // k rows padded to a stride of k_heads * k_dim + 8 halves: strided views read alike.
    const std::int64_t k_stride = k_heads * k_dim + 8;
    std::vector<half> k_half(static_cast<std::size_t>(rows * k_stride));
    std::vector<half> v_half(static_cast<std::size_t>(rows * v_heads * v_dim));
    for (half& x : k_half) x = half(static_cast<float>(rng.normal(0.0, 2.0)));
    for (half& x : v_half) x = half(static_cast<float>(rng.normal()));
    std::vector<float> k_float(k_half.size());
    std::vector<float> v_float(v_half.size());
    for (std::size_t i = 0; i < k_half.size(); ++i) k_float[i] = static_cast<float>(k_half[i]);
    for (std::size_t i = 0; i < v_half.size(); ++i) v_float[i] = static_cast<float>(v_half[i]);
    from_half.append(
        exec, seqs, counts,
        host_view<const half, 3>(k_half.data(), {rows, k_heads, k_dim}, {k_stride, k_dim, 1}),
        host_view<const half, 3>(v_half.data(), {rows, v_heads, v_dim}));
    from_float.append(
        exec, seqs, counts,
        host_view<const float, 3>(k_float.data(), {rows, k_heads, k_dim}, {k_stride, k_dim, 1}),
        host_view<const float, 3>(v_float.data(), {rows, v_heads, v_dim}));
    CHECK(from_half == from_float);
  }
  CHECK(from_half.length(seqs[1]) >= 3);

  // Checked as the float append is, before anything changes.
  const auto before = from_half;
  const std::vector<std::int64_t> counts{1, 1};
  std::vector<half> rows(2 * v_heads * v_dim);
  CHECK(argument_of([&] {
          from_half.append(exec, seqs, counts, host_view<const half, 3>(rows.data(), {2, 1, k_dim}),
                           host_view<const half, 3>(rows.data(), {2, v_heads, v_dim}));
        }) == "k.extent(1)");
  CHECK(from_half == before);
}
