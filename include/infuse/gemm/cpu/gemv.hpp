// The CPU body of infuse::gemv and infuse::gated_gemv (gemm/gemv.hpp): Highway SIMD (and AVX-512
// VNNI for int8 activations where the compiler targets it), OpenMP threads over tiles of rows.
//
// Each thread takes an even, contiguous range of rows, walked in tiles. A tile is as many rows of
// W as fit in a quarter of L2 (at least 4; half that when gated, for the two weights); for each
// batch tile of up to 8 rows of x the kernel walks the W tile once, a few rows at a time, and
// hands each dot product to the epilogue (bias, activation or gate, residual) on its way to y.
// Batch 1..8 is one batch tile, so W streams from memory exactly once; larger batches re-read
// each W tile from cache, not from memory.
//
// Float activations: per block of 32 inputs the codes unpack chunk by chunk (L float lanes) into
// dequantized weights, in registers, and multiply into one accumulator per batch row; the
// dequantization uses the same float operations, in the same order, as the scheme's
// INFUSE_HOST_DEVICE value(): a weight here equals quant::dequantize's bit for bit.
// Int8 activations: see the section below.
#pragma once

#include <hwy/highway.h>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "infuse/core/float_types.hpp"
#include "infuse/exec/cpu.hpp"
#include "infuse/gemm/cpu/lut.hpp"
#include "infuse/gemm/gemv.hpp"
#include "infuse/quant/bcq.hpp"
#include "infuse/quant/fp8.hpp"
#include "infuse/quant/int.hpp"
#include "infuse/quant/none.hpp"

namespace infuse::gemm::cpu {

namespace hn = hwy::HWY_NAMESPACE;

// Float lanes per chunk: at most 16, and 8 for int3 and int2, whose split layouts put 8
// consecutive values under one shift.
template <class S>
inline constexpr std::size_t max_chunk_lanes = 16;
template <int Group, class Zero>
inline constexpr std::size_t max_chunk_lanes<quant::int_<3, Group, Zero>> = 8;
template <int Group, class Zero>
inline constexpr std::size_t max_chunk_lanes<quant::int_<2, Group, Zero>> = 8;
template <class S>
using float_tag = hn::CappedTag<float, max_chunk_lanes<S>>;

inline constexpr int max_batch_tile = 8;

namespace detail {

INFUSE_FORCE_INLINE std::uint32_t load_le32(const std::uint8_t* p) {
  std::uint32_t word;
  std::memcpy(&word, p, sizeof(word));  // x86 and the other Highway targets we build are LE
  return word;
}

// Bit (first + lane) of `word` in each lane, as 0 or 1 (uint16 or uint32 lanes, at most 16).
// A table of powers of two instead of a variable shift: Highway 1.0.3 emulates 16-bit variable
// shifts on AVX2 with an SSE4 intrinsic it does not declare there.
template <class DU>
INFUSE_FORCE_INLINE hn::Vec<DU> bits_of(DU du, std::uint32_t word, int first) {
  using lane = hn::TFromD<DU>;
  static_assert(hn::MaxLanes(DU()) <= 16, "bits_of covers 16 lanes");
  alignas(64) static constexpr lane powers[16] = {1,   2,   4,    8,    16,   32,   64,    128,
                                                  256, 512, 1024, 2048, 4096, 8192, 16384, 32768};
  const auto bits = hn::And(hn::Set(du, static_cast<lane>(word >> first)), hn::Load(du, powers));
  return hn::IfThenElseZero(hn::Ne(bits, hn::Zero(du)), hn::Set(du, lane{1}));
}

// The unsigned codes of values [first, first + L) of an int block, as uint16 or uint32 lanes.
template <int Bits, class DU>
INFUSE_FORCE_INLINE hn::Vec<DU> int_codes(DU du, const std::uint8_t* block, int first) {
  const hn::Rebind<std::uint8_t, DU> du8;
  if constexpr (Bits == 8) {
    return hn::PromoteTo(du, hn::LoadU(du8, block + first));
  } else if constexpr (Bits == 4) {
    const auto bytes = hn::PromoteTo(du, hn::LoadU(du8, block + (first & 15)));
    return hn::And(hn::ShiftRightSame(bytes, 4 * (first >> 4)), hn::Set(du, hn::TFromD<DU>{15}));
  } else {
    const auto bytes = hn::PromoteTo(du, hn::LoadU(du8, block + (first & 7)));
    const auto low =
        hn::And(hn::ShiftRightSame(bytes, 2 * (first >> 3)), hn::Set(du, hn::TFromD<DU>{3}));
    if constexpr (Bits == 2) {
      return low;
    } else {
      return hn::Or(low, hn::ShiftLeft<2>(bits_of(du, load_le32(block + 8), first)));
    }
  }
}

// The float of FP8 bits in uint32 lanes, exactly as bits_to_float: the magnitude's bits moved
// into float's exponent and significand, then scaled by a power of two (exact, subnormals too).
template <class Format, class D, class DU>
INFUSE_FORCE_INLINE hn::Vec<D> fp8_to_float(D d, DU du, hn::Vec<DU> bits) {
  using format = float_format<Format>;
  constexpr int shift = 23 - format::significand_bits;
  constexpr int rebias = 127 - format::exponent_bias;
  const auto magnitude = hn::And(bits, hn::Set(du, 0x7Fu));
  const auto sign = hn::ShiftLeft<24>(hn::And(bits, hn::Set(du, 0x80u)));
  auto value =
      hn::Mul(hn::BitCast(d, hn::ShiftLeft<shift>(magnitude)),
              hn::Set(d, infuse::detail::bits_as_float(std::uint32_t{127 + rebias} << 23)));
  auto value_bits = hn::BitCast(du, value);
  if constexpr (format::specials == infuse::detail::special_values::ieee) {
    // The top exponent: Inf with a zero significand, NaN otherwise (CUDA's canonical NaN).
    const hn::RebindToSigned<D> di;  // magnitudes are below 128: compare them as signed
    const auto top = hn::RebindMask(
        du, hn::Gt(hn::BitCast(di, magnitude), hn::Set(di, format::infinity_bits - 1)));
    const auto special = hn::IfThenElse(hn::Eq(magnitude, hn::Set(du, format::infinity_bits)),
                                        hn::Set(du, 0x7F800000u), hn::Set(du, 0x7FFFFFFFu));
    value_bits = hn::IfThenElse(top, special, value_bits);
  } else {
    const auto nan = hn::Eq(magnitude, hn::Set(du, format::magnitude_mask));
    value_bits = hn::IfThenElse(nan, hn::Set(du, 0x7FFFFFFFu), value_bits);
  }
  // NaN keeps its canonical positive bits; every other value gets its sign back.
  const auto is_nan = hn::Eq(value_bits, hn::Set(du, 0x7FFFFFFFu));
  return hn::BitCast(d, hn::IfThenElse(is_nan, value_bits, hn::Or(value_bits, sign)));
}

// Dequantized weights [first, first + L) of a block of scheme S, in one float vector.
template <class S, class D>
INFUSE_FORCE_INLINE hn::Vec<D> dequantize_chunk(D d, const std::uint8_t* block, int first,
                                                const typename S::params& p) {
  const hn::RebindToUnsigned<D> du;
  if constexpr (quant::is_int<S>) {
    const auto u = hn::ConvertTo(
        d, hn::BitCast(hn::RebindToSigned<D>(), int_codes<S::bits>(du, block, first)));
    return hn::Mul(hn::Set(d, p.scale), hn::Sub(u, hn::Set(d, p.zero)));
  } else if constexpr (quant::is_fp8<S>) {
    const hn::Rebind<std::uint8_t, D> du8;
    const auto bits = hn::PromoteTo(du, hn::LoadU(du8, block + first));
    return hn::Mul(hn::Set(d, p.scale), fp8_to_float<typename S::format>(d, du, bits));
  } else if constexpr (quant::is_bcq<S>) {
    auto w = hn::Set(d, p.offset);
    for (int i = 0; i < S::bits; ++i) {
      const auto positive =
          hn::RebindMask(d, hn::Ne(bits_of(du, load_le32(block + 4 * i), first), hn::Zero(du)));
      w = hn::Add(w, hn::IfThenElse(positive, hn::Set(d, p.alpha[i]), hn::Set(d, -p.alpha[i])));
    }
    return w;
  } else {
    static_assert(quant::is_none<S>, "infuse: the CPU gemv has no unpacking for this scheme");
    if constexpr (S::block_bytes == 4 * quant::block_size) {
      return hn::LoadU(d, reinterpret_cast<const float*>(block) + first);
    } else {
      // half and bfloat16 widen exactly: their bits are the top of a float's (bfloat16), or
      // converted by the hardware (half), as bits_to_float does.
      const auto bits =
          hn::PromoteTo(du, hn::LoadU(hn::Rebind<std::uint16_t, D>(),
                                      reinterpret_cast<const std::uint16_t*>(block) + first));
      if constexpr (std::is_same_v<S, quant::none<bfloat16>>) {
        return hn::BitCast(d, hn::ShiftLeft<16>(bits));
      } else {
        return hn::PromoteTo(d, hn::LoadU(hn::Rebind<hwy::float16_t, D>(),
                                          reinterpret_cast<const hwy::float16_t*>(block) + first));
      }
    }
  }
}

// The dot products of one row of W with Batch rows of float x. With few batch rows there are
// independent accumulator chains per chunk of a block, so that the latency of one FMA chain does
// not bound the throughput.
template <class S, int Batch>
struct float_rows {
  static constexpr int rows = 1;
  const float* x;
  std::int64_t x_stride;

  template <int Rows>
  void operator()(const quant::matrix<S, host_memory>& w, std::int64_t row,
                  float (&out)[Rows][Batch]) const {
    static_assert(Rows == 1, "the float kernel takes one row at a time");
    using tag = float_tag<S>;
    const tag d;
    constexpr int lanes = static_cast<int>(hn::MaxLanes(tag()));
    constexpr int chunks = quant::block_size / lanes;
    constexpr int chains = std::max(1, std::min(chunks, 4 / Batch));
    const std::int64_t group_blocks = w.group_size() / quant::block_size;
    const std::int64_t groups = w.groups_per_row();
    hn::Vec<tag> acc[Batch * chains];
    for (auto& a : acc) a = hn::Zero(d);
    const std::uint8_t* block = w.block(row, 0);
    const float* x_block = x;
    for (std::int64_t g = 0; g < groups; ++g) {
      const auto p = w.group_params(row, g);
      for (std::int64_t blk = 0; blk < group_blocks; ++blk) {
        for (int c = 0; c < chunks; ++c) {
          const auto weights = dequantize_chunk<S>(d, block, c * lanes, p);
          for (int b = 0; b < Batch; ++b) {
            auto& a = acc[b * chains + c % chains];
            a = hn::MulAdd(weights, hn::LoadU(d, x_block + b * x_stride + c * lanes), a);
          }
        }
        block += S::block_bytes;
        x_block += quant::block_size;
      }
    }
    for (int b = 0; b < Batch; ++b) {
      auto sum = acc[b * chains];
      for (int c = 1; c < chains; ++c) sum = hn::Add(sum, acc[b * chains + c]);
      out[0][b] = hn::GetLane(hn::SumOfLanes(d, sum));
    }
  }
};

// ---- int8 activations ----------------------------------------------------------------------
//
// x is quantized once per call into the workspace, per batch row: the int8 codes q (padded_k
// bytes, zero past k), the scales of x per int32 lane of a step of the VNNI kernel (or one per
// block in the portable layout), and per group of W the sum over its blocks of s_b * sum(q)_b,
// which takes the zero point out of the inner loop: sum (u - z) q = sum u q - z sum q. The VNNI
// kernel takes the implied zero of symmetric codes out in int32 instead: each lane's sum starts
// at -midpoint * (the sum of its q), stored per lane, so no zero term is left per row.
//
// AVX-512 VNNI (vpdpbusd: 64 unsigned code bytes times 64 signed x bytes into 16 int32 lanes)
// works in steps of 4 blocks (int4, int3, int2: one or two loads of codes unpack with shifts and
// masks into two vectors of 64 codes whose int32 lanes see the same blocks, so the two products
// add in int32) or 2 blocks (int8: one load). x is stored in the order the codes come out
// (step_position), and each int32 lane gets its block's scale from the stored lane scales.
// Elsewhere a portable Highway path widens codes and x to int16 and multiplies pairwise
// (ReorderWidenMulAccumulate), block by block, in input order.

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
inline constexpr bool has_vnni = true;
#else
inline constexpr bool has_vnni = false;
#endif

// Blocks per step of the VNNI kernel.
template <int Bits>
inline constexpr int step_blocks = Bits == 8 ? 2 : 4;

// Byte position of value v (0..31) of block q of a step in the vpdpbusd layout: bytes 0..63 go
// with the first vector of codes, 64..127 with the second.
template <int Bits>
constexpr int step_position(int q, int v) {
  if constexpr (Bits == 8) {
    return 32 * q + v;
  } else if constexpr (Bits == 4) {
    return 64 * (v >> 4) + 16 * q + (v & 15);  // low nibbles, then high nibbles
  } else {
    return 64 * (v >> 4) + 32 * ((v >> 3) & 1) + 8 * q + (v & 7);  // shifts 0, 2 | 4, 6
  }
}

// The block of its step whose bytes int32 lane l (0..15) sums, in either vector of codes.
template <int Bits>
constexpr int step_lane_block(int l) {
  return Bits == 8 ? l >> 3 : Bits == 4 ? l >> 2 : (l & 7) >> 1;
}

struct int8_x_row {
  const std::int8_t* q;           // (padded_k)
  const float* scales;            // (padded_k / 4): per int32 lane of a step, or per block
  const std::int32_t* lane_sums;  // (padded_k / 4): minus the sum of q per int32 lane of a step
  const float* group_sums;        // (groups of W per row)
};

// Each batch row starts on a cache line: q, the lane scales, the lane sums, the group sums.
struct int8_x_layout {
  std::int64_t padded_k;
  std::uint8_t* base;

  static int8_x_layout of(void* workspace, std::int64_t k) {
    auto address = reinterpret_cast<std::uintptr_t>(workspace);
    address = (address + 63) / 64 * 64;
    return {(k + 127) / 128 * 128, reinterpret_cast<std::uint8_t*>(address)};
  }
  std::int64_t row_bytes() const { return 3 * padded_k + (padded_k / 8 + 63) / 64 * 64; }
  std::int8_t* q(std::int64_t b) const {
    return reinterpret_cast<std::int8_t*>(base + b * row_bytes());
  }
  float* scales(std::int64_t b) const {
    return reinterpret_cast<float*>(base + b * row_bytes() + padded_k);
  }
  std::int32_t* lane_sums(std::int64_t b) const {
    return reinterpret_cast<std::int32_t*>(base + b * row_bytes() + 2 * padded_k);
  }
  float* group_sums(std::int64_t b) const {
    return reinterpret_cast<float*>(base + b * row_bytes() + 3 * padded_k);
  }
  int8_x_row row(std::int64_t b) const { return {q(b), scales(b), lane_sums(b), group_sums(b)}; }
};

// Quantizes one row of x (k floats) per block of 32, in the layout of the kernel: Highway vectors
// find each block's largest magnitude and round x / s_b with the float operations gemm/gemv.hpp
// documents, a block's codes go to their places in runs of 8 (consecutive in every layout).
template <int Bits, bool Vnni>
void quantize_activations(const float* x, std::int64_t k, std::int64_t group_size,
                          const int8_x_layout& layout, std::int64_t b) {
  using tag = hn::CappedTag<float, 16>;
  const tag d;
  const hn::RebindToSigned<tag> di;
  const hn::Rebind<std::int8_t, tag> d8;
  constexpr int lanes = static_cast<int>(hn::MaxLanes(tag()));
  constexpr int per_step = step_blocks<Bits>;
  constexpr int step_values = per_step * quant::block_size;
  std::int8_t* q = layout.q(b);
  float* scales = layout.scales(b);
  float* group_sums = layout.group_sums(b);
  std::memset(q, 0, static_cast<std::size_t>(layout.padded_k));
  std::memset(scales, 0, static_cast<std::size_t>(layout.padded_k));
  const std::int64_t blocks = k / quant::block_size;
  for (std::int64_t g = 0; g < k / group_size; ++g) group_sums[g] = 0.0f;
  for (std::int64_t blk = 0; blk < blocks; ++blk) {
    const float* xb = x + blk * quant::block_size;
    auto amax = hn::Zero(d);
    for (int c = 0; c < quant::block_size; c += lanes) {
      amax = hn::Max(amax, hn::Abs(hn::LoadU(d, xb + c)));
    }
    const float scale = hn::GetLane(hn::MaxOfLanes(d, amax)) / 127.0f;
    alignas(32) std::int8_t codes[quant::block_size];
    auto sums = hn::Zero(di);
    for (int c = 0; c < quant::block_size; c += lanes) {
      auto v = scale > 0.0f ? hn::NearestInt(hn::Div(hn::LoadU(d, xb + c), hn::Set(d, scale)))
                            : hn::Zero(di);
      v = hn::Min(hn::Max(v, hn::Set(di, -127)), hn::Set(di, 127));
      sums = hn::Add(sums, v);
      hn::StoreU(hn::DemoteTo(d8, v), d8, codes + c);
    }
    const std::int64_t step = blk / per_step;
    const int in_step = static_cast<int>(blk % per_step);
    for (int run = 0; run < quant::block_size; run += 8) {
      const std::int64_t at = Vnni ? step * step_values + step_position<Bits>(in_step, run)
                                   : blk * quant::block_size + run;
      std::memcpy(q + at, codes + run, 8);
    }
    if constexpr (Vnni) {
      for (int l = 0; l < 16; ++l) {
        if (step_lane_block<Bits>(l) == in_step) scales[step * 16 + l] = scale;
      }
    } else {
      scales[blk] = scale;
    }
    group_sums[blk * quant::block_size / group_size] +=
        scale * static_cast<float>(hn::GetLane(hn::SumOfLanes(di, sums)));
  }
  if constexpr (Vnni) {
    // Lane l of a step sums bytes 4l..4l+3 of each of its (one or two) vectors of 64 codes.
    std::int32_t* lane_sums = layout.lane_sums(b);
    for (std::int64_t t = 0; t < layout.padded_k / step_values; ++t) {
      const std::int8_t* step_q = q + t * step_values;
      for (int l = 0; l < 16; ++l) {
        std::int32_t sum = 0;
        for (int v = 0; v < step_values; v += 64) {
          for (int i = 0; i < 4; ++i) sum += step_q[v + 4 * l + i];
        }
        lane_sums[t * 16 + l] = -sum;
      }
    }
  }
}

// Dot products of Rows rows of W with Batch rows of int8 x, portable: block by block, codes and
// x widened to int16, multiplied pairwise into int32 lanes of that block alone.
template <class S, int Batch, int Rows>
void int8_rows_portable(const quant::matrix<S, host_memory>& w, std::int64_t row,
                        const int8_x_row (&x)[Batch], float (&out)[Rows][Batch]) {
  using d16_tag = hn::CappedTag<std::int16_t, max_chunk_lanes<S>>;
  const d16_tag d16;
  const hn::RebindToUnsigned<d16_tag> du16;
  const hn::Repartition<std::int32_t, d16_tag> d32;
  const hn::Rebind<float, decltype(d32)> df;
  const hn::Rebind<std::int8_t, d16_tag> d8;
  constexpr int lanes = static_cast<int>(hn::MaxLanes(d16_tag()));
  const std::int64_t group_blocks = w.group_size() / quant::block_size;
  const std::int64_t groups = w.groups_per_row();
  hn::Vec<decltype(df)> acc[Rows][Batch];
  for (auto& r : acc)
    for (auto& a : r) a = hn::Zero(df);
  for (std::int64_t g = 0; g < groups; ++g) {
    hn::Vec<decltype(df)> acc_group[Rows][Batch];
    for (auto& r : acc_group)
      for (auto& a : r) a = hn::Zero(df);
    for (std::int64_t blk = g * group_blocks; blk < (g + 1) * group_blocks; ++blk) {
      hn::Vec<decltype(d32)> sum0[Rows][Batch], sum1[Rows][Batch];
      for (int r = 0; r < Rows; ++r)
        for (int b = 0; b < Batch; ++b) sum0[r][b] = sum1[r][b] = hn::Zero(d32);
      for (int c = 0; c < quant::block_size; c += lanes) {
        hn::Vec<d16_tag> xs[Batch];
        for (int b = 0; b < Batch; ++b) {
          xs[b] = hn::PromoteTo(d16, hn::LoadU(d8, x[b].q + blk * quant::block_size + c));
        }
        for (int r = 0; r < Rows; ++r) {
          const auto codes = hn::BitCast(d16, int_codes<S::bits>(du16, w.block(row + r, blk), c));
          for (int b = 0; b < Batch; ++b) {
            sum0[r][b] = hn::ReorderWidenMulAccumulate(d32, codes, xs[b], sum0[r][b], sum1[r][b]);
          }
        }
      }
      for (int b = 0; b < Batch; ++b) {
        const auto scale = hn::Set(df, x[b].scales[blk]);
        for (int r = 0; r < Rows; ++r) {
          const auto dot = hn::ConvertTo(df, hn::Add(sum0[r][b], sum1[r][b]));
          acc_group[r][b] = hn::MulAdd(dot, scale, acc_group[r][b]);
        }
      }
    }
    for (int r = 0; r < Rows; ++r) {
      const auto scale = hn::Set(df, w.group_params(row + r, g).scale);
      for (int b = 0; b < Batch; ++b) acc[r][b] = hn::MulAdd(scale, acc_group[r][b], acc[r][b]);
    }
  }
  for (int r = 0; r < Rows; ++r) {
    for (int b = 0; b < Batch; ++b) out[r][b] = hn::GetLane(hn::SumOfLanes(df, acc[r][b]));
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)

// Full unrolling of the loops over rows and batch rows keeps accumulators in registers.
#define INFUSE_UNROLL _Pragma("GCC unroll 16")

// Bytes of codes a step of `blocks` blocks loads (all of a step unless it is the last one).
template <int Bits>
INFUSE_FORCE_INLINE __mmask64 step_mask(int blocks) {
  const int bytes = blocks * Bits * 4;
  return bytes >= 64 ? ~__mmask64{0} : (__mmask64{1} << bytes) - 1;
}

// A step's codes unpacked for vpdpbusd, in step_position order: `first` meets the first vector
// of x, `second` the second (int8: `first` only).
struct step_codes {
  __m512i first;
  __m512i second;
};

// Unpacks a step's codes. Tail: only `blocks` blocks exist; the rest reads as zero.
template <int Bits, bool Tail>
INFUSE_FORCE_INLINE step_codes unpack_step(const std::uint8_t* codes, int blocks) {
  if constexpr (Bits == 8) {
    const __m512i u =
        Tail ? _mm512_maskz_loadu_epi8(step_mask<8>(blocks), codes) : _mm512_loadu_si512(codes);
    return {u, u};
  } else if constexpr (Bits == 4) {
    const __m512i bytes =
        Tail ? _mm512_maskz_loadu_epi8(step_mask<4>(blocks), codes) : _mm512_loadu_si512(codes);
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    return {_mm512_and_si512(bytes, nibble), _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble)};
  } else {
    // The low two bits of the 4 blocks as 32 bytes, in both halves; shifted by 0 | 2 and 4 | 6.
    __m512i low_bits;
    __m128i high_masks = _mm_setzero_si128();
    if constexpr (Bits == 2) {
      low_bits = _mm512_broadcast_i64x4(
          Tail ? _mm512_castsi512_si256(_mm512_maskz_loadu_epi8(step_mask<2>(blocks), codes))
               : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes)));
    } else {
      // Blocks of 12 bytes: 8 bytes of low bits, then the word of bit 2. Gather the low bytes
      // (byte 8q + j from 12q + j) and bytes t of the words into mask m of the two vectors.
      const __m512i raw =
          _mm512_maskz_loadu_epi8(Tail ? step_mask<3>(blocks) : 0xFFFFFFFFFFFFull, codes);
      alignas(64) static constexpr std::uint8_t gather[64] = {
          0,  1,  2,  3,  4,  5,  6,  7,  12, 13, 14, 15, 16, 17, 18, 19, 24, 25, 26, 27, 28, 29,
          30, 31, 36, 37, 38, 39, 40, 41, 42, 43, 0,  1,  2,  3,  4,  5,  6,  7,  12, 13, 14, 15,
          16, 17, 18, 19, 24, 25, 26, 27, 28, 29, 30, 31, 36, 37, 38, 39, 40, 41, 42, 43};
      low_bits = _mm512_permutexvar_epi8(_mm512_load_si512(gather), raw);
      // Mask of vector m (values 16m..16m+15): byte 4h + q = byte 2m + h of block q's word.
      alignas(64) static constexpr std::uint8_t words[64] = {8,  20, 32, 44, 9,  21, 33, 45,
                                                             10, 22, 34, 46, 11, 23, 35, 47};
      high_masks = _mm512_castsi512_si128(_mm512_permutexvar_epi8(_mm512_load_si512(words), raw));
    }
    const __m512i two_bits = _mm512_set1_epi8(3);
    __m512i first = _mm512_and_si512(
        _mm512_srlv_epi64(low_bits, _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0)), two_bits);
    __m512i second = _mm512_and_si512(
        _mm512_srlv_epi64(low_bits, _mm512_set_epi64(6, 6, 6, 6, 4, 4, 4, 4)), two_bits);
    if constexpr (Bits == 3) {
      const __m512i four = _mm512_set1_epi8(4);
      first = _mm512_or_si512(
          first, _mm512_maskz_mov_epi8(_cvtu64_mask64(_mm_cvtsi128_si64(high_masks)), four));
      second = _mm512_or_si512(
          second, _mm512_maskz_mov_epi8(_cvtu64_mask64(_mm_extract_epi64(high_masks, 1)), four));
    }
    return {first, second};
  }
}

// int32 dot products of unpacked codes with a step's x (one vector for int8, two otherwise),
// added to `sums`.
template <int Bits>
INFUSE_FORCE_INLINE __m512i step_dot(const step_codes& codes, const __m512i (&x)[2], __m512i sums) {
  if constexpr (Bits == 8) {
    return _mm512_dpbusd_epi32(sums, codes.first, x[0]);
  } else {
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(sums, codes.first, x[0]), codes.second, x[1]);
  }
}

// The same from the packed codes.
template <int Bits, bool Tail>
INFUSE_FORCE_INLINE __m512i step_dot(const std::uint8_t* codes, const __m512i (&x)[2], __m512i sums,
                                     int blocks) {
  return step_dot<Bits>(unpack_step<Bits, Tail>(codes, blocks), x, sums);
}

// Steps of the VNNI kernel per group of W when every group holds whole steps (known at compile
// time: no partial step, a loop the compiler unrolls), else 0.
template <class S>
inline constexpr std::int64_t fixed_group_steps =
    S::group > 0 && S::group % (step_blocks<S::bits> * quant::block_size) == 0
        ? S::group / (step_blocks<S::bits> * quant::block_size)
        : 0;

// Dot products of Rows rows of W with Batch rows of int8 x with vpdpbusd, a step of blocks at a
// time. SameGroup: all blocks of every step share a group (groups of whole steps, or one group
// per row), so a group's products gather in float before its scale.
template <class S, int Batch, int Rows, bool SameGroup>
void int8_rows_vnni(const quant::matrix<S, host_memory>& w, std::int64_t row,
                    const int8_x_row (&x)[Batch], float (&out)[Rows][Batch]) {
  constexpr int bits = S::bits;
  constexpr int per_step = step_blocks<bits>;
  constexpr std::int64_t step_bytes = per_step * S::block_bytes;
  constexpr std::int64_t step_values = per_step * quant::block_size;
  const std::int64_t blocks = w.blocks_per_row();
  const std::int64_t steps = (blocks + per_step - 1) / per_step;
  const std::int64_t group_blocks = w.group_size() / quant::block_size;
  const std::uint8_t* codes[Rows];
  INFUSE_UNROLL for (int r = 0; r < Rows; ++r) codes[r] = w.block(row + r, 0);
  // The rows of the next pass, when there is one, are fetched into L2 step by step alongside:
  // hardware prefetchers restart on every short row (TinyLlama's k = 2048: 1 KiB of int4 codes).
  const std::int64_t next_pass = row + 2 * Rows <= w.rows ? Rows * blocks * S::block_bytes : 0;
  __m512 acc[Rows][Batch];
  INFUSE_UNROLL for (auto& r : acc) INFUSE_UNROLL for (auto& a : r) a = _mm512_setzero_ps();

  // Step t's dot products for every row and batch row, as floats, to sink(t, r, b, dots).
  const auto step_dots = [&]<bool Tail>(std::int64_t t, auto&& sink) {
    const int present = Tail ? static_cast<int>(blocks - t * per_step) : per_step;
    __m512i xq[Batch][2];
    __m512i start[Batch];
    INFUSE_UNROLL for (int b = 0; b < Batch; ++b) {
      xq[b][0] = _mm512_loadu_si512(x[b].q + t * step_values);
      xq[b][1] = per_step == 4 ? _mm512_loadu_si512(x[b].q + t * step_values + 64) : xq[b][0];
      // Symmetric codes: each lane starts at -midpoint * (its sum of q) and so sums (u - zero) q.
      start[b] = S::has_zero
                     ? _mm512_setzero_si512()
                     : _mm512_slli_epi32(_mm512_loadu_si512(x[b].lane_sums + 16 * t), bits - 1);
    }
    if (next_pass != 0) {
      INFUSE_UNROLL for (int r = 0; r < Rows; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(codes[r] + next_pass + t * step_bytes),
                     _MM_HINT_T1);
      }
    }
    INFUSE_UNROLL for (int r = 0; r < Rows; ++r) {
      INFUSE_UNROLL for (int b = 0; b < Batch; ++b) {
        sink(t, r, b,
             _mm512_cvtepi32_ps(
                 step_dot<bits, Tail>(codes[r] + t * step_bytes, xq[b], start[b], present)));
      }
    }
  };
  const auto each_step = [&](std::int64_t first, std::int64_t end, auto&& sink) {
    for (std::int64_t t = first; t < end; ++t) {
      if ((t + 1) * per_step <= blocks) {
        step_dots.template operator()<false>(t, sink);
      } else {
        step_dots.template operator()<true>(t, sink);
      }
    }
  };

  if constexpr (SameGroup) {
    constexpr std::int64_t fixed_steps = fixed_group_steps<S>;
    const std::int64_t group_steps = w.groups_per_row() == 1 ? steps : group_blocks / per_step;
    for (std::int64_t g = 0; g < w.groups_per_row(); ++g) {
      __m512 acc_group[Rows][Batch];
      INFUSE_UNROLL for (auto& r : acc_group) INFUSE_UNROLL for (auto& a : r) a =
          _mm512_setzero_ps();
      const auto gather = [&](std::int64_t t, int r, int b, __m512 dots) {
        acc_group[r][b] =
            _mm512_fmadd_ps(dots, _mm512_loadu_ps(x[b].scales + 16 * t), acc_group[r][b]);
      };
      if constexpr (fixed_steps > 0) {
        INFUSE_UNROLL for (std::int64_t t = g * fixed_steps; t < (g + 1) * fixed_steps; ++t) {
          step_dots.template operator()<false>(t, gather);
        }
      } else {
        each_step(g * group_steps, std::min(steps, (g + 1) * group_steps), gather);
      }
      INFUSE_UNROLL for (int r = 0; r < Rows; ++r) {
        const __m512 scale = _mm512_set1_ps(w.group_params(row + r, g).scale);
        INFUSE_UNROLL for (int b = 0; b < Batch; ++b) {
          acc[r][b] = _mm512_fmadd_ps(scale, acc_group[r][b], acc[r][b]);
        }
      }
    }
  } else {
    // Groups that end inside a step: each lane gets its block's group scale.
    alignas(64) static constexpr std::int32_t lane_blocks[16] = {
        step_lane_block<bits>(0),  step_lane_block<bits>(1),  step_lane_block<bits>(2),
        step_lane_block<bits>(3),  step_lane_block<bits>(4),  step_lane_block<bits>(5),
        step_lane_block<bits>(6),  step_lane_block<bits>(7),  step_lane_block<bits>(8),
        step_lane_block<bits>(9),  step_lane_block<bits>(10), step_lane_block<bits>(11),
        step_lane_block<bits>(12), step_lane_block<bits>(13), step_lane_block<bits>(14),
        step_lane_block<bits>(15)};
    const __m512i lane_block = _mm512_load_si512(lane_blocks);
    __m512 weight_scales[Rows];
    std::int64_t scales_of = -1;
    each_step(0, steps, [&](std::int64_t t, int r, int b, __m512 dots) {
      if (scales_of != t) {
        for (int rr = 0; rr < Rows; ++rr) {
          alignas(16) float block_scales[4] = {};
          for (int q = 0; q < per_step; ++q) {
            const std::int64_t blk = std::min(t * per_step + q, blocks - 1);
            block_scales[q] = w.group_params(row + rr, blk / group_blocks).scale;
          }
          weight_scales[rr] =
              _mm512_permutexvar_ps(lane_block, _mm512_castps128_ps512(_mm_load_ps(block_scales)));
        }
        scales_of = t;
      }
      acc[r][b] = _mm512_fmadd_ps(
          dots, _mm512_mul_ps(weight_scales[r], _mm512_loadu_ps(x[b].scales + 16 * t)), acc[r][b]);
    });
  }
  INFUSE_UNROLL for (int r = 0; r < Rows; ++r) {
    INFUSE_UNROLL for (int b = 0; b < Batch; ++b) out[r][b] = _mm512_reduce_add_ps(acc[r][b]);
  }
}

#undef INFUSE_UNROLL
#endif

// Dot products of rows of W with int8 x: the VNNI kernel (Vnni) or the portable one, then the
// zero-point term. Several rows at once for small batches, so that x's loads serve them all.
template <class S, int Batch, bool Vnni>
struct int8_rows {
  static constexpr int rows = Batch == 1 ? 4 : Batch == 2 ? 2 : 1;
  int8_x_row x[Batch];
  bool same_group;  // every step of blocks within one group

  template <int Rows>
  void operator()(const quant::matrix<S, host_memory>& w, std::int64_t row,
                  float (&out)[Rows][Batch]) const {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
    if constexpr (Vnni) {
      if (same_group) {
        int8_rows_vnni<S, Batch, Rows, true>(w, row, x, out);
      } else {
        int8_rows_vnni<S, Batch, Rows, false>(w, row, x, out);
      }
    } else {
      int8_rows_portable<S, Batch, Rows>(w, row, x, out);
    }
#else
    static_assert(!Vnni, "the VNNI kernel needs AVX-512 VNNI, BW and VBMI");
    int8_rows_portable<S, Batch, Rows>(w, row, x, out);
#endif
    if constexpr (Vnni && !S::has_zero) return;  // the midpoint came out in int32
    for (int r = 0; r < Rows; ++r) {
      float zero_terms[Batch] = {};
      for (std::int64_t g = 0; g < w.groups_per_row(); ++g) {
        const auto p = w.group_params(row + r, g);
        for (int b = 0; b < Batch; ++b) zero_terms[b] += p.scale * p.zero * x[b].group_sums[g];
      }
      for (int b = 0; b < Batch; ++b) out[r][b] -= zero_terms[b];
    }
  }
};

// What happens to each dot product on its way to y.
struct epilogue {
  const float* bias;
  act activation;
  bool gated;
  act gate;
  const float* residual;
  std::int64_t residual_stride;
  float* y;
  std::int64_t y_stride;

  INFUSE_FORCE_INLINE void store(std::int64_t b, std::int64_t row, float v, float up) const {
    if (gated) {
      v = apply(gate, v) * up;
    } else {
      if (bias != nullptr) v += bias[row];
      v = apply(activation, v);
    }
    if (residual != nullptr) v += residual[b * residual_stride + row];
    y[b * y_stride + row] = v;
  }
};

// Rows [row_begin, row_end) of W (and of w_up, when gated) times batch rows [b0, b0 + Batch).
template <class S, int Batch, class Kernel>
void rows_times_batch(const Kernel& kernel, const quant::matrix<S, host_memory>& w,
                      const quant::matrix<S, host_memory>* w_up, std::int64_t row_begin,
                      std::int64_t row_end, std::int64_t b0, const epilogue& e) {
  const auto step = [&]<int Rows>(std::int64_t row) {
    float dots[Rows][Batch];
    float ups[Rows][Batch] = {};
    kernel.template operator()<Rows>(w, row, dots);
    if (w_up != nullptr) kernel.template operator()<Rows>(*w_up, row, ups);
    for (int r = 0; r < Rows; ++r) {
      for (int b = 0; b < Batch; ++b) e.store(b0 + b, row + r, dots[r][b], ups[r][b]);
    }
  };
  std::int64_t row = row_begin;
  for (; row + Kernel::rows <= row_end; row += Kernel::rows) {
    step.template operator()<Kernel::rows>(row);
  }
  for (; row < row_end; ++row) step.template operator()<1>(row);
}

// Rows of W per tile: a quarter of a typical 1 MiB L2 of codes, so the tile stays in cache
// while the batch tiles pass over it.
template <class S>
std::int64_t tile_rows(std::int64_t cols) {
  constexpr std::int64_t tile_bytes = 256 * 1024;
  const std::int64_t row_bytes = cols / quant::block_size * S::block_bytes;
  return std::max<std::int64_t>(1, tile_bytes / row_bytes);
}

// The threads take contiguous, even ranges of rows (in passes of 4, the most the kernels take at
// once), and walk each range in tiles; each tile meets every batch tile of up to 8 rows of x.
// make_kernel.template operator()<Batch>(b0) gives the kernel of batch rows [b0, b0 + Batch).
template <class S, class MakeKernel>
void run_tiles(const exec::cpu& exec, const quant::matrix<S, host_memory>& w,
               const quant::matrix<S, host_memory>* w_up, std::int64_t batch, const epilogue& e,
               MakeKernel&& make_kernel) {
  constexpr std::int64_t pass = 4;
  const std::int64_t rows_per_tile =
      std::max<std::int64_t>(pass, tile_rows<S>(w.cols) / (w_up != nullptr ? 2 : 1) / pass * pass);
  const std::int64_t passes = (w.rows + pass - 1) / pass;
  exec.parallel_for_ranges(passes, [&](int, std::int64_t pass_begin, std::int64_t pass_end) {
    const std::int64_t end = std::min(w.rows, pass_end * pass);
    for (std::int64_t row_begin = pass_begin * pass; row_begin < end; row_begin += rows_per_tile) {
      const std::int64_t row_end = std::min(end, row_begin + rows_per_tile);
      for (std::int64_t b0 = 0; b0 < batch; b0 += max_batch_tile) {
        const int count = static_cast<int>(std::min<std::int64_t>(max_batch_tile, batch - b0));
        [&]<int... Batch>(std::integer_sequence<int, Batch...>) {
          ((count == Batch + 1
                ? rows_times_batch<S, Batch + 1>(make_kernel.template operator()<Batch + 1>(b0), w,
                                                 w_up, row_begin, row_end, b0, e)
                : void()),
           ...);
        }
        (std::make_integer_sequence<int, max_batch_tile>());
      }
    }
  });
}

// The whole product with int8 activations: x quantized into the workspace (in the layout of the
// VNNI kernel when Vnni), then the tiles.
template <bool Vnni, class S>
void run_int8(const exec::cpu& exec, const quant::matrix<S, host_memory>& w,
              const quant::matrix<S, host_memory>* w_up, host_view<const float, 2> x,
              const epilogue& e, const int8_activations& activations) {
  const std::int64_t batch = x.extent(0);
  const auto layout = int8_x_layout::of(activations.workspace, w.cols);
  exec.parallel_for(batch, [&](std::int64_t b) {
    quantize_activations<S::bits, Vnni>(&x(b, 0), w.cols, w.group_size(), layout, b);
  });
  const bool same_group =
      w.group_size() % (step_blocks<S::bits> * quant::block_size) == 0 || w.groups_per_row() == 1;
  run_tiles(exec, w, w_up, batch, e, [&]<int Batch>(std::int64_t b0) {
    int8_rows<S, Batch, Vnni> kernel{{}, same_group};
    for (int b = 0; b < Batch; ++b) kernel.x[b] = layout.row(b0 + b);
    return kernel;
  });
}

// x(b, input_order[c]) into the caller's input workspace, as the x the kernels read.
inline host_view<const float, 2> gather_inputs(const exec::cpu& exec, host_view<const float, 2> x,
                                               const gemv_options& options) {
  const std::int64_t k = x.extent(1);
  exec.parallel_for(x.extent(0), [&](std::int64_t b) {
    float* row = options.input_workspace + b * k;
    for (std::int64_t c = 0; c < k; ++c) row[c] = x(b, options.input_order[c]);
  });
  return host_view<const float, 2>(options.input_workspace, {x.extent(0), k});
}

// The whole product of bcq weights by table lookups: the tables of x built into the workspace,
// then the tiles.
template <class S>
void run_lut(const exec::cpu& exec, const quant::matrix<S, host_memory>& w,
             const quant::matrix<S, host_memory>* w_up, host_view<const float, 2> x,
             const epilogue& e, const lut_activations& activations) {
  const std::int64_t batch = x.extent(0);
  const auto layout = lut_x_layout::of(activations.workspace, w.cols);
  exec.parallel_for(batch, [&](std::int64_t b) { build_lut_tables(&x(b, 0), layout, b); });
  run_tiles(exec, w, w_up, batch, e, [&]<int Batch>(std::int64_t b0) {
    lut_rows<S, Batch> kernel{};
    for (int b = 0; b < Batch; ++b) {
      kernel.tables[b] = layout.tables(b0 + b);
      kernel.block_sums[b] = layout.block_sums(b0 + b);
    }
    return kernel;
  });
}

}  // namespace detail

}  // namespace infuse::gemm::cpu

namespace infuse::gemm::detail {

template <>
struct gemv_body<exec::cpu> {
  template <class S>
  static void run(const exec::cpu& exec, const quant::matrix<S, host_memory>& w,
                  host_view<const float, 2> x, host_view<float, 2> y, const gemv_options& options) {
    run_fused(exec, w, static_cast<const quant::matrix<S, host_memory>*>(nullptr), x, y, options,
              act::none, float_activations{});
  }

  template <class S, class Activations>
  static void run_fused(const exec::cpu& exec, const quant::matrix<S, host_memory>& w,
                        const quant::matrix<S, host_memory>* w_up, host_view<const float, 2> x,
                        host_view<float, 2> y, const gemv_options& options, act gate,
                        const Activations& activations) {
    if (options.input_order != nullptr) x = cpu::detail::gather_inputs(exec, x, options);
    const cpu::detail::epilogue e{
        options.bias,     options.activation,
        w_up != nullptr,  gate,
        options.residual, options.residual_stride == 0 ? w.rows : options.residual_stride,
        y.data(),         y.stride(0)};
    if constexpr (std::is_same_v<Activations, int8_activations>) {
      cpu::detail::run_int8<cpu::detail::has_vnni>(exec, w, w_up, x, e, activations);
    } else if constexpr (std::is_same_v<Activations, lut_activations>) {
      cpu::detail::run_lut(exec, w, w_up, x, e, activations);
    } else {
      cpu::detail::run_tiles(exec, w, w_up, x.extent(0), e, [&]<int Batch>(std::int64_t b0) {
        return cpu::detail::float_rows<S, Batch>{&x(b0, 0), x.stride(0)};
      });
    }
  }
};

}  // namespace infuse::gemm::detail
