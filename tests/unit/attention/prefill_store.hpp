// A KV cache over plain host buffers for the prefill tests: a pool of pages in kv::page_format,
// a CSR page table (paged layouts, pages drawn from a shuffled pool) or one run per sequence
// (contiguous), prefixes encoded from random K and V, and the read-back of what is stored.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#include "infuse/kv/cache_view.hpp"
#include "support/random.hpp"

namespace infuse::test {

template <class Layout, class K, class V>
class prefill_store {
 public:
  using cache_type = kv::cache_view<Layout, K, V>;
  using format_type = typename cache_type::format_type;

  // lengths: each sequence's tokens after the prefill (prefix and new tokens); spare pages or
  // slots are left unused, filled with 0xFF bytes (NaN as floats) that the kernel must not read.
  prefill_store(seeded_rng& rng, const std::vector<std::int64_t>& lengths, std::int32_t kv_heads,
                std::int32_t k_dim, std::int32_t v_dim, bool key_bounds = false)
      : lengths_(lengths.begin(), lengths.end()) {
    format_.k = {kv_heads, k_dim};
    format_.v = {kv_heads, v_dim};
    const auto sequences = static_cast<std::int32_t>(lengths.size());
    if constexpr (Layout::is_paged) {
      constexpr int page_size = Layout::page_size;
      format_.slots = page_size;
      indptr_.push_back(0);
      for (const std::int64_t length : lengths) {
        const auto pages = static_cast<std::int32_t>((length + page_size - 1) / page_size);
        indptr_.push_back(indptr_.back() + pages);
        last_page_len_.push_back(static_cast<std::int32_t>(
            pages == 0 ? 0 : length - std::int64_t{pages - 1} * page_size));
      }
      pool_pages_ = indptr_.back() + 3;
      std::vector<std::int32_t> order(static_cast<std::size_t>(pool_pages_));
      std::iota(order.begin(), order.end(), 0);
      std::shuffle(order.begin(), order.end(), rng.engine());
      indices_.assign(order.begin(), order.begin() + indptr_.back());
    } else {
      const std::int64_t longest =
          lengths.empty() ? 0 : *std::max_element(lengths.begin(), lengths.end());
      format_.slots = static_cast<std::int32_t>(longest + 5);
      pool_pages_ = sequences + 1;
    }
    pool_.assign(static_cast<std::size_t>(pool_pages_ * format_.page_bytes()), 0xFF);
    if (key_bounds) {
      const auto count = static_cast<std::size_t>(std::int64_t{pool_pages_} * kv_heads * k_dim);
      key_min_.assign(count, 0.0f);
      key_max_.assign(count, 0.0f);
    }
  }

  cache_type view() {
    cache_type cache;
    cache.pages = pool_.data();
    cache.pool_pages = pool_pages_;
    cache.format = format_;
    const auto sequences = static_cast<std::int32_t>(lengths_.size());
    if constexpr (Layout::is_paged) {
      cache.table = {indptr_.data(), indices_.data(), last_page_len_.data(), sequences};
    } else {
      cache.table = {lengths_.data(), sequences, format_.slots};
    }
    cache.key_min = key_min_.empty() ? nullptr : key_min_.data();
    cache.key_max = key_max_.empty() ? nullptr : key_max_.data();
    return cache;
  }

  const format_type& format() const { return format_; }
  const std::vector<std::uint8_t>& bytes() const { return pool_; }
  std::vector<std::uint8_t>& bytes() { return pool_; }
  const std::vector<float>& key_min() const { return key_min_; }
  const std::vector<float>& key_max() const { return key_max_; }

  // Encodes random K and V (normal, stddev 1) into tokens 0 .. prefix of sequence s.
  void fill_prefix(seeded_rng& rng, std::int32_t s, std::int64_t prefix) {
    const cache_type cache = view();
    for (std::int64_t t = 0; t < prefix; ++t) {
      const kv::token_address at = cache.locate(s, t);
      for (std::int32_t h = 0; h < format_.k.heads; ++h) {
        const auto k = rng.normals(static_cast<std::size_t>(format_.k.head_dim));
        const auto v = rng.normals(static_cast<std::size_t>(format_.v.head_dim));
        format_.k.encode(k.data(), format_.k_codes(at.page, at.slot, h),
                         format_.k_params(at.page, at.slot, h));
        format_.v.encode(v.data(), format_.v_codes(at.page, at.slot, h),
                         format_.v_params(at.page, at.slot, h));
      }
    }
  }

  // The stored (dequantized) keys or values of sequence s: (length, heads, head_dim) doubles.
  std::vector<double> stored_keys(std::int32_t s) { return stored(s, true); }
  std::vector<double> stored_values(std::int32_t s) { return stored(s, false); }

  // Whether token t of sequence s holds exactly the records encode() makes of k_row / v_row
  // (heads x head_dim floats each); when `write` is set, writes them into `pool` instead.
  bool records_equal(std::int32_t s, std::int64_t t, const float* k_row, const float* v_row,
                     std::vector<std::uint8_t>* write = nullptr) {
    const cache_type cache = view();
    const kv::token_address at = cache.locate(s, t);
    std::uint8_t* base = write != nullptr ? write->data() : pool_.data();
    std::uint8_t* page = base + (at.page - pool_.data());
    std::vector<std::uint8_t> codes(4096), params(4096);
    bool equal = true;
    const auto compare = [&](const auto& vector, const float* x, std::uint8_t* stored_codes,
                             std::uint8_t* stored_params) {
      std::fill(codes.begin(), codes.end(), 0);
      vector.encode(x, codes.data(), params.data());
      const auto code_bytes = static_cast<std::size_t>(vector.code_bytes());
      const auto param_bytes = static_cast<std::size_t>(vector.param_bytes());
      if (write != nullptr) {
        std::memcpy(stored_codes, codes.data(), code_bytes);
        std::memcpy(stored_params, params.data(), param_bytes);
      } else {
        equal = equal && std::memcmp(stored_codes, codes.data(), code_bytes) == 0 &&
                std::memcmp(stored_params, params.data(), param_bytes) == 0;
      }
    };
    for (std::int32_t h = 0; h < format_.k.heads; ++h) {
      compare(format_.k, k_row + std::int64_t{h} * format_.k.head_dim,
              format_.k_codes(page, at.slot, h), format_.k_params(page, at.slot, h));
      compare(format_.v, v_row + std::int64_t{h} * format_.v.head_dim,
              format_.v_codes(page, at.slot, h), format_.v_params(page, at.slot, h));
    }
    return equal;
  }

 private:
  std::vector<double> stored(std::int32_t s, bool keys) {
    const cache_type cache = view();
    const std::int64_t length = cache.length(s);
    const std::int32_t heads = format_.k.heads;
    const std::int32_t dim = keys ? format_.k.head_dim : format_.v.head_dim;
    std::vector<double> out(static_cast<std::size_t>(length * heads * dim));
    for (std::int64_t t = 0; t < length; ++t) {
      const kv::token_address at = cache.locate(s, t);
      for (std::int32_t h = 0; h < heads; ++h) {
        for (std::int32_t d = 0; d < dim; ++d) {
          out[static_cast<std::size_t>((t * heads + h) * dim + d)] =
              keys ? format_.k.value(format_.k_codes(at.page, at.slot, h),
                                     format_.k_params(at.page, at.slot, h), d)
                   : format_.v.value(format_.v_codes(at.page, at.slot, h),
                                     format_.v_params(at.page, at.slot, h), d);
        }
      }
    }
    return out;
  }

  format_type format_{};
  std::vector<std::int32_t> lengths_;
  std::vector<std::int32_t> indptr_, indices_, last_page_len_;
  std::int32_t pool_pages_ = 0;
  std::vector<std::uint8_t> pool_;
  std::vector<float> key_min_, key_max_;
};

}  // namespace infuse::test
