// expect: Sparsity is not a sparsity policy \(sparse::policy\)
// A home-made sparsity policy that forgot visible(), handed to attention
// (docs/policies.md#sparsity-policies).
#include <cstdint>
#include <string_view>

#include "infuse/attention/attention.hpp"
#include "infuse/quant/none.hpp"

struct every_page {
  using identifier = infuse::sparse::policy_identifier;
  static constexpr const char* name = "every_page";
  struct params {};
  static void check(const params&, std::string_view) {}
  static std::int64_t max_ranges(const params&, const infuse::sparse::query_context&) { return 1; }
  static std::int64_t select(const params&, const infuse::sparse::query_context& q,
                             infuse::sparse::token_range* out) {
    out[0] = {0, q.length};
    return q.length > 0 ? 1 : 0;
  }
#ifndef INFUSE_COMPILE_FAIL
  static bool visible(const params&, const infuse::sparse::mask_context&) {
    return true;
  }
#endif
};

using attn = infuse::attention::attention<infuse::kv::paged<16>, infuse::quant::none<float>,
                                          infuse::quant::none<float>, every_page>;

int main() {
  return attn::call.size() > 0 ? 0 : 1;
}
