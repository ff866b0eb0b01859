// expect: infuse: this type is not a quantization scheme \(quant::scheme\)
// A home-made 4-bit scheme that forgot pack(), handed to quant::quantize
// (docs/policies.md#quantization-schemes).
#include <cstdint>
#include <vector>

#include "infuse/quant/matrix.hpp"

struct my_int4 {
  using identifier = infuse::quant::scheme_identifier;
  static constexpr const char* name = "my_int4";
  static constexpr int group = 32;
  static constexpr int block_bytes = 16;
  static constexpr int scales_per_group = 1;
  static constexpr bool has_zero = false;
  struct params {
    float scale;
  };
  static params group_params(const float* scales, std::uint8_t) { return {scales[0]}; }
  static std::uint32_t code(const std::uint8_t* block, int j) {
    return (block[j & 15] >> (4 * (j >> 4))) & 15u;
  }
  static float value(std::uint32_t u, const params& p) { return p.scale * (float(u) - 8.0f); }
  static infuse::quant::stored_group<my_int4> fit(const float*, std::int64_t, float) {
    return {{1.0f}, 0};
  }
  static std::uint32_t encode(float w, const params&) { return std::uint32_t(w + 8.0f); }
#ifndef INFUSE_COMPILE_FAIL
  static void pack(const std::uint32_t (&codes)[32], std::uint8_t* block) {
    for (int j = 0; j < 16; ++j) block[j] = std::uint8_t(codes[j] | (codes[j + 16] << 4));
  }
#endif
};

int main() {
  std::vector<float> w(64, 0.0f);
  const auto q =
      infuse::quant::quantize<my_int4>(infuse::host_view<const float, 2>(w.data(), {2, 32}));
  return q.rows == 2 ? 0 : 1;
}
