// ZipVL's mixed precision: kv::mixed<High, Low> records, a flag per token set at append (an
// importance mask) or later by requantize. Read back through kv::read_key / kv::read_value within
// the bound of the token's scheme; requantize on one branch of a fork, compaction carrying flags,
// key bounds, bytes per token and bad input.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "arrangement_support.hpp"
#include "infuse/exec/cpu.hpp"
#include "infuse/kv/kv.hpp"
#include "infuse/quant/quant.hpp"
#include "support/errors.hpp"
#include "support/key_bounds.hpp"
#include "support/random.hpp"

namespace kv = infuse::kv;
namespace quant = infuse::quant;
using infuse::test::argument_of;

namespace {

using k_high = quant::int_<8, quant::per_channel>;
using k_low = quant::int_<2, 32, quant::zero_point>;
using v_high = quant::int_<4, 32>;
using v_low = quant::int_<2, quant::per_channel, quant::zero_point>;
using k_mixed = kv::mixed<k_high, k_low>;
using v_mixed = kv::mixed<v_high, v_low>;

// Every stored vector of sequence 0 of `view` (its tokens [0, length)), K then V, head after head.
template <class View>
std::vector<std::vector<float>> read_back(const View& view) {
  std::vector<std::vector<float>> tokens;
  const auto& f = view.format;
  for (std::int64_t t = 0; t < view.length(0); ++t) {
    std::vector<float> stored;
    float out[1024];
    for (int h = 0; h < f.k.heads; ++h) {
      kv::read_key(view, 0, t, h, out);
      stored.insert(stored.end(), out, out + f.k.head_dim);
    }
    for (int h = 0; h < f.v.heads; ++h) {
      kv::read_value(view, 0, t, h, out);
      stored.insert(stored.end(), out, out + f.v.head_dim);
    }
    tokens.push_back(std::move(stored));
  }
  return tokens;
}

// Elements of `stored` (read_back's layout) farther from `want` than the bound of each token's
// scheme, as `important` says.
template <class KHigh, class KLow, class VHigh, class VLow, class Format>
int beyond_bound(const Format& f, const std::vector<std::vector<float>>& stored,
                 const std::vector<std::vector<float>>& want,
                 const std::vector<std::uint8_t>& important) {
  int wrong = 0;
  for (std::size_t t = 0; t < stored.size(); ++t) {
    std::int64_t at = 0;
    const auto check = [&](int heads, int dim, auto high, auto low) {
      for (int h = 0; h < heads; ++h, at += dim) {
        const float* vector = want[t].data() + at;
        for (int d = 0; d < dim; ++d) {
          const double bound = important[t] != 0
                                   ? infuse::test::vector_bound<decltype(high)>(vector, dim, d)
                                   : infuse::test::vector_bound<decltype(low)>(vector, dim, d);
          wrong += std::fabs(double(stored[t][std::size_t(at + d)]) - vector[d]) <= bound ? 0 : 1;
        }
      }
    };
    check(f.k.heads, f.k.head_dim, KHigh{}, KLow{});
    check(f.v.heads, f.v.head_dim, VHigh{}, VLow{});
  }
  return wrong;
}

// The appended rows of one sequence in read_back's layout.
template <class Format>
std::vector<std::vector<float>> as_tokens(const infuse::test::rows_data& data, const Format& f) {
  const std::int64_t k_size = std::int64_t{f.k.heads} * f.k.head_dim;
  const std::int64_t v_size = std::int64_t{f.v.heads} * f.v.head_dim;
  std::vector<std::vector<float>> tokens;
  for (std::int64_t r = 0; r < std::ssize(data.k) / k_size; ++r) {
    std::vector<float> token(data.k.begin() + r * k_size, data.k.begin() + (r + 1) * k_size);
    token.insert(token.end(), data.v.begin() + r * v_size, data.v.begin() + (r + 1) * v_size);
    tokens.push_back(std::move(token));
  }
  return tokens;
}

std::vector<std::uint8_t> random_mask(infuse::test::seeded_rng& rng, std::int64_t tokens) {
  std::vector<std::uint8_t> mask(static_cast<std::size_t>(tokens));
  for (auto& flag : mask) flag = rng.integer(0, 3) == 0 ? 1 : 0;
  return mask;
}

// The key bounds of the pages of sequence s (no other holder) against its keys read back.
template <class Cache>
int stale_key_bounds(Cache& cache, kv::sequence_id s) {
  const std::array<kv::sequence_id, 1> one{s};
  const auto batch = cache.view(one);
  const auto stored = read_back(batch.view());
  const auto& f = cache.format();
  int wrong = 0;
  for (std::int64_t index = 0; index < std::ssize(cache.pages(s)); ++index) {
    const std::int32_t page = cache.pages(s)[static_cast<std::size_t>(index)];
    for (int c = 0; c < f.k.heads * f.k.head_dim; ++c) {
      float lo = std::numeric_limits<float>::infinity(), hi = -lo;
      for (std::int64_t t = index * Cache::page_size;
           t < std::min<std::int64_t>(cache.length(s), (index + 1) * Cache::page_size); ++t) {
        lo = std::min(lo, stored[std::size_t(t)][std::size_t(c)]);
        hi = std::max(hi, stored[std::size_t(t)][std::size_t(c)]);
      }
      wrong += !infuse::test::bounds_are(cache.metadata().key_min(page)[c],
                                         cache.metadata().key_max(page)[c], lo, hi);
    }
  }
  return wrong;
}

}  // namespace

TEST_CASE_TEMPLATE("kv::mixed records read back within the bound of each token's scheme", Layout,
                   kv::paged<1>, kv::paged<16, kv::hnd>, kv::paged<256>) {
  INFUSE_RANDOM(rng);
  kv::cache<Layout, k_mixed, v_mixed> cache(Layout::page_size == 1 ? 200 : 32, {2, 40}, {3, 64});
  const auto& f = cache.format();
  const kv::sequence_id s = cache.create(), other = cache.create();
  std::vector<std::vector<float>> want;
  std::vector<std::uint8_t> flags;
  for (int step = 0; step < 4; ++step) {
    // Two sequences in one call, so that the rows of s are not the first.
    const std::array<kv::sequence_id, 2> seqs{other, s};
    const std::array<std::int64_t, 2> counts{rng.integer(0, 3), rng.integer(1, 40)};
    const auto data = infuse::test::random_rows(rng, f, counts[0] + counts[1]);
    const auto mask = random_mask(rng, counts[0] + counts[1]);
    cache.append(infuse::exec::cpu{}, seqs, counts, infuse::test::k_rows(data, f),
                 infuse::test::v_rows(data, f), mask);
    const auto tokens = as_tokens(data, f);
    want.insert(want.end(), tokens.begin() + counts[0], tokens.end());
    flags.insert(flags.end(), mask.begin() + counts[0], mask.end());
  }
  const std::array<kv::sequence_id, 1> one{s};
  const auto batch = cache.view(one);
  for (std::int64_t t = 0; t < cache.length(s); ++t) {
    const kv::token_address at = batch.view().locate(0, t);
    CHECK(f.important(at.page, at.slot) == (flags[std::size_t(t)] != 0));
  }
  CHECK(beyond_bound<k_high, k_low, v_high, v_low>(f, read_back(batch.view()), want, flags) == 0);
  CHECK(stale_key_bounds(cache, s) == 0);
}

TEST_CASE("kv::mixed: requantize moves tokens between the schemes on one branch of a fork only") {
  INFUSE_RANDOM(rng);
  using cache_type = kv::cache<kv::paged<16>, k_mixed, v_mixed>;
  cache_type cache(8, {2, 64}, {2, 32});
  const auto& f = cache.format();
  const kv::sequence_id parent = cache.create();
  const std::array<kv::sequence_id, 1> one{parent};
  const std::array<std::int64_t, 1> counts{40};
  const auto data = infuse::test::random_rows(rng, f, 40);
  // Without a mask every token is stored low.
  cache.append(infuse::exec::cpu{}, one, counts, infuse::test::k_rows(data, f),
               infuse::test::v_rows(data, f));
  const kv::sequence_id child = cache.fork(parent);
  const std::array<kv::sequence_id, 1> child_batch{child};
  const auto low = read_back(cache.view(one).view());
  std::vector<std::uint8_t> all_low(40, 0);
  CHECK(beyond_bound<k_high, k_low, v_high, v_low>(f, low, as_tokens(data, f), all_low) == 0);

  // Tokens 10..29 of the child: every other one raised.
  std::vector<std::uint8_t> raise(20);
  for (std::size_t i = 0; i < raise.size(); i += 2) raise[i] = 1;
  const cache_type before = cache;
  cache.requantize(child, 10, raise);
  CHECK(cache.pages(child)[0] != cache.pages(parent)[0]);  // pages 0 and 1 copied on write
  CHECK(cache.pages(child)[2] == cache.pages(parent)[2]);  // page 2 untouched, still shared
  CHECK(read_back(cache.view(one).view()) == low);
  const auto raised = read_back(cache.view(child_batch).view());
  std::vector<std::uint8_t> flags(40, 0);
  std::copy(raise.begin(), raise.end(), flags.begin() + 10);
  // A raised token is the high scheme's encoding of its stored low values.
  CHECK(beyond_bound<k_high, k_low, v_high, v_low>(f, raised, low, flags) == 0);
  for (std::size_t t = 0; t < 40; ++t) {
    if (flags[t] == 0) CHECK(raised[t] == low[t]);
  }
  CHECK(stale_key_bounds(cache, child) == 0);
  CHECK(stale_key_bounds(cache, parent) == 0);

  // Lowered again: the low scheme's encoding of the high stored values.
  const std::vector<std::uint8_t> none(20, 0);
  cache.requantize(child, 10, none);
  CHECK(beyond_bound<k_high, k_low, v_high, v_low>(f, read_back(cache.view(child_batch).view()),
                                                   raised, all_low) == 0);
  CHECK(before != cache);
}

TEST_CASE("kv::mixed: compaction carries each token's flag with its records") {
  INFUSE_RANDOM(rng);
  kv::cache<kv::paged<16>, quant::none<float>, v_mixed> cache(8, {1, 32}, {2, 32});
  const auto& f = cache.format();
  const kv::sequence_id s = cache.create();
  const std::array<kv::sequence_id, 1> one{s};
  const std::array<std::int64_t, 1> counts{37};
  const auto data = infuse::test::random_rows(rng, f, 37);
  const auto mask = random_mask(rng, 37);
  cache.append(infuse::exec::cpu{}, one, counts, infuse::test::k_rows(data, f),
               infuse::test::v_rows(data, f), mask);
  const auto stored = read_back(cache.view(one).view());
  std::vector<std::int32_t> kept;
  for (std::int32_t t = 1; t < 37; t += 3) kept.push_back(t);
  const std::array<std::int32_t, 2> indptr{0, static_cast<std::int32_t>(kept.size())};
  cache.compact(infuse::exec::cpu{}, one, indptr, kept);
  const auto batch = cache.view(one);
  const auto after = read_back(batch.view());
  REQUIRE(after.size() == kept.size());
  for (std::size_t i = 0; i < kept.size(); ++i) {
    CHECK(after[i] == stored[std::size_t(kept[i])]);
    const kv::token_address at = batch.view().locate(0, std::int64_t(i));
    CHECK(f.important(at.page, at.slot) == (mask[std::size_t(kept[i])] != 0));
  }
}

TEST_CASE("kv::mixed: bytes per token are exact") {
  // 8 heads of 128. K: int8 per vector (128 code bytes, a 4-byte scale) or int2 in groups of 32
  // with zero points (32 code bytes, 4 x (4 + 1) = 20 bytes of parameters): each record takes the
  // larger of the two, 128 + 20. V: half, 256 bytes. And the flag byte.
  const kv::cache<kv::paged<16>, k_mixed, quant::none<infuse::half>> cache(2, {8, 128}, {8, 128});
  CHECK(cache.bytes_per_token() == 8 * (128 + 20) + 8 * 256 + 1);
  CHECK(cache.page_bytes() == 16 * 8 * 128 + 16 * 8 * 20 + 16 * 8 * 256 + 64);
  CHECK(cache.window_bytes_per_sequence() == 0);
}

TEST_CASE("kv::mixed: bad input names the argument and leaves the cache as it was") {
  INFUSE_RANDOM(rng);
  using cache_type = kv::cache<kv::paged<16>, k_mixed, v_mixed>;
  cache_type cache(2, {1, 32}, {1, 32});
  const auto& f = cache.format();
  const kv::sequence_id s = cache.create();
  const std::array<kv::sequence_id, 1> one{s};
  const std::array<std::int64_t, 1> counts{20};
  const auto data = infuse::test::random_rows(rng, f, 20);
  const auto k = infuse::test::k_rows(data, f), v = infuse::test::v_rows(data, f);
  const std::vector<std::uint8_t> short_mask(19, 1), mask(20, 1);
  CHECK(argument_of([&] { cache.append(infuse::exec::cpu{}, one, counts, k, v, short_mask); }) ==
        "important.size()");
  CHECK(cache.length(s) == 0);
  cache.append(infuse::exec::cpu{}, one, counts, k, v, mask);
  const kv::sequence_id child = cache.fork(s);
  const cache_type before = cache;
  CHECK(argument_of([&] { cache.requantize(s, 21, mask); }) == "begin");
  CHECK(argument_of([&] { cache.requantize(s, 1, mask); }) == "important.size()");
  CHECK(argument_of([&] { cache.requantize(s + 9, 0, mask); }) == "sequence");
  // Lowering tokens of both shared pages needs two copies; the pool has none free.
  const std::vector<std::uint8_t> lower(20, 0);
  CHECK(argument_of([&] { cache.requantize(child, 0, lower); }) == "important");
  CHECK(cache == before);
}
