// quant::scheme: what every quantization scheme provides, shared by the host, the CPU kernels and
// the CUDA kernels. See docs/policies.md#quantization-schemes.
//
// A quantized matrix W is N rows (outputs) x K columns (inputs), row-major. Each row is cut into
// blocks of 32 consecutive inputs (quant::block_size); a block's codes fill `block_bytes` bytes and
// the blocks of a row follow each other, rows after rows: codes are (rows, cols/32, block_bytes).
// A *group* of consecutive inputs of one row shares its stored parameters: `scales_per_group`
// floats and, when `has_zero`, one uint8 zero point. The group is `group` inputs (a multiple of
// 32), the whole row (quant::per_channel) or the whole matrix (quant::per_tensor).
//
// A scheme is a struct of static members (no state):
//   using identifier = quant::scheme_identifier;        opt in
//   static constexpr const char* name;                  "int4_g128", for messages and benchmarks
//   static constexpr int group;                         32, 64, 128, per_channel or per_tensor
//   static constexpr int block_bytes;                   bytes of codes per block of 32 inputs
//   static constexpr int scales_per_group;              floats stored per group
//   static constexpr bool has_zero;                     a uint8 zero point per group
//   struct params;                                      a group's parameters, ready to dequantize
//   INFUSE_HOST_DEVICE static params group_params(const float* scales, std::uint8_t zero);
//   INFUSE_HOST_DEVICE static std::uint32_t code(const std::uint8_t* block, int j);
//   INFUSE_HOST_DEVICE static float value(std::uint32_t code, const params&);
// and on the host, to quantize:
//   static stored_group<S> fit(const float* values, std::int64_t count, float clip);
//   static std::uint32_t encode(float w, const params&);  // the code nearest to w
//   static void pack(const std::uint32_t (&codes)[32], std::uint8_t* block);
// quant::dequantize(S, block, j, params) and quant::dequantize_block(...) build on these.
#pragma once

#include <concepts>
#include <cstdint>
#include <type_traits>

#include "infuse/core/config.hpp"

namespace infuse::quant {

// The opt-in identifier of a scheme: `using identifier = quant::scheme_identifier;`.
struct scheme_identifier {};

// Inputs per block: the unit of packing, of SIMD unpacking and of the int8-activation scales.
inline constexpr int block_size = 32;

// Group sizes that are not a count of inputs.
inline constexpr int per_channel = 0;  // one group per row
inline constexpr int per_tensor = -1;  // one group for the whole matrix

// Zero-point conventions of the integer schemes.
struct symmetric {};   // w = scale * (u - 2^(Bits-1))
struct zero_point {};  // w = scale * (u - zero), zero a uint8 per group

// What a host quantization fits to each group.
enum class rounding {
  nearest,      // the range of the group, codes rounded to nearest
  clip_search,  // the best of a grid of clipped ranges by the squared error of the group
};

struct quantize_options {
  rounding method = rounding::nearest;
  // clip_search tries ratios of the group's range from 1 down to min_clip in clip_steps steps.
  float min_clip = 0.5f;
  int clip_steps = 11;
};

// The parameters a group stores: what quantize writes to `scales` and `zeros`.
template <class S>
struct stored_group {
  float scales[S::scales_per_group > 0 ? S::scales_per_group : 1];
  std::uint8_t zero;
};

namespace detail {

template <int Group>
inline constexpr bool valid_group = Group == per_channel || Group == per_tensor ||
                                    (Group > 0 && Group % block_size == 0);

}  // namespace detail

template <class S>
concept scheme = requires {
  typename S::identifier;
  typename S::params;
  { S::name } -> std::convertible_to<const char*>;
  { S::group } -> std::convertible_to<int>;
  { S::block_bytes } -> std::convertible_to<int>;
  { S::scales_per_group } -> std::convertible_to<int>;
  { S::has_zero } -> std::convertible_to<bool>;
}
&&std::same_as<typename S::identifier, scheme_identifier>&& detail::valid_group<S::group> &&
    (S::block_bytes > 0) && (S::scales_per_group >= 0) &&
    requires(const std::uint8_t* block, const float* scales, std::uint8_t zero,
             const typename S::params& p, std::uint32_t code, int j, float w,
             const std::uint32_t (&codes)[block_size], std::uint8_t* out) {
  { S::group_params(scales, zero) } -> std::same_as<typename S::params>;
  { S::code(block, j) } -> std::same_as<std::uint32_t>;
  { S::value(code, p) } -> std::same_as<float>;
  { S::fit(scales, std::int64_t{}, w) } -> std::same_as<stored_group<S>>;
  { S::encode(w, p) } -> std::same_as<std::uint32_t>;
  S::pack(codes, out);
};

// The check where a scheme is defined and where a kernel consumes one.
template <class S>
INFUSE_HOST_DEVICE constexpr void static_check_scheme() {
  static_assert(scheme<S>,
                "infuse: this type is not a quantization scheme (quant::scheme): it needs "
                "`using identifier = quant::scheme_identifier`, name, group (a multiple of 32, "
                "per_channel or per_tensor), block_bytes, scales_per_group, has_zero, params, "
                "group_params, code, value, fit, encode and pack; see "
                "docs/policies.md#quantization-schemes");
}

// Weight j (0..31) of a block.
template <class S>
INFUSE_HOST_DEVICE INFUSE_FORCE_INLINE float dequantize(const std::uint8_t* block, int j,
                                                        const typename S::params& p) {
  return S::value(S::code(block, j), p);
}

// The 32 weights of a block; with `out` a local array the compiler keeps them in registers.
template <class S>
INFUSE_HOST_DEVICE INFUSE_FORCE_INLINE void dequantize_block(const std::uint8_t* block,
                                                             const typename S::params& p,
                                                             float (&out)[block_size]) {
#if defined(INFUSE_DEVICE_PASS)
#pragma unroll
#endif
  for (int j = 0; j < block_size; ++j) out[j] = S::value(S::code(block, j), p);
}

// Bytes of codes, scales and zero points of a rows x cols matrix, exactly.
template <class S>
constexpr std::int64_t storage_bytes(std::int64_t rows, std::int64_t cols) {
  const std::int64_t groups = S::group == per_tensor    ? 1
                              : S::group == per_channel ? rows
                                                        : rows * (cols / S::group);
  return rows * (cols / block_size) * S::block_bytes +
         groups * (S::scales_per_group * std::int64_t{sizeof(float)} + (S::has_zero ? 1 : 0));
}

// Bits per weight, codes plus scales and zero points, for a matrix of `cols` inputs per row.
template <class S>
constexpr double bits_per_weight(std::int64_t cols, std::int64_t rows = 1) {
  return 8.0 * static_cast<double>(storage_bytes<S>(rows, cols)) / static_cast<double>(rows * cols);
}

}  // namespace infuse::quant
