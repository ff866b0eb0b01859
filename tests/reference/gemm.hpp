// Float64 references of the GEMV/GEMM kernels, from the dequantized weights (quant::matrix's
// operator(), which is the scheme's own dequantize).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "infuse/quant/matrix.hpp"

namespace infuse::reference {

// y (batch,n) = x (batch,k) W^T, W (n,k); x row-major with row stride k. With `magnitude`,
// sum |W(n,k) x(b,k)| instead: the scale of each dot product's rounding error.
template <class S>
std::vector<double> gemv(const quant::matrix<S, host_memory>& w, const std::vector<float>& x,
                         std::int64_t batch, bool magnitude = false) {
  std::vector<double> weights(static_cast<std::size_t>(w.rows * w.cols));
  for (std::int64_t n = 0; n < w.rows; ++n) {
    for (std::int64_t k = 0; k < w.cols; ++k) {
      weights[static_cast<std::size_t>(n * w.cols + k)] = w(n, k);
    }
  }
  std::vector<double> y(static_cast<std::size_t>(batch * w.rows));
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t n = 0; n < w.rows; ++n) {
      double sum = 0.0;
      for (std::int64_t k = 0; k < w.cols; ++k) {
        const double term = weights[static_cast<std::size_t>(n * w.cols + k)] *
                            x[static_cast<std::size_t>(b * w.cols + k)];
        sum += magnitude ? std::fabs(term) : term;
      }
      y[static_cast<std::size_t>(b * w.rows + n)] = sum;
    }
  }
  return y;
}

template <class S>
std::vector<double> gemv_magnitude(const quant::matrix<S, host_memory>& w,
                                   const std::vector<float>& x, std::int64_t batch) {
  return gemv(w, x, batch, true);
}

// The scale of a bcq LUT product's rounding for output (b, n): the tables hold sums of +/-x, and
// each group adds offset * sum x and alpha_i * (its plane's sum), so the error is relative to
// sum_k (|offset| + sum_i |alpha_i|) |x_k|, not to sum |w x| (the weights' sums cancel).
template <class S>
std::vector<double> lut_magnitude(const quant::matrix<S, host_memory>& w,
                                  const std::vector<float>& x, std::int64_t batch) {
  std::vector<double> out(static_cast<std::size_t>(batch * w.rows));
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t n = 0; n < w.rows; ++n) {
      double sum = 0.0;
      for (std::int64_t k = 0; k < w.cols; ++k) {
        const auto p = w.group_params(n, k / w.group_size());
        double scale = std::fabs(p.offset);
        for (int i = 0; i < S::bits; ++i) scale += std::fabs(p.alpha[i]);
        sum += scale * std::fabs(x[static_cast<std::size_t>(b * w.cols + k)]);
      }
      out[static_cast<std::size_t>(b * w.rows + n)] = sum;
    }
  }
  return out;
}

}  // namespace infuse::reference
