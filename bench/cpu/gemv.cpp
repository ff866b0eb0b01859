// Quantized GEMV/GEMM on the CPU, y (batch,n) = x (batch,k) W^T, against the read roofline and
// OpenBLAS sgemv (batch 1) / sgemm (batch above 1) on the fp32 matrix, in the same run. Shapes:
// 4096x4096, 14336x4096, 4096x14336 (n x k) and 16384x16384, whose int4 weights are four times a
// 32 MiB last-level cache; batch 1, 4, 16. Bytes counted: codes, scales and zero points, x and y.
// int4 g128 also runs at the matrices of a TinyLlama-1.1B decode step, batch 1 (k = 2048 for all
// but the down projection): QKV 2560x2048, the output 2048x2048, the gated gate/up pair 5632x2048
// (gemv.gated_*: both weights in one pass), down 2048x5632 and the LM head 32000x2048.
// Small matrices are taken in turn from enough copies that every call reads from memory.
// smoke filter: ^gemv\.(int4_g128|anchor_openblas)/n:4096/k:4096/batch:1/
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(INFUSE_BENCH_HAVE_OPENBLAS)
#include <cblas.h>
#endif

#include "infuse/gemm/cpu/gemv.hpp"
#include "infuse/gemm/cpu/wina.hpp"
#include "infuse/quant/quant.hpp"
#include "support/cpu_bandwidth.hpp"
#include "support/harness.hpp"

namespace {

namespace bench = infuse::bench;
namespace quant = infuse::quant;
using infuse::host_view;

// Random codes and scales of the right sizes: the speed of a product does not depend on how the
// codes were found, and filling 256M weights this way takes a fraction of quantizing them.
// `copy` numbers matrices of the same shape with other codes.
template <class S>
const quant::quantized<S>& random_weights(std::int64_t rows, std::int64_t cols, int copy = 0) {
  static std::map<std::tuple<std::int64_t, std::int64_t, int>, std::unique_ptr<quant::quantized<S>>>
      cache;
  auto& slot = cache[{rows, cols, copy}];
  if (!slot) {
    slot = std::make_unique<quant::quantized<S>>();
    auto& q = *slot;
    q.rows = rows;
    q.cols = cols;
    const quant::matrix<S> shape{nullptr, nullptr, nullptr, rows, cols};
    q.codes.resize(static_cast<std::size_t>(rows * shape.blocks_per_row() * S::block_bytes));
    std::mt19937_64 engine(42 + copy);
    for (std::size_t i = 0; i < q.codes.size(); i += 8) {
      const std::uint64_t bits = engine();
      for (std::size_t j = 0; j < 8 && i + j < q.codes.size(); ++j) {
        q.codes[i + j] = static_cast<std::uint8_t>(bits >> (8 * j));
      }
    }
    q.scales.assign(static_cast<std::size_t>(shape.group_count() * S::scales_per_group), 0.01f);
    if constexpr (S::has_zero) q.zeros.assign(static_cast<std::size_t>(shape.group_count()), 8);
  }
  return *slot;
}

// Enough matrices of one shape that, taken in turn, each call reads its weights from memory: at
// least 64 MiB in all, twice a 32 MiB last-level cache (a decode step streams 550 MB of weights;
// one small matrix alone would be read from the cache).
template <class S>
std::vector<quant::matrix<S>> weights_from_memory(std::int64_t rows, std::int64_t cols,
                                                  int at_least = 1) {
  constexpr double cache_bytes = 64.0 * 1024 * 1024;
  const double bytes = double(random_weights<S>(rows, cols).bytes());
  const int copies = std::max(at_least, static_cast<int>(std::ceil(cache_bytes / bytes)));
  std::vector<quant::matrix<S>> matrices;
  for (int c = 0; c < copies; ++c) matrices.push_back(random_weights<S>(rows, cols, c).view());
  return matrices;
}

std::vector<float> random_input(std::int64_t count) {
  std::mt19937 engine(7);
  std::normal_distribution<float> normal;
  std::vector<float> x(static_cast<std::size_t>(count));
  for (float& value : x) value = normal(engine);
  return x;
}

// Rows 0, n/2 and n-1 of y against a float64 dot product of the dequantized weights. With
// int8_x, within what the int8 rounding of x allows: |W(n,k)| times half x's step per input.
template <class Row>
bool spot_check(std::int64_t rows, std::int64_t cols, std::int64_t batch, const float* x,
                const float* y, Row&& weight, bool int8_x = false) {
  for (const std::int64_t n : {std::int64_t{0}, rows / 2, rows - 1}) {
    for (std::int64_t b = 0; b < batch; b += std::max<std::int64_t>(1, batch - 1)) {
      double sum = 0.0;
      double magnitude = 0.0;
      double x_rounding = 0.0;
      for (std::int64_t k = 0; k < cols; ++k) {
        sum += double(weight(n, k)) * x[b * cols + k];
        magnitude += std::fabs(double(weight(n, k)) * x[b * cols + k]);
        if (int8_x) {
          double amax = 0.0;
          for (std::int64_t j = k / 32 * 32; j < k / 32 * 32 + 32; ++j) {
            amax = std::max(amax, std::fabs(double(x[b * cols + j])));
          }
          x_rounding += std::fabs(double(weight(n, k))) * amax / 254.0;
        }
      }
      if (std::fabs(y[b * rows + n] - sum) > 1e-5 * magnitude + 1.001 * x_rounding) return false;
    }
  }
  return true;
}

template <class S, class Activations>
void gemv_quantized(benchmark::State& state) {
  constexpr bool int8_x = std::is_same_v<Activations, infuse::gemm::int8_activations>;
  constexpr bool tables = std::is_same_v<Activations, infuse::gemm::lut_activations>;
  const std::int64_t rows = state.range(0);
  const std::int64_t cols = state.range(1);
  const std::int64_t batch = state.range(2);
  const auto matrices = weights_from_memory<S>(rows, cols);
  const auto x = random_input(batch * cols);
  std::vector<float> y(static_cast<std::size_t>(batch * rows));
  const infuse::exec::cpu exec;
  const host_view<const float, 2> xv(x.data(), {batch, cols});
  const host_view<float, 2> yv(y.data(), {batch, rows});
  // The int8 activations' or the lookup tables' workspace, allocated once, outside the timed loop.
  std::vector<std::byte> workspace(
      static_cast<std::size_t>(int8_x   ? infuse::gemm::int8_workspace_bytes(batch, cols)
                               : tables ? infuse::gemm::lut_workspace_bytes(batch, cols)
                                        : 0));
  Activations activations{};
  if constexpr (int8_x || tables) activations = {workspace.data(), std::int64_t(workspace.size())};
  std::size_t call = 0;
  for (auto _ : state) {
    infuse::gemv(exec, matrices[call++ % matrices.size()], xv, yv, {}, activations);
    benchmark::ClobberMemory();
  }
  const auto w = matrices[(call + matrices.size() - 1) % matrices.size()];  // the last one used
  if (!spot_check(
          rows, cols, batch, x.data(), y.data(),
          [&](std::int64_t n, std::int64_t k) { return w(n, k); }, int8_x)) {
    bench::report_error(state, "y differs from the float64 dot product");
  }
  bench::set_bytes(
      state, double(random_weights<S>(rows, cols).bytes()) + 4.0 * double(batch * (rows + cols)),
      bench::cpu::measured_bandwidth().read_gbps);
  bench::set_flops(state, 2.0 * double(rows * cols * batch));
}

// gated_gemv with silu: the gate and up weights (two matrices of rows x cols) in one pass.
template <class S, class Activations>
void gemv_gated(benchmark::State& state) {
  constexpr bool int8_x = std::is_same_v<Activations, infuse::gemm::int8_activations>;
  const std::int64_t rows = state.range(0);
  const std::int64_t cols = state.range(1);
  const std::int64_t batch = state.range(2);
  const auto matrices = weights_from_memory<S>(rows, cols, 2);  // gate and up in turn
  const auto x = random_input(batch * cols);
  std::vector<float> y(static_cast<std::size_t>(batch * rows));
  const infuse::exec::cpu exec;
  std::vector<std::byte> workspace(
      static_cast<std::size_t>(int8_x ? infuse::gemm::int8_workspace_bytes(batch, cols) : 0));
  Activations activations{};
  if constexpr (int8_x) activations = {workspace.data(), std::int64_t(workspace.size())};
  std::size_t call = 0;
  for (auto _ : state) {
    const auto& gate = matrices[call++ % matrices.size()];
    infuse::gated_gemv(exec, gate, matrices[call++ % matrices.size()],
                       host_view<const float, 2>(x.data(), {batch, cols}),
                       host_view<float, 2>(y.data(), {batch, rows}), infuse::gemm::act::silu, {},
                       activations);
    benchmark::ClobberMemory();
  }
  bench::set_bytes(
      state,
      2.0 * double(random_weights<S>(rows, cols).bytes()) + 4.0 * double(batch * (rows + cols)),
      bench::cpu::measured_bandwidth().read_gbps);
  bench::set_flops(state, 4.0 * double(rows * cols * batch));
}

#if defined(INFUSE_BENCH_HAVE_OPENBLAS)
void gemv_openblas(benchmark::State& state) {
  const std::int64_t rows = state.range(0);
  const std::int64_t cols = state.range(1);
  const std::int64_t batch = state.range(2);
  static std::map<std::pair<std::int64_t, std::int64_t>, std::vector<float>> cache;
  auto& w = cache[{rows, cols}];
  if (w.empty()) w = random_input(rows * cols);
  const auto x = random_input(batch * cols);
  std::vector<float> y(static_cast<std::size_t>(batch * rows));
  openblas_set_num_threads(infuse::exec::cpu{}.threads());
  for (auto _ : state) {
    if (batch == 1) {
      cblas_sgemv(CblasRowMajor, CblasNoTrans, int(rows), int(cols), 1.0f, w.data(), int(cols),
                  x.data(), 1, 0.0f, y.data(), 1);
    } else {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(batch), int(rows), int(cols), 1.0f,
                  x.data(), int(cols), w.data(), int(cols), 0.0f, y.data(), int(rows));
    }
    benchmark::ClobberMemory();
  }
  if (!spot_check(rows, cols, batch, x.data(), y.data(), [&](std::int64_t n, std::int64_t k) {
        return w[static_cast<std::size_t>(n * cols + k)];
      })) {
    bench::report_error(state, "y differs from the float64 dot product");
  }
  bench::set_bytes(state, 4.0 * double(rows * cols + batch * (rows + cols)),
                   bench::cpu::measured_bandwidth().read_gbps);
  bench::set_flops(state, 2.0 * double(rows * cols * batch));
}
#endif

// WINA sparse activation (gemm::wina_gemv) on W^T (k, n): the threshold keeps `percent` of the
// inputs of x; bytes counted are the rows of the inputs that pass. Compare with gemv.int4_g128
// of the same n x k in the same run: at 100% the two read the same bytes.
void gemv_wina(benchmark::State& state) {
  using S = quant::int_<4, 128>;
  const std::int64_t rows = state.range(0);
  const std::int64_t cols = state.range(1);
  const std::int64_t batch = state.range(2);
  const double share = double(state.range(3)) / 100.0;
  const auto& w_t = random_weights<S>(cols, rows);
  static std::map<std::pair<std::int64_t, std::int64_t>, std::vector<float>> norm_cache;
  auto& norms = norm_cache[{cols, rows}];
  if (norms.empty()) norms = infuse::gemm::wina_column_norms(w_t.view());
  const auto x = random_input(batch * cols);
  std::vector<float> scores(static_cast<std::size_t>(cols));
  for (std::int64_t i = 0; i < cols; ++i) {
    scores[static_cast<std::size_t>(i)] = std::fabs(x[static_cast<std::size_t>(i)]) * norms[i];
  }
  std::sort(scores.begin(), scores.end());
  const float threshold =
      share >= 1.0 ? 0.0f : scores[static_cast<std::size_t>((1.0 - share) * double(cols - 1))];
  std::vector<float> y(static_cast<std::size_t>(batch * rows));
  std::vector<std::byte> workspace(static_cast<std::size_t>(
      infuse::gemm::wina_workspace_bytes(batch, cols, rows, infuse::exec::cpu{}.threads())));
  const infuse::exec::cpu exec;
  for (auto _ : state) {
    infuse::gemm::wina_gemv(exec, w_t.view(), norms,
                            host_view<const float, 2>(x.data(), {batch, cols}),
                            host_view<float, 2>(y.data(), {batch, rows}), threshold, {}, workspace);
    benchmark::ClobberMemory();
  }
  bench::set_bytes(state, share * double(w_t.bytes()) + 4.0 * double(batch * (rows + cols)),
                   bench::cpu::measured_bandwidth().read_gbps);
  state.counters["inputs kept"] = share;
}

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n", "k", "batch"});
  for (const auto& [n, k] : {std::pair{4096, 4096}, std::pair{14336, 4096}, std::pair{4096, 14336},
                             std::pair{16384, 16384}}) {
    for (const int batch : {1, 4, 16}) b->Args({n, k, batch});
  }
  b->UseRealTime();
}

// The products of a TinyLlama-1.1B decode step (see the top of the file), batch 1.
void decode_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n", "k", "batch"});
  for (const auto& [n, k] : {std::pair{2560, 2048}, std::pair{2048, 2048}, std::pair{2048, 5632},
                             std::pair{32000, 2048}}) {
    b->Args({n, k, 1});
  }
  b->UseRealTime();
}

// gemv.SCHEME: float activations; gemv.SCHEME_xint8: x quantized to int8 per block of 32;
// gemv.SCHEME_lut: bcq weights by lookup tables of x (LUT-GEMM).
template <class S>
void register_scheme() {
  benchmark::RegisterBenchmark((std::string("gemv.") + S::name).c_str(),
                               gemv_quantized<S, infuse::gemm::float_activations>)
      ->Apply(shapes);
  if constexpr (infuse::quant::is_int<S>) {
    benchmark::RegisterBenchmark((std::string("gemv.") + S::name + "_xint8").c_str(),
                                 gemv_quantized<S, infuse::gemm::int8_activations>)
        ->Apply(shapes);
  }
  if constexpr (infuse::quant::is_bcq<S>) {
    benchmark::RegisterBenchmark((std::string("gemv.") + S::name + "_lut").c_str(),
                                 gemv_quantized<S, infuse::gemm::lut_activations>)
        ->Apply(shapes);
  }
}

const bool registered = [] {
  register_scheme<quant::int_<4, 128>>();
  using int4_g128 = quant::int_<4, 128>;
  benchmark::RegisterBenchmark("gemv.int4_g128_xint8",
                               gemv_quantized<int4_g128, infuse::gemm::int8_activations>)
      ->Apply(decode_shapes);
  benchmark::RegisterBenchmark("gemv.gated_int4_g128_xint8",
                               gemv_gated<int4_g128, infuse::gemm::int8_activations>)
      ->ArgNames({"n", "k", "batch"})
      ->Args({5632, 2048, 1})
      ->UseRealTime();
  register_scheme<quant::int_<4, 128, quant::zero_point>>();
  register_scheme<quant::int_<8, 128>>();
  register_scheme<quant::int_<3, 128>>();
  register_scheme<quant::int_<2, 128>>();
  register_scheme<quant::fp8<infuse::fp8_e4m3, quant::per_channel>>();
  register_scheme<quant::bcq<3, 128>>();
  register_scheme<quant::none<infuse::bfloat16>>();
  benchmark::RegisterBenchmark("gemv.wina_int4_g128", gemv_wina)
      ->ArgNames({"n", "k", "batch", "percent"})
      ->Args({4096, 14336, 1, 100})
      ->Args({4096, 14336, 1, 50})
      ->Args({4096, 14336, 1, 35})
      ->Args({4096, 14336, 4, 35})
      ->UseRealTime();
#if defined(INFUSE_BENCH_HAVE_OPENBLAS)
  benchmark::RegisterBenchmark("gemv.anchor_openblas", gemv_openblas)->Apply(shapes);
#endif
  return true;
}();

}  // namespace
