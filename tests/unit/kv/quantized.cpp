// The quantized paged KV cache with data: batch append quantizes K and V into their pages, reads
// back through kv::cache_view within each scheme's bound, keeps the per-page key bounds equal to a
// direct recomputation after every operation, copies pages and metadata on write, and leaves the
// cache exactly as it was on every error.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "cache_model.hpp"
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

template <class Layout, class KScheme, class VScheme>
struct setup {
  using layout = Layout;
  using k_scheme = KScheme;
  using v_scheme = VScheme;
  using cache = kv::cache<Layout, KScheme, VScheme>;
};

// How far the stored value of element d of `vector` (head_dim floats) may be from it, from the
// scheme's math alone: half a step of the group's scale for symmetric integers; a whole step with a
// zero point (the rounded zero can push the group's end one code past the top, which clamps);
// half an ulp of the float format, relative, for none and fp8 (plus half fp8's smallest subnormal
// step times the scale).
template <class S>
double allowed_error(const kv::vector_format<S>& format, const float* vector, int d) {
  const double x = vector[d];
  if constexpr (quant::is_none<S>) {
    if constexpr (std::is_same_v<S, quant::none<float>>) return 0.0;
    const double ulp_bits = std::is_same_v<S, quant::none<infuse::half>> ? 11 : 8;
    return std::fabs(x) * std::ldexp(1.0, -ulp_bits) + std::ldexp(1.0, -25);
  } else {
    const int first = d / format.group_dims() * format.group_dims();
    double lo = 0.0, hi = 0.0;  // over the group, padding zeros included
    for (int j = first; j < first + format.group_dims() && j < format.head_dim; ++j) {
      lo = std::min(lo, double(vector[j]));
      hi = std::max(hi, double(vector[j]));
    }
    const double amax = std::max(hi, -lo);
    if constexpr (quant::is_fp8<S>) {
      const double scale = amax / 448.0;  // e4m3's largest finite value
      return std::fabs(x) * std::ldexp(1.0, -4) + scale * std::ldexp(1.0, -10) + 1e-6 * amax;
    } else if constexpr (S::has_zero) {
      return (hi - lo) / S::max_code * (1 + 1e-5) + 1e-6 * amax;
    } else {
      return amax / (S::midpoint - 1) * 0.5 * (1 + 1e-5) + 1e-6 * amax;
    }
  }
}

// Element d of the stored key (value) of head h in slot `slot` of the page starting at `page`.
template <class Format>
float stored_key(const Format& format, const std::uint8_t* page, std::int32_t slot, int h, int d) {
  return format.k.value(format.k_codes(page, slot, h), format.k_params(page, slot, h), d);
}
template <class Format>
float stored_value(const Format& format, const std::uint8_t* page, std::int32_t slot, int h,
                   int d) {
  return format.v.value(format.v_codes(page, slot, h), format.v_params(page, slot, h), d);
}

// The keys and values a test appended, token after token, as the cache should hold them.
struct token_data {
  std::vector<float> k;  // (k.heads, k.head_dim)
  std::vector<float> v;  // (v.heads, v.head_dim)
};

template <class Format>
token_data random_token(infuse::test::seeded_rng& rng, const Format& format) {
  token_data token;
  token.k = rng.normals(static_cast<std::size_t>(format.k.heads * format.k.head_dim));
  token.v = rng.normals(static_cast<std::size_t>(format.v.heads * format.v.head_dim), 3.0);
  // An outlier channel now and then, as real keys have.
  if (rng.integer(0, 3) == 0) token.k[0] *= 20.0f;
  return token;
}

// The number of elements of `token`, stored in slot `slot` of `page`, whose K or V is off by more
// than the scheme allows.
template <class Format>
int misread_elements(const Format& format, const std::uint8_t* page, std::int32_t slot,
                     const token_data& token) {
  int wrong = 0;
  for (int h = 0; h < format.k.heads; ++h) {
    const float* want = token.k.data() + h * format.k.head_dim;
    for (int d = 0; d < format.k.head_dim; ++d) {
      const double error = std::fabs(double(stored_key(format, page, slot, h, d)) - want[d]);
      if (!(error <= allowed_error(format.k, want, d))) ++wrong;
    }
  }
  for (int h = 0; h < format.v.heads; ++h) {
    const float* want = token.v.data() + h * format.v.head_dim;
    for (int d = 0; d < format.v.head_dim; ++d) {
      const double error = std::fabs(double(stored_value(format, page, slot, h, d)) - want[d]);
      if (!(error <= allowed_error(format.v, want, d))) ++wrong;
    }
  }
  return wrong;
}

// The key bounds of every page in use against a direct recomputation: per channel, min and max of
// the stored keys over the slots the page's longest holder fills.
template <class Cache>
void check_key_bounds(const Cache& cache, std::span<const kv::sequence_id> live) {
  constexpr int page_size = Cache::page_size;
  std::map<std::int32_t, std::int64_t> filled;
  for (const kv::sequence_id s : live) {
    const auto pages = cache.pages(s);
    for (std::size_t i = 0; i < pages.size(); ++i) {
      const std::int64_t fill =
          std::min<std::int64_t>(page_size, cache.length(s) - std::int64_t(i) * page_size);
      filled[pages[i]] = std::max(filled[pages[i]], fill);
    }
  }
  const auto& format = cache.format();
  for (const auto& [page, fill] : filled) {
    CAPTURE(page);
    CAPTURE(fill);
    const std::uint8_t* bytes = cache.pool().bytes(page).data();
    int wrong = 0;
    for (int h = 0; h < format.k.heads; ++h) {
      for (int d = 0; d < format.k.head_dim; ++d) {
        float lo = std::numeric_limits<float>::infinity();
        float hi = -lo;
        for (std::int32_t slot = 0; slot < fill; ++slot) {
          lo = std::min(lo, stored_key(format, bytes, slot, h, d));
          hi = std::max(hi, stored_key(format, bytes, slot, h, d));
        }
        const std::int64_t at = std::int64_t{h} * format.k.head_dim + d;
        if (!infuse::test::bounds_are(cache.metadata().key_min(page)[at],
                                      cache.metadata().key_max(page)[at], lo, hi)) {
          ++wrong;
        }
      }
    }
    REQUIRE_MESSAGE(wrong == 0, wrong << " key bounds differ from the stored keys");
  }
}

// Appends `counts[i]` tokens of fresh random data to seqs[i] and records them in `model`.
template <class Cache>
void append_random(Cache& cache, infuse::test::seeded_rng& rng,
                   std::span<const kv::sequence_id> seqs, std::span<const std::int64_t> counts,
                   std::map<kv::sequence_id, std::vector<token_data>>& model,
                   const infuse::exec::cpu& exec = infuse::exec::cpu{}) {
  const auto& format = cache.format();
  std::vector<float> k, v;
  std::vector<token_data> tokens;
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    for (std::int64_t t = 0; t < counts[i]; ++t) {
      tokens.push_back(random_token(rng, format));
      k.insert(k.end(), tokens.back().k.begin(), tokens.back().k.end());
      v.insert(v.end(), tokens.back().v.begin(), tokens.back().v.end());
    }
  }
  const auto rows = static_cast<std::int64_t>(tokens.size());
  cache.append(exec, seqs, counts,
               host_view<const float, 3>(k.data(), {rows, format.k.heads, format.k.head_dim}),
               host_view<const float, 3>(v.data(), {rows, format.v.heads, format.v.head_dim}));
  std::size_t next = 0;
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    for (std::int64_t t = 0; t < counts[i]; ++t) model[seqs[i]].push_back(tokens[next++]);
  }
}

// Every token of `seqs`, read through cache.view(seqs), against the model.
template <class Cache>
void check_contents(Cache& cache, std::span<const kv::sequence_id> seqs,
                    const std::map<kv::sequence_id, std::vector<token_data>>& model) {
  const auto batch = cache.view(seqs);
  const auto& view = batch.view();
  CHECK_NOTHROW(kv::require_page_table(view.table, view.pool_pages, "test"));
  for (std::size_t i = 0; i < seqs.size(); ++i) {
    const auto& tokens = model.at(seqs[i]);
    REQUIRE(view.length(std::int32_t(i)) == std::ssize(tokens));
    for (std::int64_t t = 0; t < std::ssize(tokens); ++t) {
      const kv::token_address at = view.locate(std::int32_t(i), t);
      const int wrong = misread_elements(view.format, at.page, at.slot, tokens[std::size_t(t)]);
      REQUIRE_MESSAGE(wrong == 0, "sequence " << i << " token " << t << ": " << wrong
                                              << " elements beyond the scheme's bound");
    }
  }
}

}  // namespace

TEST_CASE_TEMPLATE(
    "kv::cache append quantizes K and V into their pages and reads back within the scheme's bound",
    S, setup<kv::paged<1>, quant::none<float>, quant::none<float>>,
    setup<kv::paged<16>, quant::int_<8, quant::per_channel>, quant::int_<8, quant::per_channel>>,
    setup<kv::paged<16, kv::hnd>, quant::int_<4, 32>, quant::int_<2, 32, quant::zero_point>>,
    setup<kv::paged<256>, quant::fp8<infuse::fp8_e4m3, quant::per_channel>,
          quant::int_<4, 32, quant::zero_point>>,
    setup<kv::paged<1, kv::hnd>, quant::int_<2, 32>, quant::none<infuse::half>>,
    setup<kv::paged<256, kv::hnd>, quant::none<infuse::half>, quant::fp8<infuse::fp8_e4m3>>) {
  using cache_type = typename S::cache;
  constexpr int page_size = cache_type::page_size;
  INFUSE_RANDOM(rng);
  // K and V differ in head count and dim; the dims are not multiples of a block for V.
  const kv::vector_format<typename S::k_scheme> k{2, 64};
  const kv::vector_format<typename S::v_scheme> v{4, 96};
  // Steps that stop just before, at and just after page boundaries, for two sequences at once.
  const std::vector<std::vector<std::int64_t>> steps{
      {1, page_size}, {page_size > 1 ? page_size - 1 : 1, 0}, {1, 2}, {page_size + 1, 1}};
  std::int64_t pages = 0;
  for (const int s : {0, 1}) {
    std::int64_t length = 0;
    for (const auto& step : steps) length += step[std::size_t(s)];
    pages += (length + page_size - 1) / page_size;
  }
  cache_type cache(static_cast<std::int32_t>(pages), k, v);
  const std::vector<kv::sequence_id> seqs{cache.create(), cache.create()};
  std::map<kv::sequence_id, std::vector<token_data>> model;
  for (const auto& step : steps) {
    append_random(cache, rng, seqs, step, model);
    check_contents(cache, seqs, model);
    check_key_bounds(cache, seqs);
  }
  CHECK(cache.pool().free_pages() == 0);
  // The view reads the cache's own arrays: no copy of a page or of the metadata.
  const auto batch = cache.view(seqs);
  CHECK(batch.view().pages == cache.pool().all_bytes().data());
  CHECK(batch.view().key_min == cache.metadata().key_min());
  CHECK(batch.view().mass == cache.metadata().mass());
  CHECK(batch.view().format.page_bytes() == cache.page_bytes());
  for (std::int64_t t = 0; t < cache.length(seqs[0]); ++t) {  // appended tokens carry no mass yet
    const kv::token_address at = batch.view().locate(0, t);
    const std::int64_t page = (at.page - batch.view().pages) / cache.page_bytes();
    for (int h = 0; h < k.heads; ++h) {
      CHECK(batch.view().mass[(page * page_size + at.slot) * k.heads + h] == 0.0f);
    }
  }
}

TEST_CASE("kv::cache reports its exact memory per token, page and page metadata") {
  using half_cache = kv::cache<kv::paged<16>>;
  const half_cache fp16(4, {8, 128}, {8, 128});
  CHECK(fp16.bytes_per_token() == 2 * 8 * 128 * 2);
  CHECK(fp16.page_bytes() == 16 * fp16.bytes_per_token());  // every region a multiple of 64 bytes
  // Key bounds in half, attention mass in float.
  CHECK(fp16.metadata_bytes_per_page() == 2 * (2 * 8 * 128) + 4 * (16 * 8));

  // K int8 one scale per vector: 128 + 4 bytes a head; V int2 groups of 32 with zero points:
  // 32 bytes of codes, 4 scales and 4 zero points a head.
  using mixed = kv::cache<kv::paged<16>, quant::int_<8, quant::per_channel>,
                          quant::int_<2, 32, quant::zero_point>>;
  const mixed small(4, {8, 128}, {4, 64});
  CHECK(small.bytes_per_token() == 8 * (128 + 4) + 4 * (16 + 2 * 4 + 2 + 2));
  const kv::page_format<kv::nhd, quant::int_<8, quant::per_channel>,
                        quant::int_<2, 32, quant::zero_point>>
      format{{8, 128}, {4, 64}, 16};
  CHECK(small.page_bytes() == format.page_bytes());
  CHECK(small.pool().page_bytes() == format.page_bytes());
  CHECK(small.metadata_bytes_per_page() == 2 * (2 * 8 * 128) + 4 * (16 * 8));
  CHECK(reinterpret_cast<std::uintptr_t>(small.pool().all_bytes().data()) % 64 == 0);
}

TEST_CASE("kv::cache fork copies a shared partial page with its metadata on write") {
  constexpr int page_size = 16;
  using cache_type = kv::cache<kv::paged<page_size>, quant::int_<4, 32>, quant::int_<8, 32>>;
  INFUSE_RANDOM(rng);
  cache_type cache(8, {2, 64}, {3, 32});
  std::map<kv::sequence_id, std::vector<token_data>> model;
  const kv::sequence_id a = cache.create();
  append_random(cache, rng, std::vector{a}, std::vector<std::int64_t>{20}, model);

  // Attention mass accumulated on a's partial page before the fork.
  const std::int32_t partial = cache.pages(a)[1];
  {
    const auto batch = cache.view(std::vector{a});
    for (std::int64_t i = 0; i < cache.metadata().mass_per_page(); ++i) {
      batch.view().mass[partial * cache.metadata().mass_per_page() + i] = float(i + 1);
    }
  }
  const kv::sequence_id b = cache.fork(a);
  model[b] = model[a];
  CHECK(cache.pool().ref_count(partial) == 2);

  // b appends into the shared page: it gets a copy, bytes and metadata; a keeps the original.
  append_random(cache, rng, std::vector{b}, std::vector<std::int64_t>{1}, model);
  const std::int32_t copy = cache.pages(b)[1];
  REQUIRE(copy != partial);
  CHECK(cache.pages(b)[0] == cache.pages(a)[0]);
  CHECK(cache.pool().ref_count(partial) == 1);
  const float* mass_a = cache.metadata().mass(partial);
  const float* mass_b = cache.metadata().mass(copy);
  for (std::int64_t i = 0; i < 4 * 2; ++i) CHECK(mass_b[i] == mass_a[i]);  // slots 0..3 copied
  CHECK(mass_b[4 * 2] == 0.0f);                                            // slot 4 is new
  CHECK(mass_b[4 * 2 + 1] == 0.0f);
  CHECK(mass_a[4 * 2] == 9.0f);  // a's slot 4 is not a's token: untouched

  // a writes the same slot with other data; neither branch sees the other's token.
  append_random(cache, rng, std::vector{a}, std::vector<std::int64_t>{1}, model);
  CHECK(cache.pages(a)[1] == partial);
  CHECK(mass_a[4 * 2] == 0.0f);  // a's own token now: its mass starts at zero
  const std::vector<kv::sequence_id> both{a, b};
  check_contents(cache, both, model);
  check_key_bounds(cache, both);
  // Mass written to a's page later does not show in b's copy.
  cache.view(both).view().mass[partial * cache.metadata().mass_per_page()] = -1.0f;
  CHECK(mass_b[0] == 1.0f);

  // Truncating a into the shared first page and freeing b: the bounds follow the longest holder.
  cache.truncate(a, 13);  // 8 tokens left, page 0 shared with b (16 filled)
  check_key_bounds(cache, both);
  cache.free(b);
  const std::vector<kv::sequence_id> only_a{a};
  check_key_bounds(cache, only_a);  // page 0's bounds now over a's 8 tokens alone
  model[a].resize(8);
  check_contents(cache, only_a, model);
}

TEST_CASE("kv::update_key_bounds after a prefill write gives what append with data gives") {
  constexpr int page_size = 16;
  using cache_type = kv::cache<kv::paged<page_size, kv::hnd>, quant::int_<4, 32, quant::zero_point>,
                               quant::none<infuse::half>>;
  INFUSE_RANDOM(rng);
  const kv::vector_format<quant::int_<4, 32, quant::zero_point>> k{2, 64};
  const kv::vector_format<quant::none<infuse::half>> v{1, 32};
  cache_type direct(6, k, v);
  cache_type prefilled(6, k, v);
  std::map<kv::sequence_id, std::vector<token_data>> model;
  const kv::sequence_id s = direct.create();
  REQUIRE(prefilled.create() == s);
  for (const std::int64_t count : {std::int64_t{5}, std::int64_t{30}, std::int64_t{1}}) {
    const std::int64_t begin = direct.length(s);
    append_random(direct, rng, std::vector{s}, std::vector{count}, model);
    // The prefill way: reserve, write the records through the view, then fold the new keys in.
    prefilled.append(s, count);
    const auto batch = prefilled.view(std::vector{s});
    const auto& view = batch.view();
    for (std::int64_t t = begin; t < begin + count; ++t) {
      const kv::token_address at = view.locate(0, t);
      const token_data& token = model[s][std::size_t(t)];
      for (int h = 0; h < k.heads; ++h) {
        k.encode(token.k.data() + h * k.head_dim, view.format.k_codes(at.page, at.slot, h),
                 view.format.k_params(at.page, at.slot, h));
      }
      v.encode(token.v.data(), view.format.v_codes(at.page, at.slot, 0),
               view.format.v_params(at.page, at.slot, 0));
    }
    kv::update_key_bounds(view, 0, begin, begin + count);
    CHECK(prefilled == direct);
  }
  const auto batch = prefilled.view(std::vector{s});
  const auto& view = batch.view();
  CHECK(argument_of([&] { kv::update_key_bounds(view, 0, 0, 37); }) == "end");
  CHECK(argument_of([&] { kv::update_key_bounds(view, 0, 3, 2); }) == "begin");
  CHECK(argument_of([&] { kv::update_key_bounds(view, 1, 0, 0); }) == "sequence");
  auto without_bounds = view;
  without_bounds.key_max = nullptr;
  CHECK(argument_of([&] { kv::update_key_bounds(without_bounds, 0, 0, 1); }) == "view.key_min");
}

TEST_CASE("kv::cache batch append rejects bad input by name and changes nothing") {
  constexpr int page_size = 4;
  using cache_type = kv::cache<kv::paged<page_size>, quant::int_<4, 32>>;
  INFUSE_RANDOM(rng);
  cache_type cache(5, {2, 32}, {1, 64});
  std::map<kv::sequence_id, std::vector<token_data>> model;
  const kv::sequence_id a = cache.create();
  const kv::sequence_id b = cache.create();
  const kv::sequence_id gone = cache.create();
  cache.free(gone);
  append_random(cache, rng, std::vector{a, b}, std::vector<std::int64_t>{6, 3}, model);
  const kv::sequence_id c = cache.fork(a);  // a's second page is shared and partial
  REQUIRE(cache.pool().free_pages() == 2);

  const auto before = cache;
  std::vector<float> k(64 * 2 * 32), v(64 * 64);
  const auto append = [&](std::vector<kv::sequence_id> seqs, std::vector<std::int64_t> counts,
                          std::int64_t rows, std::int64_t k_heads = 2, std::int64_t v_dim = 64,
                          std::int64_t v_stride = 1) {
    return argument_of([&] {
      cache.append(infuse::exec::cpu{}, seqs, counts,
                   host_view<const float, 3>(k.data(), {rows, k_heads, 32}),
                   host_view<const float, 3>(v.data(), {rows, 1, v_dim}, {v_dim, v_dim, v_stride}));
    });
  };
  CHECK(append({a, gone}, {1, 1}, 2) == "seqs[1]");
  CHECK(append({a, 99}, {1, 1}, 2) == "seqs[1]");
  CHECK(append({a, b, a}, {1, 1, 1}, 3) == "seqs[2]");
  CHECK(append({a, b}, {1, -1}, 0) == "counts[1]");
  CHECK(append({a, b}, {1, std::numeric_limits<std::int64_t>::max()}, 1) == "counts[1]");
  CHECK(append({a, b}, {1}, 1) == "counts.size()");
  // Each alone fits; together they need a copy of a's shared page and a page each for b and c.
  CHECK(append({a, b, c}, {1, 2, 3}, 6) == "counts");
  CHECK(append({b}, {13}, 13) == "counts");  // three new pages for b alone
  CHECK(append({a, b}, {1, 1}, 3) == "k.extent(0)");
  CHECK(append({a, b}, {1, 1}, 2, 1) == "k.extent(1)");
  CHECK(append({a, b}, {1, 1}, 2, 2, 32) == "v.extent(2)");
  CHECK(append({a, b}, {1, 1}, 2, 2, 64, 2) == "v.stride(2)");
  CHECK(argument_of([&] {
          cache.append(infuse::exec::cpu{}, std::vector{a}, std::vector<std::int64_t>{1},
                       host_view<const float, 3>(nullptr, {1, 2, 32}),
                       host_view<const float, 3>(v.data(), {1, 1, 64}));
        }) == "k.data()");
  CHECK(argument_of([&] { cache.append(a, 9); }) == "tokens");
  CHECK(argument_of([&] { cache.append(gone, 1); }) == "sequence");
  CHECK(cache == before);
  CHECK(std::ranges::equal(cache.pool().all_bytes(), before.pool().all_bytes()));

  // An empty batch and zero counts change nothing either, and succeed.
  CHECK(append({}, {}, 0) == "(no error)");
  CHECK(append({a, b}, {0, 0}, 0) == "(no error)");
  CHECK(cache == before);
  // The batch that fits: a copies its shared page, b takes a page.
  CHECK(append({a, b}, {1, 2}, 3) == "(no error)");
  CHECK(cache.pool().free_pages() == 0);
  CHECK(cache.length(a) == 7);
  CHECK(cache.length(b) == 5);
}

namespace {

// A model page: the tokens written to its slots.
struct model_page {
  std::vector<token_data> slots;
};

template <int PageSize, class KScheme>
void run_against_model(std::int32_t capacity, int operations) {
  using cache_type = kv::cache<kv::paged<PageSize>, KScheme, quant::int_<8, 32>>;
  INFUSE_RANDOM(rng);
  cache_type cache(capacity, {2, 8}, {1, 40});
  // One thread: the batches are a few tokens, and the parallel pass is covered above.
  const infuse::exec::cpu serial(1);
  infuse::test::cache_model<cache_type, model_page> model(cache, rng, capacity, 10);
  auto& sequences = model.sequences();
  // A batch of appends with data, 1 to 3 sequences.
  const auto append = [&] {
    std::vector<kv::sequence_id> seqs;
    std::vector<std::int64_t> counts;
    const std::int64_t size = rng.integer(1, 3);
    for (std::int64_t i = 0; i < size; ++i) {
      seqs.push_back(model.pick());
      counts.push_back(rng.integer(0, 14) == 0 ? rng.integer(-1, capacity * PageSize)
                                               : rng.integer(0, PageSize + 2));
    }
    // The first check that fails, in the order the cache checks.
    std::string fault;
    std::int64_t new_pages = 0;
    for (std::size_t i = 0; i < seqs.size() && fault.empty(); ++i) {
      const auto found = sequences.find(seqs[i]);
      if (found == sequences.end() ||
          std::count(seqs.begin(), seqs.begin() + std::ptrdiff_t(i), seqs[i]) > 0) {
        fault = "seqs[" + std::to_string(i) + "]";
      } else if (counts[i] < 0) {
        fault = "counts[" + std::to_string(i) + "]";
      } else {
        new_pages += model.pages_needed(found->second, counts[i]);
      }
    }
    if (fault.empty() && new_pages > model.free_pages()) fault = "counts";
    if (!fault.empty()) {
      std::int64_t rows = 0;
      for (const std::int64_t count : counts) rows += std::max<std::int64_t>(count, 0);
      std::vector<float> k(std::size_t(rows * 16)), v(std::size_t(rows * 40));
      return model.expect_error(
          [&] {
            cache.append(serial, seqs, counts, host_view<const float, 3>(k.data(), {rows, 2, 8}),
                         host_view<const float, 3>(v.data(), {rows, 1, 40}));
          },
          fault);
    }
    std::map<kv::sequence_id, std::vector<token_data>> appended;
    append_random(cache, rng, seqs, counts, appended, serial);
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      auto& seq = sequences[seqs[i]];
      model.make_room(seq, counts[i]);
      for (const token_data& token : appended[seqs[i]]) {
        auto& slots = seq.pages[std::size_t(seq.length / PageSize)]->slots;
        slots.resize(std::size_t(seq.length % PageSize));  // drops what a truncate left
        slots.push_back(token);
        ++seq.length;
      }
    }
  };
  // Key bounds of every page, and the contents of a few tokens.
  const auto check_contents = [&] {
    std::vector<kv::sequence_id> live;
    for (const auto& [s, seq] : sequences) live.push_back(s);
    check_key_bounds(cache, live);
    for (int probe = 0; probe < 3 && !live.empty(); ++probe) {
      const kv::sequence_id s = live[std::size_t(rng.integer(0, std::ssize(live) - 1))];
      const auto& seq = sequences[s];
      if (seq.length == 0) continue;
      const std::int64_t t = rng.integer(0, seq.length - 1);
      const kv::token_location at = cache.locate(s, t);
      const token_data& token =
          seq.pages[std::size_t(t / PageSize)]->slots[std::size_t(t % PageSize)];
      REQUIRE(misread_elements(cache.format(), cache.pool().bytes(at.page).data(), at.slot,
                               token) == 0);
    }
  };
  model.run(operations, append, check_contents);
}

}  // namespace

TEST_CASE("kv::cache with data matches a model over 10,000 random operations") {
  SUBCASE("page size 1, f32 keys") {
    run_against_model<1, quant::none<float>>(48, 4'000);
  }
  SUBCASE("page size 4, int4 keys") {
    run_against_model<4, quant::int_<4, 32>>(20, 3'000);
  }
  SUBCASE("page size 16, int2 keys with zero points") {
    run_against_model<16, quant::int_<2, 32, quant::zero_point>>(10, 3'000);
  }
}
