// The pieces of a CPU attention walk over a sequence's K/V records a tile at a time, for a few
// query rows that share one KV head (decode: the query heads of a group; few-query prefill: the
// new tokens times the group): each K and V vector is read from memory once for all the rows.
//
//   sanitize_ranges      a policy's ranges clipped to the sequence, ascending and disjoint
//   for_each_tile        runs of at most score_tile tokens of one page, over selected ranges
//   for_each_tile_ahead  the same, one tile late, with line streams of the next tile for the
//                        read to request as it goes (pages lie anywhere: the hardware
//                        prefetchers do not follow the walk)
//   score_rows           raw q·k of Rows rows against a tile's K vectors, each chunk of each K
//                        vector unpacked in registers once for all the rows
//   accumulate_rows      acc_r = acc_r * factor_r + sum_j w_rj v_j, each chunk of each V vector
//                        unpacked once for all the rows
//   for_row_runs         the rows cut into runs of 4, then single rows
//   tile_max, tile_weights   one row's online-softmax step over a tile, in base 2
//   fold_tile, accumulate_tile   the step for a row, and the tile's V into every row
// K/V dequantization is the CPU gemv's, bit-exact with the scheme's value(); int V codes meet
// weights with their group's scale folded in (fold_group).
#pragma once

#include <hwy/cache_control.h>
#include <hwy/contrib/math/math-inl.h>
#include <hwy/highway.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <numbers>

#include "infuse/attention/attention.hpp"
#include "infuse/attention/cpu/dequantize.hpp"
#include "infuse/gemm/cpu/gemv.hpp"
#include "infuse/kv/format.hpp"
#include "infuse/sparse/policy.hpp"

namespace infuse::attention::cpu::walk {

namespace hn = hwy::HWY_NAMESPACE;
using detail::dims_or;
using detail::float_tag;

// The cache lines of the next tile's K (or V) records, requested while the walk reads the
// current tile, a few lines for each few bytes it reads: the requests keep pace with the reading,
// so the lines in flight stay within the core's miss buffers (a burst of a whole tile fills them
// and stalls the walk), and the next tile is in L1 by the time it is read.
class line_stream {
 public:
  // Adds count records of `bytes` bytes, the first at `first`, each `stride` bytes after the
  // previous (touching records are one record).
  INFUSE_FORCE_INLINE void add(const std::uint8_t* first, std::int64_t stride, std::int64_t count,
                               std::int64_t bytes) {
    if (bytes == 0 || count == 0) return;
    if (count == 1 || stride == bytes) {
      bytes *= count;
      count = 1;
    }
    const auto start = reinterpret_cast<std::uintptr_t>(first);
    const std::uintptr_t line_start = start & ~std::uintptr_t{63};
    runs_[runs_count_++] = {
        reinterpret_cast<const std::uint8_t*>(line_start), stride, count,
        static_cast<std::int64_t>((start - line_start + bytes + 63) & ~std::uintptr_t{63})};
    if (runs_count_ == 1) start_record();
  }

  // The walk read `bytes` bytes: requests as many bytes of lines.
  INFUSE_FORCE_INLINE void advance(std::int64_t bytes) {
    credit_ += bytes;
    while (credit_ >= 64) {
      if (at_ == end_ && !next_record()) {
        credit_ = 0;
        return;
      }
      hwy::Prefetch(at_);
      at_ += 64;
      credit_ -= 64;
    }
  }

  // Requests every line not requested yet.
  INFUSE_FORCE_INLINE void finish() {
    do {
      for (; at_ != end_; at_ += 64) hwy::Prefetch(at_);
    } while (next_record());
  }

 private:
  struct run {
    const std::uint8_t* first;
    std::int64_t stride;
    std::int64_t count;
    std::int64_t line_bytes;  // of each record, whole lines
  };

  void start_record() {
    const run& r = runs_[run_];
    at_ = r.first + record_ * r.stride;
    end_ = at_ + r.line_bytes;
  }

  // Moves to the next record (of this run or the next): false when none is left.
  bool next_record() {
    if (run_ == runs_count_) return false;
    if (++record_ == runs_[run_].count) {
      record_ = 0;
      if (++run_ == runs_count_) return false;
    }
    start_record();
    return true;
  }

  const std::uint8_t* at_ = nullptr;  // the next line to request, of the record ending at end_
  const std::uint8_t* end_ = nullptr;
  std::int64_t credit_ = 0;
  run runs_[2];
  int runs_count_ = 0;
  int run_ = 0;
  std::int64_t record_ = 0;
};

// The lines of the K records (codes, then params) and of the V records of KV head h in slots
// slot .. slot + n - 1 of a page, as two streams.
template <class Format>
INFUSE_FORCE_INLINE void tile_streams(const Format& f, const std::uint8_t* page, std::int32_t slot,
                                      std::int64_t n, std::int32_t h, line_stream& k,
                                      line_stream& v) {
  const auto records = [&](line_stream& stream, auto&& at, std::int64_t bytes) {
    const std::uint8_t* first = at(slot);
    stream.add(first, n > 1 ? at(slot + 1) - first : bytes, n, bytes);
  };
  records(
      k, [&](std::int32_t i) { return f.k_codes(page, i, h); }, f.k.code_bytes());
  records(
      k, [&](std::int32_t i) { return f.k_params(page, i, h); }, f.k.param_bytes());
  records(
      v, [&](std::int32_t i) { return f.v_codes(page, i, h); }, f.v.code_bytes());
  records(
      v, [&](std::int32_t i) { return f.v_params(page, i, h); }, f.v.param_bytes());
}

// Clips a policy's ranges to [0, length), drops empty ones and any that do not come after the
// previous one: what the walk reads is always inside the sequence. Returns the new count.
inline std::int64_t sanitize_ranges(sparse::token_range* ranges, std::int64_t count,
                                    std::int64_t length) {
  std::int64_t kept = 0;
  std::int64_t floor = 0;
  for (std::int64_t i = 0; i < count; ++i) {
    const std::int64_t begin = std::max(ranges[i].begin, floor);
    const std::int64_t end = std::min(ranges[i].end, length);
    if (begin >= end) continue;
    ranges[kept++] = {begin, end};
    floor = end;
  }
  return kept;
}

// Calls visit(t0, t1) for the spans of selected tokens [first, last) (indices into the
// concatenation of the ranges, which are ascending and disjoint).
template <class Visit>
void for_each_span(const sparse::token_range* ranges, std::int64_t count, std::int64_t first,
                   std::int64_t last, Visit&& visit) {
  std::int64_t skip = first;
  std::int64_t remaining = last - first;
  for (std::int64_t r = 0; r < count && remaining > 0; ++r) {
    const std::int64_t length = ranges[r].end - ranges[r].begin;
    if (skip >= length) {
      skip -= length;
      continue;
    }
    const std::int64_t t0 = ranges[r].begin + skip;
    const std::int64_t t1 = std::min(ranges[r].end, t0 + remaining);
    skip = 0;
    remaining -= t1 - t0;
    visit(t0, t1);
  }
}

// Calls visit(page, slot, t, n) for the tiles of selected tokens [first, last) of sequence s:
// runs of at most score_tile tokens t..t+n-1 in slots slot.. of one page.
template <class Cache, class Visit>
void for_each_tile(const Cache& cache, std::int32_t s, const sparse::token_range* ranges,
                   std::int64_t count, std::int64_t first, std::int64_t last, Visit&& visit) {
  for_each_span(ranges, count, first, last, [&](std::int64_t t0, std::int64_t t1) {
    for (std::int64_t t = t0; t < t1;) {
      const kv::token_address at = cache.locate(s, t);
      const std::int64_t run = std::min<std::int64_t>(t1 - t, cache.format.slots - at.slot);
      for (std::int64_t j = 0; j < run; j += score_tile) {
        visit(at.page, at.slot + static_cast<std::int32_t>(j), t + j,
              std::min<std::int64_t>(score_tile, run - j));
      }
      t += run;
    }
  });
}

// Where a tile lies: tokens t .. t + n - 1 in slots slot .. of a page.
struct tile_place {
  std::uint8_t* page;
  std::int32_t slot;
  std::int64_t t;
  std::int64_t n;
};

// for_each_tile for KV head h, calling visit(place, k_ahead, v_ahead) one tile late: the streams
// hold the lines of the next tile (empty for the last), for the visit to request as it reads.
// Whatever it leaves is requested after it returns.
template <class Cache, class Visit>
void for_each_tile_ahead(const Cache& cache, std::int32_t s, std::int32_t h,
                         const sparse::token_range* ranges, std::int64_t count, std::int64_t first,
                         std::int64_t last, Visit&& visit) {
  tile_place previous{};
  bool started = false;
  const auto read = [&](const tile_place* next) {
    line_stream k_ahead;
    line_stream v_ahead;
    if (next != nullptr) {
      tile_streams(cache.format, next->page, next->slot, next->n, h, k_ahead, v_ahead);
    }
    visit(previous, k_ahead, v_ahead);
    k_ahead.finish();
    v_ahead.finish();
  };
  for_each_tile(cache, s, ranges, count, first, last,
                [&](std::uint8_t* page, std::int32_t slot, std::int64_t t, std::int64_t n) {
                  const tile_place place{page, slot, t, n};
                  if (started) {
                    read(&place);
                  } else {
                    // The first tile's lines all at once: nothing is read while they come.
                    line_stream k_first;
                    line_stream v_first;
                    tile_streams(cache.format, page, slot, n, h, k_first, v_first);
                    k_first.finish();
                    v_first.finish();
                  }
                  previous = place;
                  started = true;
                });
  if (started) read(nullptr);
}

// A tile's stored vectors: records of token j of the tile (past the tile's last token, the last
// token's, so that whole register blocks of tokens read valid memory).
struct tile_records {
  const std::uint8_t* codes[score_tile];
  const std::uint8_t* params[score_tile];
};

// The K and V records of KV head h for tokens in slots slot .. slot + n - 1 of a page.
template <class Format>
INFUSE_FORCE_INLINE void gather_tile(const Format& f, std::uint8_t* page, std::int32_t slot,
                                     std::int64_t n, std::int32_t h, tile_records& k,
                                     tile_records& v) {
  for (std::int64_t j = 0; j < score_tile; ++j) {
    const auto at = slot + static_cast<std::int32_t>(std::min(j, n - 1));
    k.codes[j] = f.k_codes(page, at, h);
    k.params[j] = f.k_params(page, at, h);
    v.codes[j] = f.v_codes(page, at, h);
    v.params[j] = f.v_params(page, at, h);
  }
}

// Lane r of the result is the sum of the lanes of rows[r], one row per lane: each level adds
// neighbouring lanes of two vectors and concatenates the halves, so the rows keep their order.
template <class D, std::size_t Rows>
INFUSE_FORCE_INLINE hn::Vec<D> sum_rows(D d, hn::Vec<D> (&rows)[Rows]) {
  static_assert(Rows == hn::MaxLanes(D()), "sum_rows takes one row per lane");
#if HWY_TARGET != HWY_SCALAR  // one lane there (nvcc's host pass): nothing to add, no Concat ops
  for (std::size_t n = Rows; n > 1; n /= 2) {
    for (std::size_t i = 0; i < n / 2; ++i) {
      rows[i] = hn::Add(hn::ConcatEven(d, rows[2 * i + 1], rows[2 * i]),
                        hn::ConcatOdd(d, rows[2 * i + 1], rows[2 * i]));
    }
  }
#else
  (void)d;
#endif
  return rows[0];
}

// Float lanes of the registers that unpack scheme S.
template <class S>
inline constexpr int unpack_lanes = static_cast<int>(hn::MaxLanes(gemm::cpu::float_tag<S>()));

// Raw scores q_r · k_j of Rows query rows (q_stride floats apart) against the tile's first n K
// vectors, into raw[r * score_tile + j]. Lanes / Rows K vectors at a time: each chunk of each is
// unpacked once in registers and multiplied by every row, one accumulator per (row, token),
// summed across lanes all together at the end.
template <class S, int Stored, int Rows>
INFUSE_FORCE_INLINE void score_rows(const kv::vector_format<S>& f, const tile_records& k,
                                    std::int64_t n, const float* q, std::int64_t q_stride,
                                    float* raw, line_stream& ahead) {
  using tag = gemm::cpu::float_tag<S>;
  const tag d;
  constexpr int lanes = unpack_lanes<S>;
  constexpr int tokens = lanes / Rows;
  static_assert(tokens >= 1 && score_tile % tokens == 0, "whole blocks of tokens per tile");
  const int blocks = dims_or<Stored>(f.stored_dim()) / quant::block_size;
  const int group_dims = S::group > 0 ? S::group : dims_or<Stored>(f.stored_dim());
  for (std::int64_t j0 = 0; j0 < n; j0 += tokens) {
    hn::Vec<tag> acc[lanes];
    for (auto& a : acc) a = hn::Zero(d);
    for (int b = 0; b < blocks; ++b) {
      typename S::params p[tokens];
      const std::uint8_t* block[tokens];
      for (int t = 0; t < tokens; ++t) {
        p[t] = f.group_params(k.params[j0 + t], b * quant::block_size / group_dims);
        block[t] = k.codes[j0 + t] + std::int64_t{b} * S::block_bytes;
      }
      ahead.advance(tokens * S::block_bytes);
      for (int c = 0; c < quant::block_size; c += lanes) {
        hn::Vec<tag> key[tokens];
        for (int t = 0; t < tokens; ++t) {
          key[t] = gemm::cpu::detail::dequantize_chunk<S>(d, block[t], c, p[t]);
        }
        for (int r = 0; r < Rows; ++r) {
          const auto query = hn::LoadU(d, q + r * q_stride + b * quant::block_size + c);
          for (int t = 0; t < tokens; ++t) {
            acc[r * tokens + t] = hn::MulAdd(query, key[t], acc[r * tokens + t]);
          }
        }
      }
    }
    alignas(64) float sums[lanes];
    hn::Store(sum_rows(d, acc), d, sums);
    for (int r = 0; r < Rows; ++r) {
      std::memcpy(raw + r * score_tile + j0, sums + r * tokens, sizeof(float) * tokens);
    }
  }
}

// The codes of an int scheme's chunk as floats less the implied zero of symmetric codes
// (subtracted in int32, exact): u - midpoint, or u for zero-point codes.
template <class S, class D>
INFUSE_FORCE_INLINE hn::Vec<D> centred_codes(D d, const std::uint8_t* block, int first) {
  const hn::RebindToSigned<D> di;
  auto u = hn::BitCast(
      di, gemm::cpu::detail::int_codes<S::bits>(hn::RebindToUnsigned<D>(), block, first));
  if constexpr (!S::has_zero) u = hn::Sub(u, hn::Set(di, S::midpoint));
  return hn::ConvertTo(d, u);
}

// The scales and zero points (as floats) of value group g of the tile's records.
template <class S>
INFUSE_FORCE_INLINE void tile_group_params(const kv::vector_format<S>& f, const tile_records& v,
                                           int g, float* scales, float* zeros) {
  for (std::int64_t j = 0; j < score_tile; ++j) {
    const auto p = f.group_params(v.params[j], g);
    scales[j] = p.scale;
    zeros[j] = p.zero;
  }
}

// An int scheme's V group g folded into the tile's weights: value = scale * (u - zero), so
// sum_j w_j value_j = sum_j (w_j scale_j) u'_j - sum_j w_j scale_j zero_j, with u' the centred
// codes. folded[r * score_tile + j] = w_rj scale_j, and correction[r] the last sum (zero-point
// codes only: symmetric ones are centred in int32). Once per group and tile, instead of a
// subtraction and a multiplication per chunk and token.
template <class S, int Rows>
INFUSE_FORCE_INLINE void fold_group(const kv::vector_format<S>& f, const tile_records& v, int g,
                                    const float* weights, float* folded, float* correction) {
  const float_tag d;
  alignas(64) float scales[score_tile];
  alignas(64) float zeros[score_tile];
  tile_group_params(f, v, g, scales, zeros);
  for (int r = 0; r < Rows; ++r) {
    auto corrected = hn::Zero(d);
    for (std::int64_t j = 0; j < score_tile; j += static_cast<std::int64_t>(hn::Lanes(d))) {
      const auto w = hn::Mul(hn::LoadU(d, weights + r * score_tile + j), hn::Load(d, scales + j));
      hn::StoreU(w, d, folded + r * score_tile + j);
      if constexpr (S::has_zero) corrected = hn::MulAdd(w, hn::Load(d, zeros + j), corrected);
    }
    correction[r] = S::has_zero ? hn::GetLane(hn::SumOfLanes(d, corrected)) : 0.0f;
  }
}

// acc_r = acc_r * factors[r] + sum over the tile's tokens j in needed[0, count) of
// weights[r * score_tile + j] * v_j, for Rows rows (acc rows acc_stride floats apart): each
// chunk of each V vector unpacked once in registers for every row. Int schemes multiply their
// centred codes by weights with the group's scales folded in (fold_group).
template <class S, int Stored, int Rows>
INFUSE_FORCE_INLINE void accumulate_rows(const kv::vector_format<S>& f, const tile_records& v,
                                         const std::int32_t* needed, int count,
                                         const float* weights, const float* factors, float* acc,
                                         std::int64_t acc_stride, line_stream& ahead) {
  using tag = gemm::cpu::float_tag<S>;
  const tag d;
  constexpr int lanes = unpack_lanes<S>;
  constexpr bool folded_int = quant::is_int<S>;
  const int dims = dims_or<Stored>(f.stored_dim());
  const int group_dims = S::group > 0 ? S::group : dims;
  alignas(64) float folded[folded_int ? Rows * score_tile : 1];
  float correction[Rows] = {};
  const float* w = folded_int ? folded : weights;
  // Two chunks at a time (both in one block): two independent FMA chains per row.
  for (int at = 0; at < dims; at += 2 * lanes) {
    const int c = at % quant::block_size;
    const std::int64_t block_at = std::int64_t{at / quant::block_size} * S::block_bytes;
    if constexpr (folded_int) {
      if (at % group_dims == 0)
        fold_group<S, Rows>(f, v, at / group_dims, weights, folded, correction);
    }
    hn::Vec<tag> sum[Rows][2];
    for (int r = 0; r < Rows; ++r) {
      for (int i = 0; i < 2; ++i) {
        sum[r][i] =
            hn::MulSub(hn::Set(d, factors[r]), hn::LoadU(d, acc + r * acc_stride + at + i * lanes),
                       hn::Set(d, correction[r]));
      }
    }
    for (int i = 0; i < count; ++i) {
      const std::int32_t j = needed[i];
      const std::uint8_t* block = v.codes[j] + block_at;
      hn::Vec<tag> v0;
      hn::Vec<tag> v1;
      ahead.advance(S::block_bytes * 2 * lanes / quant::block_size);
      if constexpr (folded_int) {
        v0 = centred_codes<S>(d, block, c);
        v1 = centred_codes<S>(d, block, c + lanes);
      } else {
        const auto p = f.group_params(v.params[j], at / group_dims);
        v0 = gemm::cpu::detail::dequantize_chunk<S>(d, block, c, p);
        v1 = gemm::cpu::detail::dequantize_chunk<S>(d, block, c + lanes, p);
      }
      for (int r = 0; r < Rows; ++r) {
        const auto weight = hn::Set(d, w[r * score_tile + j]);
        sum[r][0] = hn::MulAdd(weight, v0, sum[r][0]);
        sum[r][1] = hn::MulAdd(weight, v1, sum[r][1]);
      }
    }
    for (int r = 0; r < Rows; ++r) {
      for (int i = 0; i < 2; ++i) hn::StoreU(sum[r][i], d, acc + r * acc_stride + at + i * lanes);
    }
  }
}

// Calls pass.template operator()<Rows>(r) for consecutive runs of rows covering [0, rows): runs
// of 4, then single rows, none wider than MaxRows (two run widths keep the instantiations, and
// the compile time, of every head dim and scheme down).
template <int MaxRows, class Pass>
INFUSE_FORCE_INLINE void for_row_runs(std::int32_t rows, Pass&& pass) {
  std::int32_t r = 0;
  const auto runs = [&]<int Rows>() {
    if constexpr (Rows <= MaxRows) {
      for (; rows - r >= Rows; r += Rows) pass.template operator()<Rows>(r);
    }
  };
  runs.template operator()<4>();
  runs.template operator()<1>();
}

// The largest of a tile's score_tile scores.
INFUSE_FORCE_INLINE float tile_max(const float* scores) {
  const float_tag d;
  auto m = hn::Set(d, -INFINITY);
  for (std::int64_t j = 0; j < score_tile; j += static_cast<std::int64_t>(hn::Lanes(d))) {
    m = hn::Max(m, hn::LoadU(d, scores + j));
  }
  return hn::GetLane(hn::MaxOfLanes(d, m));
}

// Replaces a tile's base-2 scores by their weights 2^(score - max) (0 for -inf, and all 0 when
// max is -inf) and returns their sum.
INFUSE_FORCE_INLINE float tile_weights(float* scores, float max) {
  const float_tag d;
  if (max == -INFINITY) {
    for (std::int64_t j = 0; j < score_tile; ++j) scores[j] = 0.0f;
    return 0.0f;
  }
  auto sum = hn::Zero(d);
  for (std::int64_t j = 0; j < score_tile; j += static_cast<std::int64_t>(hn::Lanes(d))) {
    const auto s = hn::LoadU(d, scores + j);
    const auto exponent =
        hn::Mul(hn::Sub(s, hn::Set(d, max)), hn::Set(d, std::numbers::ln2_v<float>));
    const auto w = hn::IfThenElseZero(hn::Gt(s, hn::Set(d, -INFINITY)), hn::Exp(d, exponent));
    hn::StoreU(w, d, scores + j);
    sum = hn::Add(sum, w);
  }
  return hn::GetLane(hn::SumOfLanes(d, sum));
}

// A tile's raw dot products of one row as base-2 logits, raw * scale_log2 where visible[j] is
// nonzero and -inf elsewhere: the score transform when it is a scale alone.
INFUSE_FORCE_INLINE void scaled_logits(float* scores, const float* visible, float scale_log2) {
  const float_tag d;
  for (std::int64_t j = 0; j < score_tile; j += static_cast<std::int64_t>(hn::Lanes(d))) {
    const auto s = hn::Mul(hn::LoadU(d, scores + j), hn::Set(d, scale_log2));
    hn::StoreU(
        hn::IfThenElse(hn::Gt(hn::LoadU(d, visible + j), hn::Zero(d)), s, hn::Set(d, -INFINITY)), d,
        scores + j);
  }
}

// One row's online-softmax step over a tile: folds the row's base-2 logits s into its state,
// kept after its v_stored accumulators (acc[v_stored] the max, acc[v_stored + 1] the sum), turns
// s into the tile's weights and returns the factor that rescales the row's accumulators. Sets
// `any` when the row sees a key.
INFUSE_FORCE_INLINE float fold_tile(float* s, float* acc, int v_stored, bool& any) {
  softmax_state<log_base::two> state{acc[v_stored], acc[v_stored + 1]};
  const float factor = state.merge({tile_max(s), 0.0f}).previous;
  state.sum += tile_weights(s, state.max);
  acc[v_stored] = state.max;
  acc[v_stored + 1] = state.sum;
  any = any || state.max != -INFINITY;
  return factor;
}

// The tile's weighted V vectors added into `rows` rows of accumulators (acc_stride floats apart),
// each first rescaled by its factor: a token no row weighs is skipped, its V never read.
template <class S, int VStored>
INFUSE_FORCE_INLINE void accumulate_tile(const kv::vector_format<S>& f, const tile_records& v,
                                         std::int64_t n, std::int32_t rows, const float* weights,
                                         const float* factors, float* acc, std::int64_t acc_stride,
                                         line_stream& ahead) {
  std::int32_t needed[score_tile];
  int count = 0;
  for (std::int32_t j = 0; j < n; ++j) {
    bool weighed = false;
    for (std::int32_t r = 0; r < rows; ++r) weighed |= weights[r * score_tile + j] != 0.0f;
    if (weighed) needed[count++] = j;
  }
  for_row_runs<4>(rows, [&]<int Rows>(std::int32_t r) {
    accumulate_rows<S, VStored, Rows>(f, v, needed, count, weights + r * score_tile, factors + r,
                                      acc + r * acc_stride, acc_stride, ahead);
  });
}

}  // namespace infuse::attention::cpu::walk
