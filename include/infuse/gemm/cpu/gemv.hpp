// The CPU body of infuse::gemv (gemm/gemv.hpp): Highway SIMD, OpenMP threads over tiles of rows.
//
// Each thread takes a contiguous range of row tiles. A tile is as many rows of W as fit in a
// quarter of L2 (at least one); for each batch tile of up to 8 rows of x the kernel walks the W
// tile once: per block of 32 inputs it unpacks the codes chunk by chunk (L float lanes) into
// dequantized weights, in registers, and multiplies them into one accumulator per batch row.
// Batch 1..8 is one batch tile, so W streams from memory exactly once; larger batches re-read each
// W tile from cache, not from memory.
//
// Dequantization in registers uses the same float operations, in the same order, as the scheme's
// INFUSE_HOST_DEVICE value(): a weight here equals quant::dequantize's bit for bit.
#pragma once

#include <hwy/highway.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "infuse/core/float_types.hpp"
#include "infuse/exec/cpu.hpp"
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

template <class T>
inline constexpr bool is_int = false;
template <int Bits, int Group, class Zero>
inline constexpr bool is_int<quant::int_<Bits, Group, Zero>> = true;
template <class T>
inline constexpr bool is_fp8 = false;
template <class F, int G>
inline constexpr bool is_fp8<quant::fp8<F, G>> = true;
template <class T>
inline constexpr bool is_bcq = false;
template <int Bits, int Group>
inline constexpr bool is_bcq<quant::bcq<Bits, Group>> = true;
template <class T>
inline constexpr bool is_none = false;
template <class T>
inline constexpr bool is_none<quant::none<T>> = true;

INFUSE_FORCE_INLINE std::uint32_t load_le32(const std::uint8_t* p) {
  std::uint32_t word;
  std::memcpy(&word, p, sizeof(word));  // x86 and the other Highway targets we build are LE
  return word;
}

// Bit (first + lane) of `word` in each lane, as 0 or 1.
template <class DU>
INFUSE_FORCE_INLINE hn::Vec<DU> bits_of(DU du, std::uint32_t word, int first) {
  const auto shifts = hn::Iota(du, static_cast<std::uint32_t>(first));
  return hn::And(hn::Shr(hn::Set(du, word), shifts), hn::Set(du, 1u));
}

// The unsigned codes of values [first, first + L) of an int block, as uint32 lanes.
template <int Bits, class DU>
INFUSE_FORCE_INLINE hn::Vec<DU> int_codes(DU du, const std::uint8_t* block, int first) {
  const hn::Rebind<std::uint8_t, DU> du8;
  if constexpr (Bits == 8) {
    return hn::PromoteTo(du, hn::LoadU(du8, block + first));
  } else if constexpr (Bits == 4) {
    const auto bytes = hn::PromoteTo(du, hn::LoadU(du8, block + (first & 15)));
    return hn::And(hn::ShiftRightSame(bytes, 4 * (first >> 4)), hn::Set(du, 15u));
  } else {
    const auto bytes = hn::PromoteTo(du, hn::LoadU(du8, block + (first & 7)));
    const auto low = hn::And(hn::ShiftRightSame(bytes, 2 * (first >> 3)), hn::Set(du, 3u));
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
  if constexpr (is_int<S>) {
    const auto u = hn::ConvertTo(
        d, hn::BitCast(hn::RebindToSigned<D>(), int_codes<S::bits>(du, block, first)));
    return hn::Mul(hn::Set(d, p.scale), hn::Sub(u, hn::Set(d, p.zero)));
  } else if constexpr (is_fp8<S>) {
    const hn::Rebind<std::uint8_t, D> du8;
    const auto bits = hn::PromoteTo(du, hn::LoadU(du8, block + first));
    return hn::Mul(hn::Set(d, p.scale), fp8_to_float<typename S::format>(d, du, bits));
  } else if constexpr (is_bcq<S>) {
    auto w = hn::Set(d, p.offset);
    for (int i = 0; i < S::bits; ++i) {
      const auto positive =
          hn::RebindMask(d, hn::Ne(bits_of(du, load_le32(block + 4 * i), first), hn::Zero(du)));
      w = hn::Add(w, hn::IfThenElse(positive, hn::Set(d, p.alpha[i]), hn::Set(d, -p.alpha[i])));
    }
    return w;
  } else {
    static_assert(is_none<S>, "infuse: the CPU gemv has no unpacking for this scheme");
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

// y[b][row] for rows [row_begin, row_end) and Batch rows of x: the micro-kernel. With few batch
// rows there are independent accumulator chains per chunk of a block, so that the latency of one
// FMA chain does not bound the throughput.
template <class S, int Batch>
void rows_times_batch(const quant::matrix<S, host_memory>& w, const float* x, std::int64_t x_stride,
                      float* y, std::int64_t y_stride, std::int64_t row_begin,
                      std::int64_t row_end) {
  using tag = float_tag<S>;
  const tag d;
  constexpr int lanes = static_cast<int>(hn::MaxLanes(tag()));
  constexpr int chunks = quant::block_size / lanes;
  constexpr int chains = std::max(1, std::min(chunks, 4 / Batch));
  const std::int64_t group_blocks = w.group_size() / quant::block_size;
  const std::int64_t groups = w.groups_per_row();
  for (std::int64_t row = row_begin; row < row_end; ++row) {
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
      y[b * y_stride + row] = hn::GetLane(hn::SumOfLanes(d, sum));
    }
  }
}

template <class S, int... Batch>
void dispatch_batch(int batch, std::integer_sequence<int, Batch...>,
                    const quant::matrix<S, host_memory>& w, const float* x, std::int64_t x_stride,
                    float* y, std::int64_t y_stride, std::int64_t row_begin, std::int64_t row_end) {
  ((batch == Batch + 1
        ? rows_times_batch<S, Batch + 1>(w, x, x_stride, y, y_stride, row_begin, row_end)
        : void()),
   ...);
}

// Rows of W per tile: a quarter of a typical 1 MiB L2 of codes, so the tile stays in cache
// while the batch tiles pass over it.
template <class S>
std::int64_t tile_rows(std::int64_t cols) {
  constexpr std::int64_t tile_bytes = 256 * 1024;
  const std::int64_t row_bytes = cols / quant::block_size * S::block_bytes;
  return std::max<std::int64_t>(1, tile_bytes / row_bytes);
}

}  // namespace detail

}  // namespace infuse::gemm::cpu

namespace infuse::gemm::detail {

template <>
struct gemv_body<exec::cpu> {
  template <class S>
  static void run(const exec::cpu& exec, const quant::matrix<S, host_memory>& w,
                  host_view<const float, 2> x, host_view<float, 2> y, const gemv_options&) {
    const std::int64_t batch = x.extent(0);
    // Small batches: a row tile per thread step is enough; keep tiles small enough that every
    // thread gets several, for balance.
    const std::int64_t rows_per_tile = std::min<std::int64_t>(
        cpu::detail::tile_rows<S>(w.cols),
        std::max<std::int64_t>(1, w.rows / (4 * std::int64_t{exec.threads()})));
    const std::int64_t tiles = (w.rows + rows_per_tile - 1) / rows_per_tile;
    exec.parallel_for_ranges(tiles, [&](int, std::int64_t tile_begin, std::int64_t tile_end) {
      for (std::int64_t tile = tile_begin; tile < tile_end; ++tile) {
        const std::int64_t row_begin = tile * rows_per_tile;
        const std::int64_t row_end = std::min(w.rows, row_begin + rows_per_tile);
        for (std::int64_t b = 0; b < batch; b += cpu::max_batch_tile) {
          const int count =
              static_cast<int>(std::min<std::int64_t>(cpu::max_batch_tile, batch - b));
          cpu::detail::dispatch_batch<S>(
              count, std::make_integer_sequence<int, cpu::max_batch_tile>(), w, &x(b, 0),
              x.stride(0), &y(b, 0), y.stride(0), row_begin, row_end);
        }
      }
    });
  }
};

}  // namespace infuse::gemm::detail
