// The memory-bandwidth roofline of this GPU: a read kernel (16-byte loads, grid-stride, block
// reduction) and a device-to-device cudaMemcpyAsync over arrays far larger than L2, timed with
// CUDA events after an L2 flush. Every result is checked.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <string>

#include "infuse/exec/cuda.cuh"
#include "support/gpu.cuh"
#include "support/gpu_bandwidth.cuh"
#include "support/harness.hpp"

namespace {

namespace bench = infuse::bench;
namespace gpu = infuse::bench::gpu;
using infuse::device_buffer;
using infuse::exec::cuda;

// Each row as a share of the read roofline, which also runs measured_bandwidth() and its checks.
double roofline_gbps() {
  return gpu::measured_bandwidth().read_gbps;
}

std::size_t floats_of(const benchmark::State& state) {
  return static_cast<std::size_t>(state.range(0)) << 20 >> 2;
}

void memory_read(benchmark::State& state) {
  const gpu::probe_array& source = gpu::shared_probe_array(floats_of(state));
  const gpu::owned_stream stream;
  gpu::event_timer timer(stream);
  gpu::l2_flush flush;
  device_buffer<double> total(1);
  cuda::check(cudaMemset(total.data(), 0, sizeof(double)), "cudaMemset");
  for (auto _ : state) {
    flush.run(stream);
    state.SetIterationTime(timer.seconds([&] {
      gpu::launch_read_sum(source.vectors(), source.vector_count(), total.data(), stream);
    }));
  }
  // The reads accumulate into one total, exact in double, so nothing else enters the timed span.
  double sum = 0;
  cuda::check(cudaMemcpy(&sum, total.data(), sizeof(double), cudaMemcpyDeviceToHost), "cudaMemcpy");
  const double expected = double(state.iterations()) * source.expected_sum;
  if (sum != expected) {
    bench::report_error(state, "sum of " + std::to_string(state.iterations()) + " reads is " +
                                   std::to_string(sum) + ", expected " + std::to_string(expected));
  }
  bench::set_bytes(state, double(source.values.bytes()), roofline_gbps());
}

void memory_copy(benchmark::State& state) {
  const gpu::probe_array& source = gpu::shared_probe_array(floats_of(state));
  device_buffer<float> copy(source.values.size());
  const gpu::owned_stream stream;
  gpu::event_timer timer(stream);
  gpu::l2_flush flush;
  cuda::check(cudaMemset(copy.data(), 0, copy.bytes()), "cudaMemset");
  for (auto _ : state) {
    flush.run(stream);
    state.SetIterationTime(timer.seconds([&] {
      cuda::check(cudaMemcpyAsync(copy.data(), source.values.data(), copy.bytes(),
                                  cudaMemcpyDeviceToDevice, stream),
                  "cudaMemcpyAsync");
    }));
  }
  const double sum =
      gpu::device_sum(reinterpret_cast<const float4*>(copy.data()), source.vector_count(), stream);
  if (sum != source.expected_sum) {
    bench::report_error(state, "sum of the copy is " + std::to_string(sum) + ", expected " +
                                   std::to_string(source.expected_sum));
  }
  bench::set_bytes(state, 2.0 * double(copy.bytes()), roofline_gbps());
}

// Each array 512 MiB and 2 GiB, ten and forty times an H100's L2.
void sizes(benchmark::internal::Benchmark* benchmark) {
  benchmark->ArgName("MiB")->Arg(512)->Arg(2048)->UseManualTime()->Unit(benchmark::kMicrosecond);
}

BENCHMARK(memory_read)->Name("memory.read")->Apply(sizes);
BENCHMARK(memory_copy)->Name("memory.copy")->Apply(sizes);

}  // namespace
