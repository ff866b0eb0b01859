// Attention on CUDA (attention/cuda/decode.cuh, prefill.cuh), timed with CUDA events after an L2
// flush.
//   attention.decode.f16/batch:B   dense decode, B sequences of 4096 tokens, 32 query heads over
//                                  8 KV heads of dim 128, f16 cache in pages of 16 (nhd). GB/s
//                                  counts K and V once, q and out; roofline divides it by the
//                                  device-to-device copy bandwidth measured in the same run.
//   attention.decode.f16.group8    the same with 64 query heads (groups of 8: the decode kernel
//                                  sized for 8 heads a pass).
//   attention.prefill.causal.f16   causal prefill of one sequence of 4096 new tokens, same heads,
//                                  the new K/V written into the cache in the same call, on the
//                                  tensor cores (attention/cuda/prefill_mma.cuh); GFLOP/s
//                                  counts q k^T and p v over the visible pairs (2 FLOPs a
//                                  multiply-add).
//   attention.anchor_cublas_gemm   cuBLAS's half GEMM 4096^3 (float accumulation), as many FLOPs
//                                  as the prefill: the matrix throughput the prefill compares to.
// Each row checks sampled outputs against a float64 reference on the host after its timed loop.
// smoke filter: ^attention\.decode\.f16/batch:1/
#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include "infuse/attention/cuda/decode.cuh"
#include "infuse/attention/cuda/prefill.cuh"
#include "infuse/core/float_types.hpp"
#include "infuse/exec/cuda.cuh"
#include "infuse/quant/none.hpp"
#include "infuse/sparse/dense.hpp"
#include "support/gpu.cuh"
#include "support/gpu_bandwidth.cuh"
#include "support/harness.hpp"

namespace {

namespace bench = infuse::bench;
namespace gpu = infuse::bench::gpu;
namespace kv = infuse::kv;
namespace quant = infuse::quant;
namespace sparse = infuse::sparse;
namespace attention = infuse::attention;
using infuse::device_buffer;
using infuse::device_view;
using infuse::half;

constexpr std::int64_t tokens = 4096;
constexpr std::int32_t q_heads = 32;
constexpr std::int32_t kv_heads = 8;
constexpr std::int32_t dim = 128;
using layout = kv::paged<16>;
using f16 = quant::none<half>;
using cache_view = kv::cache_view<layout, f16, f16, infuse::device_memory>;

// Deterministic values in [-1, 1): a hash of the index.
INFUSE_HOST_DEVICE inline float hashed(std::uint64_t i, std::uint32_t salt) {
  std::uint64_t x = (i + salt) * 0x9E3779B97F4A7C15ull;
  x ^= x >> 31;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 29;
  return static_cast<float>(x >> 40) / static_cast<float>(1 << 23) - 1.0f;
}

__global__ void fill_halves(std::uint16_t* data, std::int64_t count, std::uint32_t salt) {
  const std::int64_t stride = std::int64_t{gridDim.x} * blockDim.x;
  for (std::int64_t i = std::int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < count;
       i += stride) {
    data[i] = infuse::float_to_bits<half>(hashed(static_cast<std::uint64_t>(i), salt));
  }
}

std::vector<float> host_values(std::int64_t count, std::uint32_t salt) {
  std::vector<float> values(static_cast<std::size_t>(count));
  for (std::int64_t i = 0; i < count; ++i)
    values[static_cast<std::size_t>(i)] = hashed(static_cast<std::uint64_t>(i), salt);
  return values;
}

// A device cache of `batch` sequences of `length` tokens, sequence s in pages
// s * pages_per_sequence onwards, every byte of the pool random halves.
struct bench_cache {
  device_buffer<std::uint16_t> pool;
  device_buffer<std::int32_t> indptr, indices, last_page_len;
  cache_view view{};

  bench_cache(std::int64_t batch, std::int64_t length) {
    view.format.k = {kv_heads, dim};
    view.format.v = {kv_heads, dim};
    view.format.slots = layout::page_size;
    const std::int64_t pages = (length + layout::page_size - 1) / layout::page_size;
    view.pool_pages = static_cast<std::int32_t>(batch * pages);
    pool = device_buffer<std::uint16_t>(view.pool_pages * view.format.page_bytes() / 2);
    fill_halves<<<1024, 256>>>(pool.data(), pool.size(), 7);
    infuse::exec::cuda::check(cudaGetLastError(), "fill_halves");
    std::vector<std::int32_t> host_indptr{0}, host_indices(static_cast<std::size_t>(batch * pages));
    std::iota(host_indices.begin(), host_indices.end(), 0);
    for (std::int64_t s = 0; s < batch; ++s)
      host_indptr.push_back(static_cast<std::int32_t>((s + 1) * pages));
    const std::vector<std::int32_t> host_last(
        static_cast<std::size_t>(batch),
        static_cast<std::int32_t>(length - (pages - 1) * layout::page_size));
    indptr = device_buffer<std::int32_t>(std::span<const std::int32_t>(host_indptr));
    indices = device_buffer<std::int32_t>(std::span<const std::int32_t>(host_indices));
    last_page_len = device_buffer<std::int32_t>(std::span<const std::int32_t>(host_last));
    view.pages = reinterpret_cast<std::uint8_t*>(pool.data());
    view.table = {indptr.data(), indices.data(), last_page_len.data(),
                  static_cast<std::int32_t>(batch)};
  }

  // K or V of sequence 0, KV head h, as floats (tokens, dim), read back from the pool.
  std::vector<float> sequence_zero(std::int64_t length, std::int32_t h, bool values) const {
    const std::int64_t page_bytes = view.format.page_bytes();
    const std::int64_t pages = (length + layout::page_size - 1) / layout::page_size;
    std::vector<std::uint16_t> bytes(static_cast<std::size_t>(pages * page_bytes / 2));
    infuse::exec::cuda::check(
        cudaMemcpy(bytes.data(), pool.data(), bytes.size() * 2, cudaMemcpyDeviceToHost),
        "cudaMemcpy");
    const auto* base = reinterpret_cast<const std::uint8_t*>(bytes.data());
    std::vector<float> out(static_cast<std::size_t>(length * dim));
    const auto& f = view.format;
    for (std::int64_t t = 0; t < length; ++t) {
      const std::uint8_t* page = base + (t / layout::page_size) * page_bytes;
      const auto slot = static_cast<std::int32_t>(t % layout::page_size);
      for (std::int32_t d = 0; d < dim; ++d) {
        out[static_cast<std::size_t>(t * dim + d)] =
            values ? f.v.value(f.v_codes(page, slot, h), f.v_params(page, slot, h), d)
                   : f.k.value(f.k_codes(page, slot, h), f.k_params(page, slot, h), d);
      }
    }
    return out;
  }
};

// Softmax attention of one query row over keys [0, visible) in float64; the largest relative
// difference of `got` (dim floats) from it, NaN counting as the worst.
double row_error(const float* q, const std::vector<float>& k, const std::vector<float>& v,
                 std::int64_t visible, const float* got) {
  std::vector<double> scores(static_cast<std::size_t>(visible));
  double max = -INFINITY;
  for (std::int64_t t = 0; t < visible; ++t) {
    double dot = 0.0;
    for (std::int32_t d = 0; d < dim; ++d) dot += double(q[d]) * k[t * dim + d];
    scores[t] = dot / std::sqrt(double(dim));
    max = std::max(max, scores[t]);
  }
  double sum = 0.0;
  for (auto& s : scores) sum += (s = std::exp(s - max));
  double worst = 0.0;
  double norm = 0.0;
  for (std::int32_t d = 0; d < dim; ++d) {
    double want = 0.0;
    for (std::int64_t t = 0; t < visible; ++t) want += scores[t] * v[t * dim + d];
    want /= sum;
    norm = std::max(norm, std::fabs(want));
    const double error = std::fabs(got[d] - want);
    worst = std::isnan(error) ? INFINITY : std::max(worst, error);
  }
  return worst / std::max(norm, 1e-30);
}

// Dense f16 decode of state.range(0) sequences with `heads` query heads over the kv_heads.
void decode(benchmark::State& state, std::int32_t heads) {
  const std::int64_t batch = state.range(0);
  const bench_cache cache(batch, tokens);
  const std::vector<float> q = host_values(batch * heads * dim, 11);
  const device_buffer<float> q_device{std::span<const float>(q)};
  device_buffer<float> out_device(batch * heads * dim);
  const gpu::owned_stream stream;
  const infuse::exec::cuda exec(stream);
  const std::int64_t bytes =
      attention::cuda::decode_workspace_bytes<layout, f16, f16, sparse::dense>(
          exec, heads, cache.view, {}, tokens);
  device_buffer<std::byte> workspace(bytes);
  const device_view<const float, 3> qv(q_device.data(), {batch, heads, dim});
  const device_view<float, 3> outv = out_device.as_view({batch, heads, dim});
  const auto run = [&] {
    attention::cuda::decode<layout, f16, f16, sparse::dense>(
        exec, qv, cache.view, outv, {}, {}, std::span<std::byte>(workspace.data(), bytes), tokens);
  };
  run();  // warm-up: module load, first-launch costs
  exec.synchronize();
  gpu::time_iterations(state, stream, run);

  const std::vector<float> out = out_device.to_host();
  const std::vector<float> k0 = cache.sequence_zero(tokens, 0, false);
  const std::vector<float> v0 = cache.sequence_zero(tokens, 0, true);
  double error = 0.0;
  for (std::int32_t h = 0; h < heads / kv_heads; ++h) {
    error = std::max(error, row_error(&q[h * dim], k0, v0, tokens, &out[h * dim]));
  }
  if (!(error <= 1e-4)) {
    bench::report_error(state,
                        "sampled outputs off the float64 reference by " + std::to_string(error));
  }
  const double moved =
      2.0 * double(batch) * tokens * kv_heads * dim * 2 + 2.0 * 4.0 * double(batch) * heads * dim;
  bench::set_bytes(state, moved, gpu::measured_bandwidth().copy_gbps);
  bench::set_flops(state, 4.0 * double(batch) * tokens * heads * dim);
}

// Visible (query, key) pairs of a causal prefill of n tokens, times q heads, times 4 * dim FLOPs.
double prefill_flops() {
  return 4.0 * double(tokens) * (tokens + 1) / 2 * q_heads * dim;
}

void prefill(benchmark::State& state) {
  const bench_cache cache(1, tokens);
  const std::vector<float> q = host_values(tokens * q_heads * dim, 21);
  const std::vector<float> k = host_values(tokens * kv_heads * dim, 22);
  const std::vector<float> v = host_values(tokens * kv_heads * dim, 23);
  const std::vector<std::int32_t> indptr{0, static_cast<std::int32_t>(tokens)};
  const device_buffer<float> q_device{std::span<const float>(q)};
  const device_buffer<float> k_device{std::span<const float>(k)};
  const device_buffer<float> v_device{std::span<const float>(v)};
  const device_buffer<std::int32_t> indptr_device{std::span<const std::int32_t>(indptr)};
  device_buffer<float> out_device(tokens * q_heads * dim);
  const gpu::owned_stream stream;
  const infuse::exec::cuda exec(stream);
  const auto run = [&] {
    attention::cuda::prefill<layout, f16, f16, sparse::causal>(
        exec, device_view<const float, 3>(q_device.data(), {tokens, q_heads, dim}),
        device_view<const float, 3>(k_device.data(), {tokens, kv_heads, dim}),
        device_view<const float, 3>(v_device.data(), {tokens, kv_heads, dim}),
        device_view<const std::int32_t, 1>(indptr_device.data(), {2}), cache.view,
        out_device.as_view({tokens, q_heads, dim}), {});
  };
  run();
  exec.synchronize();
  gpu::time_iterations(state, stream, run);

  const std::vector<float> out = out_device.to_host();
  const std::vector<float> k0 = cache.sequence_zero(tokens, 0, false);
  const std::vector<float> v0 = cache.sequence_zero(tokens, 0, true);
  double error = 0.0;
  for (const std::int64_t row : {std::int64_t{0}, std::int64_t{1000}, tokens - 1}) {
    const std::size_t at = static_cast<std::size_t>(row * q_heads * dim);
    error = std::max(error, row_error(&q[at], k0, v0, row + 1, &out[at]));
  }
  // The tensor cores take q and the softmax weights in half: about 5e-4 of the largest output.
  if (!(error <= 2e-3)) {
    bench::report_error(state,
                        "sampled outputs off the float64 reference by " + std::to_string(error));
  }
  bench::set_flops(state, prefill_flops());
}

void check_cublas(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw infuse::error(std::string("cuBLAS: ") + what + " failed with status " +
                        std::to_string(static_cast<int>(status)));
  }
}

void anchor_cublas_gemm(benchmark::State& state) {
  constexpr int n = 4096;
  device_buffer<std::uint16_t> a(std::int64_t{n} * n);
  device_buffer<std::uint16_t> b(std::int64_t{n} * n);
  device_buffer<std::uint16_t> c(std::int64_t{n} * n);
  fill_halves<<<1024, 256>>>(a.data(), a.size(), 31);
  fill_halves<<<1024, 256>>>(b.data(), b.size(), 32);
  infuse::exec::cuda::check(cudaGetLastError(), "fill_halves");
  const gpu::owned_stream stream;
  cublasHandle_t handle = nullptr;
  check_cublas(cublasCreate(&handle), "cublasCreate");
  const float alpha = 1.0f;
  const float beta = 0.0f;
  const auto product = [&] {
    check_cublas(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, a.data(),
                              CUDA_R_16F, n, b.data(), CUDA_R_16F, n, &beta, c.data(), CUDA_R_16F,
                              n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 "cublasGemmEx");
  };
  try {
    check_cublas(cublasSetStream(handle, stream), "cublasSetStream");
    product();
    infuse::exec::cuda::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    gpu::time_iterations(state, stream, product);
  } catch (...) {
    cublasDestroy(handle);
    throw;
  }
  cublasDestroy(handle);
  bench::set_flops(state, 2.0 * n * double(n) * n);
}

const bool registered = [] {
  benchmark::RegisterBenchmark("attention.decode.f16",
                               [](benchmark::State& state) { decode(state, q_heads); })
      ->ArgName("batch")
      ->Arg(1)
      ->Arg(16)
      ->Arg(64)
      ->Arg(128)
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("attention.decode.f16.group8",
                               [](benchmark::State& state) { decode(state, 8 * kv_heads); })
      ->ArgName("batch")
      ->Arg(64)
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("attention.prefill.causal.f16", prefill)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("attention.anchor_cublas_gemm", anchor_cublas_gemm)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
  return true;
}();

}  // namespace
