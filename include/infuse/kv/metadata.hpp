// Per-page metadata of a paged KV cache, and the function that keeps the key bounds current.
//
// For every page of the pool (see kv/cache_view.hpp for the arrays a kernel reads):
//   key_min, key_max  (pages, k.heads, k.head_dim)  per channel, the minimum and maximum of the
//                     page's stored keys as a kernel dequantizes them, over its filled slots, in
//                     half precision rounded outward (half_at_most, half_at_least). For any query
//                     q, sum_d max(q_d * key_min_d, q_d * key_max_d) is then never below q . k of
//                     a stored key (the page bound Quest ranks pages by). Half, not float: a
//                     query-aware selection reads every page's bounds, and at float they would be
//                     an eighth of a half-precision cache's bytes.
//   mass              (pages, slots, k.heads)  attention mass per token and key head: zeroed when a
//                     token is appended, accumulated by the attention kernel (H2O's score).
//
// A page shared by several sequences (after fork) may be filled to a different length in each
// (truncate shortens one of them): its bounds cover the longest, which is still an upper bound
// for the others. See docs/policies.md#the-quantized-paged-kv-cache.
#pragma once

#if defined(__F16C__) && defined(__AVX2__) && !defined(__CUDA_ARCH__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "infuse/core/error.hpp"
#include "infuse/core/memory.hpp"
#include "infuse/kv/cache_view.hpp"
#include "infuse/kv/format.hpp"
#include "infuse/quant/scheme.hpp"

namespace infuse::kv {

// The metadata arrays of a pool of `pages` pages, on host memory, and the number of slots of each
// page its key bounds cover.
class page_metadata {
 public:
  page_metadata(std::int32_t pages, std::int32_t k_heads, std::int32_t k_head_dim,
                std::int32_t slots)
      : bounds_per_page_(std::int64_t{k_heads} * k_head_dim),
        mass_per_page_(std::int64_t{slots} * k_heads),
        key_min_(size(pages, bounds_per_page_), no_minimum),
        key_max_(size(pages, bounds_per_page_), no_maximum),
        mass_(size(pages, mass_per_page_), 0.0f),
        covered_(static_cast<std::size_t>(pages), 0) {}

  // The bounds of a page without keys: +inf and -inf.
  static constexpr half no_minimum = half::from_bits(0x7C00);
  static constexpr half no_maximum = half::from_bits(0xFC00);

  // Values per page of key_min (and of key_max), and of mass.
  [[nodiscard]] std::int64_t bounds_per_page() const { return bounds_per_page_; }
  [[nodiscard]] std::int64_t mass_per_page() const { return mass_per_page_; }
  // Bytes per page of the three arrays together.
  [[nodiscard]] std::int64_t bytes_per_page() const {
    return std::int64_t{sizeof(half)} * 2 * bounds_per_page_ +
           std::int64_t{sizeof(float)} * mass_per_page_;
  }

  [[nodiscard]] half* key_min(std::int32_t page = 0) {
    return key_min_.data() + at(page, bounds_per_page_);
  }
  [[nodiscard]] half* key_max(std::int32_t page = 0) {
    return key_max_.data() + at(page, bounds_per_page_);
  }
  [[nodiscard]] float* mass(std::int32_t page = 0) {
    return mass_.data() + at(page, mass_per_page_);
  }
  [[nodiscard]] const half* key_min(std::int32_t page = 0) const {
    return key_min_.data() + at(page, bounds_per_page_);
  }
  [[nodiscard]] const half* key_max(std::int32_t page = 0) const {
    return key_max_.data() + at(page, bounds_per_page_);
  }
  [[nodiscard]] const float* mass(std::int32_t page = 0) const {
    return mass_.data() + at(page, mass_per_page_);
  }

  // Slots [0, covered(page)) are what the page's key bounds span.
  [[nodiscard]] std::int32_t covered(std::int32_t page) const {
    return covered_[static_cast<std::size_t>(page)];
  }
  void set_covered(std::int32_t page, std::int32_t slots) {
    covered_[static_cast<std::size_t>(page)] = slots;
  }

  // Page `to` takes every metadata value of page `from` (copy on write of a page).
  void copy_page(std::int32_t from, std::int32_t to) {
    copy(key_min_, from, to, bounds_per_page_);
    copy(key_max_, from, to, bounds_per_page_);
    copy(mass_, from, to, mass_per_page_);
    covered_[static_cast<std::size_t>(to)] = covered_[static_cast<std::size_t>(from)];
  }

  // Equal bit for bit.
  friend bool operator==(const page_metadata& a, const page_metadata& b) {
    const auto same = [](const auto& x, const auto& y) {
      return x.size() == y.size() && std::memcmp(x.data(), y.data(), sizeof(x[0]) * x.size()) == 0;
    };
    return a.bounds_per_page_ == b.bounds_per_page_ && a.mass_per_page_ == b.mass_per_page_ &&
           same(a.key_min_, b.key_min_) && same(a.key_max_, b.key_max_) && same(a.mass_, b.mass_) &&
           a.covered_ == b.covered_;
  }

 private:
  static std::size_t size(std::int32_t pages, std::int64_t per_page) {
    return static_cast<std::size_t>(pages) * static_cast<std::size_t>(per_page);
  }
  static std::size_t at(std::int32_t page, std::int64_t per_page) {
    return static_cast<std::size_t>(page) * static_cast<std::size_t>(per_page);
  }
  template <class T>
  static void copy(std::vector<T>& values, std::int32_t from, std::int32_t to,
                   std::int64_t per_page) {
    std::memcpy(values.data() + at(to, per_page), values.data() + at(from, per_page),
                sizeof(T) * static_cast<std::size_t>(per_page));
  }

  std::int64_t bounds_per_page_;
  std::int64_t mass_per_page_;
  std::vector<half> key_min_;          // (pages, k.heads, k.head_dim)
  std::vector<half> key_max_;          // (pages, k.heads, k.head_dim)
  std::vector<float> mass_;            // (pages, slots, k.heads)
  std::vector<std::int32_t> covered_;  // (pages)
};

namespace detail {

// Widens the bounds lo, hi (dims values) to cover key: the outward-rounded halves of the running
// minimum and maximum (a NaN key changes nothing). An x86 host with F16C converts 8 at a time,
// rounding toward -inf and +inf in the conversion itself (the same bits as half_at_most and
// half_at_least; a half bound converts back exactly, so rounding it again keeps it).
INFUSE_HOST_DEVICE inline void fold_key(const float* key, std::int32_t dims, half* lo, half* hi) {
  std::int32_t d = 0;
#if defined(__F16C__) && defined(__AVX2__) && !defined(__CUDA_ARCH__)
  for (; d + 8 <= dims; d += 8) {
    auto* low = reinterpret_cast<__m128i*>(lo + d);
    auto* high = reinterpret_cast<__m128i*>(hi + d);
    const __m256 k = _mm256_loadu_ps(key + d);
    // min_ps and max_ps give their second operand when the first is NaN: the bound stays.
    const __m256 below = _mm256_min_ps(k, _mm256_cvtph_ps(_mm_loadu_si128(low)));
    const __m256 above = _mm256_max_ps(k, _mm256_cvtph_ps(_mm_loadu_si128(high)));
    _mm_storeu_si128(low, _mm256_cvtps_ph(below, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
    _mm_storeu_si128(high, _mm256_cvtps_ph(above, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC));
  }
#endif
  for (; d < dims; ++d) {
    if (key[d] < static_cast<float>(lo[d])) lo[d] = half_at_most(key[d]);
    if (key[d] > static_cast<float>(hi[d])) hi[d] = half_at_least(key[d]);
  }
}

// Folds the stored keys of slots [slot_begin, slot_end) of one page into its bounds
// (k.heads, k.head_dim); slot_begin 0 starts the bounds afresh. Keys are read back exactly as a
// kernel reads them (page_format::read_key); `window`, when not null, holds the slots' keys in
// full precision instead, (slots, k.heads, k.head_dim) floats: a kv::per_channel page not yet full.
template <class Format>
void fold_key_bounds(const Format& format, const std::uint8_t* page, std::int32_t slot_begin,
                     std::int32_t slot_end, half* key_min, half* key_max,
                     const float* window = nullptr) {
  const auto& k = format.k;
  const std::int64_t values = std::int64_t{k.heads} * k.head_dim;
  if (slot_begin == 0) {
    std::fill(key_min, key_min + values, page_metadata::no_minimum);
    std::fill(key_max, key_max + values, page_metadata::no_maximum);
  }
  for (std::int32_t slot = slot_begin; slot < slot_end; ++slot) {
    for (std::int32_t head = 0; head < k.heads; ++head) {
      float stored[1024];  // head_dim is at most 1024 (vector_format::require_valid)
      const float* key = stored;
      if (window != nullptr) {
        key = window + (std::int64_t{slot} * k.heads + head) * k.head_dim;
      } else {
        format.read_key(page, slot, head, stored);
      }
      fold_key(key, k.head_dim, key_min + std::int64_t{head} * k.head_dim,
               key_max + std::int64_t{head} * k.head_dim);
    }
  }
}

}  // namespace detail

// Folds the stored keys of tokens [begin, end) of sequence `sequence` of the view into the key
// bounds of their pages, after their K records were written (kv::cache's append does it; a prefill
// kernel that writes K itself calls it next). The bounds of a page already hold its tokens before
// `begin`; a page whose first slot is in [begin, end) starts afresh, so (view, s, 0, length)
// recomputes every page of s (after records were moved, say). Throws infuse::error naming
// the argument when the view keeps no bounds or the range is not tokens of the sequence.
template <class Layout, class KScheme, class VScheme>
void update_key_bounds(const cache_view<Layout, KScheme, VScheme, host_memory>& view,
                       std::int32_t sequence, std::int64_t begin, std::int64_t end) {
  static_assert(!is_per_channel<KScheme>,
                "infuse: kv::update_key_bounds folds keys a kernel wrote into their slots; "
                "kv::per_channel keys are written by the cache's append alone; see "
                "docs/policies.md#kivi-and-zipvl-arrangements");
  constexpr const char* call = "infuse::kv::update_key_bounds";
  require(view.key_min != nullptr && view.key_max != nullptr, call, "view.key_min", view.key_min,
          "the cache's key bounds (key_min and key_max not null)");
  require(sequence >= 0 && sequence < view.sequences(), call, "sequence", sequence,
          "a sequence of the view, 0 to sequences() - 1");
  require(begin >= 0 && begin <= end, call, "begin", begin, "from 0 to end");
  require(end <= view.length(sequence), call, "end", end,
          "at most the sequence's length " + std::to_string(view.length(sequence)));
  const std::int64_t per_page = std::int64_t{view.format.k.heads} * view.format.k.head_dim;
  for (std::int64_t t = begin; t < end;) {
    const token_location at = view.table.locate(sequence, t);
    require(at.page >= 0 && at.page < view.pool_pages, call, "view.table", at.page,
            "page indices of the pool");
    const auto count =
        static_cast<std::int32_t>(std::min<std::int64_t>(view.format.slots - at.slot, end - t));
    detail::fold_key_bounds(view.format, view.page(at.page), at.slot, at.slot + count,
                            view.key_min + at.page * per_page, view.key_max + at.page * per_page);
    t += count;
  }
}

}  // namespace infuse::kv
