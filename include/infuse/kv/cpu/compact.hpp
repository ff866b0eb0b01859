// KV compaction on the CPU: after a retention rule (kv/retain.hpp) has chosen the kept positions
// of a sequence, their K/V records and attention mass move to the front of the sequence in order.
// See docs/policies.md#kv-retention.
//
//   kv::retain::compact(exec, view, sequences, kept_indptr, kept, new_lengths);
//   for each i: kv::update_key_bounds(view, sequences[i], 0, new_lengths[i]);  // key bounds kept
//               cache.truncate(id, view.length(sequences[i]) - new_lengths[i]);
//
// Records move as bytes (page_format's map, within the sequence's own pages), so a kept token
// reads back bit for bit. The caller then recomputes the per-page key bounds (key_min, key_max),
// which no longer describe the moved tokens (kv/metadata.hpp), and shortens each sequence to its
// new length (the cache's truncate; it ends the view).
// compact_merged first folds each evicted token into its most similar kept token (Elastic Cache,
// D2O) and re-quantizes those kept tokens' records.
//
// The compacted sequences' pages must not be shared with any other sequence: compaction writes
// in place, so a page a fork shares would change for both (compact a fork only after giving it
// pages of its own: kv::cache::unshare). Two compacted sequences holding one page is an error (the
// view shows that much; sharing with sequences outside the batch is the caller's to rule out).
// Every check runs before the first byte is written. kv::cache::compact does all of it (unshare,
// move, key bounds, truncate) on host or device memory (kv/page_pool.hpp, kv/cuda/cache.cuh), and
// kv::cache::compact_merged the merge on host memory. kv::per_channel keys (KIVI) are refused
// here at compile time: their groups belong to a page, so moved or merged keys re-quantize their
// pages and the window, which the cache holds.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "infuse/core/error.hpp"
#include "infuse/core/memory.hpp"
#include "infuse/core/view.hpp"
#include "infuse/exec/cpu.hpp"
#include "infuse/kv/cache_view.hpp"
#include "infuse/kv/layout.hpp"
#include "infuse/kv/retain.hpp"

namespace infuse::kv::retain {

template <class Layout, class KScheme, class VScheme>
using host_cache_view = cache_view<Layout, KScheme, VScheme, host_memory>;

namespace detail {

inline void require_table(const contiguous_table_view& table, std::int32_t pool_pages,
                          std::int32_t slots, std::string_view call) {
  require(table.sequences >= 0 && table.sequences <= pool_pages, call, "table.sequences",
          table.sequences, "0 to the pool's " + std::to_string(pool_pages) + " runs");
  require(table.capacity == slots, call, "table.capacity", table.capacity,
          std::to_string(slots) + " (format.slots)");
  for (std::int32_t s = 0; s < table.sequences; ++s) {
    require(table.lengths[s] >= 0 && table.lengths[s] <= slots, call,
            "table.lengths[" + std::to_string(s) + "]", table.lengths[s],
            "0 to the capacity " + std::to_string(slots));
  }
}

template <int PageSize>
void require_table(const page_table_view<PageSize>& table, std::int32_t pool_pages,
                   std::int32_t slots, std::string_view call) {
  require(slots == PageSize, call, "format.slots", slots,
          std::to_string(PageSize) + " (the page size)");
  require_page_table(table, pool_pages, call);
}

// The pages (contiguous: the run) that sequence s owns.
template <class Table>
void for_each_page(const Table& table, std::int32_t s, auto&& visit) {
  if constexpr (std::is_same_v<Table, contiguous_table_view>) {
    visit(s);
  } else {
    for (std::int32_t i = table.indptr[s]; i < table.indptr[s + 1]; ++i) visit(table.indices[i]);
  }
}

template <class Layout, class KScheme, class VScheme>
void require_cache(const host_cache_view<Layout, KScheme, VScheme>& cache, std::string_view call) {
  cache.format.k.require_valid(call, "format.k");
  cache.format.v.require_valid(call, "format.v");
  require(cache.pool_pages >= 0, call, "cache.pool_pages", cache.pool_pages, "at least 0");
  require_table(cache.table, cache.pool_pages, cache.format.slots, call);
  require(cache.pages != nullptr || cache.pool_pages == 0, call, "cache.pages", cache.pages,
          "the pool's pages");
}

// Kept positions of sequence s (of `length` tokens): strictly ascending, inside the sequence.
inline void require_kept(std::int64_t s, std::int64_t length, const std::int32_t* kept,
                         std::int64_t first, std::int64_t count, std::string_view call) {
  for (std::int64_t j = first; j < first + count; ++j) {
    const std::int64_t low = j == first ? 0 : std::int64_t{kept[j - 1]} + 1;
    require(kept[j] >= low && kept[j] < length, call, "kept[" + std::to_string(j) + "]", kept[j],
            "a position of sequence " + std::to_string(s) + " (length " + std::to_string(length) +
                ") above the one before it (kept positions ascend)");
  }
}

// Copies the `heads` records of slot `from` of one region to slot `to` of another; nhd keeps a
// token's heads together, so one copy does.
template <class Order>
void copy_records(std::uint8_t* to_region, std::int32_t to, const std::uint8_t* from_region,
                  std::int32_t from, std::int32_t slots, std::int32_t heads, std::int64_t bytes) {
  if constexpr (std::is_same_v<Order, nhd>) {
    std::memcpy(to_region + Order::offset(to, 0, 0, slots, heads, bytes),
                from_region + Order::offset(from, 0, 0, slots, heads, bytes),
                static_cast<std::size_t>(heads * bytes));
  } else {
    for (std::int32_t h = 0; h < heads; ++h) {
      std::memcpy(to_region + Order::offset(to, h, 0, slots, heads, bytes),
                  from_region + Order::offset(from, h, 0, slots, heads, bytes),
                  static_cast<std::size_t>(bytes));
    }
  }
}

// Token `from` of sequence s to position `to` (< from): its four records and its mass.
template <class Layout, class KScheme, class VScheme>
void move_token(const host_cache_view<Layout, KScheme, VScheme>& cache, std::int32_t s,
                std::int64_t from, std::int64_t to) {
  using order = typename Layout::order;
  const auto& f = cache.format;
  const token_location src = cache.table.locate(s, from);
  const token_location dst = cache.table.locate(s, to);
  const std::uint8_t* src_page = cache.page(src.page);
  std::uint8_t* dst_page = cache.page(dst.page);
  const auto region = [&](std::int64_t offset, std::int32_t heads, std::int64_t bytes) {
    copy_records<order>(dst_page + offset, dst.slot, src_page + offset, src.slot, f.slots, heads,
                        bytes);
  };
  region(f.k_codes_offset(), f.k.heads, f.k.code_bytes());
  region(f.k_params_offset(), f.k.heads, f.k.param_bytes());
  region(f.v_codes_offset(), f.v.heads, f.v.code_bytes());
  region(f.v_params_offset(), f.v.heads, f.v.param_bytes());
  if (cache.mass != nullptr) {
    std::memcpy(cache.mass + (std::int64_t{dst.page} * f.slots + dst.slot) * f.k.heads,
                cache.mass + (std::int64_t{src.page} * f.slots + src.slot) * f.k.heads,
                sizeof(float) * static_cast<std::size_t>(f.k.heads));
  }
}

// Moves kept[0..count) of sequence s to positions 0..count-1, and their counts with them. In
// ascending order every source is at or after its destination and is read before anything
// overwrites it.
template <class Layout, class KScheme, class VScheme>
void move_kept(const host_cache_view<Layout, KScheme, VScheme>& cache, std::int32_t s,
               const std::int32_t* kept, std::int64_t count, std::int32_t* counts) {
  for (std::int64_t j = 0; j < count; ++j) {
    if (kept[j] == j) continue;
    move_token(cache, s, kept[j], j);
    if (counts != nullptr) counts[j] = counts[kept[j]];
  }
}

}  // namespace detail

// Compacts sequences[i] of the cache view to the positions kept[kept_indptr[i] ..
// kept_indptr[i + 1]) (ascending), i over the batch, and writes the new lengths. Sequences run in
// parallel; nothing is written when any argument is wrong.
//   sequences    (batch)      indices of the view's table, each at most once
//   kept_indptr  (batch + 1)  CSR offsets into kept
//   kept         (kept_indptr[batch] or more)
//   new_lengths  (batch)
template <class Layout, class KScheme, class VScheme>
void compact(const exec::cpu& exec, const host_cache_view<Layout, KScheme, VScheme>& cache,
             host_view<const std::int32_t, 1> sequences,
             host_view<const std::int32_t, 1> kept_indptr, host_view<const std::int32_t, 1> kept,
             host_view<std::int64_t, 1> new_lengths) {
  static_assert(!is_per_channel<KScheme>,
                "infuse: kv::per_channel keys share their groups across a page's tokens, so moved "
                "keys re-quantize their page and the window: use kv::cache::compact; see "
                "docs/policies.md#kivi-and-zipvl-arrangements");
  constexpr std::string_view call = "infuse::kv::retain::compact";
  const std::int64_t batch = sequences.extent(0);
  require_view(sequences, call, "sequences", {{any_extent}});
  require_view(kept_indptr, call, "kept_indptr", {{batch + 1, "batch + 1"}});
  require_view(new_lengths, call, "new_lengths", {{batch, "batch"}});
  require_view(kept, call, "kept", {{any_extent}});
  detail::require_cache(cache, call);
  require(kept_indptr(0) == 0, call, "kept_indptr[0]", kept_indptr(0), "0");
  // Every page of a compacted sequence belongs to it alone within the batch.
  std::vector<char> owned(static_cast<std::size_t>(cache.pool_pages), 0);
  for (std::int64_t i = 0; i < batch; ++i) {
    const std::int32_t s = sequences(i);
    std::string index = "[";  // appended, not "[" + ...: g++ 12 warns falsely (-Wrestrict) there
    index += std::to_string(i);
    index += ']';
    require(s >= 0 && s < cache.sequences(), call, "sequences" + index, s,
            "a sequence of the cache view, 0 to " + std::to_string(cache.sequences() - 1));
    detail::for_each_page(cache.table, s, [&](std::int32_t page) {
      require(!owned[static_cast<std::size_t>(page)], call, "sequences" + index, s,
              "a sequence whose pages (page " + std::to_string(page) +
                  ") no other compacted sequence holds, each sequence once");
      owned[static_cast<std::size_t>(page)] = 1;
    });
    require(kept_indptr(i + 1) >= kept_indptr(i) && kept_indptr(i + 1) <= kept.extent(0), call,
            "kept_indptr[" + std::to_string(i + 1) + "]", kept_indptr(i + 1),
            "from kept_indptr[" + std::to_string(i) + "] to kept.extent(0) " +
                std::to_string(kept.extent(0)));
    detail::require_kept(s, cache.length(s), kept.data(), kept_indptr(i),
                         kept_indptr(i + 1) - kept_indptr(i), call);
  }
  exec.parallel_for(batch, [&](std::int64_t i) {
    const std::int64_t count = kept_indptr(i + 1) - kept_indptr(i);
    detail::move_kept(cache, sequences(i), kept.data() + kept_indptr(i), count, nullptr);
    new_lengths(i) = count;
  });
}

// ---- Merge compaction (Elastic Cache / D2O) ----

namespace detail {

// The pieces of compact_merged's workspace, in order (8-byte pieces first, so each piece stays
// aligned when the workspace is).
struct merge_workspace {
  std::int64_t key_dims, value_dims, threads, length, kept;

  // One token's keys or values as floats, per thread.
  std::int64_t scratch_floats() const { return std::max(key_dims, value_dims); }

  std::int64_t norms() const { return 0; }                  // kept doubles
  std::int64_t sums() const { return norms() + 8 * kept; }  // threads x (key + value dims) doubles
  std::int64_t kept_keys() const { return sums() + 8 * threads * (key_dims + value_dims); }
  std::int64_t scratch() const { return kept_keys() + 4 * kept * key_dims; }
  std::int64_t merged_indptr() const { return scratch() + 4 * threads * scratch_floats(); }
  std::int64_t evicted() const { return merged_indptr() + 4 * (kept + 1); }
  std::int64_t targets() const { return evicted() + 4 * (length - kept); }
  std::int64_t merged() const { return targets() + 4 * (length - kept); }
  std::int64_t bytes() const { return merged() + 4 * (length - kept); }
};

template <class Layout, class KScheme, class VScheme>
merge_workspace merge_pieces(const exec::cpu& exec,
                             const host_cache_view<Layout, KScheme, VScheme>& cache,
                             std::int64_t length, std::int64_t kept) {
  const auto& f = cache.format;
  return {std::int64_t{f.k.heads} * f.k.head_dim, std::int64_t{f.v.heads} * f.v.head_dim,
          exec.threads(), length, kept};
}

// Dequantizes the `heads` vectors of one token (K or V) into out (heads x head_dim).
template <class Order, class Scheme>
void decode_token(const vector_format<Scheme>& format, const std::uint8_t* page,
                  std::int64_t codes_offset, std::int64_t params_offset, std::int32_t slots,
                  std::int32_t slot, float* out) {
  for (std::int32_t h = 0; h < format.heads; ++h) {
    const std::uint8_t* codes =
        page + codes_offset + Order::offset(slot, h, 0, slots, format.heads, format.code_bytes());
    const std::uint8_t* params =
        page + params_offset + Order::offset(slot, h, 0, slots, format.heads, format.param_bytes());
    for (std::int32_t d = 0; d < format.head_dim; ++d) {
      out[std::int64_t{h} * format.head_dim + d] = format.value(codes, params, d);
    }
  }
}

// The keys of token t of sequence s as a kernel reads them (kv::per_channel keys: from the window
// while their page is not full), heads x head_dim floats.
template <class Layout, class KScheme, class VScheme>
void decode_keys(const host_cache_view<Layout, KScheme, VScheme>& cache, std::int32_t s,
                 std::int64_t t, float* out) {
  const auto& f = cache.format;
  if constexpr (is_per_channel<KScheme>) {
    for (std::int32_t h = 0; h < f.k.heads; ++h) {
      float key[1024];  // head_dim is at most 1024
      read_key(cache, s, t, h, key);
      std::copy(key, key + f.k.head_dim, out + std::int64_t{h} * f.k.head_dim);
    }
  } else {
    const token_location at = cache.table.locate(s, t);
    decode_token<typename Layout::order>(f.k, cache.page(at.page), f.k_codes_offset(),
                                         f.k_params_offset(), f.slots, at.slot, out);
  }
}

template <class Layout, class KScheme, class VScheme>
void decode_values(const host_cache_view<Layout, KScheme, VScheme>& cache, token_location at,
                   float* out) {
  const auto& f = cache.format;
  decode_token<typename Layout::order>(f.v, cache.page(at.page), f.v_codes_offset(),
                                       f.v_params_offset(), f.slots, at.slot, out);
}

// Quantizes heads x head_dim doubles (sums / weight) into one token's records (K or V).
template <class Order, class Scheme>
void encode_token(const vector_format<Scheme>& format, std::uint8_t* page,
                  std::int64_t codes_offset, std::int64_t params_offset, std::int32_t slots,
                  std::int32_t slot, const double* sums, double weight, float* buffer) {
  for (std::int32_t h = 0; h < format.heads; ++h) {
    for (std::int32_t d = 0; d < format.head_dim; ++d) {
      buffer[d] = static_cast<float>(sums[std::int64_t{h} * format.head_dim + d] / weight);
    }
    format.encode(
        buffer,
        page + codes_offset + Order::offset(slot, h, 0, slots, format.heads, format.code_bytes()),
        page + params_offset +
            Order::offset(slot, h, 0, slots, format.heads, format.param_bytes()));
  }
}

inline double squared_norm(const float* x, std::int64_t n) {
  double sum = 0.0;
  for (std::int64_t i = 0; i < n; ++i) sum += double{x[i]} * x[i];
  return sum;
}

// Cosine similarity from a dot product and two squared norms; 0 when either vector is zero.
inline double cosine(double dot, double a_squared, double b_squared) {
  return a_squared > 0.0 && b_squared > 0.0 ? dot / (std::sqrt(a_squared) * std::sqrt(b_squared))
                                            : 0.0;
}

}  // namespace detail

// Bytes of workspace compact_merged needs for a sequence of `length` tokens keeping `kept`.
template <class Layout, class KScheme, class VScheme>
std::int64_t merge_workspace_bytes(const exec::cpu& exec,
                                   const host_cache_view<Layout, KScheme, VScheme>& cache,
                                   std::int64_t length, std::int64_t kept) {
  return detail::merge_pieces(exec, cache, length, kept).bytes();
}

namespace detail {

// compact_merged's checks of the rule, the kept positions and the counts of sequence s of
// `length` tokens.
template <int Budget, float Threshold, int Recent>
void require_merge(const merge<Budget, Threshold, Recent>& rule, std::int64_t s,
                   std::int64_t length, host_view<const std::int32_t, 1> kept,
                   host_view<std::int32_t, 1> counts, std::string_view call) {
  require(rule.threshold >= -1.0f && rule.threshold <= 1.0f, call, "rule.threshold", rule.threshold,
          "a cosine similarity in [-1, 1]");
  require_view(kept, call, "kept", {{any_extent}});
  require(kept.extent(0) >= 1, call, "kept.extent(0)", kept.extent(0),
          "at least 1 token to merge into");
  require_kept(s, length, kept.data(), 0, kept.extent(0), call);
  require(counts.extent(0) == 0 || counts.extent(0) == length, call, "counts.extent(0)",
          counts.extent(0), "0 (every token counts 1) or the length " + std::to_string(length));
  require_view(counts, call, "counts", {{any_extent}});
  for (std::int64_t t = 0; t < counts.extent(0); ++t) {
    require(counts(t) >= 1, call, "counts[" + std::to_string(t) + "]", counts(t), "at least 1");
  }
}

// The merge of compact_merged, checked, before the kept tokens move: folds each evicted token of
// sequence `sequence` into its most similar kept token, re-quantizes the receiving kept tokens'
// values into their records and sums their mass and counts. store_key(j, home, sums, weight,
// buffer) stores the mean key sums / weight (key_dims doubles; buffer: scratch floats) of kept
// token j, at `home`. Leaves the kept tokens' keys as floats in workspace piece kept_keys
// (kept x key_dims): the stored keys, which a receiving token's store_key may replace.
template <class Layout, class KScheme, class VScheme, int Budget, float Threshold, int Recent,
          class StoreKey>
void merge_into_kept(const exec::cpu& exec, const merge<Budget, Threshold, Recent>& rule,
                     const host_cache_view<Layout, KScheme, VScheme>& cache, std::int32_t sequence,
                     host_view<const std::int32_t, 1> kept, host_view<std::int32_t, 1> counts,
                     std::byte* base, StoreKey&& store_key) {
  using order = typename Layout::order;
  const std::int64_t length = cache.length(sequence);
  const std::int64_t kept_count = kept.extent(0);
  const merge_workspace pieces = merge_pieces(exec, cache, length, kept_count);
  const auto piece = [&]<class T>(std::int64_t offset, T*) {
    return reinterpret_cast<T*>(base + offset);
  };
  double* norms = piece(pieces.norms(), static_cast<double*>(nullptr));
  double* sums = piece(pieces.sums(), static_cast<double*>(nullptr));
  float* kept_keys = piece(pieces.kept_keys(), static_cast<float*>(nullptr));
  float* scratch = piece(pieces.scratch(), static_cast<float*>(nullptr));
  std::int32_t* merged_indptr = piece(pieces.merged_indptr(), static_cast<std::int32_t*>(nullptr));
  std::int32_t* evicted = piece(pieces.evicted(), static_cast<std::int32_t*>(nullptr));
  std::int32_t* targets = piece(pieces.targets(), static_cast<std::int32_t*>(nullptr));
  std::int32_t* merged = piece(pieces.merged(), static_cast<std::int32_t*>(nullptr));
  const std::int64_t key_dims = pieces.key_dims;
  const std::int64_t value_dims = pieces.value_dims;
  const std::int64_t evicted_count = length - kept_count;
  std::int32_t* token_counts = counts.extent(0) == 0 ? nullptr : counts.data();
  const auto count_of = [&](std::int64_t t) -> double {
    return token_counts == nullptr ? 1.0 : token_counts[t];
  };

  // The kept tokens' keys and norms, then every evicted token's most similar kept token.
  exec.parallel_for(kept_count, [&](std::int64_t j) {
    float* key = kept_keys + j * key_dims;
    decode_keys(cache, sequence, kept(j), key);
    norms[j] = squared_norm(key, key_dims);
  });
  for (std::int64_t t = 0, j = 0, e = 0; t < length; ++t) {
    if (j < kept_count && kept(j) == t) {
      ++j;
    } else {
      evicted[e++] = static_cast<std::int32_t>(t);
    }
  }
  exec.parallel_for_ranges(evicted_count, [&](int thread, std::int64_t begin, std::int64_t end) {
    float* key = scratch + thread * pieces.scratch_floats();
    for (std::int64_t e = begin; e < end; ++e) {
      decode_keys(cache, sequence, evicted[e], key);
      const double norm = squared_norm(key, key_dims);
      double best = -INFINITY;
      std::int32_t best_j = -1;
      for (std::int64_t j = 0; j < kept_count; ++j) {
        const float* other = kept_keys + j * key_dims;
        double dot = 0.0;
        for (std::int64_t d = 0; d < key_dims; ++d) dot += double{key[d]} * other[d];
        const double similarity = cosine(dot, norm, norms[j]);
        if (similarity > best) {
          best = similarity;
          best_j = static_cast<std::int32_t>(j);
        }
      }
      targets[e] = best >= double{rule.threshold} ? best_j : -1;
    }
  });
  // The evicted tokens of each kept token, in CSR form (ascending positions).
  std::fill(merged_indptr, merged_indptr + kept_count + 1, 0);
  for (std::int64_t e = 0; e < evicted_count; ++e) {
    if (targets[e] >= 0) ++merged_indptr[targets[e] + 1];
  }
  for (std::int64_t j = 0; j < kept_count; ++j) merged_indptr[j + 1] += merged_indptr[j];
  for (std::int64_t e = 0; e < evicted_count; ++e) {
    if (targets[e] >= 0) merged[merged_indptr[targets[e]]++] = evicted[e];
  }
  for (std::int64_t j = kept_count; j > 0; --j) merged_indptr[j] = merged_indptr[j - 1];
  merged_indptr[0] = 0;

  // Each receiving kept token becomes the weighted mean, written over its own records: only
  // evicted tokens are read besides it, so the kept tokens run in parallel.
  const auto& f = cache.format;
  exec.parallel_for_ranges(kept_count, [&](int thread, std::int64_t begin, std::int64_t end) {
    double* key_sums = sums + thread * (key_dims + value_dims);
    double* value_sums = key_sums + key_dims;
    float* buffer = scratch + thread * pieces.scratch_floats();
    float* mass = nullptr;
    for (std::int64_t j = begin; j < end; ++j) {
      if (merged_indptr[j] == merged_indptr[j + 1]) continue;
      std::fill(key_sums, key_sums + key_dims + value_dims, 0.0);
      const token_location home = cache.table.locate(sequence, kept(j));
      if (cache.mass != nullptr)
        mass = cache.mass + (std::int64_t{home.page} * f.slots + home.slot) * f.k.heads;
      double weight = 0.0;
      const auto add = [&](std::int64_t t) {
        const token_location at = cache.table.locate(sequence, t);
        const double c = count_of(t);
        decode_keys(cache, sequence, t, buffer);
        for (std::int64_t d = 0; d < key_dims; ++d) key_sums[d] += c * buffer[d];
        decode_values(cache, at, buffer);
        for (std::int64_t d = 0; d < value_dims; ++d) value_sums[d] += c * buffer[d];
        weight += c;
        if (mass != nullptr && t != kept(j)) {
          const float* other = cache.mass + (std::int64_t{at.page} * f.slots + at.slot) * f.k.heads;
          for (std::int32_t h = 0; h < f.k.heads; ++h) mass[h] += other[h];
        }
      };
      add(kept(j));
      for (std::int32_t i = merged_indptr[j]; i < merged_indptr[j + 1]; ++i) add(merged[i]);
      store_key(j, home, key_sums, weight, buffer);
      encode_token<order>(f.v, cache.page(home.page), f.v_codes_offset(), f.v_params_offset(),
                          f.slots, home.slot, value_sums, weight, buffer);
      if (token_counts != nullptr) token_counts[kept(j)] = static_cast<std::int32_t>(weight);
    }
  });
}

}  // namespace detail

// Compacts sequence `sequence` to the ascending positions `kept` (at least one) as compact does,
// after folding each evicted token e into the kept token j whose key is most similar (cosine over
// all KV heads' dequantized keys; the lower position among equal similarities; a zero key has
// similarity 0), when that similarity is at least rule.threshold; other evicted tokens are
// dropped. A kept token that receives tokens becomes the weighted mean
//   x_j <- (c_j x_j + sum_e c_e x_e) / (c_j + sum_e c_e)
// of the dequantized keys and of the values (float64 sums, float means), re-quantized into its
// records; its mass becomes the sum of the masses, and c_j the sum of the counts. Kept tokens that
// receive nothing keep their bytes.
//   counts     (length) tokens each position already stands for (at least 1), updated and
//              compacted like the records; empty: every token stands for itself.
//   workspace  merge_workspace_bytes(exec, cache, length, kept.extent(0)) bytes or more, 8-aligned.
// Returns the new length, kept.extent(0). kv::per_channel keys are re-quantized per page, which
// the cache does: kv::cache::compact_merged.
template <class Layout, class KScheme, class VScheme, int Budget, float Threshold, int Recent>
std::int64_t compact_merged(const exec::cpu& exec, const merge<Budget, Threshold, Recent>& rule,
                            const host_cache_view<Layout, KScheme, VScheme>& cache,
                            std::int32_t sequence, host_view<const std::int32_t, 1> kept,
                            host_view<std::int32_t, 1> counts, host_view<std::byte, 1> workspace) {
  static_assert(!is_per_channel<KScheme>,
                "infuse: kv::per_channel keys share their groups across a page's tokens, so a "
                "merged key re-quantizes its page and the window: use kv::cache::compact_merged; "
                "see docs/policies.md#kivi-and-zipvl-arrangements");
  constexpr std::string_view call = "infuse::kv::retain::compact_merged";
  using order = typename Layout::order;
  detail::require_cache(cache, call);
  detail::require_sequence(cache, sequence, call);
  const std::int64_t length = cache.length(sequence);
  detail::require_merge(rule, sequence, length, kept, counts, call);
  const std::int64_t bytes = merge_workspace_bytes(exec, cache, length, kept.extent(0));
  require(workspace.extent(0) >= bytes, call, "workspace.extent(0)", workspace.extent(0),
          "at least merge_workspace_bytes(...) = " + std::to_string(bytes));
  require_view(workspace, call, "workspace", {{any_extent}});
  require(reinterpret_cast<std::uintptr_t>(workspace.data()) % 8 == 0, call, "workspace.data()",
          workspace.data(), "an 8-byte aligned pointer");
  const auto& f = cache.format;
  detail::merge_into_kept(
      exec, rule, cache, sequence, kept, counts, workspace.data(),
      [&](std::int64_t, token_location home, const double* sums, double weight, float* buffer) {
        detail::encode_token<order>(f.k, cache.page(home.page), f.k_codes_offset(),
                                    f.k_params_offset(), f.slots, home.slot, sums, weight, buffer);
      });
  detail::move_kept(cache, sequence, kept.data(), kept.extent(0),
                    counts.extent(0) == 0 ? nullptr : counts.data());
  return kept.extent(0);
}

}  // namespace infuse::kv::retain
