// A sparsity policy written outside the library: "strided" reads every stride-th page of the
// sequence and the last page, and runs through the same fused decode kernel as the shipped ones.
// See docs/policies.md#sparsity-policies.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <infuse/attention/attention.hpp>
#include <infuse/attention/cpu/decode.hpp>
#include <infuse/quant/quant.hpp>
#include <infuse/sparse/policy.hpp>
#include <string_view>
#include <vector>

namespace sparse = infuse::sparse;

struct strided {
  using identifier = sparse::policy_identifier;
  static constexpr const char* name = "strided";
  struct params {
    std::int64_t stride = 2;  // pages
  };
  static void check(const params& p, std::string_view call) {
    infuse::require(p.stride >= 1, call, "sparsity.stride", p.stride, "at least 1");
  }
  static std::int64_t max_ranges(const params& p, const sparse::query_context& q) {
    const std::int64_t pages = (q.length + q.page_size - 1) / q.page_size;
    return pages / p.stride + 2;
  }
  static std::int64_t select(const params& p, const sparse::query_context& q,
                             sparse::token_range* out) {
    const std::int64_t pages = (q.length + q.page_size - 1) / q.page_size;
    std::int64_t count = 0;
    for (std::int64_t i = 0; i < pages; ++i) {
      if (i % p.stride != 0 && i != pages - 1) continue;
      const std::int64_t begin = i * q.page_size;
      out[count++] = {begin, std::min(begin + q.page_size, q.length)};
    }
    return count;
  }
  static bool visible(const params&, const sparse::mask_context& m) {
    return m.key_position <= m.query_position;
  }
};
static_assert(sparse::policy<strided>);

int main() {
  namespace kv = infuse::kv;
  using scheme = infuse::quant::int_<8, infuse::quant::per_channel>;
  using attn = infuse::attention::attention<kv::paged<16>, scheme, scheme, strided>;
  constexpr std::int32_t heads = 2, dim = 64, tokens = 100, pages = (tokens + 15) / 16;

  // One sequence of 100 tokens in pages 0..6 of a pool, K and V written quantized.
  kv::page_format<kv::nhd, scheme, scheme> format{{heads, dim}, {heads, dim}, 16};
  std::vector<float> pool(static_cast<std::size_t>(pages * format.page_bytes() / 4));
  auto* bytes = reinterpret_cast<std::uint8_t*>(pool.data());
  std::vector<float> x(dim);
  for (std::int32_t t = 0; t < tokens; ++t) {
    std::uint8_t* page = bytes + (t / 16) * format.page_bytes();
    for (std::int32_t h = 0; h < heads; ++h) {
      for (std::int32_t d = 0; d < dim; ++d) x[d] = std::sin(0.1f * float(t * dim + d + h));
      format.k.encode(x.data(), format.k_codes(page, t % 16, h), format.k_params(page, t % 16, h));
      format.v.encode(x.data(), format.v_codes(page, t % 16, h), format.v_params(page, t % 16, h));
    }
  }
  std::vector<std::int32_t> indptr = {0, pages}, indices = {0, 1, 2, 3, 4, 5, 6};
  std::vector<std::int32_t> last = {tokens - (pages - 1) * 16};
  kv::cache_view<kv::paged<16>, scheme, scheme> cache;
  cache.pages = bytes;
  cache.pool_pages = pages;
  cache.format = format;
  cache.table = {indptr.data(), indices.data(), last.data(), 1};

  const std::int32_t q_heads = 4;
  std::vector<float> q(q_heads * dim, 0.1f), out(q_heads * dim);
  const infuse::exec::cpu exec;
  const strided::params every_third{3};
  std::vector<std::byte> workspace(
      static_cast<std::size_t>(attn::decode_workspace_bytes(exec, q_heads, cache, every_third)));
  attn::decode(exec, infuse::host_view<const float, 3>(q.data(), {1, q_heads, dim}), cache,
               infuse::host_view<float, 3>(out.data(), {1, q_heads, dim}), every_third, {},
               workspace);
  std::printf("strided decode over pages 0, 3, 6: out[0][0..3] = %.4f %.4f %.4f %.4f\n", out[0],
              out[1], out[2], out[3]);
  return std::isfinite(out[0]) ? 0 : 1;
}
