// infuse::gemv on CUDA: y = W x for Llama-sized W (4096x4096, 14336x4096, 4096x14336; n x k) and
// batch 1, 4, 16, per scheme, and batch 64 for int4 g128 (batch 16 and up run on the tensor-core
// body, gemm/cuda/gemm_tc.cuh), after an L2 flush, timed with CUDA events. Rows named
// gemv.SCHEME.x_half / .x_bf16 take x in half / bfloat16 (the anchor's x type; W x in float all
// the same); gemv.bcq3_g128.lut is the LUT-GEMV (gemm::lut_activations, gemm/cuda/lut.cuh) beside
// the same weights dequantized (gemv.bcq3_g128). The anchor
// gemv.anchor_cublas/CASE is cuBLAS's cublasGemmEx on the same shape in half precision (half W,
// x and y, float accumulation). GB/s counts the bytes that must move: W's codes, scales and zero
// points, x (in its own type) and y, once each; roofline divides by
// gpu::measured_bandwidth().read_gbps.
// Each row checks sampled outputs against a float64 product on the host after its timed loop.
#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "infuse/exec/cuda.cuh"
#include "infuse/gemm/cuda/gemv.cuh"
#include "infuse/quant/quant.hpp"
#include "support/gpu.cuh"
#include "support/gpu_bandwidth.cuh"
#include "support/harness.hpp"

namespace {

namespace bench = infuse::bench;
namespace gpu = infuse::bench::gpu;
namespace quant = infuse::quant;
using infuse::device_buffer;
using infuse::device_view;

struct shape {
  std::int64_t rows;
  std::int64_t cols;
  std::int64_t batch;
};

shape shape_of(const benchmark::State& state) {
  return {state.range(0), state.range(1), state.range(2)};
}

// Uniform values in [-scale, scale) from a fixed 64-bit LCG: fast enough for 58M weights, and
// never zeros (which would hide unwritten outputs and wrong indexing).
class uniform_source {
 public:
  explicit uniform_source(std::uint64_t seed) : state_(seed) {}
  float next(float scale) {
    state_ = state_ * 6364136223846793005ull + 1442695040888963407ull;
    return scale * (static_cast<float>(state_ >> 40) * 0x1p-23f - 1.0f);
  }

 private:
  std::uint64_t state_;
};

// A W of the scheme whose groups all share one set of stored parameters (scales 0.02, the zero
// point 2^(Bits-1) - 1 where there is one), with codes encoded from uniform values: the same
// bytes a quantized matrix has, made quickly.
template <class S>
struct bench_matrix {
  std::vector<std::uint8_t> codes;
  std::vector<float> scales;
  std::vector<std::uint8_t> zeros;
  quant::matrix<S, infuse::host_memory> host;
  device_buffer<std::uint8_t> codes_device;
  device_buffer<float> scales_device;
  device_buffer<std::uint8_t> zeros_device;
  quant::matrix<S, infuse::device_memory> device;

  bench_matrix(std::int64_t rows, std::int64_t cols) {
    const quant::matrix<S, infuse::host_memory> shape{nullptr, nullptr, nullptr, rows, cols};
    quant::stored_group<S> stored{};
    for (float& scale : stored.scales) scale = 0.02f;
    if constexpr (S::has_zero) stored.zero = static_cast<std::uint8_t>((1 << (S::bits - 1)) - 1);
    const auto p = S::group_params(stored.scales, stored.zero);
    codes.resize(static_cast<std::size_t>(rows * shape.blocks_per_row() * S::block_bytes));
    uniform_source values(0x9e3779b97f4a7c15ull);
    for (std::int64_t b = 0; b < rows * shape.blocks_per_row(); ++b) {
      std::uint32_t block[quant::block_size];
      for (auto& code : block) code = S::encode(values.next(0.1f), p);
      S::pack(block, codes.data() + b * S::block_bytes);
    }
    for (std::int64_t g = 0; g < shape.group_count(); ++g) {
      scales.insert(scales.end(), stored.scales, stored.scales + S::scales_per_group);
    }
    if constexpr (S::has_zero)
      zeros.assign(static_cast<std::size_t>(shape.group_count()), stored.zero);
    host = {codes.data(), scales.data(), zeros.empty() ? nullptr : zeros.data(), rows, cols};
    codes_device = device_buffer<std::uint8_t>(std::span<const std::uint8_t>(codes));
    scales_device = device_buffer<float>(std::span<const float>(scales));
    zeros_device = device_buffer<std::uint8_t>(std::span<const std::uint8_t>(zeros));
    device = {codes_device.data(), scales.empty() ? nullptr : scales_device.data(),
              zeros.empty() ? nullptr : zeros_device.data(), rows, cols};
  }
};

std::vector<float> make_x(shape s) {
  uniform_source values(0x5851f42d4c957f2dull);
  std::vector<float> x(static_cast<std::size_t>(s.batch * s.cols));
  for (float& value : x) value = values.next(1.0f);
  return x;
}

// The worst |y - ref| / sum |w x| over 64 sampled rows and every batch row, in float64 from
// `weight(row, k)`; NaN (an unwritten output) is the worst of all.
template <class Weight>
double sampled_error(shape s, const std::vector<float>& x, const std::vector<float>& y,
                     Weight&& weight) {
  double worst = 0.0;
  for (int i = 0; i < 64; ++i) {
    const std::int64_t row = (s.rows - 1) * i / 63;
    for (std::int64_t b = 0; b < s.batch; ++b) {
      double sum = 0.0;
      double magnitude = 0.0;
      for (std::int64_t k = 0; k < s.cols; ++k) {
        const double term = weight(row, k) * double(x[static_cast<std::size_t>(b * s.cols + k)]);
        sum += term;
        magnitude += std::fabs(term);
      }
      const double error = std::fabs(double(y[static_cast<std::size_t>(b * s.rows + row)]) - sum) /
                           std::max(magnitude, 1e-30);
      worst = std::isnan(error) ? INFINITY : std::max(worst, error);
    }
  }
  return worst;
}

// y = W x with x of type X (float, half, bfloat16) and the activation policy; the reference takes
// x as the kernel reads it, rounded to X.
template <class S, class X = float, class Activations = infuse::gemm::float_activations>
void gemv(benchmark::State& state) {
  const shape s = shape_of(state);
  const bench_matrix<S> w(s.rows, s.cols);
  std::vector<X> x_stored;
  std::vector<float> x;
  for (const float value : make_x(s)) {
    x_stored.push_back(X(value));
    x.push_back(float(x_stored.back()));
  }
  const device_buffer<X> x_device{std::span<const X>(x_stored)};
  device_buffer<float> y_device(s.batch * s.rows);
  const gpu::owned_stream stream;
  const infuse::exec::cuda exec(stream);
  const device_view<const X, 2> xv(x_device.data(), {s.batch, s.cols});
  const device_view<float, 2> yv(y_device.data(), {s.batch, s.rows});
  const auto product = [&] { infuse::gemv(exec, w.device, xv, yv, {}, Activations{}); };
  product();  // warm-up: module load, first-launch costs
  exec.synchronize();
  gpu::time_iterations(state, stream, product);
  const double error = sampled_error(s, x, y_device.to_host(),
                                     [&](std::int64_t n, std::int64_t k) { return w.host(n, k); });
  // The tensor-core body rounds x and the weights to half: 2^-11 each, plus float sums. The LUT's
  // rounding is relative to (|offset| + sum |alpha|) |x|, a few times sum |w x| for this W.
  namespace body = infuse::gemm::cuda::detail;
  const bool lut = std::is_same_v<Activations, infuse::gemm::lut_activations>;
  const bool half_operands =
      !lut && body::tensor_core_scheme<S> && s.batch >= body::tensor_core_min_batch;
  if (!(error <= (half_operands ? 0x1p-10 + 1e-5 : lut ? 1e-5 : 1e-6))) {
    bench::report_error(state, "sampled outputs off the float64 product by " +
                                   std::to_string(error) + " of sum |w x|");
  }
  const double bytes = double(quant::storage_bytes<S>(s.rows, s.cols)) +
                       double(sizeof(X)) * double(s.batch) * double(s.cols) +
                       4.0 * double(s.batch) * double(s.rows);
  bench::set_bytes(state, bytes, gpu::measured_bandwidth().read_gbps);
  bench::set_flops(state, 2.0 * double(s.rows) * double(s.cols) * double(s.batch));
}

void check_cublas(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw infuse::error(std::string("cuBLAS: ") + what + " failed with status " +
                        std::to_string(static_cast<int>(status)));
  }
}

// cuBLAS on half W, x and y: column-major, W (n,k) row-major is A (k,n), so y^T = A^T x^T.
void anchor_cublas(benchmark::State& state) {
  const shape s = shape_of(state);
  using S = quant::none<infuse::half>;
  const bench_matrix<S> w(s.rows, s.cols);
  const std::vector<float> x = make_x(s);
  std::vector<infuse::half> x_half;
  for (const float value : x) x_half.push_back(infuse::half(value));
  const device_buffer<infuse::half> x_device{std::span<const infuse::half>(x_half)};
  device_buffer<infuse::half> y_device(s.batch * s.rows);
  const gpu::owned_stream stream;
  cublasHandle_t handle = nullptr;
  check_cublas(cublasCreate(&handle), "cublasCreate");
  const float alpha = 1.0f;
  const float beta = 0.0f;
  const auto product = [&] {
    check_cublas(
        cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(s.rows),
                     static_cast<int>(s.batch), static_cast<int>(s.cols), &alpha,
                     w.codes_device.data(), CUDA_R_16F, static_cast<int>(s.cols), x_device.data(),
                     CUDA_R_16F, static_cast<int>(s.cols), &beta, y_device.data(), CUDA_R_16F,
                     static_cast<int>(s.rows), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        "cublasGemmEx");
  };
  try {
    check_cublas(cublasSetStream(handle, stream), "cublasSetStream");
    product();  // warm-up: handle workspace, kernel selection
    infuse::exec::cuda::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    gpu::time_iterations(state, stream, product);
  } catch (...) {
    cublasDestroy(handle);
    throw;
  }
  cublasDestroy(handle);
  std::vector<float> y;
  for (const infuse::half value : y_device.to_host()) y.push_back(float(value));
  std::vector<float> x_rounded;
  for (const infuse::half value : x_half) x_rounded.push_back(float(value));
  // Half outputs: a rounding of 2^-11 relative to |y|, itself at most sum |w x|.
  const double error =
      sampled_error(s, x_rounded, y, [&](std::int64_t n, std::int64_t k) { return w.host(n, k); });
  if (!(error <= 2e-3)) {
    bench::report_error(state, "cuBLAS sampled outputs off the float64 product by " +
                                   std::to_string(error) + " of sum |w x|");
  }
  const double bytes =
      2.0 * (double(s.rows) * double(s.cols) + double(s.batch) * (s.cols + s.rows));
  bench::set_bytes(state, bytes, gpu::measured_bandwidth().read_gbps);
  bench::set_flops(state, 2.0 * double(s.rows) * double(s.cols) * double(s.batch));
}

void cases(benchmark::internal::Benchmark* benchmark) {
  benchmark->ArgNames({"n", "k", "batch"});
  for (const auto& [n, k] : {std::pair<int, int>{4096, 4096}, {14336, 4096}, {4096, 14336}}) {
    for (const int batch : {1, 4, 16}) benchmark->Args({n, k, batch});
  }
  benchmark->UseManualTime()->Unit(benchmark::kMicrosecond);
}

// Batch 64 on the tensor-core body (batch 16 is in cases), for int4 g128 and the anchor.
void tensor_core_cases(benchmark::internal::Benchmark* benchmark) {
  benchmark->ArgNames({"n", "k", "batch"});
  for (const auto& [n, k] : {std::pair<int, int>{4096, 4096}, {14336, 4096}}) {
    benchmark->Args({n, k, 64});
  }
  benchmark->UseManualTime()->Unit(benchmark::kMicrosecond);
}

template <class S, class X = float, class Activations = infuse::gemm::float_activations>
void register_scheme(const std::string& suffix = "") {
  benchmark::RegisterBenchmark((std::string("gemv.") + S::name + suffix).c_str(),
                               gemv<S, X, Activations>)
      ->Apply(cases);
}

// The LUT-GEMV pays at batch 1 and 2 (gemm/cuda/lut.cuh): batch 1 and 2 only.
void lut_cases(benchmark::internal::Benchmark* benchmark) {
  benchmark->ArgNames({"n", "k", "batch"});
  for (const auto& [n, k] : {std::pair<int, int>{4096, 4096}, {14336, 4096}, {4096, 14336}}) {
    for (const int batch : {1, 2}) benchmark->Args({n, k, batch});
  }
  benchmark->UseManualTime()->Unit(benchmark::kMicrosecond);
}

const bool registered = [] {
  register_scheme<quant::int_<4, 128>>();
  register_scheme<quant::int_<4, 128, quant::zero_point>>();
  register_scheme<quant::int_<8, 128>>();
  register_scheme<quant::int_<3, 128>>();
  register_scheme<quant::int_<2, 64>>();
  register_scheme<quant::fp8<infuse::fp8_e4m3, quant::per_channel>>();
  register_scheme<quant::none<infuse::half>>();
  register_scheme<quant::int_<4, 128>, infuse::half>(".x_half");
  register_scheme<quant::int_<4, 128>, infuse::bfloat16>(".x_bf16");
  register_scheme<quant::none<infuse::half>, infuse::half>(".x_half");
  using bcq3_g128 = quant::bcq<3, 128>;
  benchmark::RegisterBenchmark((std::string("gemv.") + bcq3_g128::name).c_str(), gemv<bcq3_g128>)
      ->Apply(lut_cases);
  benchmark::RegisterBenchmark((std::string("gemv.") + bcq3_g128::name + ".lut").c_str(),
                               gemv<bcq3_g128, float, infuse::gemm::lut_activations>)
      ->Apply(lut_cases);
  benchmark::RegisterBenchmark("gemv.anchor_cublas", anchor_cublas)->Apply(cases);
  using int4_g128 = quant::int_<4, 128>;
  benchmark::RegisterBenchmark((std::string("gemv.") + int4_g128::name).c_str(), gemv<int4_g128>)
      ->Apply(tensor_core_cases);
  benchmark::RegisterBenchmark("gemv.anchor_cublas", anchor_cublas)->Apply(tensor_core_cases);
  return true;
}();

}  // namespace
