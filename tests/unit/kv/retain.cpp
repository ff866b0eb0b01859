#include "infuse/kv/retain.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "infuse/exec/cpu.hpp"
#include "infuse/kv/cpu/compact.hpp"
#include "infuse/quant/quant.hpp"
#include "reference/retention.hpp"
#include "support/errors.hpp"
#include "support/random.hpp"

namespace kv = infuse::kv;
namespace retain = infuse::kv::retain;
namespace ref = infuse::reference;
namespace quant = infuse::quant;
using infuse::host_view;
using infuse::test::argument_of;

namespace {

// A paged layout, or (Contiguous) runs of 128 slots; the tests size sequences by PageSize.
template <class Order, class Scheme, int PageSize, bool Contiguous = false>
struct config {
  using layout = std::conditional_t<Contiguous, kv::contiguous<Order>, kv::paged<PageSize, Order>>;
  using scheme = Scheme;
  static constexpr int page_size = PageSize;
  static constexpr int slots = Contiguous ? 128 : PageSize;
};

// A KV cache store built by hand: a pool of pages in a shuffled order (contiguous: run s for
// sequence s), K and V records encoded from random floats, random attention mass and the table.
// K and V differ in heads and dim.
template <class Config>
struct store {
  using layout = typename Config::layout;
  using view_type = kv::cache_view<layout, typename Config::scheme, typename Config::scheme>;
  static constexpr int page_size = Config::page_size;
  static constexpr int slots = Config::slots;

  typename view_type::format_type format{{2, 40}, {3, 32}, slots};
  std::vector<std::uint8_t> pages;
  std::vector<float> mass;
  std::vector<std::int32_t> indptr{0}, indices, last_page_len, run_lengths;
  std::int32_t pool_pages = 0;

  // Keys and values of each token as written, before quantization.
  store(infuse::test::seeded_rng& rng, const std::vector<std::int64_t>& lengths,
        const std::vector<std::vector<float>>& keys = {}) {
    for (const std::int64_t length : lengths) {
      if constexpr (!layout::is_paged) REQUIRE(length <= slots);
      pool_pages += layout::is_paged ? std::int32_t((length + page_size - 1) / page_size) : 1;
      run_lengths.push_back(std::int32_t(length));
    }
    pool_pages += 3;  // pages nobody holds
    std::vector<std::int32_t> order(static_cast<std::size_t>(pool_pages));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng.engine());
    pages.resize(static_cast<std::size_t>(pool_pages * format.page_bytes()));
    for (auto& byte : pages) byte = static_cast<std::uint8_t>(rng.bits32());
    mass.resize(static_cast<std::size_t>(pool_pages) * slots * format.k.heads);
    for (auto& m : mass) m = static_cast<float>(rng.uniform());
    std::size_t next = 0;
    if constexpr (layout::is_paged) {
      for (const std::int64_t length : lengths) {
        const std::int64_t count = (length + page_size - 1) / page_size;
        for (std::int64_t p = 0; p < count; ++p) indices.push_back(order[next++]);
        indptr.push_back(std::int32_t(indices.size()));
        last_page_len.push_back(length == 0 ? 0 : std::int32_t((length - 1) % page_size + 1));
      }
    }
    const auto v = view();
    for (std::int32_t s = 0; s < std::int32_t(lengths.size()); ++s) {
      for (std::int64_t t = 0; t < lengths[s]; ++t) {
        const auto at = v.locate(s, t);
        for (std::int32_t h = 0; h < format.k.heads; ++h) {
          std::vector<float> x = rng.normals(std::size_t(format.k.head_dim));
          if (!keys.empty() && !keys[s].empty()) {
            std::copy_n(keys[s].begin() + (t * format.k.heads + h) * format.k.head_dim,
                        format.k.head_dim, x.begin());
          }
          format.k.encode(x.data(), format.k_codes(at.page, at.slot, h),
                          format.k_params(at.page, at.slot, h));
        }
        for (std::int32_t h = 0; h < format.v.heads; ++h) {
          const std::vector<float> x = rng.normals(std::size_t(format.v.head_dim));
          format.v.encode(x.data(), format.v_codes(at.page, at.slot, h),
                          format.v_params(at.page, at.slot, h));
        }
      }
    }
  }

  view_type view() {
    view_type v;
    v.pages = pages.data();
    v.pool_pages = pool_pages;
    v.format = format;
    if constexpr (layout::is_paged) {
      v.table = {indptr.data(), indices.data(), last_page_len.data(),
                 std::int32_t(last_page_len.size())};
    } else {
      v.table = {run_lengths.data(), std::int32_t(run_lengths.size()), slots};
    }
    v.mass = mass.data();
    return v;
  }

  // Every byte a token owns: its four records for every head, then its mass.
  std::vector<std::uint8_t> token_bytes(std::int32_t s, std::int64_t t) {
    const auto v = view();
    const auto at = v.locate(s, t);
    std::vector<std::uint8_t> bytes;
    const auto append = [&](const std::uint8_t* p, std::int64_t n) {
      bytes.insert(bytes.end(), p, p + n);
    };
    for (std::int32_t h = 0; h < format.k.heads; ++h) {
      append(format.k_codes(at.page, at.slot, h), format.k.code_bytes());
      append(format.k_params(at.page, at.slot, h), format.k.param_bytes());
    }
    for (std::int32_t h = 0; h < format.v.heads; ++h) {
      append(format.v_codes(at.page, at.slot, h), format.v.code_bytes());
      append(format.v_params(at.page, at.slot, h), format.v.param_bytes());
    }
    const auto loc = v.table.locate(s, t);
    append(reinterpret_cast<const std::uint8_t*>(
               mass.data() + (std::int64_t{loc.page} * slots + loc.slot) * format.k.heads),
           4 * format.k.heads);
    return bytes;
  }

  // Dequantized keys (true) or values of a token, all heads, and the largest tolerance a
  // quantized element of each has (half its group's step; 0 unquantized).
  template <bool Keys>
  void decode(std::int32_t s, std::int64_t t, std::vector<float>& out,
              std::vector<double>& half_step) {
    const auto v = view();
    const auto at = v.locate(s, t);
    const auto& f = Keys ? format.k : format.v;
    out.clear();
    half_step.clear();
    for (std::int32_t h = 0; h < f.heads; ++h) {
      const std::uint8_t* codes =
          Keys ? format.k_codes(at.page, at.slot, h) : format.v_codes(at.page, at.slot, h);
      const std::uint8_t* params =
          Keys ? format.k_params(at.page, at.slot, h) : format.v_params(at.page, at.slot, h);
      for (std::int32_t d = 0; d < f.head_dim; ++d) {
        out.push_back(f.value(codes, params, d));
        const auto p = f.group_params(params, d / f.group_dims());
        if constexpr (requires { p.scale; }) {
          half_step.push_back(0.5 * p.scale);
        } else {
          half_step.push_back(0.0);
        }
      }
    }
  }
};

// A random subset of [0, length), ascending; about `share` of the positions.
std::vector<std::int32_t> random_subset(infuse::test::seeded_rng& rng, std::int64_t length,
                                        double share) {
  std::vector<std::int32_t> kept;
  for (std::int64_t t = 0; t < length; ++t) {
    if (rng.uniform() < share) kept.push_back(std::int32_t(t));
  }
  return kept;
}

template <class T>
host_view<T, 1> view_of(std::vector<T>& x) {
  return {x.data(), {std::int64_t(x.size())}};
}
template <class T>
host_view<const T, 1> const_view_of(const std::vector<T>& x) {
  return {x.data(), {std::int64_t(x.size())}};
}

#define RETAIN_CONFIGS                                                                 \
  config<kv::nhd, quant::none<float>, 1>, config<kv::nhd, quant::none<float>, 16>,     \
      config<kv::hnd, quant::none<float>, 1>, config<kv::hnd, quant::none<float>, 16>, \
      config<kv::nhd, quant::int_<4, 32>, 1>, config<kv::nhd, quant::int_<4, 32>, 16>, \
      config<kv::hnd, quant::int_<4, 32>, 1>, config<kv::hnd, quant::int_<4, 32>, 16>, \
      config<kv::nhd, quant::none<float>, 16, true>, config<kv::hnd, quant::int_<4, 32>, 16, true>

}  // namespace

TEST_CASE_TEMPLATE("kv::retain::compact moves the kept tokens' records to the front, in order",
                   Config, RETAIN_CONFIGS) {
  INFUSE_RANDOM(rng);
  // Lengths around page boundaries; sequence 3 is not compacted and must not change.
  const std::int64_t p = Config::page_size;
  const std::vector<std::int64_t> lengths{1, 2 * p + 1, 3 * p + 5, p + 7, 40};
  store<Config> cache(rng, lengths);
  std::vector<std::vector<std::vector<std::uint8_t>>> before(lengths.size());
  for (std::int32_t s = 0; s < std::int32_t(lengths.size()); ++s) {
    for (std::int64_t t = 0; t < lengths[s]; ++t) before[s].push_back(cache.token_bytes(s, t));
  }
  const std::vector<std::int32_t> sequences{4, 0, 2, 1};
  std::vector<std::int32_t> kept_indptr{0}, kept;
  for (const std::int32_t s : sequences) {
    // All kept, none kept, about half.
    const double share = s == 0 ? 1.0 : s == 4 ? 0.0 : 0.5;
    const auto chosen = random_subset(rng, lengths[s], share);
    kept.insert(kept.end(), chosen.begin(), chosen.end());
    kept_indptr.push_back(std::int32_t(kept.size()));
  }
  std::vector<std::int64_t> new_lengths(sequences.size(), -1);
  retain::compact(infuse::exec::cpu(2), cache.view(), const_view_of(sequences),
                  const_view_of(kept_indptr), const_view_of(kept), view_of(new_lengths));
  for (std::size_t i = 0; i < sequences.size(); ++i) {
    const std::int32_t s = sequences[i];
    CHECK(new_lengths[i] == kept_indptr[i + 1] - kept_indptr[i]);
    for (std::int64_t j = 0; j < new_lengths[i]; ++j) {
      INFO("sequence " << s << " position " << j);
      CHECK(cache.token_bytes(s, j) == before[s][kept[kept_indptr[i] + j]]);
    }
  }
  for (std::int64_t t = 0; t < lengths[3]; ++t) CHECK(cache.token_bytes(3, t) == before[3][t]);
}

TEST_CASE("kv::retain rules keep the reference's token set") {
  INFUSE_RANDOM(rng);
  using cfg = config<kv::nhd, quant::none<float>, 16>;
  for (int round = 0; round < 20; ++round) {
    const std::int64_t length = rng.integer(1, 300);
    // Integer mass makes ties common: the lower position must win them.
    const bool ties = round % 2 == 0;
    store<cfg> cache(rng, {7, length});
    if (ties) {
      for (auto& m : cache.mass) m = float(rng.integer(0, 2));
    } else if (round % 4 == 1) {
      for (auto& m : cache.mass) m = rng.uniform() < 0.05 ? NAN : m;  // NaN ranks last
    }
    const auto view = cache.view();
    std::vector<float> mass;  // (length, heads) of sequence 1
    for (std::int64_t t = 0; t < length; ++t) {
      const auto at = view.table.locate(1, t);
      for (int h = 0; h < cache.format.k.heads; ++h) {
        mass.push_back(cache.mass[(std::int64_t{at.page} * store<cfg>::slots + at.slot) *
                                      cache.format.k.heads +
                                  h]);
      }
    }
    const std::int64_t budget = rng.integer(1, length);
    const std::int64_t recent = rng.integer(0, budget);
    INFO("length " << length << " budget " << budget << " recent " << recent);

    CHECK(retain::select(retain::keep_all{}, view, 1) == ref::streaming(length, length, 0));
    const std::int64_t sink = rng.integer(0, length);
    const std::int64_t window = std::max<std::int64_t>(rng.integer(0, length - sink), sink == 0);
    CHECK(retain::select(retain::streaming<>{sink, window}, view, 1) ==
          ref::streaming(length, sink, window));
    const auto heavy = ref::heavy_hitter(mass, length, cache.format.k.heads, budget, recent);
    CHECK(retain::select(retain::heavy_hitter<>{budget, recent}, view, 1) == heavy);
    CHECK(retain::select(retain::merge<>{budget, recent, 0.5f}, view, 1) == heavy);

    const std::int64_t window_queries = rng.integer(1, length);
    const std::int64_t snap_budget = rng.integer(window_queries, length);
    const std::int64_t prefix = length - window_queries;
    const std::int64_t heads = rng.integer(1, 4);
    std::vector<float> observation(std::size_t(window_queries * heads * prefix));
    for (auto& w : observation) w = ties ? float(rng.integer(0, 1)) : float(rng.uniform());
    const host_view<const float, 3> weights(observation.data(), {window_queries, heads, prefix});
    for (const std::int64_t pool : {1, 4, 7}) {
      for (const bool max_pool : {true, false}) {
        INFO("snapkv window " << window_queries << " budget " << snap_budget << " pool " << pool
                              << " max " << max_pool);
        const retain::snapkv<> rule{snap_budget, window_queries, pool,
                                    max_pool ? retain::pooling::max : retain::pooling::average};
        CHECK(retain::select(rule, view, 1, weights) ==
              ref::snapkv(observation, window_queries, heads, prefix, snap_budget, pool, max_pool));
      }
    }
  }
}

TEST_CASE_TEMPLATE("kv::retain::compact_merged folds evicted tokens into similar kept ones", Config,
                   config<kv::nhd, quant::none<float>, 1>, config<kv::hnd, quant::none<float>, 16>,
                   config<kv::nhd, quant::int_<4, 32>, 16>, config<kv::hnd, quant::int_<4, 32>, 1>,
                   config<kv::hnd, quant::none<float>, 16, true>) {
  INFUSE_RANDOM(rng);
  const std::int64_t length = 3 * Config::page_size + 40;
  const std::int64_t key_dims = 2 * 40;
  // Keys near one of four directions, so that many similarities pass the threshold and some
  // do not.
  std::vector<std::vector<float>> centers(4);
  for (auto& c : centers) c = rng.normals(std::size_t(key_dims));
  std::vector<std::vector<float>> keys(2);
  for (std::int64_t t = 0; t < length; ++t) {
    const auto& c = centers[std::size_t(rng.integer(0, 3))];
    const double noise = rng.uniform(0.2, 1.5);
    for (std::int64_t d = 0; d < key_dims; ++d)
      keys[1].push_back(float(c[d] + rng.normal(0.0, noise)));
  }
  store<Config> cache(rng, {5, length}, keys);
  std::vector<std::int32_t> counts(static_cast<std::size_t>(length));
  for (auto& c : counts) c = std::int32_t(rng.integer(1, 3));
  const std::vector<std::int32_t> kept = random_subset(rng, length, 0.3);
  REQUIRE(!kept.empty());
  const float threshold = 0.6f;

  // The reference reads the dequantized tokens as stored.
  std::vector<float> stored_keys, stored_values, x;
  std::vector<double> step;
  for (std::int64_t t = 0; t < length; ++t) {
    cache.template decode<true>(1, t, x, step);
    stored_keys.insert(stored_keys.end(), x.begin(), x.end());
    cache.template decode<false>(1, t, x, step);
    stored_values.insert(stored_values.end(), x.begin(), x.end());
  }
  const std::int64_t value_dims = 3 * 32;
  const auto expected =
      ref::merge(stored_keys, stored_values, counts, key_dims, value_dims, kept, double{threshold});
  std::vector<std::vector<std::uint8_t>> before;
  for (std::int64_t t = 0; t < length; ++t) before.push_back(cache.token_bytes(1, t));
  std::vector<std::vector<std::uint8_t>> other;
  for (std::int64_t t = 0; t < 5; ++t) other.push_back(cache.token_bytes(0, t));
  // The mass each kept token should end with: its own plus its members' (per K head).
  const auto view_before = cache.view();
  const auto mass_of = [&](std::int64_t t, int h) {
    const auto at = view_before.table.locate(1, t);
    return double{cache.mass[(std::int64_t{at.page} * store<Config>::slots + at.slot) * 2 + h]};
  };
  std::vector<double> mass_sum;
  for (std::size_t j = 0; j < kept.size(); ++j) {
    for (int h = 0; h < 2; ++h) {
      double sum = mass_of(kept[j], h);
      for (const std::int32_t t : expected.members[j]) sum += mass_of(t, h);
      mass_sum.push_back(sum);
    }
  }

  const infuse::exec::cpu exec(2);
  const auto view = cache.view();
  const std::int64_t bytes = retain::merge_workspace_bytes(exec, view, length, std::ssize(kept));
  std::vector<double> workspace(std::size_t((bytes + 7) / 8));
  const host_view<std::byte, 1> scratch(reinterpret_cast<std::byte*>(workspace.data()), {bytes});
  const retain::merge<> rule{std::ssize(kept), 0, threshold};
  const std::int64_t new_length =
      retain::compact_merged(exec, rule, view, 1, const_view_of(kept), view_of(counts), scratch);
  REQUIRE(new_length == std::ssize(kept));
  std::int64_t received = 0;
  for (std::int64_t j = 0; j < new_length; ++j) {
    INFO("kept token " << j << " from position " << kept[j] << " receiving "
                       << expected.members[j].size());
    received += std::ssize(expected.members[j]);
    for (int h = 0; h < 2; ++h) {
      CHECK(std::abs(mass_of(j, h) - mass_sum[std::size_t(j) * 2 + h]) <=
            1e-6 * (1 + mass_sum[std::size_t(j) * 2 + h]));
    }
    CHECK(counts[j] == expected.counts[j]);
    if (expected.members[j].empty()) {
      CHECK(cache.token_bytes(1, j) == before[kept[j]]);
      continue;
    }
    cache.template decode<true>(1, j, x, step);
    for (std::int64_t d = 0; d < key_dims; ++d) {
      const double want = expected.keys[j * key_dims + d];
      CHECK(std::abs(x[d] - want) <= step[d] * (1 + 1e-4) + 1e-5 * (1 + std::abs(want)));
    }
    cache.template decode<false>(1, j, x, step);
    for (std::int64_t d = 0; d < value_dims; ++d) {
      const double want = expected.values[j * value_dims + d];
      CHECK(std::abs(x[d] - want) <= step[d] * (1 + 1e-4) + 1e-5 * (1 + std::abs(want)));
    }
  }
  CHECK(received > 0);                          // some tokens merged
  CHECK(received < length - std::ssize(kept));  // and some were dropped
  for (std::int64_t t = 0; t < 5; ++t) CHECK(cache.token_bytes(0, t) == other[t]);
}

TEST_CASE("kv::retain checks its arguments before writing anything") {
  INFUSE_RANDOM(rng);
  using cfg = config<kv::nhd, quant::int_<4, 32>, 16>;
  store<cfg> cache(rng, {20, 33});
  const auto pages_before = cache.pages;
  const auto mass_before = cache.mass;
  const auto view = cache.view();
  const infuse::exec::cpu exec(2);
  std::vector<std::int64_t> lengths(2);

  const auto compact = [&](std::vector<std::int32_t> sequences, std::vector<std::int32_t> indptr,
                           std::vector<std::int32_t> kept) {
    std::vector<std::int64_t> out(sequences.size());
    retain::compact(exec, view, const_view_of(sequences), const_view_of(indptr),
                    const_view_of(kept), view_of(out));
  };
  CHECK(argument_of([&] { compact({0, 2}, {0, 1, 2}, {0, 0}); }) == "sequences[1]");
  CHECK(argument_of([&] { compact({1, 1}, {0, 1, 2}, {0, 0}); }) == "sequences[1]");
  CHECK(argument_of([&] { compact({0, 1}, {0, 2, 3}, {0, 5, 40}); }) == "kept[2]");
  CHECK(argument_of([&] { compact({0, 1}, {0, 2, 3}, {3, 3, 1}); }) == "kept[1]");
  CHECK(argument_of([&] { compact({0, 1}, {0, 2, 4}, {3, 4, 1}); }) == "kept_indptr[2]");
  CHECK(argument_of([&] { compact({0, 1}, {0, 2}, {3, 4}); }) == "kept_indptr.extent(0)");
  CHECK(argument_of([&] { compact({0}, {1, 2}, {3, 4}); }) == "kept_indptr[0]");
  const std::int32_t saved = cache.indices[2];
  cache.indices[2] = cache.pool_pages;
  CHECK(argument_of([&] { compact({1}, {0, 0}, {}); }) == "page_table.indices[2]");
  cache.indices[2] = cache.indices[0];  // sequences 0 and 1 share a page
  CHECK(argument_of([&] { compact({0, 1}, {0, 0, 0}, {}); }) == "sequences[1]");
  cache.indices[2] = saved;

  // Rules: budgets beyond the sequence, meaningless zeros, unknown sequences, wrong shapes.
  CHECK(argument_of([&] { retain::select(retain::heavy_hitter<>{34, 2}, view, 1); }) == "budget");
  CHECK(argument_of([&] { retain::select(retain::heavy_hitter<>{0, 0}, view, 1); }) == "budget");
  CHECK(argument_of([&] { retain::select(retain::heavy_hitter<>{4, 5}, view, 1); }) == "recent");
  CHECK(argument_of([&] { retain::select(retain::heavy_hitter<>{4, 1}, view, 2); }) == "sequence");
  CHECK(argument_of([&] {
          retain::select(retain::streaming<>{20, 14}, view, 1);
        }) == "sink + window");
  CHECK(argument_of([&] { retain::select(retain::streaming<>{0, 0}, view, 1); }) == "window");
  auto massless = view;
  massless.mass = nullptr;
  CHECK(argument_of([&] {
          retain::select(retain::heavy_hitter<>{4, 1}, massless, 1);
        }) == "cache.mass");
  std::vector<float> observation(4 * 2 * 29);
  const host_view<const float, 3> good(observation.data(), {4, 2, 29});
  const host_view<const float, 3> long_prefix(observation.data(), {4, 2, 28});
  const host_view<const float, 3> wrong_window(observation.data(), {3, 2, 29});
  CHECK(argument_of([&] {
          retain::select(retain::snapkv<>{8, 4, 3}, view, 1, good);
        }) == "(no error)");
  CHECK(argument_of([&] {
          retain::select(retain::snapkv<>{8, 4, 3}, view, 1, long_prefix);
        }) == "observation.extent(2)");
  CHECK(argument_of([&] {
          retain::select(retain::snapkv<>{8, 4, 3}, view, 1, wrong_window);
        }) == "observation.extent(0)");
  CHECK(argument_of([&] { retain::select(retain::snapkv<>{3, 4, 3}, view, 1, good); }) == "budget");
  CHECK(argument_of([&] {
          retain::select(retain::snapkv<>{40, 4, 3}, view, 1, good);
        }) == "budget");
  CHECK(argument_of([&] { retain::select(retain::snapkv<>{8, 4, 0}, view, 1, good); }) == "pool");

  // Merge compaction.
  std::vector<std::int32_t> kept{0, 5, 9};
  std::vector<std::int32_t> counts(33, 1);
  const std::int64_t bytes = retain::merge_workspace_bytes(exec, view, 33, 3);
  std::vector<double> workspace(std::size_t(bytes / 8 + 1));
  const host_view<std::byte, 1> scratch(reinterpret_cast<std::byte*>(workspace.data()), {bytes});
  const host_view<std::byte, 1> small(reinterpret_cast<std::byte*>(workspace.data()), {bytes - 1});
  const host_view<std::byte, 1> odd(reinterpret_cast<std::byte*>(workspace.data()) + 4, {bytes});
  const retain::merge<> rule{3, 0, 0.5f};
  const auto merged = [&](const host_view<std::byte, 1>& w, std::vector<std::int32_t> k,
                          std::vector<std::int32_t>& c, std::int32_t s, float threshold) {
    retain::merge<> r = rule;
    r.threshold = threshold;
    retain::compact_merged(exec, r, view, s, const_view_of(k), view_of(c), w);
  };
  CHECK(argument_of([&] { merged(small, kept, counts, 1, 0.5f); }) == "workspace.extent(0)");
  CHECK(argument_of([&] { merged(odd, kept, counts, 1, 0.5f); }) == "workspace.data()");
  CHECK(argument_of([&] { merged(scratch, kept, counts, 2, 0.5f); }) == "sequence");
  CHECK(argument_of([&] { merged(scratch, {0, 5, 33}, counts, 1, 0.5f); }) == "kept[2]");
  CHECK(argument_of([&] { merged(scratch, {}, counts, 1, 0.5f); }) == "kept.extent(0)");
  CHECK(argument_of([&] { merged(scratch, kept, counts, 1, 1.5f); }) == "rule.threshold");
  std::vector<std::int32_t> short_counts(20, 1);
  CHECK(argument_of([&] { merged(scratch, kept, short_counts, 1, 0.5f); }) == "counts.extent(0)");
  counts[7] = 0;
  CHECK(argument_of([&] { merged(scratch, kept, counts, 1, 0.5f); }) == "counts[7]");

  CHECK(cache.pages == pages_before);
  CHECK(cache.mass == mass_before);
}

TEST_CASE("kv::retain per-layer budgets: uniform and pyramid sum to the total") {
  INFUSE_RANDOM(rng);
  for (int round = 0; round < 50; ++round) {
    const auto layers = std::int32_t(rng.integer(1, 40));
    const std::int64_t total = rng.integer(0, 100000);
    const double beta = rng.uniform(1.0, 30.0);
    const auto uniform = retain::uniform_budgets(layers, total);
    const auto pyramid = retain::pyramid_budgets(layers, total, beta);
    CHECK(std::accumulate(uniform.begin(), uniform.end(), std::int64_t{0}) == total);
    CHECK(std::accumulate(pyramid.begin(), pyramid.end(), std::int64_t{0}) == total);
    CHECK(*std::max_element(uniform.begin(), uniform.end()) -
              *std::min_element(uniform.begin(), uniform.end()) <=
          1);
    // Falling from the lowest layer to the highest (rounding moves a share by at most one).
    for (std::int32_t l = 1; l < layers; ++l) CHECK(pyramid[l] <= pyramid[l - 1] + 1);
    if (layers > 1 && total >= 100 * layers && beta > 2) CHECK(pyramid.front() > pyramid.back());
  }
  CHECK(retain::pyramid_budgets(4, 400, 1.0) == std::vector<std::int64_t>{100, 100, 100, 100});
  CHECK(argument_of([] { retain::pyramid_budgets(0, 10); }) == "layers");
  CHECK(argument_of([] { retain::pyramid_budgets(3, 10, 0.5); }) == "beta");
  CHECK(argument_of([] { retain::uniform_budgets(3, -1); }) == "total");
}

TEST_CASE("kv::retain::prefix_budgets meets the budget with one ratio, monotone in the budget") {
  INFUSE_RANDOM(rng);
  const int layers = 6;
  std::vector<std::vector<double>> curves(layers);
  std::int64_t all = 0;
  for (auto& curve : curves) {
    // Sorted attention masses, heavier in some layers than others.
    const std::int64_t tokens = rng.integer(1, 200);
    const double skew = rng.uniform(0.5, 4.0);
    std::vector<double> masses;
    for (std::int64_t t = 0; t < tokens; ++t) masses.push_back(std::pow(rng.uniform(), skew));
    std::sort(masses.rbegin(), masses.rend());
    std::partial_sum(masses.begin(), masses.end(), std::back_inserter(curve));
    all += tokens;
  }
  std::vector<std::int64_t> previous(layers, 0);
  for (std::int64_t budget = 0; budget <= all + 5; budget += 1 + budget / 7) {
    const auto result = retain::prefix_budgets(curves, budget);
    INFO("budget " << budget << " ratio " << result.ratio);
    const std::int64_t total =
        std::accumulate(result.budgets.begin(), result.budgets.end(), std::int64_t{0});
    CHECK(total <= budget);
    for (int l = 0; l < layers; ++l) {
      CHECK(result.budgets[l] >= previous[l]);
      // The fewest tokens covering the ratio, from a linear scan.
      std::int64_t fewest = 0;
      while (result.ratio > 0 && curves[l][fewest] < result.ratio * curves[l].back()) ++fewest;
      CHECK(result.budgets[l] == (result.ratio > 0 ? fewest + 1 : 0));
    }
    // A slightly larger ratio would not fit (the search found the largest).
    if (result.ratio < 1.0) {
      std::int64_t over = 0;
      for (const auto& curve : curves)
        over += retain::tokens_for_ratio(curve, result.ratio + 1e-12);
      CHECK(over > budget);
    } else {
      CHECK(total == all);
    }
    previous = result.budgets;
  }
  std::vector<std::vector<double>> bad{{1.0, 0.5}};
  CHECK(argument_of([&] { retain::prefix_budgets(bad, 1); }) == "curves[0][1]");
  CHECK(argument_of([&] { retain::prefix_budgets(curves, -1); }) == "budget");
}
