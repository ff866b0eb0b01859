// What the CUDA tests (.cu files only) share: checked runtime calls, the check after a kernel
// launch, and thrust::device_vector as kernel arguments and back on the host.
#pragma once

#include <cuda_runtime.h>
#include <doctest/doctest.h>
#include <thrust/copy.h>
#include <thrust/device_vector.h>

#include <source_location>
#include <vector>

// REQUIREs that a CUDA runtime call returned cudaSuccess; the failure names the call and CUDA's
// description of the error.
#define INFUSE_CUDA_REQUIRE(call)                                                  \
  do {                                                                             \
    const cudaError_t infuse_cuda_status_ = (call);                                \
    REQUIRE_MESSAGE(infuse_cuda_status_ == cudaSuccess,                            \
                    #call " failed: " << cudaGetErrorString(infuse_cuda_status_)); \
  } while (0)

namespace infuse::test {

// After a kernel launch: the launch was accepted and the kernel ran to the end. A failure names
// the caller's line, since a test checks many launches.
inline void check_launch(std::source_location where = std::source_location::current()) {
  INFO("kernel launch checked at ", where.file_name(), ":", where.line());
  INFUSE_CUDA_REQUIRE(cudaGetLastError());
  INFUSE_CUDA_REQUIRE(cudaDeviceSynchronize());
}

// The device pointer to a vector's elements, to pass to a kernel.
template <class T>
T* raw(thrust::device_vector<T>& device) {
  return thrust::raw_pointer_cast(device.data());
}
template <class T>
const T* raw(const thrust::device_vector<T>& device) {
  return thrust::raw_pointer_cast(device.data());
}

template <class T>
std::vector<T> to_host(const thrust::device_vector<T>& device) {
  std::vector<T> host(device.size());
  thrust::copy(device.begin(), device.end(), host.begin());
  return host;
}

}  // namespace infuse::test
