// What the CUDA gemm tests share: host vectors copied to the device, and a quantized matrix on
// the device with the view gemv takes.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "infuse/exec/cuda.cuh"
#include "infuse/quant/matrix.hpp"

namespace infuse::test {

template <class T>
device_buffer<T> to_device(const std::vector<T>& host) {
  return device_buffer<T>(std::span<const T>(host));
}

template <class S>
struct device_matrix {
  device_buffer<std::uint8_t> codes;
  device_buffer<float> scales;
  device_buffer<std::uint8_t> zeros;
  quant::matrix<S, device_memory> view;

  explicit device_matrix(const quant::quantized<S>& q)
      : codes(to_device(q.codes)),
        scales(to_device(q.scales)),
        zeros(to_device(q.zeros)),
        view{codes.data(), scales.size() > 0 ? scales.data() : nullptr,
             zeros.size() > 0 ? zeros.data() : nullptr, q.rows, q.cols} {}
};

}  // namespace infuse::test
