// How the keys or the values of a KV cache are stored: kv::vector_format<Scheme> and the byte map
// of a page, the same on the host and on the device. See docs/policies.md#kv-layouts.
//
// One stored *vector* is the head_dim values of one token and one head. A quantized vector is cut
// into blocks of 32 (quant::block_size) like a row of a quantized matrix, so its dims are padded up
// to stored_dim (a multiple of 32) with zeros: the padding is stored, never read into a result. The
// scheme's group runs along the vector: int_<B, per_channel> has one scale per vector (the
// per-token quantization of KIVI's values), int_<B, 32> one scale per 32 dims.
//
// A vector is two records: its codes (code_bytes) and its group parameters (param_bytes: the
// scales as floats, then one uint8 zero point per group when the scheme has one, padded to 4
// bytes). A page of `slots` token slots holds four regions, each starting at a multiple of
// region_alignment bytes:
//   K codes   slots x k.heads records of k.code_bytes(), placed by the layout's Order
//   K params  slots x k.heads records of k.param_bytes(), placed by the same Order
//   V codes   slots x v.heads records of v.code_bytes()
//   V params  slots x v.heads records of v.param_bytes()
// Order::offset(slot, head, 0, slots, heads, record_bytes) is the byte offset of a record inside its
// region, so nhd keeps one token's heads together and hnd one head's tokens together.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "infuse/core/config.hpp"
#include "infuse/core/error.hpp"
#include "infuse/quant/scheme.hpp"

namespace infuse::kv {

// Every region of a page starts at a multiple of this many bytes (a cache line; 16-byte vector
// loads on the device stay aligned).
inline constexpr std::int64_t region_alignment = 64;

INFUSE_HOST_DEVICE constexpr std::int64_t round_up(std::int64_t n, std::int64_t multiple) {
  return (n + multiple - 1) / multiple * multiple;
}

template <class S>
struct vector_format {
  static_assert(quant::scheme<S>,
                "infuse: kv::vector_format<S> takes a quantization scheme (quant::none<half>, "
                "quant::int_<8, quant::per_channel>, quant::fp8<...>, ...); see "
                "docs/policies.md#quantization-schemes");
  using scheme = S;

  std::int32_t heads = 0;
  std::int32_t head_dim = 0;

  // head_dim padded to whole blocks of 32.
  INFUSE_HOST_DEVICE constexpr std::int32_t stored_dim() const {
    return static_cast<std::int32_t>(round_up(head_dim, quant::block_size));
  }
  INFUSE_HOST_DEVICE constexpr std::int32_t blocks() const {
    return stored_dim() / quant::block_size;
  }
  // Groups per vector: one for per_channel and per_tensor (a whole vector), else stored_dim / group.
  INFUSE_HOST_DEVICE constexpr std::int32_t groups() const {
    return S::group > 0 ? stored_dim() / S::group : 1;
  }
  INFUSE_HOST_DEVICE constexpr std::int32_t group_dims() const {
    return S::group > 0 ? S::group : stored_dim();
  }
  INFUSE_HOST_DEVICE constexpr std::int64_t code_bytes() const {
    return std::int64_t{blocks()} * S::block_bytes;
  }
  INFUSE_HOST_DEVICE constexpr std::int64_t param_bytes() const {
    return round_up(std::int64_t{groups()} * (S::scales_per_group * 4 + (S::has_zero ? 1 : 0)), 4);
  }
  // Bytes of one token (all heads), codes and parameters: the exact cost of a token.
  INFUSE_HOST_DEVICE constexpr std::int64_t bytes_per_token() const {
    return std::int64_t{heads} * (code_bytes() + param_bytes());
  }

  // The parameters of group g of a vector whose parameter record starts at `params`.
  INFUSE_HOST_DEVICE typename S::params group_params(const std::uint8_t* params, int g) const {
    const auto* scales = reinterpret_cast<const float*>(params);
    const std::uint8_t zero =
        S::has_zero ? params[std::int64_t{groups()} * S::scales_per_group * 4 + g] : 0;
    return S::group_params(scales + std::int64_t{g} * S::scales_per_group, zero);
  }

  // Element d (below stored_dim) of a vector.
  INFUSE_HOST_DEVICE float value(const std::uint8_t* codes, const std::uint8_t* params,
                                 int d) const {
    return quant::dequantize<S>(codes + std::int64_t{d / quant::block_size} * S::block_bytes,
                                d % quant::block_size, group_params(params, d / group_dims()));
  }

  // Quantizes one vector of head_dim floats into its codes and parameter records (host), each
  // group fitted by the scheme's round-to-nearest fit over its dims (padding included, as zeros).
  INFUSE_HOST_DEVICE void encode(const float* x, std::uint8_t* codes, std::uint8_t* params) const {
    float padded[1024 + quant::block_size];
    const int dims = stored_dim();
    std::memcpy(padded, x, sizeof(float) * static_cast<std::size_t>(head_dim));
    for (int d = head_dim; d < dims; ++d) padded[d] = 0.0f;
    std::memset(params, 0, static_cast<std::size_t>(param_bytes()));
    const int per_group = group_dims();
    for (int g = 0; g < groups(); ++g) {
      const auto stored = S::fit(padded + g * per_group, per_group, 1.0f);
      std::memcpy(params + std::int64_t{g} * S::scales_per_group * 4, stored.scales,
                  sizeof(float) * S::scales_per_group);
      if constexpr (S::has_zero) {
        params[std::int64_t{groups()} * S::scales_per_group * 4 + g] = stored.zero;
      }
      const typename S::params p = group_params(params, g);
      for (int b = g * per_group / quant::block_size; b < (g + 1) * per_group / quant::block_size;
           ++b) {
        std::uint32_t block_codes[quant::block_size];
        for (int j = 0; j < quant::block_size; ++j) {
          block_codes[j] = S::encode(padded[b * quant::block_size + j], p);
        }
        S::pack(block_codes, codes + std::int64_t{b} * S::block_bytes);
      }
    }
  }

  // Checks the format before a cache or a kernel trusts it; `what` is "k" or "v".
  void require_valid(std::string_view call, std::string_view what) const {
    const std::string name(what);
    require(heads >= 1, call, name + ".heads", heads, "at least 1");
    require(head_dim >= 1 && head_dim <= 1024, call, name + ".head_dim", head_dim, "1 to 1024");
    require(S::group <= 0 || stored_dim() % (S::group > 0 ? S::group : 1) == 0, call, name + ".head_dim", head_dim,
            std::string("a head dim whose padded size (") + std::to_string(stored_dim()) +
                ") is a multiple of the scheme's group " + std::to_string(S::group) + " (" +
                S::name + ")");
  }
};

// The byte map of a page (see the top of this file) for K and V formats and `slots` slots.
template <class Order, class KScheme, class VScheme>
struct page_format {
  vector_format<KScheme> k;
  vector_format<VScheme> v;
  std::int32_t slots = 0;

  INFUSE_HOST_DEVICE constexpr std::int64_t k_codes_offset() const { return 0; }
  INFUSE_HOST_DEVICE constexpr std::int64_t k_params_offset() const {
    return round_up(std::int64_t{slots} * k.heads * k.code_bytes(), region_alignment);
  }
  INFUSE_HOST_DEVICE constexpr std::int64_t v_codes_offset() const {
    return k_params_offset() +
           round_up(std::int64_t{slots} * k.heads * k.param_bytes(), region_alignment);
  }
  INFUSE_HOST_DEVICE constexpr std::int64_t v_params_offset() const {
    return v_codes_offset() +
           round_up(std::int64_t{slots} * v.heads * v.code_bytes(), region_alignment);
  }
  INFUSE_HOST_DEVICE constexpr std::int64_t page_bytes() const {
    return v_params_offset() +
           round_up(std::int64_t{slots} * v.heads * v.param_bytes(), region_alignment);
  }

  // The records of token slot `slot`, head `head` inside a page starting at `page`.
  template <class Byte>
  INFUSE_HOST_DEVICE Byte* k_codes(Byte* page, std::int32_t slot, std::int32_t head) const {
    return page + k_codes_offset() + Order::offset(slot, head, 0, slots, k.heads, k.code_bytes());
  }
  template <class Byte>
  INFUSE_HOST_DEVICE Byte* k_params(Byte* page, std::int32_t slot, std::int32_t head) const {
    return page + k_params_offset() +
           Order::offset(slot, head, 0, slots, k.heads, k.param_bytes());
  }
  template <class Byte>
  INFUSE_HOST_DEVICE Byte* v_codes(Byte* page, std::int32_t slot, std::int32_t head) const {
    return page + v_codes_offset() + Order::offset(slot, head, 0, slots, v.heads, v.code_bytes());
  }
  template <class Byte>
  INFUSE_HOST_DEVICE Byte* v_params(Byte* page, std::int32_t slot, std::int32_t head) const {
    return page + v_params_offset() +
           Order::offset(slot, head, 0, slots, v.heads, v.param_bytes());
  }
};

}  // namespace infuse::kv
