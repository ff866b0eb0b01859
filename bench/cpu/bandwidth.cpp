// The memory-bandwidth roofline of this machine: read (sum), copy and STREAM triad over arrays
// several times the last-level cache, on one thread and on all. Every result is checked.
// smoke filter: ^memory\.read/threads:1/
#include <benchmark/benchmark.h>
#include <omp.h>

#include <algorithm>
#include <string>

#include "support/cpu_bandwidth.hpp"
#include "support/harness.hpp"

namespace {

namespace bench = infuse::bench;
namespace cpu = infuse::bench::cpu;

constexpr float triad_scalar = 3.0f;

double array_bytes(const cpu::probe_arrays& arrays) {
  return double(arrays.floats) * sizeof(float);
}

// Each row as a share of the read roofline (so one thread's share, and copy's against read, show),
// which also runs measured_bandwidth() and its checks in the smoke test.
double roofline_gbps() {
  return cpu::measured_bandwidth().read_gbps;
}

void memory_read(benchmark::State& state) {
  cpu::probe_arrays& arrays = cpu::shared_probe_arrays();
  const int threads = static_cast<int>(state.range(0));
  // Every sum counts in the check (exact in double), so none can be optimized away.
  double total = 0;
  for (auto _ : state) total += cpu::sum(arrays.b.get(), arrays.floats, threads);
  const double expected = double(state.iterations()) * arrays.b_sum;
  if (total != expected) {
    bench::report_error(state, "sum of " + std::to_string(state.iterations()) + " reads is " +
                                   std::to_string(total) + ", expected " +
                                   std::to_string(expected));
  }
  bench::set_bytes(state, array_bytes(arrays), roofline_gbps());
}

template <bool Streaming>
void memory_copy(benchmark::State& state) {
  cpu::probe_arrays& arrays = cpu::shared_probe_arrays();
  const int threads = static_cast<int>(state.range(0));
  std::fill_n(arrays.a.get(), arrays.floats, 0.0f);
  for (auto _ : state) {
    cpu::copy<Streaming>(arrays.a.get(), arrays.b.get(), arrays.floats, threads);
    benchmark::ClobberMemory();
  }
  if (!std::equal(arrays.a.get(), arrays.a.get() + arrays.floats, arrays.b.get())) {
    bench::report_error(state, "the copy differs from its source");
  }
  bench::set_bytes(state, 2 * array_bytes(arrays), roofline_gbps());
}

void memory_triad(benchmark::State& state) {
  cpu::probe_arrays& arrays = cpu::shared_probe_arrays();
  const int threads = static_cast<int>(state.range(0));
  std::fill_n(arrays.a.get(), arrays.floats, 0.0f);
  for (auto _ : state) {
    cpu::triad(arrays.a.get(), arrays.b.get(), arrays.c.get(), triad_scalar, arrays.floats,
               threads);
    benchmark::ClobberMemory();
  }
  // Small integers: b + 3 c is exact in float, so the comparison is too.
  for (std::size_t i = 0; i < arrays.floats; ++i) {
    if (arrays.a[i] != arrays.b[i] + triad_scalar * arrays.c[i]) {
      bench::report_error(state, "triad element " + std::to_string(i) + " is wrong");
      break;
    }
  }
  bench::set_bytes(state, 3 * array_bytes(arrays), roofline_gbps());
}

// One thread, then all of them (the roofline that the other benchmarks divide by).
void thread_counts(benchmark::internal::Benchmark* benchmark) {
  benchmark->ArgName("threads")->Arg(1);
  if (omp_get_max_threads() > 1) benchmark->Arg(omp_get_max_threads());
  benchmark->UseRealTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK(memory_read)->Name("memory.read")->Apply(thread_counts);
BENCHMARK(memory_copy<false>)->Name("memory.copy")->Apply(thread_counts);
BENCHMARK(memory_copy<true>)->Name("memory.copy_streaming")->Apply(thread_counts);
BENCHMARK(memory_triad)->Name("memory.triad")->Apply(thread_counts);

}  // namespace
