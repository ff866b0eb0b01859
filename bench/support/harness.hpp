// What every infuse benchmark shares, on either backend: the counters it reports, how an error
// fails the run, and the main loop. See bench/README.md for the conventions.
//
//   for (auto _ : state) kernel(...);
//   bench::set_bytes(state, bytes_that_must_move, bench::cpu::measured_bandwidth().read_gbps);
//   bench::set_flops(state, flops);
#pragma once

#include <benchmark/benchmark.h>

#include <atomic>
#include <cstdio>
#include <exception>
#include <string>

namespace infuse::bench {

namespace detail {

inline std::atomic<bool>& any_error() {
  static std::atomic<bool> flag{false};
  return flag;
}

// A per-iteration amount as a rate: Google Benchmark multiplies by the iteration count and divides
// by the benchmark's time (manual, real or CPU time, whichever it uses), so `scale` fixes the unit.
inline benchmark::Counter rate(double per_iteration, double scale) {
  return benchmark::Counter(per_iteration / scale, benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace detail

// A measured memory bandwidth, the roofline of one backend.
struct bandwidth {
  double read_gbps;  // decimal GB/s of a sum over an array far larger than the caches
  double copy_gbps;  // decimal GB/s of a copy, bytes read plus bytes written
};

// Counter "GB/s": decimal gigabytes (1e9 bytes) per second of the bytes that must move between
// memory and the processor in one iteration (SetBytesProcessed would print binary GiB/s).
inline void set_bytes(benchmark::State& state, double bytes_per_iteration) {
  state.counters["GB/s"] = detail::rate(bytes_per_iteration, 1e9);
}

// As above, and counter "roofline": that rate as a share of `roofline_gbps`, a bandwidth measured
// in the same run (cpu::measured_bandwidth(), gpu::measured_bandwidth()), so 1.0 is the machine's
// limit and ratios from different machines compare.
inline void set_bytes(benchmark::State& state, double bytes_per_iteration, double roofline_gbps) {
  set_bytes(state, bytes_per_iteration);
  state.counters["roofline"] = detail::rate(bytes_per_iteration, 1e9 * roofline_gbps);
}

// Counter "GFLOP/s": 1e9 floating-point operations per second (a multiply-add counts as two).
inline void set_flops(benchmark::State& state, double flops_per_iteration) {
  state.counters["GFLOP/s"] = detail::rate(flops_per_iteration, 1e9);
}

// Marks the benchmark as failed (a wrong result, a failed launch): Google Benchmark reports the
// message with the row, and run() then exits with status 1, so scripts and ctest notice.
inline void report_error(benchmark::State& state, const std::string& message) {
  detail::any_error() = true;
  state.SkipWithError(message.c_str());
}

// Records the command line in the context, so a stored JSON says how it was produced.
inline void add_command_context(int argc, char** argv) {
  std::string command;
  for (int i = 0; i < argc; ++i) command.append(i == 0 ? "" : " ").append(argv[i]);
  benchmark::AddCustomContext("command", command);
}

// The body of every benchmark main after its context is added: 0 when benchmarks ran without
// error, 1 otherwise (an error, an exception, an unrecognized argument, a filter matching none).
inline int run(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  try {
    if (benchmark::RunSpecifiedBenchmarks() == 0) detail::any_error() = true;
  } catch (const std::exception& failure) {
    std::fprintf(stderr, "infuse benchmark failed: %s\n", failure.what());
    detail::any_error() = true;
  }
  benchmark::Shutdown();
  return detail::any_error() ? 1 : 0;
}

}  // namespace infuse::bench
