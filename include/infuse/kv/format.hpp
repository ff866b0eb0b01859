// How the keys or the values of a KV cache are stored: kv::vector_format<Arrangement> and the
// byte map of a page, the same on the host and on the device. See docs/policies.md#kv-layouts.
//
// One stored *vector* is the head_dim values of one token and one head. A quantized vector is cut
// into blocks of 32 (quant::block_size) like a row of a quantized matrix, so its dims are padded up
// to stored_dim (a multiple of 32) with zeros: the padding is stored, never read into a result.
//
// K and V each take an arrangement:
//   a quantization scheme S         per token: the scheme's group runs along the vector
//                                   (int_<B, per_channel> has one scale per vector, the per-token
//                                   quantization of KIVI's values; int_<B, 32> one per 32 dims);
//   kv::per_channel<S>              keys grouped per channel across the tokens of a page (KIVI's
//                                   keys): one group of S per (head, dim) and page, fitted when the
//                                   page fills; the tokens of a page not yet full are held in full
//                                   precision by the cache (its window, see kv/page_pool.hpp);
//   kv::mixed<High, Low>            per token, High for a token flagged important and Low for the
//                                   others (ZipVL's mixed precision): each record has the larger
//                                   size of the two, so a token's address does not depend on flags.
//
// A vector is two records: its codes (code_bytes) and its group parameters (param_bytes: the
// scales as floats, then one uint8 zero point per group when the scheme has one, padded to 4
// bytes). A page of `slots` token slots holds these regions, each starting at a multiple of
// region_alignment bytes (an empty region takes no bytes):
//   K codes        slots x k.heads records of k.code_bytes(), placed by the layout's Order
//   K params       slots x k.heads records of k.param_bytes(), placed by the same Order
//   V codes        slots x v.heads records of v.code_bytes()
//   V params       slots x v.heads records of v.param_bytes()
//   K page params  k.page_param_bytes(), per_channel keys only: the scales (k.heads, stored_dim,
//                  scales_per_group) as floats, then the zero points (k.heads, stored_dim) as
//                  uint8 when the scheme has them
//   flags          one byte per slot, 1 for an important token, when K or V is kv::mixed
// Order::offset(slot, head, 0, slots, heads, record_bytes) is the byte offset of a record inside
// its region, so nhd keeps one token's heads together and hnd one head's tokens together.
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

// The most token slots a page has (kv::paged).
inline constexpr std::int32_t max_page_slots = 256;

INFUSE_HOST_DEVICE constexpr std::int64_t round_up(std::int64_t n, std::int64_t multiple) {
  return (n + multiple - 1) / multiple * multiple;
}

// Keys grouped per channel across the tokens of a page, in scheme S (KIVI's keys). S's group
// must be quant::per_channel: one group per channel, spanning the page's slots.
template <class S>
struct per_channel {
  static_assert(quant::scheme<S> && S::group == quant::per_channel,
                "infuse: kv::per_channel<S> takes a quantization scheme with one group per channel "
                "(quant::int_<2, quant::per_channel, quant::zero_point>, ...); see "
                "docs/policies.md#kivi-and-zipvl-arrangements");
  using scheme = S;
};

// Per token, High for a token flagged important and Low for the others (ZipVL's mixed precision).
template <class High, class Low>
struct mixed {
  static_assert(quant::scheme<High> && quant::scheme<Low>,
                "infuse: kv::mixed<High, Low> takes two quantization schemes (quant::int_<8, "
                "quant::per_channel>, quant::int_<2, 32, quant::zero_point>, ...); see "
                "docs/policies.md#kivi-and-zipvl-arrangements");
  using high = High;
  using low = Low;
};

template <class A>
inline constexpr bool is_per_channel = false;
template <class S>
inline constexpr bool is_per_channel<per_channel<S>> = true;
template <class A>
inline constexpr bool is_mixed = false;
template <class H, class L>
inline constexpr bool is_mixed<mixed<H, L>> = true;

// Where one stored vector is: its codes and parameter records, its page's parameters (per_channel
// keys), its head, and its token's flag (kv::mixed).
struct stored_record {
  const std::uint8_t* codes;
  const std::uint8_t* params;
  const std::uint8_t* page_params;
  std::int32_t head;
  bool important;
};

namespace detail {

// head_dim padded to whole blocks of 32.
INFUSE_HOST_DEVICE constexpr std::int32_t stored_dim(std::int32_t head_dim) {
  return static_cast<std::int32_t>(round_up(head_dim, quant::block_size));
}

inline void require_shape(std::int32_t heads, std::int32_t head_dim, std::string_view call,
                          const std::string& name) {
  require(heads >= 1, call, name + ".heads", heads, "at least 1");
  require(head_dim >= 1 && head_dim <= 1024, call, name + ".head_dim", head_dim, "1 to 1024");
}

}  // namespace detail

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
    return detail::stored_dim(head_dim);
  }
  INFUSE_HOST_DEVICE constexpr std::int32_t blocks() const {
    return stored_dim() / quant::block_size;
  }
  // Groups per vector: one for per_channel and per_tensor (a whole vector), else stored_dim /
  // group.
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
  // Per-token arrangements keep nothing per page.
  INFUSE_HOST_DEVICE constexpr std::int64_t page_param_bytes() const { return 0; }
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

  // The stored_dim values of a stored vector, a block of 32 at a time.
  INFUSE_HOST_DEVICE void read(const stored_record& at, float* out) const {
    for (int b = 0; b < blocks(); ++b) {
      float block[quant::block_size];
      quant::dequantize_block<S>(at.codes + std::int64_t{b} * S::block_bytes,
                                 group_params(at.params, b * quant::block_size / group_dims()),
                                 block);
      for (int j = 0; j < quant::block_size; ++j) out[b * quant::block_size + j] = block[j];
    }
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
    detail::require_shape(heads, head_dim, call, name);
    require(S::group <= 0 || stored_dim() % (S::group > 0 ? S::group : 1) == 0, call,
            name + ".head_dim", head_dim,
            std::string("a head dim whose padded size (") + std::to_string(stored_dim()) +
                ") is a multiple of the scheme's group " + std::to_string(S::group) + " (" +
                S::name + ")");
  }
};

// Keys grouped per channel across a page's slots: a token's record is its codes alone (blocks of
// 32 dims, as per token), the groups' parameters are the page's (page_param_bytes).
template <class S>
struct vector_format<per_channel<S>> {
  using scheme = per_channel<S>;

  std::int32_t heads = 0;
  std::int32_t head_dim = 0;

  INFUSE_HOST_DEVICE constexpr std::int32_t stored_dim() const {
    return detail::stored_dim(head_dim);
  }
  INFUSE_HOST_DEVICE constexpr std::int32_t blocks() const {
    return stored_dim() / quant::block_size;
  }
  INFUSE_HOST_DEVICE constexpr std::int64_t code_bytes() const {
    return std::int64_t{blocks()} * S::block_bytes;
  }
  INFUSE_HOST_DEVICE constexpr std::int64_t param_bytes() const { return 0; }
  // One group per (head, stored dim): its scales, then its zero point when S has one.
  INFUSE_HOST_DEVICE constexpr std::int64_t channels() const {
    return std::int64_t{heads} * stored_dim();
  }
  INFUSE_HOST_DEVICE constexpr std::int64_t page_param_bytes() const {
    return round_up(channels() * (S::scales_per_group * 4 + (S::has_zero ? 1 : 0)), 4);
  }
  // The codes of a token; the page's parameters are page_param_bytes() per page.
  INFUSE_HOST_DEVICE constexpr std::int64_t bytes_per_token() const {
    return std::int64_t{heads} * code_bytes();
  }

  // The parameters of channel d of head `head`, from the page's parameter region.
  INFUSE_HOST_DEVICE typename S::params channel_params(const std::uint8_t* page_params,
                                                       std::int32_t head, int d) const {
    const std::int64_t channel = std::int64_t{head} * stored_dim() + d;
    const auto* scales = reinterpret_cast<const float*>(page_params);
    const std::uint8_t zero =
        S::has_zero ? page_params[channels() * S::scales_per_group * 4 + channel] : 0;
    return S::group_params(scales + channel * S::scales_per_group, zero);
  }

  INFUSE_HOST_DEVICE void read(const stored_record& at, float* out) const {
    for (int d = 0; d < stored_dim(); ++d) {
      out[d] =
          quant::dequantize<S>(at.codes + std::int64_t{d / quant::block_size} * S::block_bytes,
                               d % quant::block_size, channel_params(at.page_params, at.head, d));
    }
  }

  // Stores the fitted group of channel d of head `head` in the page's parameters.
  INFUSE_HOST_DEVICE void set_channel_params(std::uint8_t* page_params, std::int32_t head, int d,
                                             const quant::stored_group<S>& stored) const {
    const std::int64_t channel = std::int64_t{head} * stored_dim() + d;
    std::memcpy(page_params + channel * S::scales_per_group * 4, stored.scales,
                sizeof(float) * S::scales_per_group);
    if constexpr (S::has_zero)
      page_params[channels() * S::scales_per_group * 4 + channel] = stored.zero;
  }

  // The page's `slots` keys of block b (dims 32b to 32b + 31) of head `head`, as floats:
  // block[slot * 32 + j] = key(slot, head, 32b + j), zero past head_dim. One pass over the page's
  // tokens serves the block's 32 channels.
  template <class Key>
  void gather_block(std::int32_t slots, Key& key, std::int32_t head, int b, float* block) const {
    const int first = b * quant::block_size;
    const int dims = head_dim - first < quant::block_size ? head_dim - first : quant::block_size;
    for (std::int32_t slot = 0; slot < slots; ++slot) {
      float* row = block + std::int64_t{slot} * quant::block_size;
      for (int j = 0; j < dims; ++j) row[j] = key(slot, head, first + j);
      for (int j = dims; j < quant::block_size; ++j) row[j] = 0.0f;
    }
  }

  // Quantizes a full page (host): key(slot, head, d) is the float of channel d of head `head` in
  // slot `slot` (d below head_dim), codes(slot, head) the code record to fill. Each channel's
  // group is fitted over the page's `slots` values by the scheme's round-to-nearest fit. A block
  // of 32 channels at a time: its keys are gathered once and stay in L1.
  template <class Key, class Codes>
  void encode_page(std::int32_t slots, Key&& key, Codes&& codes, std::uint8_t* page_params) const {
    std::memset(page_params, 0, static_cast<std::size_t>(page_param_bytes()));
    float block[max_page_slots * quant::block_size];
    for (std::int32_t head = 0; head < heads; ++head) {
      for (int b = 0; b < blocks(); ++b) {
        gather_block(slots, key, head, b, block);
        typename S::params params[quant::block_size];
        for (int j = 0; j < quant::block_size; ++j) {
          float channel[max_page_slots];
          for (std::int32_t slot = 0; slot < slots; ++slot) {
            channel[slot] = block[std::int64_t{slot} * quant::block_size + j];
          }
          const int d = b * quant::block_size + j;
          set_channel_params(page_params, head, d, S::fit(channel, slots, 1.0f));
          params[j] = channel_params(page_params, head, d);
        }
        for (std::int32_t slot = 0; slot < slots; ++slot) {
          const float* row = block + std::int64_t{slot} * quant::block_size;
          std::uint32_t block_codes[quant::block_size];
          for (int j = 0; j < quant::block_size; ++j) block_codes[j] = S::encode(row[j], params[j]);
          S::pack(block_codes, codes(slot, head) + std::int64_t{b} * S::block_bytes);
        }
      }
    }
  }

  void require_valid(std::string_view call, std::string_view what) const {
    detail::require_shape(heads, head_dim, call, std::string(what));
  }
};

// High for an important token, Low for the others; a record has the larger size of the two.
template <class High, class Low>
struct vector_format<mixed<High, Low>> {
  using scheme = mixed<High, Low>;

  std::int32_t heads = 0;
  std::int32_t head_dim = 0;

  INFUSE_HOST_DEVICE constexpr vector_format<High> high() const { return {heads, head_dim}; }
  INFUSE_HOST_DEVICE constexpr vector_format<Low> low() const { return {heads, head_dim}; }
  INFUSE_HOST_DEVICE constexpr std::int32_t stored_dim() const {
    return detail::stored_dim(head_dim);
  }
  INFUSE_HOST_DEVICE constexpr std::int64_t code_bytes() const {
    return high().code_bytes() > low().code_bytes() ? high().code_bytes() : low().code_bytes();
  }
  INFUSE_HOST_DEVICE constexpr std::int64_t param_bytes() const {
    return high().param_bytes() > low().param_bytes() ? high().param_bytes() : low().param_bytes();
  }
  INFUSE_HOST_DEVICE constexpr std::int64_t page_param_bytes() const { return 0; }
  // The records of a token; its flag byte is the page's (page_format::flag_bytes_per_token).
  INFUSE_HOST_DEVICE constexpr std::int64_t bytes_per_token() const {
    return std::int64_t{heads} * (code_bytes() + param_bytes());
  }

  INFUSE_HOST_DEVICE void read(const stored_record& at, float* out) const {
    if (at.important) {
      high().read(at, out);
    } else {
      low().read(at, out);
    }
  }
  void encode(const float* x, std::uint8_t* codes, std::uint8_t* params, bool important) const {
    if (important) {
      high().encode(x, codes, params);
    } else {
      low().encode(x, codes, params);
    }
  }

  void require_valid(std::string_view call, std::string_view what) const {
    high().require_valid(call, what);
    low().require_valid(call, what);
  }
};

// The byte map of a page (see the top of this file) for K and V formats and `slots` slots.
template <class Order, class KScheme, class VScheme>
struct page_format {
  static_assert(!is_per_channel<VScheme>,
                "infuse: kv::per_channel arranges keys; values are quantized per token (KIVI's "
                "arrangement); see docs/policies.md#kivi-and-zipvl-arrangements");
  // A flag byte per slot when K or V is kv::mixed.
  static constexpr bool has_flags = is_mixed<KScheme> || is_mixed<VScheme>;

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
  INFUSE_HOST_DEVICE constexpr std::int64_t k_page_params_offset() const {
    return v_params_offset() +
           round_up(std::int64_t{slots} * v.heads * v.param_bytes(), region_alignment);
  }
  INFUSE_HOST_DEVICE constexpr std::int64_t flags_offset() const {
    return k_page_params_offset() + round_up(k.page_param_bytes(), region_alignment);
  }
  INFUSE_HOST_DEVICE constexpr std::int64_t flag_bytes_per_token() const {
    return has_flags ? 1 : 0;
  }
  INFUSE_HOST_DEVICE constexpr std::int64_t page_bytes() const {
    return flags_offset() + round_up(slots * flag_bytes_per_token(), region_alignment);
  }
  // Bytes of one token's K and V records and flag; a page adds k.page_param_bytes() and the
  // padding of each region to region_alignment.
  INFUSE_HOST_DEVICE constexpr std::int64_t bytes_per_token() const {
    return k.bytes_per_token() + v.bytes_per_token() + flag_bytes_per_token();
  }

  // The records of token slot `slot`, head `head` inside a page starting at `page`.
  template <class Byte>
  INFUSE_HOST_DEVICE Byte* k_codes(Byte* page, std::int32_t slot, std::int32_t head) const {
    return page + k_codes_offset() + Order::offset(slot, head, 0, slots, k.heads, k.code_bytes());
  }
  template <class Byte>
  INFUSE_HOST_DEVICE Byte* k_params(Byte* page, std::int32_t slot, std::int32_t head) const {
    return page + k_params_offset() + Order::offset(slot, head, 0, slots, k.heads, k.param_bytes());
  }
  template <class Byte>
  INFUSE_HOST_DEVICE Byte* v_codes(Byte* page, std::int32_t slot, std::int32_t head) const {
    return page + v_codes_offset() + Order::offset(slot, head, 0, slots, v.heads, v.code_bytes());
  }
  template <class Byte>
  INFUSE_HOST_DEVICE Byte* v_params(Byte* page, std::int32_t slot, std::int32_t head) const {
    return page + v_params_offset() + Order::offset(slot, head, 0, slots, v.heads, v.param_bytes());
  }
  template <class Byte>
  INFUSE_HOST_DEVICE Byte* flag(Byte* page, std::int32_t slot) const {
    return page + flags_offset() + slot;
  }
  // Whether the token in `slot` is stored at the high bit-width (kv::mixed).
  INFUSE_HOST_DEVICE bool important(const std::uint8_t* page, std::int32_t slot) const {
    return has_flags && *flag(page, slot) != 0;
  }

  // Reads back the stored key (value) of `slot` and `head` of a page: k.stored_dim() floats into
  // out. The tokens of a per_channel page that is not full are not in the page (the cache's
  // window holds them, see kv::read_key).
  INFUSE_HOST_DEVICE void read_key(const std::uint8_t* page, std::int32_t slot, std::int32_t head,
                                   float* out) const {
    k.read({k_codes(page, slot, head), k_params(page, slot, head), page + k_page_params_offset(),
            head, important(page, slot)},
           out);
  }
  INFUSE_HOST_DEVICE void read_value(const std::uint8_t* page, std::int32_t slot, std::int32_t head,
                                     float* out) const {
    v.read({v_codes(page, slot, head), v_params(page, slot, head), nullptr, head,
            important(page, slot)},
           out);
  }
};

}  // namespace infuse::kv
