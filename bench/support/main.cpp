// Entry point of every CPU benchmark binary: the machine context, then the benchmarks.
#include <benchmark/benchmark.h>
#include <hwy/highway.h>
#include <hwy/targets.h>
#include <omp.h>

#include <string>

#include "harness.hpp"
#include "machine.hpp"

int main(int argc, char** argv) {
  infuse::bench::add_host_context();
  benchmark::AddCustomContext("omp_threads", std::to_string(omp_get_max_threads()));
  benchmark::AddCustomContext("simd_target", hwy::TargetName(HWY_TARGET));
  infuse::bench::add_command_context(argc, argv);
  return infuse::bench::run(argc, argv);
}
