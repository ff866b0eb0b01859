// The CPU memory-bandwidth probe: sum (read), copy and triad over float arrays well above the
// last-level cache, with Highway SIMD (static dispatch) on OpenMP threads. bench_cpu_bandwidth
// reports it; every other CPU benchmark divides its GB/s by measured_bandwidth().read_gbps.
#pragma once

#include <hwy/aligned_allocator.h>
#include <hwy/cache_control.h>
#include <hwy/highway.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>

#include "harness.hpp"
#include "infuse/core/error.hpp"
#include "machine.hpp"
#include "probe_pattern.hpp"

namespace infuse::bench::cpu {

namespace hn = hwy::HWY_NAMESPACE;

// The probe works in blocks of 64 KiB: a thread's unit of work, and the span over which a float
// sum of the probe's small integers stays exact (the blocks add in double).
inline constexpr std::size_t block_floats = std::size_t{1} << 14;

// Floats in each of the three probe arrays: four times the last-level cache so that no level of
// cache holds a useful part of it, between 64 MiB and 1 GiB, and at most 1/16 of memory; 1 GiB for
// all three when the cache size is unknown.
inline std::size_t probe_array_floats() {
  const std::size_t cache = last_level_cache_bytes();
  std::size_t bytes = cache == 0
                          ? (std::size_t{1} << 30) / 3
                          : std::clamp(4 * cache, std::size_t{64} << 20, std::size_t{1} << 30);
  if (const std::size_t memory = physical_memory_bytes(); memory != 0) {
    bytes = std::min(bytes, memory / 16);
  }
  return std::max<std::size_t>(bytes / sizeof(float) / block_floats, 1) * block_floats;
}

// Three arrays a = 0, b and c filled with probe values; every page first touched by the thread
// that streams it with all threads, as the kernels below partition the blocks.
struct probe_arrays {
  std::size_t floats = probe_array_floats();
  hwy::AlignedFreeUniquePtr<float[]> a = hwy::AllocateAligned<float>(floats);
  hwy::AlignedFreeUniquePtr<float[]> b = hwy::AllocateAligned<float>(floats);
  hwy::AlignedFreeUniquePtr<float[]> c = hwy::AllocateAligned<float>(floats);
  double b_sum = 0;  // exact: at most 7 * 2^28

  probe_arrays() {
    require(a && b && c, "infuse::bench::cpu::probe_arrays", "allocation", 3 * floats * 4,
            "bytes that can be allocated");
    const auto blocks = static_cast<std::ptrdiff_t>(floats / block_floats);
#pragma omp parallel for schedule(static) reduction(+ : b_sum)
    for (std::ptrdiff_t block = 0; block < blocks; ++block) {
      for (std::size_t i = block * block_floats; i < (block + 1) * block_floats; ++i) {
        a[i] = 0.0f;
        b[i] = probe_value(i, 0);
        c[i] = probe_value(i, 1u << 28);
        b_sum += b[i];
      }
    }
  }
};

// One set of arrays per process, shared by the bandwidth benchmarks and measured_bandwidth().
inline probe_arrays& shared_probe_arrays() {
  static probe_arrays arrays;
  return arrays;
}

// Sum of data[0, floats), floats a multiple of block_floats, on `threads` threads.
inline double sum(const float* data, std::size_t floats, int threads) {
  const hn::ScalableTag<float> tag;
  const std::size_t lanes = hn::Lanes(tag);
  const auto blocks = static_cast<std::ptrdiff_t>(floats / block_floats);
  double total = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : total)
  for (std::ptrdiff_t block = 0; block < blocks; ++block) {
    const float* in = data + block * block_floats;
    // Four accumulators keep four loads in flight per step.
    auto sum0 = hn::Zero(tag), sum1 = hn::Zero(tag), sum2 = hn::Zero(tag), sum3 = hn::Zero(tag);
    for (std::size_t i = 0; i < block_floats; i += 4 * lanes) {
      sum0 = hn::Add(sum0, hn::Load(tag, in + i));
      sum1 = hn::Add(sum1, hn::Load(tag, in + i + lanes));
      sum2 = hn::Add(sum2, hn::Load(tag, in + i + 2 * lanes));
      sum3 = hn::Add(sum3, hn::Load(tag, in + i + 3 * lanes));
    }
    total += hn::GetLane(hn::SumOfLanes(tag, hn::Add(hn::Add(sum0, sum1), hn::Add(sum2, sum3))));
  }
  return total;
}

// store(i) for every vector offset i of [0, floats), floats a multiple of block_floats, on
// `threads` threads splitting the blocks as everywhere in the probe. Streaming stores are weakly
// ordered: with Streaming, each thread fences its own before the region ends.
template <bool Streaming, class Store>
void store_blocks(std::size_t floats, int threads, Store&& store) {
  const std::size_t lanes = hn::Lanes(hn::ScalableTag<float>());
  const auto blocks = static_cast<std::ptrdiff_t>(floats / block_floats);
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static) nowait
    for (std::ptrdiff_t block = 0; block < blocks; ++block) {
      for (std::size_t i = block * block_floats; i < (block + 1) * block_floats; i += lanes) {
        store(i);
      }
    }
    if constexpr (Streaming) hwy::FlushStream();
  }
}

// out = in, or with streaming (non-temporal) stores that skip reading `out` into the cache first.
template <bool Streaming>
void copy(float* out, const float* in, std::size_t floats, int threads) {
  store_blocks<Streaming>(floats, threads, [&](std::size_t i) {
    const hn::ScalableTag<float> tag;
    if constexpr (Streaming) {
      hn::Stream(hn::Load(tag, in + i), tag, out + i);
    } else {
      hn::Store(hn::Load(tag, in + i), tag, out + i);
    }
  });
}

// STREAM's triad, out = b + scalar * c, with streaming stores.
inline void triad(float* out, const float* b, const float* c, float scalar, std::size_t floats,
                  int threads) {
  store_blocks<true>(floats, threads, [&](std::size_t i) {
    const hn::ScalableTag<float> tag;
    hn::Stream(hn::MulAdd(hn::Set(tag, scalar), hn::Load(tag, c + i), hn::Load(tag, b + i)), tag,
               out + i);
  });
}

// The machine's read (sum) and copy (streaming stores) bandwidth on all threads, best of five
// runs, measured once per process on first use (about a second) and checked: a wrong sum or copy
// throws infuse::error.
inline const bandwidth& measured_bandwidth() {
  static const bandwidth measured = [] {
    probe_arrays& arrays = shared_probe_arrays();
    const int threads = omp_get_max_threads();
    const double bytes = double(arrays.floats) * sizeof(float);
    constexpr int runs = 5;
    const auto best_gbps = [&](double bytes_moved, auto&& kernel) {
      double best = 0;
      for (int run = 0; run < runs; ++run) {
        const auto start = std::chrono::steady_clock::now();
        kernel();
        const std::chrono::duration<double> seconds = std::chrono::steady_clock::now() - start;
        best = std::max(best, bytes_moved / seconds.count() / 1e9);
      }
      return best;
    };
    // Every run's sum counts in the check (exact in double), so none can be optimized away.
    double total = 0;
    const double read =
        best_gbps(bytes, [&] { total += sum(arrays.b.get(), arrays.floats, threads); });
    require(total == runs * arrays.b_sum, "infuse::bench::cpu::measured_bandwidth",
            "sum of five probe reads", total, std::to_string(runs * arrays.b_sum));
    const double copied = best_gbps(
        2 * bytes, [&] { copy<true>(arrays.a.get(), arrays.b.get(), arrays.floats, threads); });
    require(std::equal(arrays.a.get(), arrays.a.get() + arrays.floats, arrays.b.get()),
            "infuse::bench::cpu::measured_bandwidth", "probe copy", "different from its source",
            "an exact copy");
    return bandwidth{read, copied};
  }();
  return measured;
}

}  // namespace infuse::bench::cpu
