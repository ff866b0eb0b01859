// KIVI's arrangement: kv::per_channel keys, grouped per channel across the tokens of a page, a
// full-precision window for the last page until it fills, values per token. Read back through
// kv::read_key / kv::read_value against the appended floats: exact in the window, within the
// scheme's bound over the page's channel in a full page; fork, truncate (into a quantized page),
// key bounds, bytes per token and bad input.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
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
using infuse::host_view;
using infuse::test::argument_of;

namespace {

template <int PageSize, class KScheme, class VScheme, class Order = kv::nhd>
struct setup {
  using k_scheme = KScheme;
  using v_scheme = VScheme;
  using cache = kv::cache<kv::paged<PageSize, Order>, kv::per_channel<KScheme>, VScheme>;
};

// What a sequence should read back: per token, its keys (as appended, or as stored when a
// truncation sent a quantized page back to the window) and its values as appended.
struct token {
  std::vector<float> k;  // (k.heads, k.head_dim)
  std::vector<float> v;  // (v.heads, v.head_dim)
};
using model = std::map<kv::sequence_id, std::vector<token>>;

template <class Cache>
void append_random(Cache& cache, infuse::test::seeded_rng& rng,
                   std::span<const kv::sequence_id> seqs, std::span<const std::int64_t> counts,
                   model& expected) {
  const auto& f = cache.format();
  std::int64_t rows = 0;
  for (const std::int64_t count : counts) rows += count;
  const auto data = infuse::test::random_rows(rng, f, rows);
  cache.append(infuse::exec::cpu{}, seqs, counts, infuse::test::k_rows(data, f),
               infuse::test::v_rows(data, f));
  std::int64_t row = 0;
  const std::int64_t k_size = std::int64_t{f.k.heads} * f.k.head_dim;
  const std::int64_t v_size = std::int64_t{f.v.heads} * f.v.head_dim;
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    for (std::int64_t t = 0; t < counts[i]; ++t, ++row) {
      expected[seqs[i]].push_back(
          {{data.k.begin() + row * k_size, data.k.begin() + (row + 1) * k_size},
           {data.v.begin() + row * v_size, data.v.begin() + (row + 1) * v_size}});
    }
  }
}

// The keys of sequence s as the cache reads them back, token after token.
template <class Cache>
std::vector<std::vector<float>> read_keys(Cache& cache, kv::sequence_id s) {
  const std::array<kv::sequence_id, 1> one{s};
  const auto batch = cache.view(one);
  const auto& f = cache.format();
  std::vector<std::vector<float>> keys;
  for (std::int64_t t = 0; t < cache.length(s); ++t) {
    std::vector<float> key(static_cast<std::size_t>(f.k.heads * f.k.head_dim));
    for (int h = 0; h < f.k.heads; ++h) {
      float out[1024];
      kv::read_key(batch.view(), 0, t, h, out);
      std::copy(out, out + f.k.head_dim, key.begin() + h * f.k.head_dim);
    }
    keys.push_back(std::move(key));
  }
  return keys;
}

// Every token of s against the model: keys of the window exactly, keys of a full page within the
// bound of their channel over the page, values within the bound of their group.
template <class Setup, class Cache>
void check_sequence(Cache& cache, kv::sequence_id s, const std::vector<token>& tokens) {
  constexpr int page_size = Cache::page_size;
  const auto& f = cache.format();
  REQUIRE(cache.length(s) == std::ssize(tokens));
  const std::array<kv::sequence_id, 1> one{s};
  const auto batch = cache.view(one);
  const std::int64_t window_begin = cache.length(s) / page_size * page_size;
  int wrong_window = 0, wrong_keys = 0, wrong_values = 0;
  std::vector<double> bounds(static_cast<std::size_t>(f.k.heads * f.k.head_dim));  // the page's
  for (std::int64_t t = 0; t < std::ssize(tokens); ++t) {
    const token& want = tokens[static_cast<std::size_t>(t)];
    if (t % page_size == 0 && t < window_begin) {
      for (std::size_t c = 0; c < bounds.size(); ++c) {
        float channel[page_size];
        for (int slot = 0; slot < page_size; ++slot) {
          channel[slot] = tokens[static_cast<std::size_t>(t + slot)].k[c];
        }
        bounds[c] = infuse::test::int_bound<typename Setup::k_scheme>(channel, page_size);
      }
    }
    for (int h = 0; h < f.k.heads; ++h) {
      float out[1024];
      kv::read_key(batch.view(), 0, t, h, out);
      for (int d = 0; d < f.k.head_dim; ++d) {
        const auto c = static_cast<std::size_t>(h * f.k.head_dim + d);
        if (t >= window_begin) {
          wrong_window += out[d] != want.k[c] ? 1 : 0;
        } else {
          wrong_keys += std::fabs(double(out[d]) - want.k[c]) <= bounds[c] ? 0 : 1;
        }
      }
    }
    for (int h = 0; h < f.v.heads; ++h) {
      float out[1024];
      kv::read_value(batch.view(), 0, t, h, out);
      const float* vector = want.v.data() + h * f.v.head_dim;
      for (int d = 0; d < f.v.head_dim; ++d) {
        const double bound =
            infuse::test::vector_bound<typename Setup::v_scheme>(vector, f.v.head_dim, d);
        wrong_values += std::fabs(double(out[d]) - vector[d]) <= bound ? 0 : 1;
      }
    }
  }
  CHECK_MESSAGE(wrong_window == 0, wrong_window << " window keys not read back exactly");
  CHECK_MESSAGE(wrong_keys == 0, wrong_keys << " quantized keys beyond the scheme's bound");
  CHECK_MESSAGE(wrong_values == 0, wrong_values << " values beyond the scheme's bound");
}

// The key bounds of every page in use against the keys its longest holder reads back.
template <class Cache>
void check_key_bounds(Cache& cache, std::span<const kv::sequence_id> live) {
  constexpr int page_size = Cache::page_size;
  struct holder {
    kv::sequence_id s;
    std::int64_t index;
    std::int64_t filled;
  };
  std::map<std::int32_t, holder> longest;
  for (const kv::sequence_id s : live) {
    const auto pages = cache.pages(s);
    for (std::int64_t i = 0; i < std::ssize(pages); ++i) {
      const std::int64_t filled =
          std::min<std::int64_t>(page_size, cache.length(s) - i * page_size);
      auto [at, fresh] =
          longest.try_emplace(pages[static_cast<std::size_t>(i)], holder{s, i, filled});
      if (!fresh && at->second.filled < filled) at->second = {s, i, filled};
    }
  }
  const auto& f = cache.format();
  std::map<kv::sequence_id, std::vector<std::vector<float>>> read;
  for (const kv::sequence_id s : live) read[s] = read_keys(cache, s);
  int wrong = 0;
  for (const auto& [page, h] : longest) {
    const auto& keys = read[h.s];
    for (std::int64_t c = 0; c < std::int64_t{f.k.heads} * f.k.head_dim; ++c) {
      float lo = std::numeric_limits<float>::infinity(), hi = -lo;
      for (std::int64_t slot = 0; slot < h.filled; ++slot) {
        const float x =
            keys[static_cast<std::size_t>(h.index * page_size + slot)][static_cast<std::size_t>(c)];
        lo = std::min(lo, x);
        hi = std::max(hi, x);
      }
      wrong += !infuse::test::bounds_are(cache.metadata().key_min(page)[c],
                                         cache.metadata().key_max(page)[c], lo, hi);
    }
  }
  CHECK_MESSAGE(wrong == 0, wrong << " key bounds differ from the keys read back");
}

// Truncates s by `tokens`, as the model says the cache does: the kept tokens of a quantized page
// that becomes the last, not full, go back to the window as stored.
template <class Cache>
void truncate(Cache& cache, kv::sequence_id s, std::int64_t tokens, model& expected) {
  constexpr int page_size = Cache::page_size;
  const auto stored = read_keys(cache, s);
  cache.truncate(s, tokens);
  auto& kept = expected[s];
  kept.resize(kept.size() - static_cast<std::size_t>(tokens));
  const std::int64_t length = std::ssize(kept);
  if (length % page_size != 0 && std::ssize(stored) >= (length / page_size + 1) * page_size) {
    for (std::int64_t t = length / page_size * page_size; t < length; ++t) {
      kept[static_cast<std::size_t>(t)].k = stored[static_cast<std::size_t>(t)];
    }
  }
}

}  // namespace

TEST_CASE_TEMPLATE(
    "kv::per_channel keys read back exactly in the window and within the bound of their channel "
    "in a full page, across fork, truncate and free",
    S,
    setup<1, quant::int_<2, quant::per_channel, quant::zero_point>,
          quant::int_<2, quant::per_channel, quant::zero_point>>,
    setup<16, quant::int_<2, quant::per_channel, quant::zero_point>,
          quant::int_<2, quant::per_channel, quant::zero_point>>,
    setup<16, quant::int_<4, quant::per_channel, quant::zero_point>, quant::int_<4, 32>, kv::hnd>,
    setup<256, quant::int_<8, quant::per_channel>, quant::int_<2, 32, quant::zero_point>>) {
  using cache_type = typename S::cache;
  constexpr int page_size = cache_type::page_size;
  INFUSE_RANDOM(rng);
  // K's dim is not a whole number of blocks; V differs in heads and dim.
  cache_type cache(page_size == 256 ? 24 : 160, {2, 40}, {3, 64});
  model expected;
  std::vector<kv::sequence_id> live{cache.create(), cache.create()};
  for (const kv::sequence_id s : live) expected[s];
  const int steps = page_size == 256 ? 20 : 40;
  for (int step = 0; step < steps; ++step) {
    CAPTURE(step);
    const auto op = rng.integer(0, 9);
    CAPTURE(op);
    const auto pick = live[static_cast<std::size_t>(rng.integer(0, std::ssize(live) - 1))];
    if (op <= 5) {
      std::vector<std::int64_t> counts;
      for (std::size_t i = 0; i < live.size(); ++i) {
        counts.push_back(rng.integer(0, 1) == 0 ? 1 : rng.integer(0, 2 * page_size + 1));
      }
      std::int64_t pages_needed = 0;
      for (std::size_t i = 0; i < live.size(); ++i) {
        pages_needed += (cache.length(live[i]) + counts[i]) / page_size + 2;
      }
      if (pages_needed > cache.pool().free_pages()) continue;
      append_random(cache, rng, live, counts, expected);
    } else if (op == 6 && live.size() < 5) {
      const kv::sequence_id child = cache.fork(pick);
      expected[child] = expected[pick];
      live.push_back(child);
    } else if (op <= 8) {
      truncate(cache, pick, rng.integer(0, cache.length(pick)), expected);
    } else if (live.size() > 1) {
      cache.free(pick);
      expected.erase(pick);
      live.erase(std::find(live.begin(), live.end(), pick));
    }
    for (const kv::sequence_id s : live) check_sequence<S>(cache, s, expected[s]);
    check_key_bounds(cache, live);
  }
}

TEST_CASE("kv::per_channel: a write to one branch of a fork never shows in the other") {
  INFUSE_RANDOM(rng);
  using scheme = quant::int_<2, quant::per_channel, quant::zero_point>;
  using setup_type = setup<16, scheme, scheme>;
  typename setup_type::cache cache(16, {2, 64}, {2, 64});
  model expected;
  const kv::sequence_id parent = cache.create();
  const std::array<kv::sequence_id, 1> one{parent};
  const std::array<std::int64_t, 1> twenty{20};
  append_random(cache, rng, one, twenty, expected);  // a full page and 4 tokens in the window
  const kv::sequence_id child = cache.fork(parent);
  expected[child] = expected[parent];
  const std::array<kv::sequence_id, 2> both{parent, child};
  const std::array<std::int64_t, 2> counts{5, 12};  // the child fills its copy of the page
  append_random(cache, rng, both, counts, expected);
  CHECK(cache.pages(parent)[1] != cache.pages(child)[1]);
  CHECK(cache.pages(parent)[0] == cache.pages(child)[0]);
  check_sequence<setup_type>(cache, parent, expected[parent]);
  check_sequence<setup_type>(cache, child, expected[child]);
  // The child truncates into the shared full page: it reads it back from its window, the parent
  // from the page, both unchanged.
  truncate(cache, child, 22, expected);
  check_sequence<setup_type>(cache, parent, expected[parent]);
  check_sequence<setup_type>(cache, child, expected[child]);
  cache.free(parent);
  cache.free(child);
  CHECK(cache.pool().free_pages() == cache.pool().capacity());
}

TEST_CASE("kv::per_channel: truncating into a quantized page gives back the stored keys") {
  INFUSE_RANDOM(rng);
  using scheme = quant::int_<4, quant::per_channel, quant::zero_point>;
  using setup_type = setup<16, scheme, scheme>;
  typename setup_type::cache cache(8, {1, 32}, {1, 32});
  model expected;
  const kv::sequence_id s = cache.create();
  const std::array<kv::sequence_id, 1> one{s};
  const std::array<std::int64_t, 1> counts{16};
  append_random(cache, rng, one, counts, expected);
  const auto stored = read_keys(cache, s);
  const auto appended = expected[s];
  cache.truncate(s, 6);
  const auto back = read_keys(cache, s);
  for (std::size_t t = 0; t < back.size(); ++t) CHECK(back[t] == stored[t]);
  // Refilled, the page is quantized again over the stored keys of its first 10 slots.
  expected[s].resize(10);
  for (std::size_t t = 0; t < 10; ++t) expected[s][t].k = stored[t];
  const std::array<std::int64_t, 1> six{6};
  append_random(cache, rng, one, six, expected);
  check_sequence<setup_type>(cache, s, expected[s]);
  // And within twice the bound of what was first appended.
  const auto again = read_keys(cache, s);
  float channel[16];
  for (int d = 0; d < 32; ++d) {
    for (int slot = 0; slot < 16; ++slot) channel[slot] = appended[std::size_t(slot)].k[d];
    const double bound = infuse::test::int_bound<scheme>(channel, 10);
    for (std::size_t t = 0; t < 10; ++t) {
      CHECK(std::fabs(double(again[t][d]) - appended[t].k[d]) <=
            2 * bound + infuse::test::int_bound<scheme>(channel, 16));
    }
  }
}

TEST_CASE("kv::per_channel: half rows store what their floats store") {
  INFUSE_RANDOM(rng);
  using scheme = quant::int_<2, quant::per_channel, quant::zero_point>;
  using cache_type = setup<16, scheme, scheme>::cache;
  cache_type from_float(4, {2, 32}, {1, 32}), from_half(4, {2, 32}, {1, 32});
  const auto data = infuse::test::random_rows(rng, from_float.format(), 21);
  std::vector<infuse::half> k_half(data.k.begin(), data.k.end()),
      v_half(data.v.begin(), data.v.end());
  std::vector<float> k_float(k_half.begin(), k_half.end()), v_float(v_half.begin(), v_half.end());
  const std::array<kv::sequence_id, 1> a{from_float.create()}, b{from_half.create()};
  const std::array<std::int64_t, 1> counts{21};
  from_float.append(infuse::exec::cpu{}, a, counts,
                    host_view<const float, 3>(k_float.data(), {21, 2, 32}),
                    host_view<const float, 3>(v_float.data(), {21, 1, 32}));
  from_half.append(infuse::exec::cpu{}, b, counts,
                   host_view<const infuse::half, 3>(k_half.data(), {21, 2, 32}),
                   host_view<const infuse::half, 3>(v_half.data(), {21, 1, 32}));
  CHECK(from_float == from_half);
}

TEST_CASE("kv::per_channel: bytes per token, page and window are exact") {
  using int2 = quant::int_<2, quant::per_channel, quant::zero_point>;
  // 8 heads of 128: K codes 32 bytes a head; V codes 32 and a scale and zero point (8 bytes).
  const kv::cache<kv::paged<16>, kv::per_channel<int2>, int2> kivi(2, {8, 128}, {8, 128});
  CHECK(kivi.bytes_per_token() == 8 * 32 + 8 * (32 + 8));
  // K codes, V codes, V params per slot, then K's 8 x 128 channels: a float and a zero point each.
  CHECK(kivi.page_bytes() == 16 * 8 * 32 + 16 * 8 * 32 + 16 * 8 * 8 + 8 * 128 * 5);
  CHECK(kivi.window_bytes_per_sequence() == 16 * 8 * 128 * 4);
  const kv::cache<kv::paged<16>> fp16(2, {8, 128}, {8, 128});
  CHECK(fp16.bytes_per_token() == 2 * 8 * 128 * 2);
  CHECK(fp16.window_bytes_per_sequence() == 0);
  // Symmetric int8 keys of dim 40 (stored as 64), page of 1: the scales alone, padded to 64 bytes.
  using int8 = quant::int_<8, quant::per_channel>;
  const kv::cache<kv::paged<1>, kv::per_channel<int8>, quant::none<float>> small(2, {3, 40},
                                                                                 {1, 40});
  CHECK(small.bytes_per_token() == 3 * 64 + 64 * 4);  // V's padding is stored
  CHECK(small.page_bytes() == 192 + 256 + 3 * 64 * 4);
}

TEST_CASE("kv::per_channel: bad input names the argument and leaves the cache as it was") {
  INFUSE_RANDOM(rng);
  using scheme = quant::int_<2, quant::per_channel, quant::zero_point>;
  using cache_type = setup<16, scheme, scheme>::cache;
  cache_type cache(3, {2, 32}, {2, 32});
  model expected;
  const kv::sequence_id s = cache.create();
  const std::array<kv::sequence_id, 1> one{s};
  const std::array<std::int64_t, 1> counts{20};
  append_random(cache, rng, one, counts, expected);
  const cache_type before = cache;
  const auto& f = cache.format();
  const auto data = infuse::test::random_rows(rng, f, 40);
  const auto k = infuse::test::k_rows(data, f), v = infuse::test::v_rows(data, f);
  const infuse::exec::cpu exec;
  const std::array<std::int64_t, 1> too_many{40};  // 60 tokens need 4 pages of 3
  CHECK(argument_of([&] { cache.append(exec, one, too_many, k, v); }) == "counts");
  const std::array<kv::sequence_id, 1> unknown{s + 7};
  const std::array<std::int64_t, 1> two{2};
  CHECK(argument_of([&] { cache.append(exec, unknown, two, k, v); }) == "seqs[0]");
  CHECK(argument_of([&] { cache.append(exec, one, two, k, v); }) == "k.extent(0)");
  CHECK(argument_of([&] { cache.truncate(s, 21); }) == "tokens");
  CHECK(cache == before);
}
