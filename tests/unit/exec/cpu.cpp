#include <doctest/doctest.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "infuse/exec/cpu.hpp"
#include "support/random.hpp"

namespace {

using infuse::exec::cpu;

// Thread counts to try: 1, 2, 3, the default, and more than this machine has cores.
std::vector<int> thread_counts() {
  std::vector<int> counts = {1, 2, 3, omp_get_max_threads(), 2 * omp_get_num_procs() + 1};
  std::sort(counts.begin(), counts.end());
  counts.erase(std::unique(counts.begin(), counts.end()), counts.end());
  return counts;
}

// Sizes that stress the split: empty, single, fewer than, as many as and more than the threads,
// and one large random n.
std::vector<std::int64_t> sizes(int threads, infuse::test::seeded_rng& rng) {
  return {0, 1, threads - 1, threads, threads + 1, 2 * threads - 1, 1000, rng.integer(1, 100000)};
}

}  // namespace

TEST_CASE("exec::cpu takes its thread count from the constructor, 0 meaning OpenMP's default") {
  CHECK(cpu{}.threads() == omp_get_max_threads());
  CHECK(cpu{0}.threads() == omp_get_max_threads());
  CHECK(cpu{1}.threads() == 1);
  CHECK(cpu{7}.threads() == 7);
  CHECK_THROWS_WITH_AS(cpu{-2}, "infuse::exec::cpu: threads is -2, expected 0 (OpenMP's default) "
                                "or a positive thread count",
                       infuse::error);
}

TEST_CASE("parallel_for calls the body once for every index, for many sizes and thread counts") {
  INFUSE_RANDOM(rng);
  for (const int threads : thread_counts()) {
    const cpu exec(threads);
    for (const std::int64_t n : sizes(threads, rng)) {
      CAPTURE(threads);
      CAPTURE(n);
      std::vector<std::atomic<int>> calls(static_cast<std::size_t>(n));
      std::atomic<std::int64_t> out_of_range{0};
      exec.parallel_for(n, [&](std::int64_t i) {
        if (i < 0 || i >= n) {
          ++out_of_range;
          return;
        }
        ++calls[static_cast<std::size_t>(i)];
      });
      CHECK(out_of_range == 0);
      CHECK(std::all_of(calls.begin(), calls.end(), [](const auto& count) { return count == 1; }));
    }
  }
}

TEST_CASE("parallel_for_ranges hands each thread one contiguous block, balanced within one") {
  INFUSE_RANDOM(rng);
  struct block {
    int thread;
    std::int64_t begin;
    std::int64_t end;
    int openmp_thread;
  };
  for (const int threads : thread_counts()) {
    const cpu exec(threads);
    for (const std::int64_t n : sizes(threads, rng)) {
      CAPTURE(threads);
      CAPTURE(n);
      std::mutex mutex;
      std::vector<block> blocks;
      exec.parallel_for_ranges(n, [&](int thread, std::int64_t begin, std::int64_t end) {
        const std::lock_guard<std::mutex> lock(mutex);
        blocks.push_back({thread, begin, end, omp_get_thread_num()});
      });
      // One block per thread that has work: min(threads, n) of them, every thread index once,
      // the index being the OpenMP thread that ran it.
      const auto expected_blocks = static_cast<std::size_t>(std::min<std::int64_t>(threads, n));
      REQUIRE(blocks.size() == expected_blocks);
      std::sort(blocks.begin(), blocks.end(),
                [](const block& a, const block& b) { return a.begin < b.begin; });
      std::set<int> seen;
      std::int64_t covered = 0;
      for (const block& b : blocks) {
        CHECK(b.thread == b.openmp_thread);
        CHECK(b.thread >= 0);
        CHECK(b.thread < threads);
        seen.insert(b.thread);
        CHECK(b.begin == covered);  // contiguous, disjoint, in order
        CHECK(b.end > b.begin);
        CHECK(b.end - b.begin >= n / threads);
        CHECK(b.end - b.begin <= n / threads + 1);
        covered = b.end;
      }
      CHECK(seen.size() == expected_blocks);
      CHECK(covered == n);
    }
  }
}

TEST_CASE("parallel_for runs on exactly threads() OpenMP threads") {
  for (const int threads : thread_counts()) {
    CAPTURE(threads);
    const cpu exec(threads);
    std::mutex mutex;
    std::set<int> thread_numbers;
    std::set<int> team_sizes;
    exec.parallel_for(10 * threads, [&](std::int64_t) {
      const std::lock_guard<std::mutex> lock(mutex);
      thread_numbers.insert(omp_get_thread_num());
      team_sizes.insert(omp_get_num_threads());
    });
    CHECK(team_sizes == std::set<int>{threads});
    CHECK(thread_numbers.size() == static_cast<std::size_t>(threads));
    CHECK(*thread_numbers.rbegin() == threads - 1);
  }
}

TEST_CASE("an exception thrown by the body reaches the caller after the region") {
  for (const int threads : thread_counts()) {
    CAPTURE(threads);
    const cpu exec(threads);
    std::atomic<std::int64_t> calls{0};
    // Only index 777 throws: its exception arrives, and every other index still ran.
    CHECK_THROWS_WITH_AS(exec.parallel_for(1000,
                                           [&](std::int64_t i) {
                                             ++calls;
                                             if (i == 777) throw std::runtime_error("index 777");
                                           }),
                         "index 777", std::runtime_error);
    // The block holding 777 stops there and skips the rest; the other blocks complete.
    std::int64_t block_end = 0;
    for (int t = 0; block_end <= 777; ++t) block_end += 1000 / threads + (t < 1000 % threads);
    CHECK(calls == 1000 - (block_end - 778));

    // Every thread throws: one of the exceptions arrives, whole.
    try {
      exec.parallel_for_ranges(1000, [](int thread, std::int64_t, std::int64_t) {
        throw infuse::error("thread " + std::to_string(thread));
      });
      FAIL("parallel_for_ranges did not rethrow");
    } catch (const infuse::error& failure) {
      CHECK(std::string(failure.what()).rfind("thread ", 0) == 0);
    }

    // The backend is usable afterwards.
    std::atomic<std::int64_t> sum{0};
    exec.parallel_for(100, [&](std::int64_t i) { sum += i; });
    CHECK(sum == 4950);
  }
}

TEST_CASE("parallel_for with n = 0 calls nothing; a negative n throws before any call") {
  const cpu exec(4);
  bool called = false;
  exec.parallel_for(0, [&](std::int64_t) { called = true; });
  exec.parallel_for_ranges(0, [&](int, std::int64_t, std::int64_t) { called = true; });
  CHECK_FALSE(called);
  CHECK_THROWS_WITH_AS(exec.parallel_for(-3, [&](std::int64_t) { called = true; }),
                       "infuse::exec::cpu::parallel_for: n is -3, expected a nonnegative count",
                       infuse::error);
  CHECK_THROWS_AS(exec.parallel_for_ranges(-1, [&](int, std::int64_t, std::int64_t) {
    called = true;
  }),
                  infuse::error);
  CHECK_FALSE(called);
}

TEST_CASE("exec::cpu is a backend over host memory") {
  static_assert(infuse::exec::backend<cpu>);
  static_assert(std::is_same_v<cpu::memory_space, infuse::host_memory>);
  CHECK(cpu::name == "cpu");
  CHECK_NOTHROW(cpu{}.synchronize());
}
