// The CPU body of attention::decode (attention/attention.hpp): OpenMP threads, Highway SIMD.
//
// Three passes over the units of work, one unit per (sequence, KV head):
//   1. select: the policy's select() writes the unit's token ranges (checked: clipped to the
//      sequence, ascending, disjoint); the selected tokens are cut into split-KV chunks of
//      attention::split_tokens;
//   2. attend: every chunk, on any thread, walks its ranges a tile (up to score_tile tokens of
//      one page) at a time, requesting the next tile's records before reading this one. Scores:
//      a few K vectors at a time against a run of the group's query heads, each chunk of each K
//      vector unpacked in registers (the CPU gemv's unpacking, bit-exact with the scheme's
//      value()) and multiplied by every head of the run, one accumulator per (head, token), all
//      summed across lanes at once; then the score transform (vectorized when it is a scale
//      alone) and an online softmax per head over the tile. V: each chunk of each V vector is
//      unpacked in registers once and added, weighted, to every head's accumulator. Each K and V
//      vector is read from memory once per group;
//   3. merge: the thread that finishes a unit's last chunk merges the unit's chunks as softmax
//      states (max, sum, unnormalised accumulator) and normalises the result into out; the lse
//      and token weights follow from the merged state.
// One parallel region per call (two for policies that rank pages in select()).
// Head dims 64, 96, 128 and 256 (K and V alike) get bodies with a compile-time dim; any other
// dim takes the generic body.
#pragma once

#include <hwy/cache_control.h>
#include <hwy/contrib/math/math-inl.h>
#include <hwy/highway.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numbers>
#include <span>
#include <type_traits>

#include "infuse/attention/attention.hpp"
#include "infuse/attention/cpu/dequantize.hpp"
#include "infuse/attention/cpu/tile_walk.hpp"
#include "infuse/attention/options.hpp"
#include "infuse/core/math.hpp"
#include "infuse/exec/cpu.hpp"
#include "infuse/gemm/cpu/gemv.hpp"
#include "infuse/kv/cache_view.hpp"
#include "infuse/quant/none.hpp"
#include "infuse/sparse/policy.hpp"

namespace infuse::attention::cpu {

namespace hn = hwy::HWY_NAMESPACE;

namespace detail {

// The walk over a unit's tiles that decode shares with the few-query prefill
// (attention/cpu/tile_walk.hpp).
using walk::for_each_span;
using walk::for_each_tile;
using walk::sanitize_ranges;
using walk::scaled_logits;
using walk::sum_rows;
using walk::tile_max;
using walk::tile_records;
using walk::tile_weights;
using walk::unpack_lanes;

// acc = acc * factor + weight * v over n floats, n a multiple of 32.
template <int Stored>
INFUSE_FORCE_INLINE void scale_add(float* acc, float factor, float weight, const float* v, int n) {
  const float_tag d;
  const int lanes = static_cast<int>(hn::Lanes(d));
  const auto f = hn::Set(d, factor);
  const auto w = hn::Set(d, weight);
  for (int i = 0; i < dims_or<Stored>(n); i += lanes) {
    hn::StoreU(hn::MulAdd(w, hn::LoadU(d, v + i), hn::Mul(f, hn::LoadU(d, acc + i))), d, acc + i);
  }
}

// ---- int8 queries (options::int8_query) -----------------------------------------------------
//
// With integer keys, each head's query row is rounded to int8 once per unit by the CPU gemv's
// int8 activations (one scale per block of 32, in its VNNI step layout, with each int32 lane's
// sum of q), and each key's codes meet it in vpdpbusd a step of 2 (int8) or 4 (int4, int3, int2)
// blocks at a time, unpacked as the gemv unpacks them, once for all the group's heads. Each lane
// starts at -zero * (its sum of q), so it sums (u - zero) q exactly in int32; then per lane, the
// query scale (times the key's group scale; a scale per vector multiplies the finished sum). The
// key is never dequantized.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)

template <class S>
inline constexpr bool int8_query_keys = quant::is_int<S>;

// Raw scores of Heads query heads (rows g0.. of the int8 query) against the tile's first n K
// vectors, into raw[g * score_tile + j]: the float kernel's blocks of tokens and lane sums.
template <class S, int Stored, int Heads>
INFUSE_FORCE_INLINE void score_heads_int8(const kv::vector_format<S>& f, const tile_records& k,
                                          std::int64_t n,
                                          const gemm::cpu::detail::int8_x_layout& query, int g0,
                                          float* raw, walk::line_stream& ahead) {
  namespace gd = gemm::cpu::detail;
  constexpr int bits = S::bits;
  constexpr int per_step = gd::step_blocks<bits>;
  constexpr int step_values = per_step * quant::block_size;
  constexpr std::int64_t step_bytes = per_step * S::block_bytes;
  constexpr int tokens = 16 / Heads;
  static_assert(tokens >= 1 && score_tile % tokens == 0, "whole blocks of tokens per tile");
  const int blocks = dims_or<Stored>(f.stored_dim()) / quant::block_size;
  const int steps = (blocks + per_step - 1) / per_step;
  // The group of a block: a compile-time division (a vector of one group: group 0).
  const auto group_of = [](int block) {
    if constexpr (S::group > 0) {
      return block / (S::group / quant::block_size);
    } else {
      return 0;
    }
  };
  alignas(64) static constexpr std::int32_t lane_blocks[16] = {
      gd::step_lane_block<bits>(0),  gd::step_lane_block<bits>(1),  gd::step_lane_block<bits>(2),
      gd::step_lane_block<bits>(3),  gd::step_lane_block<bits>(4),  gd::step_lane_block<bits>(5),
      gd::step_lane_block<bits>(6),  gd::step_lane_block<bits>(7),  gd::step_lane_block<bits>(8),
      gd::step_lane_block<bits>(9),  gd::step_lane_block<bits>(10), gd::step_lane_block<bits>(11),
      gd::step_lane_block<bits>(12), gd::step_lane_block<bits>(13), gd::step_lane_block<bits>(14),
      gd::step_lane_block<bits>(15)};
  const __m512i lane_block = _mm512_load_si512(lane_blocks);
  // Symmetric keys with groups of whole blocks read their scales straight from the record (the
  // scales come first, one float a group): the groups a step covers, as a lane index and a count.
  constexpr bool direct_scales = S::group > 0 && !S::has_zero;
  constexpr int blocks_per_group = S::group > 0 ? S::group / quant::block_size : 1;
  const __m512i lane_group =
      _mm512_srli_epi32(lane_block, std::countr_zero(unsigned(blocks_per_group)));
  // Each token's key scale per lane (its block's group's), and zero point per lane.
  const auto key_lanes = [&](const std::uint8_t* params, int t, int present, __m512& scale,
                             __m512i& zero) {
    if constexpr (direct_scales) {
      const auto* scales = reinterpret_cast<const float*>(params);
      const int first = t * per_step / blocks_per_group;
      const int count = (t * per_step + present - 1) / blocks_per_group - first + 1;
      scale = _mm512_permutexvar_ps(
          lane_group,
          _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1), scales + first));
    } else {
      alignas(16) float scales[4] = {};
      alignas(16) std::int32_t zeros[4] = {};
      for (int b = 0; b < present; ++b) {
        const auto p = f.group_params(params, group_of(t * per_step + b));
        scales[b] = p.scale;
        zeros[b] = static_cast<std::int32_t>(p.zero);
      }
      scale = _mm512_permutexvar_ps(lane_block, _mm512_castps128_ps512(_mm_load_ps(scales)));
      if constexpr (S::has_zero) {
        zero = _mm512_permutexvar_epi32(
            lane_block, _mm512_castsi128_si512(_mm_load_si128(reinterpret_cast<__m128i*>(zeros))));
      }
    }
  };
  const float_tag d;
  for (std::int64_t j0 = 0; j0 < n; j0 += tokens) {
    hn::Vec<float_tag> acc[16];
    for (auto& a : acc) a = hn::Zero(d);
    for (int t = 0; t < steps; ++t) {
      const int present = std::min(per_step, blocks - t * per_step);
      ahead.advance(tokens * present * S::block_bytes);
      // Symmetric codes: each lane starts at -midpoint * (its sum of q), and so sums (u - zero) q.
      __m512i symmetric_start[Heads];
      for (int g = 0; g < Heads; ++g) {
        symmetric_start[g] =
            _mm512_slli_epi32(_mm512_loadu_si512(query.lane_sums(g0 + g) + 16 * t), bits - 1);
      }
      for (int i = 0; i < tokens; ++i) {
        // The token's codes unpacked once for every head.
        const std::uint8_t* codes = k.codes[j0 + i] + t * step_bytes;
        const gd::step_codes u = present == per_step ? gd::unpack_step<bits, false>(codes, present)
                                                     : gd::unpack_step<bits, true>(codes, present);
        // A key scale per vector waits for the lane sums (below); per group it is per lane.
        __m512 key_scale = _mm512_set1_ps(1.0f);
        __m512i key_zero = _mm512_setzero_si512();
        if constexpr (S::group > 0 || S::has_zero) {
          key_lanes(k.params[j0 + i], t, present, key_scale, key_zero);
        }
        for (int g = 0; g < Heads; ++g) {
          const std::int8_t* q = query.q(g0 + g) + std::int64_t{t} * step_values;
          const __m512i x[2] = {_mm512_loadu_si512(q),
                                _mm512_loadu_si512(q + (per_step == 4 ? 64 : 0))};
          const __m512i start =
              S::has_zero ? _mm512_mullo_epi32(_mm512_loadu_si512(query.lane_sums(g0 + g) + 16 * t),
                                               key_zero)
                          : symmetric_start[g];
          __m512 scale = _mm512_loadu_ps(query.scales(g0 + g) + 16 * t);
          if constexpr (S::group > 0) scale = _mm512_mul_ps(scale, key_scale);
          auto& a = acc[g * tokens + i];
          a.raw =
              _mm512_fmadd_ps(_mm512_cvtepi32_ps(gd::step_dot<bits>(u, x, start)), scale, a.raw);
        }
      }
    }
    alignas(64) float sums[16];
    hn::Store(sum_rows(d, acc), d, sums);
    for (int g = 0; g < Heads; ++g) {
      for (int i = 0; i < tokens; ++i) {
        const float key_scale = S::group > 0 ? 1.0f : f.group_params(k.params[j0 + i], 0).scale;
        raw[g * score_tile + j0 + i] = sums[g * tokens + i] * key_scale;
      }
    }
  }
}

// ---- int8 weights (options::int8_weights) ---------------------------------------------------
//
// With int8, int4 or int2 values, a tile's softmax weights of each head, times each value's scale,
// are rounded to int8 per head and group (scale: their largest / 127), and the weighted sum of the
// value codes is taken in int32 by vpdpbusd, a run of 64 channels and four tokens at a time: each
// token's codes of the run as 64 bytes in channel order (run_codes), those of four tokens
// interleaved byte by byte, so that each int32 lane holds one channel of the four, against the
// head's four weights broadcast (per half run with groups of 32). The codes' zero comes off in
// int32 (sum q (u - z) = sum q u - sum q z), and the value is never dequantized.

template <class S>
inline constexpr bool int8_weight_values = false;
template <int Bits, int Group, class Zero>
inline constexpr bool int8_weight_values<quant::int_<Bits, Group, Zero>> =
    Bits == 8 || Bits == 4 || Bits == 2;

// The codes of a run of 64 channels (at `codes`, the run's first block) as 64 bytes, channel c
// in byte c. Below 8 bits a block of 32 values packs value j in byte j % B at bit Bits * (j / B),
// B = 32 * Bits / 8 bytes a block (quant/int.hpp): byte c takes its packed byte (vpermb) and is
// shifted to its value's bits (vpsrlvw: the two channels of a word share their shift).
template <int Bits>
INFUSE_FORCE_INLINE __m512i run_codes(const std::uint8_t* codes) {
  if constexpr (Bits == 8) {
    return _mm512_loadu_si512(codes);
  } else {
    constexpr int block_bytes = quant::block_size * Bits / 8;
    const auto index = [] {
      std::array<std::uint8_t, 64> at{};
      for (int c = 0; c < 64; ++c) {
        at[c] = static_cast<std::uint8_t>(c / quant::block_size * block_bytes + c % block_bytes);
      }
      return at;
    };
    const auto shift = [] {
      std::array<std::uint16_t, 32> by{};
      for (int w = 0; w < 32; ++w) {
        by[w] = static_cast<std::uint16_t>(2 * w % quant::block_size / block_bytes * Bits);
      }
      return by;
    };
    alignas(64) static constexpr std::array<std::uint8_t, 64> byte_index = index();
    alignas(64) static constexpr std::array<std::uint16_t, 32> word_shift = shift();
    const __m512i packed =
        Bits == 4
            ? _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes)))
            : _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
    const __m512i spread = _mm512_permutexvar_epi8(_mm512_load_si512(byte_index.data()), packed);
    return _mm512_and_si512(_mm512_srlv_epi16(spread, _mm512_load_si512(word_shift.data())),
                            _mm512_set1_epi8(static_cast<char>((1 << Bits) - 1)));
  }
}

// Whole runs of 64 channels.
template <class S>
bool int8_weights_fit(const kv::vector_format<S>& f) {
  return f.stored_dim() % 64 == 0;
}

// One head's tile weights (score_tile, 0 where unweighted) times the value scales of group g,
// rounded to int8 (0..127): q (16 bytes), their scale, and sum_j q_j zero_j.
struct rounded_weights {
  alignas(16) std::int8_t q[score_tile];
  float scale;
  std::int32_t zero_sum;
};

// The rounding of Rows <= 4 heads at once: row r's figures in 128-bit block r of a register, so
// that the largest weight, the rounding factor and the zero sums of all rows take one sequence of
// shuffles instead of a horizontal reduction each.
template <class S, int Rows>
INFUSE_FORCE_INLINE void round_weights(const kv::vector_format<S>& f, const tile_records& v, int g,
                                       const float* weights, rounded_weights* rounded) {
  static_assert(score_tile == 16, "one vector of weights per head");
  static_assert(Rows >= 1 && Rows <= 4, "a 128-bit block per row");
  alignas(64) float scales[score_tile];
  alignas(64) float zeros[score_tile];
  walk::tile_group_params(f, v, g, scales, zeros);
  const __m512 scale = _mm512_load_ps(scales);
  __m512 w[4];
  for (int r = 0; r < 4; ++r) {
    w[r] = r < Rows ? _mm512_mul_ps(_mm512_loadu_ps(weights + r * score_tile), scale)
                    : _mm512_setzero_ps();
  }
  // Each row's largest weight (weights are >= 0), in every lane of its block.
  const __m512 pairs01 =
      _mm512_max_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x44), _mm512_shuffle_f32x4(w[0], w[1], 0xEE));
  const __m512 pairs23 =
      _mm512_max_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x44), _mm512_shuffle_f32x4(w[2], w[3], 0xEE));
  __m512 largest = _mm512_max_ps(_mm512_shuffle_f32x4(pairs01, pairs23, 0x88),
                                 _mm512_shuffle_f32x4(pairs01, pairs23, 0xDD));
  largest = _mm512_max_ps(largest, _mm512_permute_ps(largest, 0x4E));
  largest = _mm512_max_ps(largest, _mm512_permute_ps(largest, 0xB1));
  // Round to nearest; the largest weight becomes 127 (the product may round up to 127.00002). A
  // row without weight gets codes 0 and scale 0.
  const __m512 to_codes =
      _mm512_div_ps(_mm512_set1_ps(127.0f),
                    _mm512_max_ps(largest, _mm512_set1_ps(std::numeric_limits<float>::min())));
  __m512i codes = _mm512_setzero_si512();  // row r's 16 codes in block r
  const auto block_of = [&]<int R>() {
    const __m512i q = _mm512_min_epi32(
        _mm512_cvtps_epi32(_mm512_mul_ps(w[R], _mm512_shuffle_f32x4(to_codes, to_codes, R * 0x55))),
        _mm512_set1_epi32(127));
    codes = _mm512_inserti32x4(codes, _mm512_cvtepi32_epi8(q), R);
  };
  block_of.template operator()<0>();
  if constexpr (Rows > 1) block_of.template operator()<1>();
  if constexpr (Rows > 2) block_of.template operator()<2>();
  if constexpr (Rows > 3) block_of.template operator()<3>();
  // sum_j q_rj zero_j: each lane sums four tokens (vpdpbusd), then the block's four lanes.
  const __m512i zero_bytes =
      _mm512_broadcast_i32x4(_mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_load_ps(zeros))));
  __m512i zero_sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), zero_bytes, codes);
  zero_sums = _mm512_add_epi32(zero_sums, _mm512_shuffle_epi32(zero_sums, _MM_PERM_BADC));
  zero_sums = _mm512_add_epi32(zero_sums, _mm512_shuffle_epi32(zero_sums, _MM_PERM_CDAB));
  alignas(64) std::int8_t code_bytes[64];
  alignas(64) float row_scales[16];
  alignas(64) std::int32_t row_zero_sums[16];
  _mm512_store_si512(code_bytes, codes);
  _mm512_store_ps(row_scales, _mm512_div_ps(largest, _mm512_set1_ps(127.0f)));
  _mm512_store_si512(row_zero_sums, zero_sums);
  for (int r = 0; r < Rows; ++r) {
    std::memcpy(rounded[r].q, code_bytes + 16 * r, score_tile);
    rounded[r].scale = row_scales[4 * r];
    rounded[r].zero_sum = row_zero_sums[4 * r];
  }
}

// acc_r = acc_r * factors[r] + the tile's weighted integer values, for Rows rows (acc_stride floats
// apart), through int8 weights (above).
template <class S, int Stored, int Rows>
INFUSE_FORCE_INLINE void accumulate_rows_int8(const kv::vector_format<S>& f, const tile_records& v,
                                              const float* weights, const float* factors,
                                              float* acc, std::int64_t acc_stride,
                                              walk::line_stream& ahead) {
  const int dims = dims_or<Stored>(f.stored_dim());
  const int group_dims = S::group > 0 ? S::group : dims;
  // The weights of each half run (channels 32h .. 32h + 31 of it): two groups of 32, or one.
  constexpr bool halves_differ = S::group == 32;
  rounded_weights rounded[2][Rows];
  for (int run = 0; run < dims; run += 64) {
    if (run % group_dims == 0) round_weights<S, Rows>(f, v, run / group_dims, weights, rounded[0]);
    if constexpr (halves_differ) round_weights<S, Rows>(f, v, run / 32 + 1, weights, rounded[1]);
    const rounded_weights* half[2] = {rounded[0], rounded[halves_differ ? 1 : 0]};
    __m512i sum[Rows][4];
    for (auto& row : sum) {
      for (auto& lanes : row) lanes = _mm512_setzero_si512();
    }
    for (int j0 = 0; j0 < score_tile; j0 += 4) {
      const std::int64_t at = std::int64_t{run} * S::bits / 8;
      const __m512i t0 = run_codes<S::bits>(v.codes[j0] + at);
      const __m512i t1 = run_codes<S::bits>(v.codes[j0 + 1] + at);
      const __m512i t2 = run_codes<S::bits>(v.codes[j0 + 2] + at);
      const __m512i t3 = run_codes<S::bits>(v.codes[j0 + 3] + at);
      const __m512i low01 = _mm512_unpacklo_epi8(t0, t1);
      const __m512i high01 = _mm512_unpackhi_epi8(t0, t1);
      const __m512i low23 = _mm512_unpacklo_epi8(t2, t3);
      const __m512i high23 = _mm512_unpackhi_epi8(t2, t3);
      // x[c], lane 4k + i: channel 16k + 4c + i of the run, the four tokens' codes in its bytes.
      const __m512i x[4] = {
          _mm512_unpacklo_epi16(low01, low23), _mm512_unpackhi_epi16(low01, low23),
          _mm512_unpacklo_epi16(high01, high23), _mm512_unpackhi_epi16(high01, high23)};
      for (int r = 0; r < Rows; ++r) {
        std::int32_t four[2];
        std::memcpy(&four[0], half[0][r].q + j0, sizeof(four[0]));
        std::memcpy(&four[1], half[1][r].q + j0, sizeof(four[1]));
        // Blocks 0 and 1 of x hold channels 0 .. 31 of the run, blocks 2 and 3 the rest.
        const __m512i w = halves_differ
                              ? _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(four[0]),
                                                        _mm512_set1_epi32(four[1]))
                              : _mm512_set1_epi32(four[0]);
        for (int c = 0; c < 4; ++c) sum[r][c] = _mm512_dpbusd_epi32(sum[r][c], x[c], w);
      }
    }
    ahead.advance(score_tile * 64 * S::bits / 8);
    for (int r = 0; r < Rows; ++r) {
      // A 4 x 4 transpose of 128-bit blocks: block c of ordered[k] is block k of sum[r][c],
      // channels 16k + 4c .. 16k + 4c + 3.
      const __m512i a = _mm512_shuffle_i32x4(sum[r][0], sum[r][1], 0x44);
      const __m512i b = _mm512_shuffle_i32x4(sum[r][0], sum[r][1], 0xEE);
      const __m512i c = _mm512_shuffle_i32x4(sum[r][2], sum[r][3], 0x44);
      const __m512i d = _mm512_shuffle_i32x4(sum[r][2], sum[r][3], 0xEE);
      const __m512i ordered[4] = {
          _mm512_shuffle_i32x4(a, c, 0x88), _mm512_shuffle_i32x4(a, c, 0xDD),
          _mm512_shuffle_i32x4(b, d, 0x88), _mm512_shuffle_i32x4(b, d, 0xDD)};
      const __m512 factor = _mm512_set1_ps(factors[r]);
      float* row = acc + r * acc_stride + run;
      for (int k = 0; k < 4; ++k) {
        const rounded_weights& w = half[k / 2][r];
        const __m512i zero_sum = _mm512_set1_epi32(w.zero_sum);
        const __m512 scale = _mm512_set1_ps(w.scale);
        const __m512 weighted = _mm512_cvtepi32_ps(_mm512_sub_epi32(ordered[k], zero_sum));
        _mm512_storeu_ps(
            row + 16 * k,
            _mm512_fmadd_ps(scale, weighted, _mm512_mul_ps(factor, _mm512_loadu_ps(row + 16 * k))));
      }
    }
  }
}

#endif

// What one thread's scratch holds (floats).
struct thread_scratch {
  float* q;        // (group, k.stored_dim): the group's query, zero past head_dim
  float* scores;   // (group, score_tile)
  float* factors;  // (group): each head's rescale factor for the tile
  float* select;   // the policy's scratch
  std::int64_t select_floats;
  // The group's int8 query rows (options::int8_query), over the policy's scratch: select() is done
  // before the walk. Null base when the query stays float.
  gemm::cpu::detail::int8_x_layout query8{0, nullptr};
  // A tile of keys, then one of values, read back as floats (staged formats), there too.
  float* staged;
};

// The walk reads a tile of staged K or V (attention.hpp) back as floats (kv::read_key /
// read_value) into the thread's scratch and scores and accumulates those as quant::none<float>
// vectors.
using infuse::attention::detail::staged;
template <class S>
using read_scheme = std::conditional_t<staged<S>, quant::none<float>, S>;

// Rounds the group's float query rows (scratch.q) into scratch.query8.
template <class S>
void quantize_query(const kv::vector_format<S>& f, const thread_scratch& scratch,
                    std::int32_t group) {
  if constexpr (quant::is_int<S>) {
    for (std::int32_t g = 0; g < group; ++g) {
      gemm::cpu::detail::quantize_activations<S::bits, true>(
          scratch.q + std::int64_t{g} * f.stored_dim(), f.stored_dim(), f.group_dims(),
          scratch.query8, g);
    }
  }
}

// The pieces of the workspace, typed.
struct workspace_parts {
  sparse::token_range* ranges;
  std::int64_t* range_offsets;
  std::int64_t* range_counts;
  std::int64_t* chunk_offsets;
  std::int64_t* item_offsets;
  std::int64_t* chunks_done;
  float* partials;
  float* thread_floats;

  workspace_parts(std::span<std::byte> workspace, const decode_workspace_layout& plan) {
    auto* base = reinterpret_cast<std::byte*>(kv::round_up(
        static_cast<std::int64_t>(reinterpret_cast<std::uintptr_t>(workspace.data())), 64));
    ranges = reinterpret_cast<sparse::token_range*>(base + plan.ranges_at);
    range_offsets = reinterpret_cast<std::int64_t*>(base + plan.range_offsets_at);
    range_counts = reinterpret_cast<std::int64_t*>(base + plan.range_counts_at);
    chunk_offsets = reinterpret_cast<std::int64_t*>(base + plan.chunk_offsets_at);
    item_offsets = reinterpret_cast<std::int64_t*>(base + plan.item_offsets_at);
    chunks_done = reinterpret_cast<std::int64_t*>(base + plan.chunks_done_at);
    partials = reinterpret_cast<float*>(base + plan.partials_at);
    thread_floats = reinterpret_cast<float*>(base + plan.thread_scratch_at);
  }
};

inline std::int64_t selected_tokens(const sparse::token_range* ranges, std::int64_t count) {
  std::int64_t total = 0;
  for (std::int64_t i = 0; i < count; ++i) total += ranges[i].end - ranges[i].begin;
  return total;
}

// One unit's view of the call.
template <class Cache, class Sparsity>
struct unit_context {
  const Cache& cache;
  const typename Sparsity::params& sparsity;
  score_transform transform;
  std::int32_t sequence;
  std::int32_t kv_head;
  std::int32_t group;
  std::int64_t length;
  bool int8_weights = false;  // options::int8_weights, where the values take it
};

// The online softmax of one split-KV chunk: selected tokens [first, last) of the unit, into its
// partial slot (group x (acc[v.stored_dim], max, sum)). Scores in base 2: log2(e) is folded in.
// Tile by tile: the next tile's records are requested while this one is read (pages lie
// anywhere: the hardware prefetchers do not follow the walk).
template <int KStored, int VStored, class Cache, class Sparsity>
void attend_chunk(const unit_context<Cache, Sparsity>& u, const sparse::token_range* ranges,
                  std::int64_t count, std::int64_t first, std::int64_t last,
                  const thread_scratch& scratch, float* partial, std::int64_t partial_floats,
                  float* weights, std::int64_t weights_head_stride) {
  using k_scheme = typename Cache::k_scheme;
  using v_scheme = typename Cache::v_scheme;
  const auto& f = u.cache.format;
  const int k_stored = dims_or<KStored>(f.k.stored_dim());
  const int v_stored = dims_or<VStored>(f.v.stored_dim());
  const std::int64_t query = u.length - 1;
  constexpr float log2e = std::numbers::log2e_v<float>;
  const bool scale_only = u.transform.soft_cap == 0.0f && u.transform.alibi_slopes == nullptr;
  const float scale_log2 = u.transform.scale * log2e;
  for (std::int32_t g = 0; g < u.group; ++g) {
    float* acc = partial + g * partial_floats;
    std::memset(acc, 0, sizeof(float) * static_cast<std::size_t>(v_stored));
    acc[v_stored] = -INFINITY;
    acc[v_stored + 1] = 0.0f;
  }
  // What the scoring and accumulating read: the stored records, or the staged floats.
  using k_read = read_scheme<k_scheme>;
  using v_read = read_scheme<v_scheme>;
  const kv::vector_format<k_read> k_format{f.k.heads, f.k.head_dim};
  const kv::vector_format<v_read> v_format{f.v.heads, f.v.head_dim};
  const auto tile = [&](const walk::tile_place& here, walk::line_stream& k_ahead,
                        walk::line_stream& v_ahead) {
    const auto [page, slot, t, n] = here;
    tile_records k;
    tile_records v;
    walk::gather_tile(f, page, slot, n, u.kv_head, k, v);
    const auto stage = [&](tile_records& records, float* rows, int stored, auto&& read) {
      for (std::int64_t j = 0; j < n; ++j) read(t + j, rows + j * stored);
      for (std::int64_t j = 0; j < score_tile; ++j) {
        records.codes[j] =
            reinterpret_cast<const std::uint8_t*>(rows + std::min(j, n - 1) * stored);
      }
    };
    if constexpr (staged<k_scheme>) {
      stage(k, scratch.staged, k_stored, [&](std::int64_t token, float* out) {
        kv::read_key(u.cache, u.sequence, token, u.kv_head, out);
      });
    }
    if constexpr (staged<v_scheme>) {
      stage(v, scratch.staged + score_tile * k_stored, v_stored,
            [&](std::int64_t token, float* out) {
              kv::read_value(u.cache, u.sequence, token, u.kv_head, out);
            });
    }
    // Raw scores, every head of the group against each K vector.
    float* scores = scratch.scores;
    bool scored = false;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
    if constexpr (int8_query_keys<k_scheme>) {
      if (scratch.query8.base != nullptr) {
        walk::for_row_runs<4>(u.group, [&]<int Heads>(std::int32_t g) {
          score_heads_int8<k_scheme, KStored, Heads>(f.k, k, n, scratch.query8, g,
                                                     scores + g * score_tile, k_ahead);
        });
        scored = true;
      }
    }
#endif
    if (!scored) {
      walk::for_row_runs<unpack_lanes<k_read>>(u.group, [&]<int Heads>(std::int32_t g) {
        walk::score_rows<k_read, KStored, Heads>(k_format, k, n,
                                                 scratch.q + std::int64_t{g} * k_stored, k_stored,
                                                 scores + g * score_tile, k_ahead);
      });
    }
    // Logits (-inf for tokens not visible, and past n) and each head's online softmax.
    alignas(64) float visible[score_tile];
    for (std::int64_t j = 0; j < score_tile; ++j) {
      visible[j] = j < n && Sparsity::visible(u.sparsity, sparse::mask_context{u.sequence, query,
                                                                               t + j, u.length})
                       ? 1.0f
                       : 0.0f;
    }
    bool any = false;
    float* factors = scratch.factors;
    for (std::int32_t g = 0; g < u.group; ++g) {
      float* s = scores + g * score_tile;
      if (scale_only) {
        scaled_logits(s, visible, scale_log2);
      } else {
        const std::int32_t q_head = u.kv_head * u.group + g;
        for (std::int64_t j = 0; j < score_tile; ++j) {
          s[j] = visible[j] != 0.0f ? u.transform(s[j], q_head, query, t + j) * log2e : -INFINITY;
        }
      }
      if (weights != nullptr) {
        std::memcpy(weights + g * weights_head_stride + t, s,
                    sizeof(float) * static_cast<std::size_t>(n));
      }
      factors[g] = walk::fold_tile(s, partial + g * partial_floats, v_stored, any);
    }
    if (!any) return;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
    if constexpr (int8_weight_values<v_read>) {
      if (u.int8_weights) {
        walk::for_row_runs<4>(u.group, [&]<int Heads>(std::int32_t g) {
          accumulate_rows_int8<v_read, VStored, Heads>(v_format, v, scores + g * score_tile,
                                                       factors + g, partial + g * partial_floats,
                                                       partial_floats, v_ahead);
        });
        return;
      }
    }
#endif
    walk::accumulate_tile<v_read, VStored>(v_format, v, n, u.group, scores, factors, partial,
                                           partial_floats, v_ahead);
  };
  walk::for_each_tile_ahead(u.cache, u.sequence, u.kv_head, ranges, count, first, last, tile);
}

}  // namespace detail

// The decode body for Layout, schemes and policy; KStored and VStored are the padded head dims when
// known at compile time (0: read them from the cache's format).
template <int KStored, int VStored, class Layout, class KQuant, class VQuant, class Sparsity,
          class... Optional>
void decode(const exec::cpu& exec, host_view<const float, 3> q,
            const kv::cache_view<Layout, KQuant, VQuant>& cache, host_view<float, 3> out,
            const typename Sparsity::params& sparsity, const options& opt,
            std::span<std::byte> workspace, const decode_workspace_layout& plan,
            const Optional&... outputs) {
  using cache_type = kv::cache_view<Layout, KQuant, VQuant>;
  using infuse::attention::detail::find_output;
  using infuse::attention::detail::has_output;
  constexpr bool want_lse = has_output<lse_output, Optional...>;
  constexpr bool want_weights = has_output<token_weights, Optional...>;
  constexpr bool want_mass = has_output<accumulate_mass, Optional...>;
  const auto& f = cache.format;
  const std::int32_t kv_heads = f.k.heads;
  const std::int32_t group = static_cast<std::int32_t>(q.extent(1) / kv_heads);
  const std::int32_t head_dim = f.k.head_dim;
  const int k_stored = f.k.stored_dim();
  const std::int64_t units = std::int64_t{cache.sequences()} * kv_heads;
  const detail::workspace_parts parts(workspace, plan);
  const score_transform transform = score_transform::from(opt, head_dim);
  const host_view<float, 3> weights = find_output<token_weights>(outputs...).weights;

  // Int8 queries: integer keys on a CPU with VNNI, when the thread scratch past the select
  // scratch's start holds the group's int8 rows.
  const std::int64_t select_at =
      std::int64_t{group} * k_stored + std::int64_t{group} * score_tile + kv::round_up(group, 16);
  const std::int64_t query8_bytes = gemm::int8_workspace_bytes(group, k_stored);
  bool int8_query = false;
  bool int8_weights = false;  // int8, int4 or int2 values in whole runs of 64 channels, VNNI
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
  int8_query = detail::int8_query_keys<typename cache_type::k_scheme> && opt.int8_query &&
               query8_bytes <= (plan.scratch_floats - select_at) * 4;
  int8_weights = detail::int8_weight_values<typename cache_type::v_scheme> && opt.int8_weights &&
                 detail::int8_weights_fit(f.v);
#endif

  const auto scratch_of = [&](int thread) {
    float* base = parts.thread_floats + std::int64_t{thread} * plan.scratch_floats;
    detail::thread_scratch s{};
    s.q = base;
    s.scores = s.q + std::int64_t{group} * k_stored;
    s.factors = s.scores + std::int64_t{group} * score_tile;
    s.select = s.factors + kv::round_up(group, 16);
    s.select_floats = plan.select_scratch_floats;
    if (int8_query) s.query8 = gemm::cpu::detail::int8_x_layout::of(s.select, k_stored);
    s.staged = s.select;
    return s;
  };
  // The group's query rows, `stride` floats apart, zero past head_dim.
  const auto load_query = [&](float* to, std::int64_t stride, std::int32_t s, std::int32_t h) {
    for (std::int32_t g = 0; g < group; ++g) {
      float* row = to + g * stride;
      for (std::int32_t d = 0; d < head_dim; ++d) row[d] = q(s, h * group + g, d);
      for (std::int64_t d = head_dim; d < stride; ++d) row[d] = 0.0f;
    }
  };

  // Range and partial-slot offsets: bounds from the lengths, known before any select().
  parts.range_offsets[0] = 0;
  parts.chunk_offsets[0] = 0;
  for (std::int64_t u = 0; u < units; ++u) {
    const auto s = static_cast<std::int32_t>(u / kv_heads);
    const std::int64_t length = cache.length(s);
    sparse::query_context c{};
    c.sequence = s;
    c.kv_head = static_cast<std::int32_t>(u % kv_heads);
    c.length = length;
    c.query_begin = length - 1;
    c.query_end = length;
    c.new_begin = length;
    c.group = group;
    c.head_dim = head_dim;
    c.page_size = f.slots;
    c.kv_heads = kv_heads;
    parts.range_offsets[u + 1] =
        parts.range_offsets[u] + std::max<std::int64_t>(0, Sparsity::max_ranges(sparsity, c));
    parts.chunk_offsets[u + 1] =
        parts.chunk_offsets[u] + (length + split_tokens - 1) / split_tokens;
  }

  // 1. select.
  const auto select_units = [&](int thread, std::int64_t begin, std::int64_t end) {
    const detail::thread_scratch scratch = scratch_of(thread);
    for (std::int64_t u = begin; u < end; ++u) {
      const auto s = static_cast<std::int32_t>(u / kv_heads);
      const auto h = static_cast<std::int32_t>(u % kv_heads);
      const std::int64_t length = cache.length(s);
      load_query(scratch.q, head_dim, s, h);
      sparse::query_context c = decode_query_context(cache, s, h, group, transform.scale, &s);
      c.q = scratch.q;
      c.scratch = scratch.select;
      c.scratch_floats = scratch.select_floats;
      sparse::token_range* ranges = parts.ranges + parts.range_offsets[u];
      const std::int64_t room = parts.range_offsets[u + 1] - parts.range_offsets[u];
      const std::int64_t count =
          length == 0 || room == 0 ? 0 : Sparsity::select(sparsity, c, ranges);
      parts.range_counts[u] =
          detail::sanitize_ranges(ranges, std::clamp<std::int64_t>(count, 0, room), length);
      if constexpr (want_weights) {
        for (std::int32_t g = 0; g < group; ++g) {
          std::fill_n(&weights(s, h * group + g, 0), weights.extent(2), 0.0f);
        }
      }
    }
  };
  // A policy that ranks pages does real work per unit: spread it over the threads. The others
  // write a few ranges, cheaper than waking a thread.
  if constexpr (infuse::attention::detail::scratch_floats_per_page<Sparsity>() > 0) {
    exec.parallel_for_ranges(units, select_units);
  } else {
    select_units(0, 0, units);
  }
  parts.item_offsets[0] = 0;
  for (std::int64_t u = 0; u < units; ++u) {
    const std::int64_t selected =
        detail::selected_tokens(parts.ranges + parts.range_offsets[u], parts.range_counts[u]);
    parts.item_offsets[u + 1] =
        parts.item_offsets[u] + (selected + split_tokens - 1) / split_tokens;
  }
  const std::int64_t items = parts.item_offsets[units];
  const std::int64_t group_floats = std::int64_t{group} * plan.partial_floats;

  // 3. merges the chunks of unit u, normalises, and turns stored scores into weights: run by the
  // thread that finishes the unit's last chunk.
  const int v_stored = f.v.stored_dim();
  const auto merge_unit = [&](std::int64_t u) {
    const auto s = static_cast<std::int32_t>(u / kv_heads);
    const auto h = static_cast<std::int32_t>(u % kv_heads);
    const std::int64_t chunks = parts.item_offsets[u + 1] - parts.item_offsets[u];
    float* first = parts.partials + parts.chunk_offsets[u] * group_floats;
    for (std::int32_t g = 0; g < group; ++g) {
      float* acc = first + g * plan.partial_floats;
      softmax_state<log_base::two> state{acc[v_stored], acc[v_stored + 1]};
      if (chunks == 0) state = {};
      for (std::int64_t c = 1; c < chunks; ++c) {
        const float* other = acc + c * group_floats;
        const softmax_rescale factors = state.merge({other[v_stored], other[v_stored + 1]});
        if (factors.incoming == 0.0f) {
          if (factors.previous != 1.0f)
            detail::scale_add<VStored>(acc, factors.previous, 0.0f, acc, v_stored);
          continue;
        }
        detail::scale_add<VStored>(acc, factors.previous, factors.incoming, other, v_stored);
      }
      const float inverse = state.inverse_sum();
      const std::int32_t q_head = h * group + g;
      for (std::int32_t d = 0; d < f.v.head_dim; ++d) {
        out(s, q_head, d) = chunks == 0 ? 0.0f : acc[d] * inverse;
      }
      if constexpr (want_lse)
        find_output<lse_output>(outputs...).lse(s, q_head) = state.natural_lse();
      if constexpr (want_weights) {
        const float lse2 = state.lse();
        float* row = &weights(s, q_head, 0);
        detail::for_each_span(parts.ranges + parts.range_offsets[u], parts.range_counts[u], 0,
                              cache.length(s), [&](std::int64_t t0, std::int64_t t1) {
                                for (std::int64_t t = t0; t < t1; ++t) {
                                  row[t] = fast_exp2(row[t] - lse2);
                                }
                              });
      }
    }
  };

  // Units without a chunk (nothing selected) are done now.
  for (std::int64_t u = 0; u < units; ++u) {
    parts.chunks_done[u] = 0;
    if (parts.item_offsets[u + 1] == parts.item_offsets[u]) merge_unit(u);
  }

  // 2. attend, chunk by chunk; the last chunk of a unit to finish merges it (acquire-release:
  // it sees every other chunk's partial). Each thread takes the next chunk when it is done with
  // one: threads that share a core or a busy host do not run at one speed, and a fixed split
  // leaves the faster ones waiting. A thread's chunks come in order, so its unit only moves on.
  std::atomic<std::int64_t> next_item{0};
  const std::int64_t team = std::min<std::int64_t>(items, exec.threads());
  exec.parallel_for_ranges(team, [&](int thread, std::int64_t, std::int64_t) {
    const detail::thread_scratch scratch = scratch_of(thread);
    std::int64_t u = 0;
    std::int64_t loaded = -1;
    for (std::int64_t item = next_item.fetch_add(1, std::memory_order_relaxed); item < items;
         item = next_item.fetch_add(1, std::memory_order_relaxed)) {
      while (item >= parts.item_offsets[u + 1]) ++u;
      const auto s = static_cast<std::int32_t>(u / kv_heads);
      const auto h = static_cast<std::int32_t>(u % kv_heads);
      if (loaded != u) {
        load_query(scratch.q, k_stored, s, h);
        if (int8_query) detail::quantize_query(f.k, scratch, group);
        loaded = u;
      }
      const std::int64_t chunk = item - parts.item_offsets[u];
      const sparse::token_range* ranges = parts.ranges + parts.range_offsets[u];
      const std::int64_t count = parts.range_counts[u];
      const std::int64_t selected = detail::selected_tokens(ranges, count);
      const detail::unit_context<cache_type, Sparsity> unit{
          cache, sparsity, transform, s, h, group, cache.length(s), int8_weights};
      float* weights_row = nullptr;
      if constexpr (want_weights) weights_row = &weights(s, h * group, 0);
      detail::attend_chunk<KStored, VStored>(
          unit, ranges, count, chunk * split_tokens, std::min(selected, (chunk + 1) * split_tokens),
          scratch, parts.partials + (parts.chunk_offsets[u] + chunk) * group_floats,
          plan.partial_floats, weights_row, want_weights ? weights.stride(1) : 0);
      const std::int64_t chunks = parts.item_offsets[u + 1] - parts.item_offsets[u];
      if (std::atomic_ref<std::int64_t>(parts.chunks_done[u])
                  .fetch_add(1, std::memory_order_acq_rel) +
              1 ==
          chunks) {
        merge_unit(u);
      }
    }
  });

  // Sequences may share pages (a forked prefix): the mass is summed on one thread.
  if constexpr (want_mass) {
    for (std::int64_t u = 0; u < units; ++u) {
      const auto s = static_cast<std::int32_t>(u / kv_heads);
      const auto h = static_cast<std::int32_t>(u % kv_heads);
      detail::for_each_span(
          parts.ranges + parts.range_offsets[u], parts.range_counts[u], 0, cache.length(s),
          [&](std::int64_t t0, std::int64_t t1) {
            for (std::int64_t t = t0; t < t1; ++t) {
              const kv::token_location at = cache.table.locate(s, t);
              float sum = 0.0f;
              for (std::int32_t g = 0; g < group; ++g) sum += weights(s, h * group + g, t);
              cache.mass[(std::int64_t{at.page} * f.slots + at.slot) * kv_heads + h] += sum;
            }
          });
    }
  }
}

}  // namespace infuse::attention::cpu

namespace infuse::attention::detail {

template <>
struct decode_body<exec::cpu> {
  template <class Layout, class KQuant, class VQuant, class Sparsity, class... Optional>
  static void run(const exec::cpu& exec, host_view<const float, 3> q,
                  const kv::cache_view<Layout, KQuant, VQuant>& cache, host_view<float, 3> out,
                  const typename Sparsity::params& sparsity, const options& opt,
                  std::span<std::byte> workspace, const decode_workspace_layout& plan,
                  const Optional&... outputs) {
    const auto body = [&]<int Stored>() {
      cpu::decode<Stored, Stored, Layout, KQuant, VQuant, Sparsity>(
          exec, q, cache, out, sparsity, opt, workspace, plan, outputs...);
    };
    const int dim = cache.format.k.head_dim;
    if (dim != cache.format.v.head_dim) return body.template operator()<0>();
    switch (dim) {
      case 64:
        return body.template operator()<64>();
      case 96:
        return body.template operator()<96>();
      case 128:
        return body.template operator()<128>();
      case 256:
        return body.template operator()<256>();
      default:
        return body.template operator()<0>();
    }
  }
};

}  // namespace infuse::attention::detail
