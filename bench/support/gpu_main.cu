// Entry point of every CUDA benchmark binary. Without a device it says so and exits 0 having run
// nothing (a benchmark is not a test); with one, the host and device context, then the benchmarks.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <cstdio>

#include "gpu.cuh"
#include "harness.hpp"
#include "machine.hpp"

int main(int argc, char** argv) {
  int devices = 0;
  const cudaError_t status = cudaGetDeviceCount(&devices);
  if (status != cudaSuccess || devices == 0) {
    std::printf("%s: no CUDA device (%s); no benchmarks ran\n", argv[0],
                status != cudaSuccess ? cudaGetErrorString(status) : "device count is 0");
    return 0;
  }
  infuse::bench::add_host_context();
  infuse::bench::gpu::add_device_context();
  infuse::bench::add_command_context(argc, argv);
  return infuse::bench::run(argc, argv);
}
