// KIVI's keys (kv::per_channel) under compaction and in the vectorized page encode: the SIMD encode
// of a full page gives the bytes of vector_format::encode_page; compaction with every retention
// rule keeps the reference's token set, moves values as bytes and re-quantizes the keys of each
// full page that receives a moved or merged token within one more rounding; the window, the key
// bounds, the pool's free pages and reference counts stay right; bad input changes nothing.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <span>
#include <type_traits>
#include <vector>

#include "arrangement_support.hpp"
#include "infuse/exec/cpu.hpp"
#include "infuse/kv/cpu/compact.hpp"
#include "infuse/kv/kv.hpp"
#include "infuse/kv/retain.hpp"
#include "infuse/quant/quant.hpp"
#include "reference/retention.hpp"
#include "support/errors.hpp"
#include "support/random.hpp"

namespace kv = infuse::kv;
namespace quant = infuse::quant;
namespace retain = infuse::kv::retain;
namespace ref = infuse::reference;
using infuse::host_view;
using infuse::test::argument_of;

namespace {

using int2_zp = quant::int_<2, quant::per_channel, quant::zero_point>;
using int3_zp = quant::int_<3, quant::per_channel, quant::zero_point>;
using int4_zp = quant::int_<4, quant::per_channel, quant::zero_point>;
using int8_sym = quant::int_<8, quant::per_channel>;

// Keys of a page for the encode test: normal, with a zero channel, a constant one, one of tiny
// negatives (codes that round to -0) and one of large magnitude.
std::vector<float> page_keys(infuse::test::seeded_rng& rng, std::int32_t slots, std::int32_t heads,
                             std::int32_t head_dim) {
  std::vector<float> keys = rng.normals(static_cast<std::size_t>(slots * heads * head_dim));
  for (std::int32_t slot = 0; slot < slots; ++slot) {
    float* row = keys.data() + std::int64_t{slot} * heads * head_dim;
    row[1] = 0.0f;
    row[2] = 0.75f;
    // Mostly positive, with tiny negatives: a zero point of 0 that they round below.
    row[3] = slot % 2 == 0 ? static_cast<float>(rng.uniform()) : -1e-5f;
    row[4] *= 3e4f;
  }
  return keys;
}

// The keys each sequence should read back: what was appended, and what is stored.
struct tokens {
  std::vector<float> appended;  // (length, k.heads * k.head_dim)
  std::vector<float> values;    // (length, v.heads * v.head_dim), as stored
  std::vector<float> stored;    // (length, k.heads * k.head_dim)
};

template <class Cache>
std::vector<float> read_all(Cache& cache, kv::sequence_id s, bool keys) {
  const std::array<kv::sequence_id, 1> one{s};
  const auto batch = cache.view(one);
  const auto& format = cache.format();
  const std::int32_t heads = keys ? format.k.heads : format.v.heads;
  const std::int32_t dim = keys ? format.k.head_dim : format.v.head_dim;
  std::vector<float> out;
  for (std::int64_t t = 0; t < cache.length(s); ++t) {
    for (std::int32_t h = 0; h < heads; ++h) {
      float row[1024];
      if (keys) {
        kv::read_key(batch.view(), 0, t, h, row);
      } else {
        kv::read_value(batch.view(), 0, t, h, row);
      }
      out.insert(out.end(), row, row + dim);
    }
  }
  return out;
}

template <class Cache>
tokens append_tokens(Cache& cache, infuse::test::seeded_rng& rng, kv::sequence_id s,
                     std::int64_t count) {
  const auto& f = cache.format();
  const auto data = infuse::test::random_rows(rng, f, count);
  const std::array<kv::sequence_id, 1> one{s};
  const std::array<std::int64_t, 1> counts{count};
  cache.append(infuse::exec::cpu{}, one, counts, infuse::test::k_rows(data, f),
               infuse::test::v_rows(data, f));
  return {data.k, read_all(cache, s, false), read_all(cache, s, true)};
}

// Random attention mass in every slot of s's pages.
template <class Cache>
void fill_mass(Cache& cache, infuse::test::seeded_rng& rng, kv::sequence_id s) {
  const std::array<kv::sequence_id, 1> one{s};
  const auto batch = cache.view(one);
  const std::int64_t per_page = cache.metadata().mass_per_page();
  for (const std::int32_t page : cache.pages(s)) {
    for (std::int64_t i = 0; i < per_page; ++i) {
      batch.view().mass[page * per_page + i] = static_cast<float>(rng.uniform());
    }
  }
}

// The key bounds of s's pages (s holds them alone) are the fold of the keys it reads back.
template <class Cache>
int stale_bounds(Cache& cache, kv::sequence_id s) {
  const auto& f = cache.format();
  const std::vector<float> keys = read_all(cache, s, true);
  const std::int64_t per_token = std::int64_t{f.k.heads} * f.k.head_dim;
  using bound = std::remove_cvref_t<decltype(cache.metadata().key_min(0)[0])>;
  std::vector<bound> lo(static_cast<std::size_t>(per_token)), hi(lo.size());
  int wrong = 0;
  for (std::int64_t index = 0; index < std::ssize(cache.pages(s)); ++index) {
    const std::int32_t page = cache.pages(s)[static_cast<std::size_t>(index)];
    const auto filled = static_cast<std::int32_t>(
        std::min<std::int64_t>(Cache::page_size, cache.length(s) - index * Cache::page_size));
    kv::detail::fold_key_bounds(f, nullptr, 0, filled, lo.data(), hi.data(),
                                keys.data() + index * Cache::page_size * per_token);
    wrong += std::memcmp(lo.data(), cache.metadata().key_min(page), sizeof(bound) * lo.size()) != 0;
    wrong += std::memcmp(hi.data(), cache.metadata().key_max(page), sizeof(bound) * hi.size()) != 0;
  }
  return wrong;
}

// The bound of one rounding by S of element c of the tokens [first, first + count) of a
// (tokens x per_token) array: the scheme's bound over that channel.
template <class S>
double channel_bound(const std::vector<float>& keys, std::int64_t per_token, std::int64_t first,
                     std::int64_t count, std::int64_t c) {
  std::vector<float> channel;
  for (std::int64_t t = first; t < first + count; ++t) {
    channel.push_back(keys[static_cast<std::size_t>(t * per_token + c)]);
  }
  return infuse::test::int_bound<S>(channel.data(), count);
}

// After a compaction of s to `kept` (positions before it; `keys` the kept tokens' keys before
// the re-quantization: the stored ones, or their merged means), each key reads back:
//   - bit for bit when its page is the window (short of full) or kept every token in place;
//   - else within one rounding of its page's channel over `keys`,
// and within that plus the first rounding of the appended key (`appended` before compaction).
template <class S, class Cache>
void check_keys(Cache& cache, kv::sequence_id s, const std::vector<std::int32_t>& kept,
                const std::vector<float>& keys, const std::vector<bool>& changed) {
  constexpr int page_size = Cache::page_size;
  const auto& f = cache.format();
  const std::int64_t per_token = std::int64_t{f.k.heads} * f.k.head_dim;
  const auto count = std::ssize(kept);
  REQUIRE(cache.length(s) == count);
  const std::vector<float> got = read_all(cache, s, true);
  int wrong_exact = 0, wrong_bound = 0;
  for (std::int64_t index = 0; index * page_size < count; ++index) {
    const std::int64_t first = index * page_size;
    const std::int64_t filled = std::min<std::int64_t>(page_size, count - first);
    bool requantized = false;
    for (std::int64_t j = first; j < first + filled; ++j) requantized = requantized || changed[j];
    requantized = requantized && filled == page_size;
    for (std::int64_t c = 0; c < per_token; ++c) {
      const double bound =
          requantized ? channel_bound<S>(keys, per_token, first, page_size, c) : 0.0;
      for (std::int64_t j = first; j < first + filled; ++j) {
        const auto at = static_cast<std::size_t>(j * per_token + c);
        if (requantized) {
          wrong_bound += std::fabs(double(got[at]) - keys[at]) <= bound ? 0 : 1;
        } else {
          wrong_exact += got[at] != keys[at] ? 1 : 0;
        }
      }
    }
  }
  CHECK_MESSAGE(wrong_exact == 0, wrong_exact << " keys of untouched pages or the window changed");
  CHECK_MESSAGE(wrong_bound == 0, wrong_bound << " re-quantized keys beyond one more rounding");
  CHECK(stale_bounds(cache, s) == 0);
}

// Positions whose key changes in a compaction to `kept`: those that take another token.
std::vector<bool> moved(const std::vector<std::int32_t>& kept) {
  std::vector<bool> changed(kept.size());
  for (std::size_t j = 0; j < kept.size(); ++j) changed[j] = kept[j] != std::int32_t(j);
  return changed;
}

template <class T>
std::vector<T> rows_of(const std::vector<T>& all, std::int64_t per_token,
                       const std::vector<std::int32_t>& kept) {
  std::vector<T> out;
  for (const std::int32_t t : kept) {
    out.insert(out.end(), all.begin() + t * per_token, all.begin() + (t + 1) * per_token);
  }
  return out;
}

template <int PageSize, class KScheme, class Order = kv::nhd>
struct compact_setup {
  using k_scheme = KScheme;
  using cache = kv::cache<kv::paged<PageSize, Order>, kv::per_channel<KScheme>,
                          quant::int_<4, 32, quant::zero_point>>;
};

}  // namespace

TEST_CASE_TEMPLATE("kv::per_channel: the SIMD page encode stores the bytes of encode_page", S,
                   int2_zp, int3_zp, int4_zp, int8_sym) {
  INFUSE_RANDOM(rng);
  for (const std::int32_t head_dim : {40, 128}) {
    for (const std::int32_t slots : {1, 16, 256}) {
      CAPTURE(head_dim);
      CAPTURE(slots);
      const kv::vector_format<kv::per_channel<S>> k{3, head_dim};
      const std::vector<float> keys = page_keys(rng, slots, k.heads, head_dim);
      const auto key = [&](std::int32_t slot, std::int32_t h, int d) {
        return keys[static_cast<std::size_t>((std::int64_t{slot} * k.heads + h) * head_dim + d)];
      };
      const auto bytes = static_cast<std::size_t>(slots * k.heads * k.code_bytes());
      std::vector<std::uint8_t> codes(bytes, 0xAB), want_codes(bytes, 0xCD);
      std::vector<std::uint8_t> params(static_cast<std::size_t>(k.page_param_bytes()), 0xAB);
      std::vector<std::uint8_t> want_params(params.size(), 0xCD);
      const auto at = [&](std::vector<std::uint8_t>& to) {
        return [&to, &k](std::int32_t slot, std::int32_t h) {
          return to.data() + (std::int64_t{slot} * k.heads + h) * k.code_bytes();
        };
      };
      std::vector<float> extremes(static_cast<std::size_t>(k.heads * 2 * head_dim));
      auto codes_at = at(codes);
      kv::detail::encode_int_key_page(
          k, slots, key, codes_at, params.data(), [&](std::int32_t h, const float* head) {
            std::copy(head, head + 2 * head_dim, extremes.begin() + h * 2 * head_dim);
          });
      k.encode_page(slots, key, at(want_codes), want_params.data());
      CHECK(codes == want_codes);
      CHECK(params == want_params);
      // The extremes: the minimum and maximum of each channel as read back (+0 for a zero).
      int wrong = 0;
      for (std::int32_t h = 0; h < k.heads; ++h) {
        std::vector<float> lo(static_cast<std::size_t>(head_dim), INFINITY),
            hi(lo.size(), -INFINITY);
        for (std::int32_t slot = 0; slot < slots; ++slot) {
          float row[1024];
          k.read({at(want_codes)(slot, h), nullptr, want_params.data(), h, false}, row);
          for (std::int32_t d = 0; d < head_dim; ++d) {
            lo[d] = std::min(lo[d], row[d]);
            hi[d] = std::max(hi[d], row[d]);
          }
        }
        const float* head = extremes.data() + h * 2 * head_dim;
        wrong += std::memcmp(head, lo.data(), sizeof(float) * lo.size()) != 0;
        wrong += std::memcmp(head + head_dim, hi.data(), sizeof(float) * hi.size()) != 0;
      }
      CHECK(wrong == 0);
    }
  }
}

TEST_CASE_TEMPLATE(
    "kv::per_channel: compaction with each retention rule keeps the reference's tokens, values "
    "as bytes and keys within one more rounding",
    Setup, compact_setup<16, int2_zp>, compact_setup<16, int4_zp, kv::hnd>,
    compact_setup<1, int8_sym>, compact_setup<32, int3_zp>) {
  using cache_type = typename Setup::cache;
  using scheme = typename Setup::k_scheme;
  constexpr int page_size = cache_type::page_size;
  INFUSE_RANDOM(rng);
  const infuse::exec::cpu exec(2);
  // Rules: keep_all, streaming, heavy_hitter, snapkv, merge, and merge into whole pages kept in
  // place (every evicted token merged: pages that change with no token moved).
  for (int rule = 0; rule < 6; ++rule) {
    CAPTURE(rule);
    const std::int64_t length = rng.integer(2 * page_size + 5, 5 * page_size + 3);
    CAPTURE(length);
    const auto capacity = static_cast<std::int32_t>(3 * (length / page_size + 1) + 1);
    cache_type cache(capacity, {2, 40}, {3, 32});
    const auto& f = cache.format();
    const std::int64_t per_key = std::int64_t{f.k.heads} * f.k.head_dim;
    const std::int64_t per_value = std::int64_t{f.v.heads} * f.v.head_dim;
    const kv::sequence_id s = cache.create();
    const tokens before = append_tokens(cache, rng, s, length);
    fill_mass(cache, rng, s);
    // A fork shares every page: compaction unshares s and leaves the fork as it was.
    const kv::sequence_id other = cache.fork(s);
    const std::vector<float> mass_before = [&] {
      std::vector<float> mass;
      for (std::int64_t t = 0; t < length; ++t) {
        const kv::token_location at = cache.locate(s, t);
        const float* m = cache.metadata().mass(at.page) + at.slot * f.k.heads;
        mass.insert(mass.end(), m, m + f.k.heads);
      }
      return mass;
    }();
    std::vector<std::int32_t> kept, want;
    std::vector<std::int32_t> counts;
    {
      const std::array<kv::sequence_id, 1> one{s};
      const auto batch = cache.view(one);
      const std::int64_t budget = rng.integer(1, length);
      const std::int64_t recent = rng.integer(0, budget);
      if (rule == 0) {
        kept = retain::select(retain::keep_all{}, batch.view(), 0);
        want = ref::streaming(length, length, 0);
      } else if (rule == 1) {
        const retain::streaming<> streaming{rng.integer(0, length / 3), rng.integer(1, length / 2)};
        kept = retain::select(streaming, batch.view(), 0);
        want = ref::streaming(length, streaming.sink, streaming.window);
      } else if (rule == 5) {
        for (std::int32_t t = 0; t < length; ++t) {
          if (t < 2 * page_size || t >= length - 3) kept.push_back(t);
        }
        want = kept;
      } else if (rule == 2 || rule == 4) {
        kept = retain::select(retain::heavy_hitter<>{budget, recent}, batch.view(), 0);
        want = ref::heavy_hitter(mass_before, length, f.k.heads, budget, recent);
      } else {
        const retain::snapkv<> snap{std::max<std::int64_t>(budget, 4), 4, 3};
        const std::int64_t prefix = length - 4;
        std::vector<float> observation(static_cast<std::size_t>(4 * f.k.heads * prefix));
        for (float& x : observation) x = static_cast<float>(rng.uniform());
        kept =
            retain::select(snap, batch.view(), 0,
                           host_view<const float, 3>(observation.data(), {4, f.k.heads, prefix}));
        want = ref::snapkv(observation, 4, f.k.heads, prefix, snap.budget, 3, true);
      }
    }
    CHECK(kept == want);
    if (rule < 4) {
      const std::vector<kv::sequence_id> seqs{s};
      const std::vector<std::int32_t> indptr{0, static_cast<std::int32_t>(kept.size())};
      cache.compact(exec, seqs, indptr, kept);
      check_keys<scheme>(cache, s, kept, rows_of(before.stored, per_key, kept), moved(kept));
      // Values and mass move as bytes.
      CHECK(read_all(cache, s, false) == rows_of(before.values, per_value, kept));
      const std::vector<float> mass_want = rows_of(mass_before, f.k.heads, kept);
      for (std::size_t j = 0; j < kept.size(); ++j) {
        const kv::token_location at = cache.locate(s, static_cast<std::int64_t>(j));
        const float* m = cache.metadata().mass(at.page) + at.slot * f.k.heads;
        CHECK(std::equal(m, m + f.k.heads, mass_want.begin() + std::int64_t(j) * f.k.heads));
      }
    } else {
      counts.assign(static_cast<std::size_t>(length), 1);
      for (auto& c : counts) c = static_cast<std::int32_t>(rng.integer(1, 3));
      const std::vector<std::int32_t> counts_before = counts;
      const float threshold = rule == 5 ? -1.0f : 0.1f;
      const retain::merge<> rule_value{std::ssize(kept), 0, threshold};
      const auto merged = ref::merge(before.stored, before.values, counts_before, per_key,
                                     per_value, kept, threshold);
      CHECK(cache.compact_merged(exec, rule_value, s, kept, counts) == std::ssize(kept));
      std::vector<float> means(merged.keys.begin(), merged.keys.end());
      std::vector<bool> changed = moved(kept);
      for (std::size_t j = 0; j < kept.size(); ++j) {
        if (!merged.members[j].empty()) changed[j] = true;
      }
      // The means are float64 sums over float: equal to the float of the reference's mean up to
      // the sums' rounding, so the bound takes a little slack.
      const std::vector<float> got = read_all(cache, s, true);
      int wrong = 0;
      for (std::int64_t index = 0; index * page_size < std::ssize(kept); ++index) {
        const std::int64_t first = index * page_size;
        const std::int64_t filled = std::min<std::int64_t>(page_size, std::ssize(kept) - first);
        bool requantized = false;
        for (std::int64_t j = first; j < first + filled; ++j)
          requantized = requantized || changed[j];
        requantized = requantized && filled == page_size;
        for (std::int64_t c = 0; c < per_key; ++c) {
          const double bound =
              requantized ? channel_bound<scheme>(means, per_key, first, page_size, c) : 0.0;
          for (std::int64_t j = first; j < first + filled; ++j) {
            const double x = merged.keys[static_cast<std::size_t>(j * per_key + c)];
            wrong += std::fabs(got[static_cast<std::size_t>(j * per_key + c)] - x) <=
                             bound + 1e-6 * std::fabs(x) + 1e-6
                         ? 0
                         : 1;
          }
        }
      }
      CHECK_MESSAGE(wrong == 0, wrong << " merged keys beyond one rounding of the means");
      CHECK(stale_bounds(cache, s) == 0);
      for (std::size_t j = 0; j < kept.size(); ++j) CHECK(counts[j] == merged.counts[j]);
      // Values: a receiving token's within its scheme's bound of the mean, the others as bytes.
      using v_scheme = typename cache_type::v_scheme;
      const std::vector<float> values = read_all(cache, s, false);
      const std::vector<float> moved_values = rows_of(before.values, per_value, kept);
      int wrong_values = 0;
      for (std::size_t j = 0; j < kept.size(); ++j) {
        for (std::int32_t h = 0; h < f.v.heads; ++h) {
          const std::int64_t row = std::int64_t(j) * per_value + h * f.v.head_dim;
          std::vector<float> mean(merged.values.begin() + row,
                                  merged.values.begin() + row + f.v.head_dim);
          for (std::int32_t d = 0; d < f.v.head_dim; ++d) {
            const auto at = static_cast<std::size_t>(row + d);
            wrong_values +=
                merged.members[j].empty()
                    ? values[at] != moved_values[at]
                    : !(std::fabs(values[at] - merged.values[at]) <=
                        infuse::test::vector_bound<v_scheme>(mean.data(), f.v.head_dim, d) +
                            1e-6 * std::fabs(merged.values[at]) + 1e-6);
          }
        }
      }
      CHECK_MESSAGE(wrong_values == 0, wrong_values << " values off their mean or moved bytes");
    }
    // Every key within two roundings of what was appended: the first over its page, the second
    // over its new page (bounded by the first page's range plus a step, for the stored keys).
    if (rule < 4) {
      const std::vector<float> got = read_all(cache, s, true);
      const std::vector<float> appended = rows_of(before.appended, per_key, kept);
      int wrong = 0;
      for (std::size_t j = 0; j < kept.size(); ++j) {
        const std::int64_t t = kept[j];
        const std::int64_t page_first = t / page_size * page_size;
        const bool was_window = page_first + page_size > length;
        const std::int64_t dest_first = std::int64_t(j) / page_size * page_size;
        for (std::int64_t c = 0; c < per_key; ++c) {
          const double first_rounding =
              was_window
                  ? 0.0
                  : channel_bound<scheme>(before.appended, per_key, page_first, page_size, c);
          const bool dest_full = dest_first + page_size <= std::ssize(kept);
          const double second_rounding =
              dest_full ? channel_bound<scheme>(rows_of(before.stored, per_key, kept), per_key,
                                                dest_first, page_size, c)
                        : 0.0;
          const auto at = static_cast<std::size_t>(std::int64_t(j) * per_key + c);
          wrong +=
              std::fabs(double(got[at]) - appended[at]) <= first_rounding + second_rounding ? 0 : 1;
        }
      }
      CHECK_MESSAGE(wrong == 0, wrong << " keys beyond two roundings of what was appended");
    }
    // The fork reads what it read; s holds its pages alone; the pool counts them.
    CHECK(read_all(cache, other, true) == before.stored);
    CHECK(read_all(cache, other, false) == before.values);
    CHECK(stale_bounds(cache, other) == 0);
    for (const std::int32_t page : cache.pages(s)) CHECK(cache.pool().ref_count(page) == 1);
    for (const std::int32_t page : cache.pages(other)) CHECK(cache.pool().ref_count(page) == 1);
    CHECK(cache.pool().free_pages() ==
          capacity - std::ssize(cache.pages(s)) - std::ssize(cache.pages(other)));
    if (rule == 0) {
      // Keeping every token unshares s and changes no byte of its pages.
      CHECK(read_all(cache, s, true) == before.stored);
      CHECK(stale_bounds(cache, s) == 0);
    }
    // Appending after compaction continues from the window.
    cache.free(other);
    const std::int64_t now = cache.length(s);
    append_tokens(cache, rng, s, page_size);
    CHECK(cache.length(s) == now + page_size);
    CHECK(stale_bounds(cache, s) == 0);
    cache.free(s);
    CHECK(cache.pool().free_pages() == capacity);
  }
}

TEST_CASE("kv::per_channel: bad compaction input names the argument and changes nothing") {
  INFUSE_RANDOM(rng);
  using cache_type = compact_setup<4, int2_zp>::cache;
  cache_type cache(5, {2, 32}, {2, 32});
  const kv::sequence_id a = cache.create();
  append_tokens(cache, rng, a, 10);  // 3 pages, 2 tokens in the window
  const kv::sequence_id b = cache.fork(a);
  const cache_type before = cache;
  const infuse::exec::cpu exec;
  const auto compact = [&](std::vector<kv::sequence_id> seqs, std::vector<std::int32_t> indptr,
                           std::vector<std::int32_t> kept) {
    return argument_of([&] { cache.compact(exec, seqs, indptr, kept); });
  };
  CHECK(compact({a}, {0, 2}, {3, 3}) == "kept[1]");
  CHECK(compact({a}, {0, 2}, {4, 10}) == "kept[1]");
  CHECK(compact({a, 9}, {0, 0, 0}, {}) == "seqs[1]");
  CHECK(compact({a, b}, {0, 1, 2}, {0, 0}) == "seqs");  // 3 pages to copy, 2 free
  const auto merge = [&](kv::sequence_id s, std::vector<std::int32_t> kept,
                         std::vector<std::int32_t> counts, float threshold = 0.5f) {
    retain::merge<> rule;
    rule.threshold = threshold;
    return argument_of([&] { cache.compact_merged(exec, rule, s, kept, counts); });
  };
  CHECK(merge(a, {1, 2}, {}, 2.0f) == "rule.threshold");
  CHECK(merge(a, {}, {}) == "kept.extent(0)");
  CHECK(merge(a, {2, 1}, {}) == "kept[1]");
  CHECK(merge(a, {1, 2}, {1, 1}) == "counts.extent(0)");
  CHECK(merge(a, {1, 2}, {1, 1, 1, 1, 0, 1, 1, 1, 1, 1}) == "counts[4]");
  CHECK(merge(9, {1, 2}, {}) == "sequence");
  CHECK(merge(a, {1, 2}, {}) == "sequence");  // a's 3 shared pages need 3 copies, 2 free
  CHECK(cache == before);

  // b shorter: a's pages 1 and 2 are its own, page 0 one copy.
  cache.truncate(b, 6);
  CHECK(merge(a, {1, 9}, {}) == "(no error)");
  CHECK(cache.length(a) == 2);
  CHECK(cache.length(b) == 4);
  CHECK(cache.pool().free_pages() == 5 - 2);
}
