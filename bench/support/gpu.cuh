// What the CUDA benchmarks share beyond the library's exec::cuda::check and device_buffer: the
// device in the JSON context, an owned stream, CUDA-event timing for UseManualTime, a 16-byte-load
// read kernel, and an L2 flush.
//
//   infuse::bench::gpu::event_timer timer(stream);
//   for (auto _ : state) {
//     flush.run(stream);                                      // outside the timed span
//     state.SetIterationTime(timer.seconds([&] { kernel<<<grid, block, 0, stream>>>(...); }));
//   }
#pragma once

#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cub/block/block_reduce.cuh>
#include <string>

#include "infuse/exec/cuda.cuh"

namespace infuse::bench::gpu {

// Properties of the current device, read once.
inline const cudaDeviceProp& device_properties() {
  static const cudaDeviceProp properties = [] {
    int device = 0;
    exec::cuda::check(cudaGetDevice(&device), "cudaGetDevice");
    cudaDeviceProp read{};
    exec::cuda::check(cudaGetDeviceProperties(&read, device), "cudaGetDeviceProperties");
    return read;
  }();
  return properties;
}

inline int device_attribute(cudaDeviceAttr attribute) {
  int device = 0;
  int value = 0;
  exec::cuda::check(cudaGetDevice(&device), "cudaGetDevice");
  exec::cuda::check(cudaDeviceGetAttribute(&value, attribute, device), "cudaDeviceGetAttribute");
  return value;
}

// Context entries for the device: name, compute capability, SMs, clocks, memory, L2, and the
// memory bandwidth of its specification (double data rate times bus width) beside the measured one.
inline void add_device_context() {
  const cudaDeviceProp& device = device_properties();
  const int sm_khz = device_attribute(cudaDevAttrClockRate);
  const int memory_khz = device_attribute(cudaDevAttrMemoryClockRate);
  int driver = 0;
  int runtime = 0;
  exec::cuda::check(cudaDriverGetVersion(&driver), "cudaDriverGetVersion");
  exec::cuda::check(cudaRuntimeGetVersion(&runtime), "cudaRuntimeGetVersion");
  const auto version = [](int packed) {
    return std::to_string(packed / 1000) + "." + std::to_string(packed % 1000 / 10);
  };
  char memory[32];
  std::snprintf(memory, sizeof memory, "%.1f GiB", double(device.totalGlobalMem) / (1u << 30));
  const double spec_gbps = 2.0 * memory_khz * 1e3 * (device.memoryBusWidth / 8) / 1e9;
  benchmark::AddCustomContext("gpu_name", device.name);
  benchmark::AddCustomContext("gpu_compute_capability",
                              std::to_string(device.major) + "." + std::to_string(device.minor));
  benchmark::AddCustomContext("gpu_sm_count", std::to_string(device.multiProcessorCount));
  benchmark::AddCustomContext("gpu_sm_clock_mhz", std::to_string(sm_khz / 1000));
  benchmark::AddCustomContext("gpu_memory_clock_mhz", std::to_string(memory_khz / 1000));
  benchmark::AddCustomContext("gpu_memory", memory);
  benchmark::AddCustomContext("gpu_memory_bus_bits", std::to_string(device.memoryBusWidth));
  benchmark::AddCustomContext("gpu_spec_bandwidth_GB/s", std::to_string(int(spec_gbps)));
  benchmark::AddCustomContext("gpu_l2_cache", std::to_string(device.l2CacheSize >> 20) + " MiB");
  benchmark::AddCustomContext("cuda_driver", version(driver));
  benchmark::AddCustomContext("cuda_runtime", version(runtime));
}

// A stream created for one owner and destroyed with it.
class owned_stream {
 public:
  owned_stream() { exec::cuda::check(cudaStreamCreate(&stream_), "cudaStreamCreate"); }
  owned_stream(const owned_stream&) = delete;
  owned_stream& operator=(const owned_stream&) = delete;
  ~owned_stream() { cudaStreamDestroy(stream_); }
  operator cudaStream_t() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

// The GPU time of the work a callable enqueues on a stream, between two CUDA events: what
// benchmark::State::SetIterationTime wants under UseManualTime().
class event_timer {
 public:
  explicit event_timer(cudaStream_t stream) : stream_(stream) {
    exec::cuda::check(cudaEventCreate(&start_), "cudaEventCreate");
    exec::cuda::check(cudaEventCreate(&stop_), "cudaEventCreate");
  }
  event_timer(const event_timer&) = delete;
  event_timer& operator=(const event_timer&) = delete;
  ~event_timer() {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }

  template <class Work>
  double seconds(Work&& work) {
    exec::cuda::check(cudaEventRecord(start_, stream_), "cudaEventRecord");
    work();
    exec::cuda::check(cudaGetLastError(), "the timed launch");
    exec::cuda::check(cudaEventRecord(stop_, stream_), "cudaEventRecord");
    exec::cuda::check(cudaEventSynchronize(stop_), "cudaEventSynchronize");
    float milliseconds = 0;
    exec::cuda::check(cudaEventElapsedTime(&milliseconds, start_, stop_), "cudaEventElapsedTime");
    return milliseconds * 1e-3;
  }

 private:
  cudaStream_t stream_;
  cudaEvent_t start_ = nullptr;
  cudaEvent_t stop_ = nullptr;
};

inline constexpr int read_block_threads = 256;

// *total += the sum of data[0, count): grid-stride, four independent 16-byte loads in flight per
// thread. Per-thread sums stay in float (exact for the probe's small integers up to 2^24), blocks
// reduce in double. A template, so that every translation unit may define it.
template <int BlockThreads>
__global__ void __launch_bounds__(BlockThreads)
    read_sum_kernel(const float4* __restrict__ data, std::size_t count, double* total) {
  const std::size_t stride = std::size_t{gridDim.x} * blockDim.x;
  std::size_t i = std::size_t{blockIdx.x} * blockDim.x + threadIdx.x;
  const auto add = [](float sum, float4 v) { return sum + ((v.x + v.y) + (v.z + v.w)); };
  float sum = 0;
  for (; i + 3 * stride < count; i += 4 * stride) {
    const float4 v0 = data[i];
    const float4 v1 = data[i + stride];
    const float4 v2 = data[i + 2 * stride];
    const float4 v3 = data[i + 3 * stride];
    sum = add(add(add(add(sum, v0), v1), v2), v3);
  }
  for (; i < count; i += stride) sum = add(sum, data[i]);
  using block_reduce = cub::BlockReduce<double, BlockThreads>;
  __shared__ typename block_reduce::TempStorage storage;
  const double block_sum = block_reduce(storage).Sum(double(sum));
  if (threadIdx.x == 0) atomicAdd(total, block_sum);
}

// Enough resident blocks to fill every SM, read once per device.
inline int read_grid_blocks() {
  static const int blocks = [] {
    int per_sm = 0;
    exec::cuda::check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                          &per_sm, read_sum_kernel<read_block_threads>, read_block_threads, 0),
                      "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    return per_sm * device_properties().multiProcessorCount;
  }();
  return blocks;
}

inline void launch_read_sum(const float4* data, std::size_t count, double* total,
                            cudaStream_t stream) {
  read_sum_kernel<read_block_threads>
      <<<read_grid_blocks(), read_block_threads, 0, stream>>>(data, count, total);
}

// Evicts what a benchmark's previous iteration left in L2 by reading a buffer twice the L2's size
// (reading, not writing, so no dirty lines are written back during the next timed span).
class l2_flush {
 public:
  l2_flush()
      : lines_(2 * std::int64_t{device_properties().l2CacheSize} / std::int64_t{sizeof(float4)}),
        total_(1) {
    exec::cuda::check(cudaMemset(lines_.data(), 0, lines_.bytes()), "cudaMemset");
  }

  void run(cudaStream_t stream) {
    launch_read_sum(lines_.data(), static_cast<std::size_t>(lines_.size()), total_.data(), stream);
    exec::cuda::check(cudaGetLastError(), "the L2 flush");
  }

 private:
  device_buffer<float4> lines_;
  device_buffer<double> total_;
};

// The timed loop of the CUDA benchmarks: L2 evicted before each iteration, `work` timed by events
// on `stream`, each time handed to Google Benchmark (which needs UseManualTime()).
template <class Work>
void time_iterations(benchmark::State& state, cudaStream_t stream, Work&& work) {
  event_timer timer(stream);
  l2_flush flush;
  for (auto _ : state) {
    flush.run(stream);
    state.SetIterationTime(timer.seconds(work));
  }
}

}  // namespace infuse::bench::gpu
