// Entry point of every CUDA test binary. Without a usable device it says so and exits 77, which
// ctest reports as skipped: a CUDA test never passes silently on a machine that cannot run it.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cuda_runtime.h>

#include <cstdio>

int main(int argc, char** argv) {
  int devices = 0;
  const cudaError_t status = cudaGetDeviceCount(&devices);
  if (status != cudaSuccess || devices == 0) {
    std::printf("SKIPPED: no CUDA device (%s); these CUDA tests did not run\n",
                status != cudaSuccess ? cudaGetErrorString(status) : "device count is 0");
    return 77;
  }
  cudaDeviceProp properties{};
  cudaGetDeviceProperties(&properties, 0);
  std::printf("CUDA device 0: %s, compute capability %d.%d\n", properties.name, properties.major,
              properties.minor);
  doctest::Context context(argc, argv);
  return context.run();
}
