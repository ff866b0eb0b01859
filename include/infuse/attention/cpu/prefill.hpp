// The CPU body of infuse::attention::prefill (attention/prefill.hpp): Highway SIMD, OpenMP
// threads. See docs/policies.md#prefill-attention.
//
// 1. Store: each new token's K and V vectors are encoded into their slots, threads over tokens;
//    then the pages that received keys get their key bounds recomputed (when the cache keeps them).
// 2. Attend: a work item is (sequence, KV head, query tile): up to tile_rows rows, a row being one
//    (query, query head of the group). The tile's queries are transposed, pre-scaled, into
//    (head_dim, rows); the policy's ranges are walked in key tiles of key_tile tokens. For each key
//    tile the mask is evaluated once per (query, key), a tile nobody sees is skipped unread, and
//    the keys and values are dequantized once into float buffers that every row of the tile
//    reuses:
//      scores (keys, rows) = K q^T     broadcast k[d], FMA over a vector of rows
//      online softmax                  vectorized over rows: no horizontal reductions
//      acc (rows, v_dim) += P^T V      broadcast p, FMA over a vector of value dims
//    Threads take work items from a shared counter, latest query tiles first (under a causal mask
//    the costliest), so that the two ends of a sequence even out. A tile computes only the rows it
//    has, rounded up to whole vectors.
// 2'. Attend, few queries: when every sequence has at most few_queries new tokens (and few_rows
//    rows a KV head), as a speculative verification has, each (sequence, KV head) walks its keys
//    once for all its rows the way decode walks them (tile_walk.hpp), split over the KV length;
//    see few_query_kernel.
#pragma once

#include <hwy/contrib/math/math-inl.h>
#include <hwy/highway.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numbers>
#include <type_traits>
#include <vector>

#include "infuse/attention/cpu/dequantize.hpp"
#include "infuse/attention/cpu/tile_walk.hpp"
#include "infuse/attention/options.hpp"
#include "infuse/attention/prefill.hpp"
#include "infuse/core/math.hpp"
#include "infuse/core/view.hpp"
#include "infuse/exec/cpu.hpp"
#include "infuse/gemm/cpu/gemv.hpp"
#include "infuse/kv/cache_view.hpp"
#include "infuse/kv/format.hpp"
#include "infuse/kv/metadata.hpp"
#include "infuse/quant/none.hpp"
#include "infuse/sparse/dense.hpp"
#include "infuse/sparse/policy.hpp"
#include "infuse/sparse/tree.hpp"

namespace infuse::attention::cpu {

namespace hn = hwy::HWY_NAMESPACE;

// Rows (queries x group heads) of a query tile, at most: a query tile of max(1, tile_rows / group)
// queries. Keys per key tile. Both sized so that the tile's buffers stay in L2.
inline constexpr int tile_rows = 128;
inline constexpr int key_tile = 64;

namespace detail {

inline constexpr int lanes = static_cast<int>(hn::MaxLanes(float_tag()));
// Rows are padded to whole vectors, and to blocks of four rows for the P^T V step.
inline constexpr int row_multiple = lanes > 4 ? lanes : 4;

// scores[j][r0 .. r0 + Vectors * lanes) = keys[j] . qt[:, r] for four keys j: broadcast a key's
// element, FMA into a vector of rows.
template <int Vectors>
INFUSE_FORCE_INLINE void score_block(const float* qt, std::int64_t rows_pad, std::int32_t head_dim,
                                     const float* const* keys, float* scores) {
  const float_tag d;
  hn::Vec<float_tag> acc[4][Vectors];
  for (auto& row : acc) {
    for (auto& a : row) a = hn::Zero(d);
  }
  for (std::int32_t e = 0; e < head_dim; ++e) {
    hn::Vec<float_tag> qv[Vectors];
    for (int v = 0; v < Vectors; ++v) qv[v] = hn::LoadU(d, qt + e * rows_pad + v * lanes);
    for (int j = 0; j < 4; ++j) {
      const auto k = hn::Set(d, keys[j][e]);
      for (int v = 0; v < Vectors; ++v) acc[j][v] = hn::MulAdd(k, qv[v], acc[j][v]);
    }
  }
  for (int j = 0; j < 4; ++j) {
    for (int v = 0; v < Vectors; ++v) hn::StoreU(acc[j][v], d, scores + j * rows_pad + v * lanes);
  }
}

// acc[r0 .. r0 + 4][c0 .. c0 + Vectors * lanes) = acc * rescale[r] + sum_j p[j][r] values[j]:
// broadcast a probability, FMA into a vector of value dims.
template <int Vectors>
INFUSE_FORCE_INLINE void value_block(const float* probabilities, std::int64_t rows_pad, int keys,
                                     const float* const* values, std::int64_t first,
                                     const float* rescale, float* acc, std::int64_t acc_stride) {
  const float_tag d;
  hn::Vec<float_tag> sums[4][Vectors];
  for (int r = 0; r < 4; ++r) {
    const auto factor = hn::Set(d, rescale[r]);
    for (int v = 0; v < Vectors; ++v) {
      sums[r][v] = hn::Mul(factor, hn::LoadU(d, acc + r * acc_stride + v * lanes));
    }
  }
  for (int j = 0; j < keys; ++j) {
    hn::Vec<float_tag> vv[Vectors];
    for (int v = 0; v < Vectors; ++v) vv[v] = hn::LoadU(d, values[j] + first + v * lanes);
    for (int r = 0; r < 4; ++r) {
      const auto p = hn::Set(d, probabilities[j * rows_pad + r]);
      for (int v = 0; v < Vectors; ++v) sums[r][v] = hn::MulAdd(p, vv[v], sums[r][v]);
    }
  }
  for (int r = 0; r < 4; ++r) {
    for (int v = 0; v < Vectors; ++v) hn::StoreU(sums[r][v], d, acc + r * acc_stride + v * lanes);
  }
}

// What the queries at positions query_first..query_last see of the keys at key_first..key_last
// (inclusive), where a shipped policy's mask has a closed form: all of them, none, or `some`,
// which asks visible() pair by pair. Any other policy takes the pair-by-pair path.
enum class tile_visibility { none, some, all };

template <class Sparsity>
struct mask_shape {
  static tile_visibility of(const typename Sparsity::params&, std::int64_t, std::int64_t,
                            std::int64_t, std::int64_t, std::int64_t) {
    return tile_visibility::some;
  }
};
template <>
struct mask_shape<sparse::dense> {
  static tile_visibility of(const sparse::dense::params&, std::int64_t, std::int64_t, std::int64_t,
                            std::int64_t, std::int64_t) {
    return tile_visibility::all;
  }
};
template <>
struct mask_shape<sparse::causal> {
  static tile_visibility of(const sparse::causal::params&, std::int64_t query_first,
                            std::int64_t query_last, std::int64_t key_first, std::int64_t key_last,
                            std::int64_t) {
    return key_last <= query_first  ? tile_visibility::all
           : key_first > query_last ? tile_visibility::none
                                    : tile_visibility::some;
  }
};
template <>
struct mask_shape<sparse::tree> {
  static tile_visibility of(const sparse::tree::params&, std::int64_t, std::int64_t, std::int64_t,
                            std::int64_t key_last, std::int64_t new_begin) {
    return key_last < new_begin ? tile_visibility::all : tile_visibility::some;  // the prefix
  }
};

// The buffers of one thread, sized once per call.
struct tile_buffers {
  // The current tile's rows rounded up to row_multiple: the stride of qt and scores. A tile of
  // a few queries (a speculative verification) computes no more rows than it has.
  std::int64_t rows_pad = 0;
  std::vector<float> qt;                 // (head_dim, rows_pad): the tile's queries, scaled
  std::vector<float> keys;               // (key_tile, k stored_dim): dequantized keys
  std::vector<float> values;             // (key_tile, v stored_dim)
  std::vector<float> zero_key;           // (k stored_dim)
  std::vector<const float*> key_rows;    // (key_tile + 3): the tile's keys as floats
  std::vector<const float*> value_rows;  // (key_tile)
  std::vector<float> scores;             // (key_tile, rows_pad): scores, then probabilities
  std::vector<float> acc;                // (rows_pad, v stored_dim)
  std::vector<float> max, sum, rescale;  // (rows_pad)
  std::vector<unsigned char> mask;       // (queries of the tile, key_tile)
  std::vector<float> group_q;            // (group, head_dim): the first query, for select()
  std::vector<float> select_scratch;
  std::vector<sparse::token_range> ranges;
};

struct work_item {
  std::int32_t sequence;
  std::int32_t kv_head;
  std::int64_t first;    // row of q of the tile's first query
  std::int32_t queries;  // queries in the tile
};

template <class Sparsity>
constexpr std::int64_t select_floats_per_page() {
  if constexpr (requires { Sparsity::scratch_floats_per_page; }) {
    return Sparsity::scratch_floats_per_page;
  } else {
    return 0;
  }
}

template <class Sparsity, class Layout, class K, class V>
class prefill_kernel {
 public:
  using cache_type = kv::cache_view<Layout, K, V, host_memory>;

  prefill_kernel(host_view<const float, 3> q, host_view<const std::int32_t, 1> q_indptr,
                 const cache_type& cache, host_view<float, 3> out,
                 const typename Sparsity::params& params, const options& opts,
                 host_view<float, 2> lse)
      : q_(q),
        q_indptr_(q_indptr),
        cache_(cache),
        out_(out),
        params_(params),
        lse_(lse),
        head_dim_(cache.format.k.head_dim),
        k_stored_(cache.format.k.stored_dim()),
        v_stored_(cache.format.v.stored_dim()),
        group_(static_cast<std::int32_t>(q.extent(1) / cache.format.k.heads)),
        tile_queries_(std::max<std::int32_t>(1, tile_rows / group_)),
        max_rows_pad_(kv::round_up(std::int64_t{tile_queries_} * group_, row_multiple)),
        transform_{1.0f, opts.soft_cap, opts.alibi_slopes},
        scale_(score_transform::from(opts, head_dim_).scale) {}

  // The work items, latest query tiles first.
  std::vector<work_item> items() const {
    std::vector<work_item> list;
    const std::int32_t kv_heads = cache_.format.k.heads;
    for (std::int32_t b = 0; b < cache_.sequences(); ++b) {
      for (std::int64_t first = q_indptr_(b); first < q_indptr_(b + 1); first += tile_queries_) {
        const auto queries = static_cast<std::int32_t>(
            std::min<std::int64_t>(tile_queries_, q_indptr_(b + 1) - first));
        for (std::int32_t h = 0; h < kv_heads; ++h) list.push_back({b, h, first, queries});
      }
    }
    std::stable_sort(list.begin(), list.end(), [this](const work_item& a, const work_item& b) {
      return a.first - q_indptr_(a.sequence) > b.first - q_indptr_(b.sequence);
    });
    return list;
  }

  tile_buffers buffers() const {
    tile_buffers t;
    t.qt.resize(static_cast<std::size_t>(head_dim_ * max_rows_pad_));
    t.keys.resize(static_cast<std::size_t>(std::int64_t{key_tile} * k_stored_));
    t.values.resize(static_cast<std::size_t>(std::int64_t{key_tile} * v_stored_));
    t.zero_key.assign(static_cast<std::size_t>(k_stored_), 0.0f);
    t.key_rows.resize(key_tile + 3);
    t.value_rows.resize(key_tile);
    t.scores.resize(static_cast<std::size_t>(key_tile * max_rows_pad_));
    t.acc.resize(static_cast<std::size_t>(max_rows_pad_ * v_stored_));
    t.max.resize(static_cast<std::size_t>(max_rows_pad_));
    t.sum.resize(static_cast<std::size_t>(max_rows_pad_));
    t.rescale.resize(static_cast<std::size_t>(max_rows_pad_));
    t.mask.resize(static_cast<std::size_t>(tile_queries_) * key_tile);
    t.group_q.resize(static_cast<std::size_t>(group_) * head_dim_);
    std::int64_t pages = 0;
    for (std::int32_t b = 0; b < cache_.sequences(); ++b) {
      pages = std::max(pages, (cache_.length(b) + cache_.format.slots - 1) / cache_.format.slots);
    }
    t.select_scratch.resize(static_cast<std::size_t>(select_floats_per_page<Sparsity>() * pages));
    return t;
  }

  void attend(const work_item& item, tile_buffers& t) const {
    const std::int32_t b = item.sequence;
    const std::int64_t length = cache_.length(b);
    const std::int64_t new_begin = length - (q_indptr_(b + 1) - q_indptr_(b));
    const std::int64_t query_begin = new_begin + (item.first - q_indptr_(b));
    const std::int64_t query_end = query_begin + item.queries;
    const std::int64_t rows = std::int64_t{item.queries} * group_;
    t.rows_pad = kv::round_up(rows, row_multiple);
    load_queries(item, t, rows);

    std::int32_t run = b;  // the contiguous layout's one "page" of the sequence
    const std::int32_t* pages = &run;
    if constexpr (Layout::is_paged) pages = cache_.table.indices + cache_.table.indptr[b];
    const sparse::query_context context{b,
                                        item.kv_head,
                                        length,
                                        query_begin,
                                        query_end,
                                        new_begin,
                                        t.group_q.data(),
                                        group_,
                                        head_dim_,
                                        scale_,
                                        cache_.format.slots,
                                        pages,
                                        cache_.format.k.heads,
                                        cache_.key_min,
                                        cache_.key_max,
                                        cache_.mass,
                                        t.select_scratch.data(),
                                        static_cast<std::int64_t>(t.select_scratch.size()),
                                        cache_.pool_pages};
    const std::int64_t capacity = Sparsity::max_ranges(params_, context);
    if (static_cast<std::int64_t>(t.ranges.size()) < capacity) {
      t.ranges.resize(static_cast<std::size_t>(capacity));
    }
    const std::int64_t count = Sparsity::select(params_, context, t.ranges.data());

    std::fill_n(t.max.begin(), t.rows_pad, -INFINITY);
    std::fill_n(t.sum.begin(), t.rows_pad, 0.0f);
    std::fill_n(t.acc.begin(), t.rows_pad * v_stored_, 0.0f);
    for (std::int64_t i = 0; i < count; ++i) {
      const sparse::token_range range = t.ranges[static_cast<std::size_t>(i)];
      const std::int64_t end = std::min(range.end, length);
      for (std::int64_t k0 = std::max<std::int64_t>(range.begin, 0); k0 < end; k0 += key_tile) {
        const int keys = static_cast<int>(std::min<std::int64_t>(key_tile, end - k0));
        key_tile_step(item, t, query_begin, new_begin, k0, keys);
      }
    }
    store_outputs(item, t, rows);
  }

 private:
  // qt (head_dim, rows_pad) = scale * q of the tile's rows, padding rows zero; group_q = the first
  // query's heads as they are.
  void load_queries(const work_item& item, tile_buffers& t, std::int64_t rows) const {
    std::fill_n(t.qt.begin(), head_dim_ * t.rows_pad, 0.0f);
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int64_t token = item.first + r / group_;
      const std::int64_t head = std::int64_t{item.kv_head} * group_ + r % group_;
      const float* src = &q_(token, head, 0);
      for (std::int32_t e = 0; e < head_dim_; ++e) t.qt[e * t.rows_pad + r] = src[e] * scale_;
      if (r < group_) std::copy(src, src + head_dim_, t.group_q.begin() + r * head_dim_);
    }
  }

  // The mask of the tile's queries over keys k0 .. k0 + keys; returns how many pairs are visible.
  std::int64_t evaluate_mask(const work_item& item, tile_buffers& t, std::int64_t query_begin,
                             std::int64_t new_begin, std::int64_t k0, int keys) const {
    std::int64_t seen = 0;
    for (std::int32_t qi = 0; qi < item.queries; ++qi) {
      for (int j = 0; j < keys; ++j) {
        const bool visible = Sparsity::visible(
            params_, sparse::mask_context{item.sequence, query_begin + qi, k0 + j, new_begin});
        t.mask[qi * key_tile + j] = visible ? 1 : 0;
        seen += visible ? 1 : 0;
      }
    }
    return seen;
  }

  void key_tile_step(const work_item& item, tile_buffers& t, std::int64_t query_begin,
                     std::int64_t new_begin, std::int64_t k0, int keys) const {
    const tile_visibility shape = mask_shape<Sparsity>::of(
        params_, query_begin, query_begin + item.queries - 1, k0, k0 + keys - 1, new_begin);
    const std::int64_t pairs = std::int64_t{item.queries} * keys;
    const std::int64_t seen = shape == tile_visibility::all ? pairs
                              : shape == tile_visibility::none
                                  ? 0
                                  : evaluate_mask(item, t, query_begin, new_begin, k0, keys);
    if (seen == 0) return;  // nobody sees these keys: never read them
    load_keys(item, t, k0, keys);
    for (int j4 = 0; j4 < keys; j4 += 4) {
      const float* const* key_rows = t.key_rows.data() + j4;
      float* scores_at = t.scores.data() + std::int64_t{j4} * t.rows_pad;
      for (std::int64_t r0 = 0; r0 < t.rows_pad; r0 += 4 * lanes) {
        const float* qt = t.qt.data() + r0;
        switch (std::min<std::int64_t>(4, (t.rows_pad - r0) / lanes)) {
          case 4:
            score_block<4>(qt, t.rows_pad, head_dim_, key_rows, scores_at + r0);
            break;
          case 3:
            score_block<3>(qt, t.rows_pad, head_dim_, key_rows, scores_at + r0);
            break;
          case 2:
            score_block<2>(qt, t.rows_pad, head_dim_, key_rows, scores_at + r0);
            break;
          default:
            score_block<1>(qt, t.rows_pad, head_dim_, key_rows, scores_at + r0);
        }
      }
    }
    transform_and_mask(item, t, query_begin, k0, keys, seen == pairs);
    softmax_step(t, keys);
    const std::int64_t value_rows = kv::round_up(std::int64_t{item.queries} * group_, 4);
    for (std::int64_t r0 = 0; r0 < value_rows; r0 += 4) {
      const float* p = t.scores.data() + r0;
      float* acc = t.acc.data() + r0 * v_stored_;
      std::int64_t c0 = 0;
      for (; c0 + 4 * lanes <= v_stored_; c0 += 4 * lanes) {
        value_block<4>(p, t.rows_pad, keys, t.value_rows.data(), c0, &t.rescale[r0], acc + c0,
                       v_stored_);
      }
      for (; c0 < v_stored_; c0 += 2 * lanes) {
        value_block<2>(p, t.rows_pad, keys, t.value_rows.data(), c0, &t.rescale[r0], acc + c0,
                       v_stored_);
      }
    }
  }

  // Points key_rows and value_rows at the tile's keys and values as floats: float records in
  // place, other schemes dequantized into the buffers. Scores are computed four keys at a time:
  // the rows past the tile point at a row of zeros.
  void load_keys(const work_item& item, tile_buffers& t, std::int64_t k0, int keys) const {
    const auto& format = cache_.format;
    for (int j = 0; j < keys; ++j) {
      const kv::token_address at = cache_.locate(item.sequence, k0 + j);
      t.key_rows[j] = float_row(format.k, format.k_codes(at.page, at.slot, item.kv_head),
                                format.k_params(at.page, at.slot, item.kv_head),
                                t.keys.data() + std::int64_t{j} * k_stored_);
      t.value_rows[j] = float_row(format.v, format.v_codes(at.page, at.slot, item.kv_head),
                                  format.v_params(at.page, at.slot, item.kv_head),
                                  t.values.data() + std::int64_t{j} * v_stored_);
    }
    for (int j = keys; j < (keys + 3) / 4 * 4; ++j) t.key_rows[j] = t.zero_key.data();
  }

  template <class S>
  static const float* float_row(const kv::vector_format<S>& format, const std::uint8_t* codes,
                                const std::uint8_t* params, float* buffer) {
    if constexpr (std::is_same_v<S, quant::none<float>>) {
      return reinterpret_cast<const float*>(codes);
    } else {
      dequantize_vector(format, codes, params, buffer);
      return buffer;
    }
  }

  // Soft cap and ALiBi (when set) on the scaled scores, then -inf where the mask hides a key.
  void transform_and_mask(const work_item& item, tile_buffers& t, std::int64_t query_begin,
                          std::int64_t k0, int keys, bool all_visible) const {
    const bool transformed = transform_.soft_cap > 0.0f || transform_.alibi_slopes != nullptr;
    if (!transformed && all_visible) return;
    for (int j = 0; j < keys; ++j) {
      float* scores = t.scores.data() + std::int64_t{j} * t.rows_pad;
      for (std::int32_t qi = 0; qi < item.queries; ++qi) {
        const bool visible = all_visible || t.mask[qi * key_tile + j] != 0;
        for (std::int32_t g = 0; g < group_; ++g) {
          float& s = scores[qi * group_ + g];
          if (!visible) {
            s = -INFINITY;
          } else if (transformed) {
            s = transform_(s, item.kv_head * group_ + g, query_begin + qi, k0 + j);
          }
        }
      }
    }
  }

  // The online softmax over one key tile, vectorized over rows: new maxima, the factor that
  // rescales what was accumulated, probabilities in place of the scores, running sums.
  void softmax_step(tile_buffers& t, int keys) const {
    const float_tag d;
    const auto negative_infinity = hn::Set(d, -INFINITY);
    for (std::int64_t r = 0; r < t.rows_pad; r += lanes) {
      const auto old_max = hn::LoadU(d, &t.max[r]);
      auto tile_max = negative_infinity;
      for (int j = 0; j < keys; ++j) {
        tile_max = hn::Max(tile_max, hn::LoadU(d, &t.scores[j * t.rows_pad + r]));
      }
      const auto new_max = hn::Max(old_max, tile_max);
      // With nothing seen yet (max -inf), measure from 0: every weight is then exp(-inf) = 0.
      const auto origin = hn::IfThenZeroElse(hn::Eq(new_max, negative_infinity), new_max);
      const auto rescale = hn::Exp(d, hn::Sub(old_max, origin));
      auto tile_sum = hn::Zero(d);
      for (int j = 0; j < keys; ++j) {
        float* s = &t.scores[j * t.rows_pad + r];
        const auto p = hn::Exp(d, hn::Sub(hn::LoadU(d, s), origin));
        hn::StoreU(p, d, s);
        tile_sum = hn::Add(tile_sum, p);
      }
      hn::StoreU(hn::MulAdd(hn::LoadU(d, &t.sum[r]), rescale, tile_sum), d, &t.sum[r]);
      hn::StoreU(new_max, d, &t.max[r]);
      hn::StoreU(rescale, d, &t.rescale[r]);
    }
  }

  void store_outputs(const work_item& item, const tile_buffers& t, std::int64_t rows) const {
    const std::int32_t v_dim = cache_.format.v.head_dim;
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int64_t token = item.first + r / group_;
      const std::int64_t head = std::int64_t{item.kv_head} * group_ + r % group_;
      const float sum = t.sum[r];
      const float inverse = sum == 0.0f ? 0.0f : 1.0f / sum;
      const float* acc = t.acc.data() + r * v_stored_;
      float* dst = &out_(token, head, 0);
      for (std::int32_t e = 0; e < v_dim; ++e) dst[e] = acc[e] * inverse;
      if (lse_.data() != nullptr)
        lse_(token, head) = sum == 0.0f ? -INFINITY : t.max[r] + std::log(sum);
    }
  }

  host_view<const float, 3> q_;
  host_view<const std::int32_t, 1> q_indptr_;
  cache_type cache_;
  host_view<float, 3> out_;
  typename Sparsity::params params_;
  host_view<float, 2> lse_;
  std::int32_t head_dim_;
  std::int64_t k_stored_;
  std::int64_t v_stored_;
  std::int32_t group_;
  std::int32_t tile_queries_;
  std::int64_t max_rows_pad_;  // the widest tile's rows_pad: what the buffers hold
  score_transform transform_;  // scale 1: the queries are scaled already
  float scale_;
};

// ---- The few-query path: a handful of new tokens over a long cached prefix (a speculative
// verification step). A unit is (sequence, KV head): its rows are every new token times every
// query head of the group, and its selected tokens are walked a tile of one page at a time as
// decode walks them (tile_walk.hpp), each K and V vector unpacked in registers once for all the
// rows; the mask is evaluated per (query, key) only on tiles that the policy's closed form does
// not decide (under causal and tree: the tiles holding new tokens). Long selections are cut into
// split-KV chunks of split_tokens, any thread takes any chunk, and the chunks of a unit are merged
// by log-sum-exp at the end.

// New tokens per sequence, and rows (new tokens x group) per KV head, up to which prefill takes
// the few-query path. Its cost grows with the rows (each row its own dot products), the tiled
// path's with the rows padded to whole vectors: past about 32 rows the tiled path is cheaper.
inline constexpr std::int64_t few_queries = 16;
inline constexpr std::int64_t few_rows = 32;

// Whether every sequence of the call fits the few-query path.
inline bool takes_few_query_path(host_view<const std::int32_t, 1> q_indptr, std::int32_t batch,
                                 std::int32_t group) {
  for (std::int32_t b = 0; b < batch; ++b) {
    const std::int64_t n = q_indptr(b + 1) - q_indptr(b);
    if (n > few_queries || n * group > few_rows) return false;
  }
  return true;
}

template <int KStored, int VStored, class Sparsity, class Layout, class K, class V>
class few_query_kernel {
 public:
  using cache_type = kv::cache_view<Layout, K, V, host_memory>;

  few_query_kernel(const exec::cpu& exec, host_view<const float, 3> q,
                   host_view<const std::int32_t, 1> q_indptr, const cache_type& cache,
                   host_view<float, 3> out, const typename Sparsity::params& params,
                   const options& opts, host_view<float, 2> lse)
      : exec_(exec),
        q_(q),
        q_indptr_(q_indptr),
        cache_(cache),
        out_(out),
        params_(params),
        lse_(lse),
        transform_(score_transform::from(opts, cache.format.k.head_dim)),
        kv_heads_(cache.format.k.heads),
        group_(static_cast<std::int32_t>(q.extent(1) / kv_heads_)),
        k_stored_(dims_or<KStored>(cache.format.k.stored_dim())),
        v_stored_(dims_or<VStored>(cache.format.v.stored_dim())),
        partial_floats_(kv::round_up(std::int64_t{v_stored_} + 2, 16)),
        thread_floats_(few_rows * (k_stored_ + score_tile + 1) + few_queries * score_tile) {}

  void run() {
    select_units();
    const std::int64_t chunk_floats = rows_ * partial_floats_;
    const auto partials = std::make_unique_for_overwrite<float[]>(
        static_cast<std::size_t>(chunk_offsets_.back() * chunk_floats));
    const auto scratch = std::make_unique_for_overwrite<float[]>(
        static_cast<std::size_t>(exec_.threads() * thread_floats_));
    const std::int64_t chunks = chunk_offsets_.back();
    std::atomic<std::int64_t> next{0};
    exec_.parallel_for_ranges(exec_.threads(), [&](int thread, std::int64_t, std::int64_t) {
      float* own = scratch.get() + thread * thread_floats_;
      std::int64_t loaded = -1;
      for (std::int64_t c = next++; c < chunks; c = next++) {
        const std::int64_t u = std::upper_bound(chunk_offsets_.begin(), chunk_offsets_.end(), c) -
                               chunk_offsets_.begin() - 1;
        if (u != loaded) load_queries(units_[static_cast<std::size_t>(u)], own);
        loaded = u;
        attend_chunk(units_[static_cast<std::size_t>(u)], c - chunk_offsets_[u], own,
                     partials.get() + c * chunk_floats);
      }
    });
    exec_.parallel_for(std::ssize(units_), [&](std::int64_t u) {
      merge_unit(units_[static_cast<std::size_t>(u)],
                 partials.get() + chunk_offsets_[u] * chunk_floats,
                 chunk_offsets_[u + 1] - chunk_offsets_[u]);
    });
  }

 private:
  struct unit {
    std::int32_t sequence;
    std::int32_t kv_head;
    std::int64_t first;      // row of q of the sequence's first new token
    std::int32_t queries;    // new tokens
    std::int64_t length;     // of the sequence, the new tokens included
    std::int64_t new_begin;  // position of the first new token
    std::int32_t rows;       // queries x group
    std::vector<sparse::token_range> ranges;
    std::int64_t selected = 0;  // tokens in the ranges
  };

  // The units, their ranges (the policy's select() once per unit, for all its queries) and the
  // chunk offsets.
  void select_units() {
    std::vector<float> group_q(static_cast<std::size_t>(group_) * cache_.format.k.head_dim);
    std::int64_t pages = 0;
    for (std::int32_t b = 0; b < cache_.sequences(); ++b) {
      pages = std::max(pages, (cache_.length(b) + cache_.format.slots - 1) / cache_.format.slots);
    }
    std::vector<float> select_scratch(
        static_cast<std::size_t>(select_floats_per_page<Sparsity>() * pages));
    for (std::int32_t b = 0; b < cache_.sequences(); ++b) {
      const auto queries = static_cast<std::int32_t>(q_indptr_(b + 1) - q_indptr_(b));
      if (queries == 0) continue;
      const std::int64_t length = cache_.length(b);
      const std::int64_t new_begin = length - queries;
      std::int32_t run = b;  // the contiguous layout's one "page" of the sequence
      const std::int32_t* pages_of = &run;
      if constexpr (Layout::is_paged) pages_of = cache_.table.indices + cache_.table.indptr[b];
      for (std::int32_t h = 0; h < kv_heads_; ++h) {
        for (std::int32_t g = 0; g < group_; ++g) {
          const float* src = &q_(q_indptr_(b), h * group_ + g, 0);
          std::copy(src, src + cache_.format.k.head_dim,
                    group_q.begin() + std::int64_t{g} * cache_.format.k.head_dim);
        }
        const sparse::query_context context{b,
                                            h,
                                            length,
                                            new_begin,
                                            length,
                                            new_begin,
                                            group_q.data(),
                                            group_,
                                            cache_.format.k.head_dim,
                                            transform_.scale,
                                            cache_.format.slots,
                                            pages_of,
                                            kv_heads_,
                                            cache_.key_min,
                                            cache_.key_max,
                                            cache_.mass,
                                            select_scratch.data(),
                                            std::ssize(select_scratch),
                                            cache_.pool_pages};
        unit u{b, h, q_indptr_(b), queries, length, new_begin, queries * group_, {}};
        u.ranges.resize(static_cast<std::size_t>(
            std::max<std::int64_t>(0, Sparsity::max_ranges(params_, context))));
        const std::int64_t count =
            u.ranges.empty() ? 0 : Sparsity::select(params_, context, u.ranges.data());
        u.ranges.resize(static_cast<std::size_t>(walk::sanitize_ranges(
            u.ranges.data(), std::clamp<std::int64_t>(count, 0, std::ssize(u.ranges)), length)));
        for (const sparse::token_range& r : u.ranges) u.selected += r.end - r.begin;
        rows_ = std::max(rows_, u.rows);
        units_.push_back(std::move(u));
      }
    }
    // Chunks of split_tokens, or longer: more chunks than a few per thread only add merges.
    std::int64_t selected = 0;
    for (const unit& u : units_) selected += u.selected;
    chunk_tokens_ = std::max(
        split_tokens,
        kv::round_up((selected + 4 * exec_.threads() - 1) / (4 * exec_.threads()), split_tokens));
    chunk_offsets_.assign(1, 0);
    for (const unit& u : units_) {
      chunk_offsets_.push_back(chunk_offsets_.back() +
                               (u.selected + chunk_tokens_ - 1) / chunk_tokens_);
    }
  }

  // The unit's query rows (row r: new token r / group, query head r % group of the KV head),
  // k_stored_ floats apart, zero past head_dim.
  void load_queries(const unit& u, float* rows) const {
    const std::int32_t head_dim = cache_.format.k.head_dim;
    for (std::int32_t r = 0; r < u.rows; ++r) {
      const float* src = &q_(u.first + r / group_, u.kv_head * group_ + r % group_, 0);
      float* row = rows + std::int64_t{r} * k_stored_;
      std::copy(src, src + head_dim, row);
      std::fill(row + head_dim, row + k_stored_, 0.0f);
    }
  }

  // The online softmax of the unit's chunk `chunk` into its partial slot: rows x (acc[v_stored],
  // max, sum), scores in base 2.
  void attend_chunk(const unit& u, std::int64_t chunk, float* own, float* partial) const {
    using k_scheme = typename cache_type::k_scheme;
    using v_scheme = typename cache_type::v_scheme;
    const auto& f = cache_.format;
    const std::int32_t rows = u.rows;
    const float* q = own;
    float* scores = own + few_rows * k_stored_;
    float* factors = scores + few_rows * score_tile;
    float* visible = factors + few_rows;  // (queries, score_tile)
    constexpr float log2e = std::numbers::log2e_v<float>;
    const bool scale_only = transform_.soft_cap == 0.0f && transform_.alibi_slopes == nullptr;
    const float scale_log2 = transform_.scale * log2e;
    for (std::int32_t r = 0; r < rows; ++r) {
      float* acc = partial + r * partial_floats_;
      std::fill(acc, acc + v_stored_, 0.0f);
      acc[v_stored_] = -INFINITY;
      acc[v_stored_ + 1] = 0.0f;
    }
    const std::int64_t query_last = u.new_begin + u.queries - 1;

    // Fills visible (one row of score_tile per query, or one shared row when the policy's
    // closed form says every query sees every key of the tile); returns whether any pair is.
    const auto mask = [&](std::int64_t t, std::int64_t n, bool& shared) {
      const tile_visibility shape =
          mask_shape<Sparsity>::of(params_, u.new_begin, query_last, t, t + n - 1, u.new_begin);
      shared = shape != tile_visibility::some;
      if (shape == tile_visibility::none) return false;
      if (shared) {
        for (std::int64_t j = 0; j < score_tile; ++j) visible[j] = j < n ? 1.0f : 0.0f;
        return true;
      }
      bool any = false;
      for (std::int32_t qi = 0; qi < u.queries; ++qi) {
        for (std::int64_t j = 0; j < score_tile; ++j) {
          const bool seen =
              j < n && Sparsity::visible(params_, sparse::mask_context{u.sequence, u.new_begin + qi,
                                                                       t + j, u.new_begin});
          visible[qi * score_tile + j] = seen ? 1.0f : 0.0f;
          any = any || seen;
        }
      }
      return any;
    };

    const auto tile = [&](const walk::tile_place& here, walk::line_stream& k_ahead,
                          walk::line_stream& v_ahead) {
      const auto [page, slot, t, n] = here;
      bool shared = true;
      if (!mask(t, n, shared)) return;  // nobody sees these keys: never read them
      walk::tile_records k;
      walk::tile_records v;
      walk::gather_tile(f, page, slot, n, u.kv_head, k, v);
      walk::for_row_runs<walk::unpack_lanes<k_scheme>>(rows, [&]<int Rows>(std::int32_t r) {
        walk::score_rows<k_scheme, KStored, Rows>(f.k, k, n, q + std::int64_t{r} * k_stored_,
                                                  k_stored_, scores + r * score_tile, k_ahead);
      });
      bool any = false;
      for (std::int32_t r = 0; r < rows; ++r) {
        const std::int32_t qi = r / group_;
        const float* seen = shared ? visible : visible + qi * score_tile;
        float* s = scores + r * score_tile;
        if (scale_only) {
          walk::scaled_logits(s, seen, scale_log2);
        } else {
          const std::int32_t q_head = u.kv_head * group_ + r % group_;
          for (std::int64_t j = 0; j < score_tile; ++j) {
            s[j] = seen[j] != 0.0f ? transform_(s[j], q_head, u.new_begin + qi, t + j) * log2e
                                   : -INFINITY;
          }
        }
        factors[r] = walk::fold_tile(s, partial + r * partial_floats_, v_stored_, any);
      }
      if (!any) return;
      walk::accumulate_tile<v_scheme, VStored>(f.v, v, n, rows, scores, factors, partial,
                                               partial_floats_, v_ahead);
    };
    const std::int64_t first = chunk * chunk_tokens_;
    const std::int64_t last = std::min(u.selected, first + chunk_tokens_);
    walk::for_each_tile_ahead(cache_, u.sequence, u.kv_head, u.ranges.data(), std::ssize(u.ranges),
                              first, last, tile);
  }

  // Merges the unit's chunks row by row and writes out (normalised) and lse.
  void merge_unit(const unit& u, float* partials, std::int64_t chunks) const {
    const std::int64_t chunk_floats = rows_ * partial_floats_;
    const std::int32_t v_dim = cache_.format.v.head_dim;
    for (std::int32_t r = 0; r < u.rows; ++r) {
      float* acc = partials + r * partial_floats_;
      softmax_state<log_base::two> state{};
      if (chunks > 0) state = {acc[v_stored_], acc[v_stored_ + 1]};
      for (std::int64_t c = 1; c < chunks; ++c) {
        const float* other = acc + c * chunk_floats;
        const softmax_rescale factors = state.merge({other[v_stored_], other[v_stored_ + 1]});
        for (std::int32_t e = 0; e < v_stored_; ++e) {
          acc[e] = acc[e] * factors.previous + other[e] * factors.incoming;
        }
      }
      const float inverse = state.inverse_sum();
      const std::int64_t token = u.first + r / group_;
      const std::int64_t head = std::int64_t{u.kv_head} * group_ + r % group_;
      float* dst = &out_(token, head, 0);
      for (std::int32_t e = 0; e < v_dim; ++e) dst[e] = chunks == 0 ? 0.0f : acc[e] * inverse;
      if (lse_.data() != nullptr) lse_(token, head) = state.natural_lse();
    }
  }

  const exec::cpu& exec_;
  host_view<const float, 3> q_;
  host_view<const std::int32_t, 1> q_indptr_;
  cache_type cache_;
  host_view<float, 3> out_;
  typename Sparsity::params params_;
  host_view<float, 2> lse_;
  score_transform transform_;
  std::int32_t kv_heads_;
  std::int32_t group_;
  std::int32_t k_stored_;
  std::int32_t v_stored_;
  std::int64_t partial_floats_;  // per row: acc (v_stored), max, sum; rounded to 64 bytes
  std::int64_t thread_floats_;   // scratch: q rows, scores, factors, visible
  std::vector<unit> units_;
  std::int32_t rows_ = 0;                     // the most rows of a unit
  std::int64_t chunk_tokens_ = split_tokens;  // selected tokens per chunk
  std::vector<std::int64_t> chunk_offsets_;   // (units + 1): each unit's first chunk
};

// Writes every new token's K and V into its slot, encoded by the cache's formats.
template <class Layout, class K, class V>
void store_new_tokens(const exec::cpu& exec, host_view<const float, 3> k,
                      host_view<const float, 3> v, host_view<const std::int32_t, 1> q_indptr,
                      const kv::cache_view<Layout, K, V, host_memory>& cache) {
  const std::int32_t batch = cache.sequences();
  const auto& format = cache.format;
  exec.parallel_for(k.extent(0), [&](std::int64_t token) {
    const std::int32_t* bounds = q_indptr.data();
    const auto b =
        static_cast<std::int32_t>(std::upper_bound(bounds, bounds + batch + 1, token) - bounds - 1);
    const std::int64_t position = cache.length(b) - (bounds[b + 1] - token);
    const kv::token_address at = cache.locate(b, position);
    for (std::int32_t h = 0; h < format.k.heads; ++h) {
      format.k.encode(&k(token, h, 0), format.k_codes(at.page, at.slot, h),
                      format.k_params(at.page, at.slot, h));
      format.v.encode(&v(token, h, 0), format.v_codes(at.page, at.slot, h),
                      format.v_params(at.page, at.slot, h));
    }
  });
}

// Recomputes key_min and key_max of every page that received new keys, over the page's stored
// keys (the prefix's, kept in a partly filled page, included).
template <class Layout, class K, class V>
void update_key_bounds(const exec::cpu& exec, host_view<const std::int32_t, 1> q_indptr,
                       const kv::cache_view<Layout, K, V, host_memory>& cache) {
  const auto& format = cache.format;
  const std::int32_t slots = format.slots;
  exec.parallel_for(cache.sequences(), [&](std::int64_t sequence) {
    const auto b = static_cast<std::int32_t>(sequence);
    const std::int64_t length = cache.length(b);
    const std::int64_t fresh = q_indptr(b + 1) - q_indptr(b);
    if (fresh == 0) return;
    for (std::int64_t page = (length - fresh) / slots; page * slots < length; ++page) {
      const std::int32_t filled =
          static_cast<std::int32_t>(std::min<std::int64_t>(slots, length - page * slots));
      const kv::token_address at = cache.locate(b, page * slots);
      const std::int64_t index = (at.page - cache.pages) / format.page_bytes();
      const std::int64_t values = std::int64_t{format.k.heads} * format.k.head_dim;
      kv::detail::fold_key_bounds(format, at.page, 0, filled, cache.key_min + index * values,
                                  cache.key_max + index * values);
    }
  });
}

}  // namespace detail

}  // namespace infuse::attention::cpu

namespace infuse::attention::detail {

template <>
struct prefill_body<exec::cpu> {
  template <class Sparsity, class Layout, class K, class V>
  static void run(const exec::cpu& exec, host_view<const float, 3> q, host_view<const float, 3> k,
                  host_view<const float, 3> v, host_view<const std::int32_t, 1> q_indptr,
                  const kv::cache_view<Layout, K, V, host_memory>& cache, host_view<float, 3> out,
                  const typename Sparsity::params& params, const options& opts,
                  host_view<float, 2> lse) {
    namespace body = cpu::detail;
    body::store_new_tokens(exec, k, v, q_indptr, cache);
    if (cache.key_min != nullptr) body::update_key_bounds(exec, q_indptr, cache);

    const auto group = static_cast<std::int32_t>(q.extent(1) / cache.format.k.heads);
    if (body::takes_few_query_path(q_indptr, cache.sequences(), group)) {
      const auto few = [&]<int Stored>() {
        body::few_query_kernel<Stored, Stored, Sparsity, Layout, K, V>(exec, q, q_indptr, cache,
                                                                       out, params, opts, lse)
            .run();
      };
      const int dim = cache.format.k.head_dim;
      if (dim != cache.format.v.head_dim) return few.template operator()<0>();
      switch (dim) {
        case 64:
          return few.template operator()<64>();
        case 128:
          return few.template operator()<128>();
        default:
          return few.template operator()<0>();
      }
    }
    const body::prefill_kernel<Sparsity, Layout, K, V> kernel(q, q_indptr, cache, out, params, opts,
                                                              lse);
    const std::vector<body::work_item> items = kernel.items();
    std::atomic<std::size_t> next{0};
    exec.parallel_for_ranges(exec.threads(), [&](int, std::int64_t, std::int64_t) {
      body::tile_buffers buffers = kernel.buffers();
      for (std::size_t i = next++; i < items.size(); i = next++) kernel.attend(items[i], buffers);
    });
  }
};

}  // namespace infuse::attention::detail
