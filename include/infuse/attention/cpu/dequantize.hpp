// The SIMD pieces the CPU attention bodies share: the float vector tag and the dequantization of
// one stored K or V vector into floats.
#pragma once

#include <hwy/highway.h>

#include <cstdint>

#include "infuse/core/config.hpp"
#include "infuse/gemm/cpu/gemv.hpp"
#include "infuse/kv/format.hpp"
#include "infuse/quant/scheme.hpp"

namespace infuse::attention::cpu {

namespace hn = hwy::HWY_NAMESPACE;

namespace detail {

using float_tag = hn::CappedTag<float, 16>;

// `dims` floats, a multiple of 32: the compile-time Dims when nonzero.
template <int Dims>
INFUSE_FORCE_INLINE int dims_or(int runtime) {
  return Dims > 0 ? Dims : runtime;
}

// The stored vector (codes, params) of format f, dequantized into out[0, f.stored_dim()) with the
// CPU gemv's unpacking: equal to kv::vector_format::value bit for bit. Stored: the stored dim when
// known at compile time, else 0.
template <class S, int Stored = 0>
INFUSE_FORCE_INLINE void dequantize_vector(const kv::vector_format<S>& f, const std::uint8_t* codes,
                                           const std::uint8_t* params, float* out) {
  const gemm::cpu::float_tag<S> d;
  constexpr int lanes = static_cast<int>(hn::MaxLanes(d));
  const int blocks = dims_or<Stored>(f.stored_dim()) / quant::block_size;
  const int group_dims = S::group > 0 ? S::group : dims_or<Stored>(f.stored_dim());
  for (int b = 0; b < blocks; ++b) {
    const auto p = f.group_params(params, b * quant::block_size / group_dims);
    const std::uint8_t* block = codes + std::int64_t{b} * S::block_bytes;
    for (int c = 0; c < quant::block_size; c += lanes) {
      hn::StoreU(gemm::cpu::detail::dequantize_chunk<S>(d, block, c, p), d,
                 out + b * quant::block_size + c);
    }
  }
}

}  // namespace detail

}  // namespace infuse::attention::cpu
