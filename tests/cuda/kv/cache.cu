// The KV cache on device memory against the same cache on host memory: one randomized series of
// create / append (float or half rows, quantized on the device) / fork / truncate / free /
// unshare / compact calls runs on both, and after every call the device cache holds the same bytes
// as the host cache, page for page (codes, parameters, padding), the same key bounds and attention
// mass bit for bit, the same reference counts, free list and sequences, and rejects the same bad
// calls by the same argument.
#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "infuse/exec/cpu.hpp"
#include "infuse/exec/cuda.cuh"
#include "infuse/kv/cuda/cache.cuh"
#include "infuse/kv/kv.hpp"
#include "infuse/quant/quant.hpp"
#include "support/cuda.cuh"
#include "support/errors.hpp"
#include "support/key_bounds.hpp"
#include "support/random.hpp"

namespace kv = infuse::kv;
namespace quant = infuse::quant;
using infuse::device_buffer;
using infuse::host_view;
using infuse::test::argument_of;

namespace {

template <class Layout, class KScheme, class VScheme, int KDim, int VDim>
struct setup {
  using host_cache = kv::cache<Layout, KScheme, VScheme>;
  using device_cache = kv::cache<Layout, KScheme, VScheme, kv::device_pages>;
  static constexpr int k_dim = KDim;
  static constexpr int v_dim = VDim;
};

using zp = quant::zero_point;
// f16, int8, int4 g32 and int2 with a zero point (per group and per vector); page sizes 1 and 16,
// both orders; head dims that pad (40, 96) and group counts that are not powers of two (96 / 32).
#define KV_DEVICE_SETUPS                                                                           \
  setup<kv::paged<1>, quant::none<infuse::half>, quant::int_<8, 32>, 64, 40>,                      \
      setup<kv::paged<16>, quant::int_<4, 32>, quant::int_<2, 32, zp>, 96, 64>,                    \
      setup<kv::paged<16, kv::hnd>, quant::int_<8, quant::per_channel>, quant::none<infuse::half>, \
            40, 96>,                                                                               \
      setup<kv::paged<1, kv::hnd>, quant::int_<2, quant::per_channel, zp>, quant::int_<4, 32>, 96, \
            64>

// Both caches hold the same bytes, metadata, ledger and sequences (ids 0 .. last_id - 1).
template <class Host, class Device>
void check_same(const Host& host, const Device& device, kv::sequence_id last_id) {
  const std::int32_t capacity = host.pool().capacity();
  REQUIRE(device.pool().capacity() == capacity);
  CHECK(device.pool().free_pages() == host.pool().free_pages());
  for (std::int32_t page = 0; page < capacity; ++page) {
    INFO("page " << page);
    CHECK(device.pool().ref_count(page) == host.pool().ref_count(page));
    CHECK(device.metadata().covered(page) == host.metadata().covered(page));
  }
  const std::vector<std::uint8_t> bytes = device.pool().to_host();
  const auto expected = host.pool().all_bytes();
  REQUIRE(bytes.size() == expected.size());
  std::size_t first_difference = 0;
  while (first_difference < bytes.size() && bytes[first_difference] == expected[first_difference]) {
    ++first_difference;
  }
  INFO("first differing byte " << first_difference << " (page "
                               << first_difference / static_cast<std::size_t>(host.page_bytes())
                               << ")");
  CHECK(first_difference == bytes.size());
  CHECK(infuse::test::same_bits(device.metadata().key_min_to_host(), host.metadata().key_min()));
  CHECK(infuse::test::same_bits(device.metadata().key_max_to_host(), host.metadata().key_max()));
  CHECK(infuse::test::same_bits(device.metadata().mass_to_host(), host.metadata().mass()));
  for (kv::sequence_id s = 0; s < last_id; ++s) {
    INFO("sequence " << s);
    REQUIRE(device.contains(s) == host.contains(s));
    if (!host.contains(s)) continue;
    CHECK(device.length(s) == host.length(s));
    const auto host_pages = host.pages(s);
    const auto device_pages = device.pages(s);
    CHECK(std::vector<std::int32_t>(device_pages.begin(), device_pages.end()) ==
          std::vector<std::int32_t>(host_pages.begin(), host_pages.end()));
  }
}

template <class T>
std::vector<T> download(const T* device, std::size_t count) {
  std::vector<T> host(count);
  if (count > 0) {
    INFUSE_CUDA_REQUIRE(cudaMemcpy(host.data(), device, count * sizeof(T), cudaMemcpyDeviceToHost));
  }
  return host;
}

// Drives both caches through the same random calls.
template <class Setup>
class mirror {
 public:
  using host_cache = typename Setup::host_cache;
  using device_cache = typename Setup::device_cache;
  static constexpr int page_size = host_cache::page_size;

  mirror(infuse::test::seeded_rng& rng, std::int32_t capacity)
      : rng_(rng),
        host_(capacity, {2, Setup::k_dim}, {3, Setup::v_dim}),
        device_(capacity, {2, Setup::k_dim}, {3, Setup::v_dim}, kv::device_pages{exec_}) {}

  host_cache& host() { return host_; }
  device_cache& device() { return device_; }
  void check() { check_same(host_, device_, next_id_); }

  // Runs `call` on both caches: the same argument rejected, or neither.
  template <class Call>
  void both(const Call& call) {
    const std::string on_host = argument_of([&] { call(host_, infuse::exec::cpu{}); });
    const std::string on_device = argument_of([&] { call(device_, exec_); });
    CHECK(on_device == on_host);
  }

  // A known sequence, or now and then one that is not.
  kv::sequence_id pick() {
    if (next_id_ == 0 || rng_.integer(0, 15) == 0) return rng_.integer(-1, next_id_ + 1);
    return rng_.integer(0, next_id_ - 1);
  }
  std::vector<kv::sequence_id> live() const {
    std::vector<kv::sequence_id> ids;
    for (kv::sequence_id s = 0; s < next_id_; ++s) {
      if (host_.contains(s)) ids.push_back(s);
    }
    return ids;
  }
  // Up to `most` distinct live sequences in random order, sometimes with a stranger among them.
  std::vector<kv::sequence_id> some(std::size_t most) {
    std::vector<kv::sequence_id> ids = live();
    std::vector<kv::sequence_id> chosen;
    while (!ids.empty() && chosen.size() < most) {
      const auto at = rng_.integer(0, std::ssize(ids) - 1);
      chosen.push_back(ids[static_cast<std::size_t>(at)]);
      ids.erase(ids.begin() + at);
    }
    if (rng_.integer(0, 19) == 0) chosen.push_back(pick());
    return chosen;
  }

  kv::sequence_id create() {
    CHECK(host_.create() == next_id_);
    CHECK(device_.create() == next_id_);
    return next_id_++;
  }

  void fork(kv::sequence_id s) {
    both([&](auto& cache, const auto&) { cache.fork(s); });
    if (host_.contains(s)) ++next_id_;
  }

  void step() {
    switch (rng_.integer(0, 9)) {
      case 0:
        create();
        break;
      case 1:
      case 2:
      case 3:
        append(some(5));
        break;
      case 4:
        fork(pick());
        break;
      case 5: {
        const kv::sequence_id s = pick();
        const std::int64_t tokens = rng_.integer(-1, 2 * page_size + 2);
        both([&](auto& cache, const auto&) { cache.truncate(s, tokens); });
        break;
      }
      case 6: {
        const kv::sequence_id s = pick();
        if (rng_.integer(0, 2) == 0) {
          both([&](auto& cache, const auto&) { cache.free(s); });
        } else {
          both([&](auto& cache, const auto&) { cache.unshare(s); });
        }
        break;
      }
      case 7:
      case 8:
        compact(some(3));
        break;
      default:
        fill_mass();
        break;
    }
  }

  // Appends random tokens (some counts 0, some past a page) to `seqs` in one batch, as float or
  // half rows.
  void append(const std::vector<kv::sequence_id>& seqs) {
    std::vector<std::int64_t> counts;
    std::int64_t rows = 0;
    for (std::size_t i = 0; i < seqs.size(); ++i) {
      counts.push_back(rng_.integer(0, 3) == 0 ? 0 : rng_.integer(1, page_size + 3));
      rows += counts.back();
    }
    const auto& f = host_.format();
    const std::int64_t k_row = std::int64_t{f.k.heads} * f.k.head_dim;
    const std::int64_t v_row = std::int64_t{f.v.heads} * f.v.head_dim;
    std::vector<float> k = rng_.normals(static_cast<std::size_t>(rows * k_row));
    std::vector<float> v = rng_.normals(static_cast<std::size_t>(rows * v_row), 3.0);
    // A key with one large channel, and a value vector of zeros: ranges one sided and empty.
    if (rows > 0) {
      k[static_cast<std::size_t>(rng_.integer(0, rows * k_row - 1))] = 40.0f;
      std::fill_n(v.begin(), f.v.head_dim, 0.0f);
    }
    if (rng_.integer(0, 3) == 0) {  // now and then as half rows
      append_rows(seqs, counts, rows, std::vector<infuse::half>(k.begin(), k.end()),
                  std::vector<infuse::half>(v.begin(), v.end()));
    } else {
      append_rows(seqs, counts, rows, k, v);
    }
  }

  // The same append on both caches, from k and v rows on the host and copied to the device.
  template <class Row>
  void append_rows(const std::vector<kv::sequence_id>& seqs,
                   const std::vector<std::int64_t>& counts, std::int64_t rows,
                   const std::vector<Row>& k, const std::vector<Row>& v) {
    const auto& f = host_.format();
    const device_buffer<Row> k_device{std::span<const Row>(k)};
    const device_buffer<Row> v_device{std::span<const Row>(v)};
    both([&](auto& cache, const auto& exec) {
      using cache_type = std::remove_cvref_t<decltype(cache)>;
      if constexpr (std::is_same_v<typename cache_type::memory_space, infuse::host_memory>) {
        cache.append(exec, seqs, counts,
                     host_view<const Row, 3>(k.data(), {rows, f.k.heads, f.k.head_dim}),
                     host_view<const Row, 3>(v.data(), {rows, f.v.heads, f.v.head_dim}));
      } else {
        cache.append(exec, seqs, counts, k_device.as_view({rows, f.k.heads, f.k.head_dim}),
                     v_device.as_view({rows, f.v.heads, f.v.head_dim}));
      }
    });
  }

  // Compacts `seqs` to random kept positions (each token kept with probability 2/3).
  void compact(const std::vector<kv::sequence_id>& seqs) {
    std::vector<std::int32_t> indptr{0};
    std::vector<std::int32_t> kept;
    for (const kv::sequence_id s : seqs) {
      const std::int64_t length = host_.contains(s) ? host_.length(s) : 0;
      for (std::int32_t t = 0; t < length; ++t) {
        if (rng_.integer(0, 2) != 0) kept.push_back(t);
      }
      indptr.push_back(static_cast<std::int32_t>(kept.size()));
    }
    both([&](auto& cache, const auto& exec) { cache.compact(exec, seqs, indptr, kept); });
  }

  // Distinct attention mass on every page of both caches (the attention kernel's writes).
  void fill_mass() {
    const std::int64_t floats =
        std::int64_t{host_.pool().capacity()} * host_.metadata().mass_per_page();
    std::vector<float> mass(static_cast<std::size_t>(floats));
    for (float& m : mass) m = static_cast<float>(rng_.uniform());
    std::memcpy(host_.view({}).view().mass, mass.data(), mass.size() * sizeof(float));
    INFUSE_CUDA_REQUIRE(cudaMemcpy(device_.view({}).view().mass, mass.data(),
                                   mass.size() * sizeof(float), cudaMemcpyHostToDevice));
  }

 private:
  infuse::test::seeded_rng& rng_;
  infuse::exec::cuda exec_{};
  host_cache host_;
  device_cache device_;
  kv::sequence_id next_id_ = 0;
};

}  // namespace

TEST_CASE_TEMPLATE("kv::cache on device memory matches the host cache byte for byte", Setup,
                   KV_DEVICE_SETUPS) {
  INFUSE_RANDOM(rng);
  mirror<Setup> both(rng, 24);
  for (int step = 0; step < 300; ++step) {
    INFO("step " << step);
    both.step();
    both.check();
    infuse::test::check_launch();
  }
}

TEST_CASE_TEMPLATE("kv::cache on device memory: forks, copy on write and compaction", Setup,
                   KV_DEVICE_SETUPS) {
  INFUSE_RANDOM(rng);
  mirror<Setup> both(rng, 40);
  auto& host = both.host();
  auto& device = both.device();
  const kv::sequence_id a = both.create();
  const std::vector<kv::sequence_id> first{a};
  both.append(first);
  both.append(first);  // a partial last page (page size 16) or a full one (1)
  both.fill_mass();
  both.fork(a);
  const kv::sequence_id b = a + 1;
  both.check();
  // b appends into the shared last page: copied with its metadata, on both.
  const std::vector<kv::sequence_id> second{b};
  both.append(second);
  both.check();
  // Compacting a forked branch unshares it first, then moves its records and mass.
  const std::vector<kv::sequence_id> compacted{a};
  both.compact(compacted);
  both.check();
  for (const std::int32_t page : device.pages(a)) CHECK(device.pool().ref_count(page) == 1);

  // The view of a batch: the page table in device memory, the pool and metadata in place.
  const std::vector<kv::sequence_id> batch{b, a};
  const auto table = host.table(batch);
  const auto view = device.view(batch);
  CHECK(view.view().pages == device.pool().data());
  CHECK(view.view().key_min == device.metadata().key_min());
  CHECK(view.view().mass == device.metadata().mass());
  CHECK(view.view().pool_pages == device.pool().capacity());
  CHECK(view.view().table.sequences == 2);
  CHECK(download(view.view().table.indptr, table.indptr.size()) == table.indptr);
  CHECK(download(view.view().table.indices, table.indices.size()) == table.indices);
  CHECK(download(view.view().table.last_page_len, 2) == table.last_page_len);
}

TEST_CASE("kv::cache on device memory rejects an exec on another stream and bad shapes") {
  using setup_type =
      setup<kv::paged<16>, quant::int_<4, 32>, quant::int_<2, 32, quant::zero_point>, 64, 64>;
  INFUSE_RANDOM(rng);
  mirror<setup_type> both(rng, 4);
  auto& device = both.device();
  const kv::sequence_id a = both.create();
  both.append({a});
  cudaStream_t stream = nullptr;
  INFUSE_CUDA_REQUIRE(cudaStreamCreate(&stream));
  const infuse::exec::cuda other(stream);
  const device_buffer<float> rows(100 * 2 * 64);
  const std::vector<kv::sequence_id> seqs{a};
  const std::vector<std::int64_t> counts{4};
  CHECK(argument_of([&] {
          device.append(other, seqs, counts, rows.as_view({4, 2, 64}), rows.as_view({4, 2, 64}));
        }) == "exec");
  CHECK(argument_of([&] {
          device.append(infuse::exec::cuda{}, seqs, counts, rows.as_view({3, 2, 64}),
                        rows.as_view({4, 2, 64}));
        }) == "k.extent(0)");
  const std::vector<std::int32_t> indptr{0, 0};
  CHECK(argument_of([&] { device.compact(other, seqs, indptr, {}); }) == "exec");
  const std::vector<std::int64_t> too_many{100};
  CHECK(argument_of([&] {
          device.append(infuse::exec::cuda{}, seqs, too_many, rows.as_view({100, 2, 64}),
                        rows.as_view({100, 2, 64}));
        }) == "counts[0]");
  both.check();  // nothing changed
  INFUSE_CUDA_REQUIRE(cudaStreamDestroy(stream));
}
