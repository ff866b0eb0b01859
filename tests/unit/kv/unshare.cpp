// kv::cache::unshare and kv::cache::compact: a forked sequence gets its own pages before it is
// compacted in place, so compacting one branch never changes the other; the compacted branch
// holds what the view-level compaction (kv::retain::compact, then the key bounds and truncate)
// gives a sequence that was never forked, and compact_merged what the view-level merge gives; and
// every rejected call leaves the cache as it was.
#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>
#include <span>
#include <type_traits>
#include <vector>

#include "infuse/exec/cpu.hpp"
#include "infuse/kv/kv.hpp"
#include "infuse/quant/quant.hpp"
#include "support/errors.hpp"
#include "support/random.hpp"

namespace kv = infuse::kv;
namespace quant = infuse::quant;
using infuse::host_view;
using infuse::test::argument_of;

namespace {

template <int PageSize>
using cache_type = kv::cache<kv::paged<PageSize>, quant::int_<4, 32>, quant::int_<8, 32>>;

// `tokens` random tokens (normal keys and values drawn from `seed`) appended to s.
template <class Cache>
void append_random(Cache& cache, kv::sequence_id s, std::int64_t tokens, std::uint64_t seed) {
  const auto& f = cache.format();
  std::vector<float> k(static_cast<std::size_t>(tokens * f.k.heads * f.k.head_dim));
  std::vector<float> v(static_cast<std::size_t>(tokens * f.v.heads * f.v.head_dim));
  std::mt19937_64 engine(seed);
  std::normal_distribution<float> normal;
  for (float& x : k) x = normal(engine);
  for (float& x : v) x = normal(engine);
  const std::vector<kv::sequence_id> seqs{s};
  const std::vector<std::int64_t> counts{tokens};
  cache.append(infuse::exec::cpu{}, seqs, counts,
               host_view<const float, 3>(k.data(), {tokens, f.k.heads, f.k.head_dim}),
               host_view<const float, 3>(v.data(), {tokens, f.v.heads, f.v.head_dim}));
}

// A distinct attention mass for every slot and head of every page of s.
template <class Cache>
void fill_mass(Cache& cache, kv::sequence_id s, float base) {
  const std::vector<kv::sequence_id> batch{s};
  const auto view = cache.view(batch);
  const std::int64_t per_page = cache.metadata().mass_per_page();
  for (const std::int32_t page : cache.pages(s)) {
    for (std::int64_t i = 0; i < per_page; ++i) {
      view.view().mass[page * per_page + i] = base + static_cast<float>(page * per_page + i);
    }
  }
}

// Token ta of a in cache x and token tb of b in cache y: the same records and attention mass.
template <class Cache>
bool same_token(const Cache& x, kv::sequence_id a, std::int64_t ta, const Cache& y,
                kv::sequence_id b, std::int64_t tb) {
  const auto& f = x.format();
  const kv::token_location p = x.locate(a, ta);
  const kv::token_location q = y.locate(b, tb);
  const std::uint8_t* page_p = x.pool().bytes(p.page).data();
  const std::uint8_t* page_q = y.pool().bytes(q.page).data();
  bool same = true;
  const auto records = [&](auto at, std::int32_t heads, std::int64_t bytes) {
    for (std::int32_t h = 0; h < heads; ++h) {
      same = same && std::memcmp(at(page_p, p.slot, h), at(page_q, q.slot, h),
                                 static_cast<std::size_t>(bytes)) == 0;
    }
  };
  records([&](auto* page, auto slot, auto h) { return f.k_codes(page, slot, h); }, f.k.heads,
          f.k.code_bytes());
  records([&](auto* page, auto slot, auto h) { return f.k_params(page, slot, h); }, f.k.heads,
          f.k.param_bytes());
  records([&](auto* page, auto slot, auto h) { return f.v_codes(page, slot, h); }, f.v.heads,
          f.v.code_bytes());
  records([&](auto* page, auto slot, auto h) { return f.v_params(page, slot, h); }, f.v.heads,
          f.v.param_bytes());
  const std::int64_t heads = f.k.heads;
  const float* mass_p = x.metadata().mass(p.page) + p.slot * heads;
  const float* mass_q = y.metadata().mass(q.page) + q.slot * heads;
  return same && std::memcmp(mass_p, mass_q, sizeof(float) * static_cast<std::size_t>(heads)) == 0;
}

// Sequence a of x and b of y: the same length, tokens and per-page key bounds.
template <class Cache>
void check_same_sequence(const Cache& x, kv::sequence_id a, const Cache& y, kv::sequence_id b) {
  REQUIRE(x.length(a) == y.length(b));
  for (std::int64_t t = 0; t < x.length(a); ++t) {
    INFO("token " << t);
    CHECK(same_token(x, a, t, y, b, t));
  }
  const std::int64_t per_page = x.metadata().bounds_per_page();
  for (std::size_t i = 0; i < x.pages(a).size(); ++i) {
    INFO("page " << i);
    const std::int32_t p = x.pages(a)[i];
    const std::int32_t q = y.pages(b)[i];
    CHECK(std::memcmp(x.metadata().key_min(p), y.metadata().key_min(q),
                      sizeof(infuse::half) * static_cast<std::size_t>(per_page)) == 0);
    CHECK(std::memcmp(x.metadata().key_max(p), y.metadata().key_max(q),
                      sizeof(infuse::half) * static_cast<std::size_t>(per_page)) == 0);
  }
}

// Each position of a sequence of `length` tokens kept with probability 1/2, ascending.
std::vector<std::int32_t> random_kept(infuse::test::seeded_rng& rng, std::int64_t length) {
  std::vector<std::int32_t> kept;
  for (std::int32_t t = 0; t < length; ++t) {
    if (rng.integer(0, 1) == 1) kept.push_back(t);
  }
  return kept;
}

}  // namespace

TEST_CASE_TEMPLATE("kv::cache::compact of one branch of a fork never changes the other", Page,
                   std::integral_constant<int, 1>, std::integral_constant<int, 16>) {
  constexpr int page_size = Page::value;
  using cache_t = cache_type<page_size>;
  INFUSE_RANDOM(rng);
  const std::int64_t length = rng.integer(page_size + 1, 3 * page_size + 7);
  const std::int64_t pages = (length + page_size - 1) / page_size;
  const std::uint64_t seed = rng.bits32();
  const std::int32_t capacity = static_cast<std::int32_t>(3 * pages + 2);
  // The cache under test: a, then b forked from it, each appended to once more.
  cache_t cache(capacity, {2, 64}, {3, 32});
  // The same tokens with no fork: the reference for either branch.
  cache_t alone_a(capacity, {2, 64}, {3, 32});
  cache_t alone_b(capacity, {2, 64}, {3, 32});
  const kv::sequence_id a = cache.create();
  append_random(cache, a, length, seed);
  fill_mass(cache, a, 1.0f);
  const kv::sequence_id b = cache.fork(a);
  for (cache_t* alone : {&alone_a, &alone_b}) {
    const kv::sequence_id s = alone->create();
    append_random(*alone, s, length, seed);
  }
  // Mass is per page: fill the references' pages with what a's pages hold.
  for (cache_t* alone : {&alone_a, &alone_b}) {
    const std::vector<kv::sequence_id> batch{0};
    const auto view = alone->view(batch);
    const std::int64_t per_page = alone->metadata().mass_per_page();
    for (std::size_t i = 0; i < cache.pages(a).size(); ++i) {
      std::memcpy(view.view().mass + alone->pages(0)[i] * per_page,
                  cache.metadata().mass(cache.pages(a)[i]),
                  sizeof(float) * static_cast<std::size_t>(per_page));
    }
  }
  check_same_sequence(cache, b, alone_b, 0);

  // Compacting a: b keeps every byte; a equals the view-level compaction of a lone sequence.
  const std::vector<std::int32_t> kept = random_kept(rng, length);
  const std::vector<std::int32_t> kept_indptr{0, static_cast<std::int32_t>(kept.size())};
  const std::vector<kv::sequence_id> seqs{a};
  cache.compact(infuse::exec::cpu{}, seqs, kept_indptr, kept);
  CHECK(cache.length(a) == std::ssize(kept));
  check_same_sequence(cache, b, alone_b, 0);
  {
    const std::vector<kv::sequence_id> batch{0};
    const auto view = alone_a.view(batch);
    const std::vector<std::int32_t> sequences{0};
    std::vector<std::int64_t> new_lengths(1);
    kv::retain::compact(infuse::exec::cpu{}, view.view(),
                        host_view<const std::int32_t, 1>(sequences.data(), {1}),
                        host_view<const std::int32_t, 1>(kept_indptr.data(), {2}),
                        host_view<const std::int32_t, 1>(kept.data(), {std::ssize(kept)}),
                        host_view<std::int64_t, 1>(new_lengths.data(), {1}));
    kv::update_key_bounds(view.view(), 0, 0, new_lengths[0]);
  }
  alone_a.truncate(0, length - std::ssize(kept));
  check_same_sequence(cache, a, alone_a, 0);
  for (const std::int32_t page : cache.pages(a)) CHECK(cache.pool().ref_count(page) == 1);
  for (const std::int32_t page : cache.pages(b)) CHECK(cache.pool().ref_count(page) == 1);
  CHECK(cache.pool().free_pages() ==
        capacity - std::ssize(cache.pages(a)) - std::ssize(cache.pages(b)));

  // Appending to either branch afterwards writes its own pages only.
  append_random(cache, b, 3, seed + 1);
  append_random(alone_b, 0, 3, seed + 1);
  check_same_sequence(cache, b, alone_b, 0);
  check_same_sequence(cache, a, alone_a, 0);
}

TEST_CASE("kv::cache::unshare copies exactly the shared pages, bytes and metadata") {
  constexpr int page_size = 16;
  INFUSE_RANDOM(rng);
  cache_type<page_size> cache(10, {2, 64}, {3, 32});
  const kv::sequence_id a = cache.create();
  append_random(cache, a, 40, rng.bits32());  // pages 0, 1 full; page 2 holds 8
  fill_mass(cache, a, 0.5f);
  const kv::sequence_id b = cache.fork(a);
  cache.truncate(b, 30);  // b: 10 tokens of page 0 alone
  const kv::sequence_id c = cache.fork(a);
  const std::vector<std::int32_t> before(cache.pages(a).begin(), cache.pages(a).end());

  cache.unshare(a);
  const auto after = cache.pages(a);
  CHECK(after[0] != before[0]);  // shared with b and c
  CHECK(after[1] != before[1]);  // shared with c
  CHECK(after[2] != before[2]);
  for (std::size_t i = 0; i < after.size(); ++i) {
    CHECK(cache.pool().ref_count(after[i]) == 1);
    CHECK(cache.pages(c)[i] == before[i]);
  }
  check_same_sequence(cache, a, cache, c);
  CHECK(cache.pool().ref_count(before[0]) == 2);  // b and c

  // Unsharing c now copies only page 0, which b still holds.
  cache.unshare(c);
  CHECK(cache.pages(c)[0] != before[0]);
  CHECK(cache.pages(c)[1] == before[1]);
  CHECK(cache.pages(c)[2] == before[2]);
  check_same_sequence(cache, a, cache, c);

  // Nothing left to share: unshare changes nothing.
  const auto unchanged = cache;
  cache.unshare(b);
  CHECK(cache == unchanged);
}

TEST_CASE("kv::cache::unshare and compact reject bad arguments and leave the cache as it was") {
  constexpr int page_size = 4;
  INFUSE_RANDOM(rng);
  cache_type<page_size> cache(5, {2, 64}, {3, 32});
  const kv::sequence_id a = cache.create();
  append_random(cache, a, 10, rng.bits32());  // 3 pages
  const kv::sequence_id b = cache.fork(a);
  const auto before = cache;
  const infuse::exec::cpu exec;
  const auto compact = [&](std::vector<kv::sequence_id> seqs, std::vector<std::int32_t> indptr,
                           std::vector<std::int32_t> kept) {
    return argument_of([&] { cache.compact(exec, seqs, indptr, kept); });
  };

  CHECK(argument_of([&] { cache.unshare(a); }) == "sequence");  // 3 copies, 2 free pages
  CHECK(argument_of([&] { cache.unshare(7); }) == "sequence");
  CHECK(compact({a}, {0, 2}, {1, 3}) == "seqs");  // the pages to unshare do not fit
  CHECK(compact({a, 9}, {0, 0, 0}, {}) == "seqs[1]");
  CHECK(compact({a, a}, {0, 0, 0}, {}) == "seqs[1]");
  CHECK(compact({a}, {0}, {}) == "kept_indptr.size()");
  CHECK(compact({a}, {1, 1}, {0}) == "kept_indptr[0]");
  CHECK(compact({a}, {0, 3}, {1, 2}) == "kept_indptr[1]");
  CHECK(compact({a}, {0, 2}, {3, 3}) == "kept[1]");
  CHECK(compact({a}, {0, 2}, {4, 10}) == "kept[1]");
  CHECK(compact({a, b}, {0, 1, 2}, {0, -1}) == "kept[1]");
  CHECK(cache == before);

  // b alone: its pages become a's to keep, a's three copies fit once b is shorter.
  cache.truncate(b, 6);  // b: 4 tokens, page 0 shared; pages 1 and 2 are a's alone now
  CHECK(compact({a}, {0, 2}, {1, 9}) == "(no error)");
  CHECK(cache.length(a) == 2);
  CHECK(cache.length(b) == 4);
}

TEST_CASE("kv::cache::compact_merged of a fork holds what the view-level merge gives") {
  constexpr int page_size = 16;
  using cache_t = cache_type<page_size>;
  INFUSE_RANDOM(rng);
  const std::int64_t length = rng.integer(page_size + 1, 4 * page_size);
  const std::uint64_t seed = rng.bits32();
  cache_t cache(12, {2, 64}, {3, 32});
  cache_t alone(12, {2, 64}, {3, 32});
  const kv::sequence_id a = cache.create();
  append_random(cache, a, length, seed);
  fill_mass(cache, a, 1.0f);
  const kv::sequence_id b = cache.fork(a);
  const kv::sequence_id s = alone.create();
  append_random(alone, s, length, seed);
  {
    const std::vector<kv::sequence_id> batch{s};
    const auto view = alone.view(batch);
    const std::int64_t per_page = alone.metadata().mass_per_page();
    for (std::size_t i = 0; i < cache.pages(a).size(); ++i) {
      std::memcpy(view.view().mass + alone.pages(s)[i] * per_page,
                  cache.metadata().mass(cache.pages(a)[i]),
                  sizeof(float) * static_cast<std::size_t>(per_page));
    }
  }
  std::vector<std::int32_t> kept = random_kept(rng, length);
  if (kept.empty()) kept.push_back(0);
  std::vector<std::int32_t> counts(static_cast<std::size_t>(length));
  for (auto& c : counts) c = static_cast<std::int32_t>(rng.integer(1, 4));
  std::vector<std::int32_t> alone_counts = counts;
  const kv::retain::merge<> rule{std::ssize(kept), 0, 0.2f};
  const infuse::exec::cpu exec(2);

  CHECK(cache.compact_merged(exec, rule, a, kept, counts) == std::ssize(kept));
  {
    const std::vector<kv::sequence_id> batch{s};
    const auto view = alone.view(batch);
    std::vector<double> workspace(static_cast<std::size_t>(
        kv::retain::merge_workspace_bytes(exec, view.view(), length, std::ssize(kept)) / 8 + 1));
    kv::retain::compact_merged(
        exec, rule, view.view(), 0,
        host_view<const std::int32_t, 1>(kept.data(), {std::ssize(kept)}),
        host_view<std::int32_t, 1>(alone_counts.data(), {length}),
        host_view<std::byte, 1>(reinterpret_cast<std::byte*>(workspace.data()),
                                {std::ssize(workspace) * 8}));
    kv::update_key_bounds(view.view(), 0, 0, std::ssize(kept));
  }
  alone.truncate(s, length - std::ssize(kept));
  check_same_sequence(cache, a, alone, s);
  CHECK(counts == alone_counts);
  // b keeps the pages a shared with it; a holds copies of its own.
  CHECK(cache.length(b) == length);
  for (const std::int32_t page : cache.pages(a)) CHECK(cache.pool().ref_count(page) == 1);
  for (const std::int32_t page : cache.pages(b)) CHECK(cache.pool().ref_count(page) == 1);
  CHECK(cache.pool().free_pages() == 12 - std::ssize(cache.pages(a)) - std::ssize(cache.pages(b)));
}
