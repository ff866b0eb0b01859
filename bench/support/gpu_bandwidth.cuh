// The GPU memory-bandwidth probe: a read kernel (16-byte loads) and a device-to-device copy over
// arrays far larger than L2, each checked. bench_cuda_bandwidth reports it; every other CUDA
// benchmark divides its GB/s by measured_bandwidth().read_gbps.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>

#include "gpu.cuh"
#include "harness.hpp"
#include "infuse/exec/cuda.cuh"
#include "probe_pattern.hpp"

namespace infuse::bench::gpu {

// A template, so that every translation unit may define it.
template <int BlockThreads>
__global__ void __launch_bounds__(BlockThreads)
    fill_probe_kernel(float* data, std::size_t count, std::uint32_t salt) {
  const std::size_t stride = std::size_t{gridDim.x} * blockDim.x;
  for (std::size_t i = std::size_t{blockIdx.x} * blockDim.x + threadIdx.x; i < count; i += stride) {
    data[i] = probe_value(i, salt);
  }
}

// A device array of probe values (a whole number of float4) and their exact sum, computed on the
// host so that the device's read path is checked against an independent result.
struct probe_array {
  device_buffer<float> values;
  double expected_sum = 0;

  explicit probe_array(std::size_t floats) : values(static_cast<std::int64_t>(floats / 4 * 4)) {
    fill_probe_kernel<read_block_threads>
        <<<read_grid_blocks(), read_block_threads>>>(values.data(), float_count(), 0);
    exec::cuda::check(cudaGetLastError(), "fill_probe_kernel");
    std::uint64_t sum = 0;  // in integers, which the compiler vectorizes
    for (std::size_t i = 0; i < float_count(); ++i) sum += probe_integer(i, 0);
    expected_sum = double(sum);
    exec::cuda::check(cudaDeviceSynchronize(), "fill_probe_kernel");
  }

  [[nodiscard]] std::size_t float_count() const { return static_cast<std::size_t>(values.size()); }
  [[nodiscard]] const float4* vectors() const {
    return reinterpret_cast<const float4*>(values.data());
  }
  [[nodiscard]] std::size_t vector_count() const { return float_count() / 4; }
};

// One probe array per size, made on first use and kept for the process.
inline const probe_array& shared_probe_array(std::size_t floats) {
  static std::map<std::size_t, probe_array> arrays;
  return arrays.try_emplace(floats, floats).first->second;
}

// The sum of a float4 array on the device, after all work on `stream`.
inline double device_sum(const float4* data, std::size_t count, cudaStream_t stream) {
  device_buffer<double> total(1);
  exec::cuda::check(cudaMemsetAsync(total.data(), 0, sizeof(double), stream), "cudaMemsetAsync");
  launch_read_sum(data, count, total.data(), stream);
  exec::cuda::check(cudaGetLastError(), "read_sum_kernel");
  double result = 0;
  exec::cuda::check(
      cudaMemcpyAsync(&result, total.data(), sizeof(double), cudaMemcpyDeviceToHost, stream),
      "cudaMemcpyAsync");
  exec::cuda::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  return result;
}

// Floats in the roofline probe: 32 times L2 (no cache holds a useful part), between 256 MiB and
// 2 GiB, at most 1/8 of device memory.
inline std::size_t probe_floats() {
  const cudaDeviceProp& device = device_properties();
  const std::size_t bytes = std::min(std::clamp(std::size_t(32) * device.l2CacheSize,
                                                std::size_t{256} << 20, std::size_t{2} << 30),
                                     device.totalGlobalMem / 8);
  return bytes / sizeof(float);
}

// The device's read and copy (cudaMemcpyAsync) bandwidth, best of five event-timed runs after an
// L2 flush, measured once per process on first use and checked: a wrong sum throws infuse::error.
inline const bandwidth& measured_bandwidth() {
  static const bandwidth measured = [] {
    const probe_array& source = shared_probe_array(probe_floats());
    device_buffer<float> copy(source.values.size());
    device_buffer<double> total(1);
    const owned_stream stream;
    event_timer timer(stream);
    l2_flush flush;
    const double bytes = double(source.values.bytes());
    constexpr int runs = 5;
    const auto best_gbps = [&](double bytes_moved, auto&& work) {
      double best = 0;
      for (int run = 0; run < runs; ++run) {
        flush.run(stream);
        best = std::max(best, bytes_moved / timer.seconds(work) / 1e9);
      }
      return best;
    };
    // The runs accumulate into one total (exact in double), so nothing else enters the timed span.
    exec::cuda::check(cudaMemset(total.data(), 0, sizeof(double)), "cudaMemset");
    const double read = best_gbps(bytes, [&] {
      launch_read_sum(source.vectors(), source.vector_count(), total.data(), stream);
    });
    const double copied = best_gbps(2 * bytes, [&] {
      exec::cuda::check(cudaMemcpyAsync(copy.data(), source.values.data(), source.values.bytes(),
                                        cudaMemcpyDeviceToDevice, stream),
                        "cudaMemcpyAsync");
    });
    const double copy_sum =
        device_sum(reinterpret_cast<const float4*>(copy.data()), source.vector_count(), stream);
    double read_sum = 0;
    exec::cuda::check(cudaMemcpy(&read_sum, total.data(), sizeof(double), cudaMemcpyDeviceToHost),
                      "cudaMemcpy");
    require(read_sum == runs * source.expected_sum, "infuse::bench::gpu::measured_bandwidth",
            "sum of five probe reads", read_sum, std::to_string(runs * source.expected_sum));
    require(copy_sum == source.expected_sum, "infuse::bench::gpu::measured_bandwidth",
            "sum of the copy", copy_sum, std::to_string(source.expected_sum));
    return bandwidth{read, copied};
  }();
  return measured;
}

}  // namespace infuse::bench::gpu
