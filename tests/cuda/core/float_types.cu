// The storage float conversions in kernels: every bit pattern decoded and a few hundred thousand
// floats encoded (every value, tie and near-tie of the format, specials, random floats), by
// infuse's types and by CUDA's conversions (the hardware instructions), compared bit for bit with
// each other and with infuse's host results.
#include <doctest/doctest.h>
#include <thrust/device_vector.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "infuse/core/float_types.hpp"
#include "reference/float_formats.hpp"
#include "support/cuda.cuh"
#include "support/random.hpp"

namespace {

namespace reference = infuse::reference;
using infuse::saturation;
using infuse::test::check_launch;
using infuse::test::raw;
using infuse::test::to_host;

template <class T>
using cuda_conversion = reference::cuda_conversion<reference::format_of<T>::value>;

template <class T>
__global__ void encode_kernel(const float* inputs, std::size_t count, saturation mode,
                              std::uint32_t* infuse_bits, std::uint32_t* cuda_bits) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < count;
       i += std::size_t{gridDim.x} * blockDim.x) {
    infuse_bits[i] = T::from_float(inputs[i], mode).bits();
    cuda_bits[i] = cuda_conversion<T>::encode(inputs[i], mode == saturation::finite);
  }
}

template <class T>
__global__ void decode_kernel(std::uint32_t count, std::uint32_t* infuse_bits,
                              std::uint32_t* cuda_bits) {
  for (std::uint32_t bits = blockIdx.x * blockDim.x + threadIdx.x; bits < count;
       bits += gridDim.x * blockDim.x) {
    const auto storage = static_cast<infuse::storage_type_t<T>>(bits);
    infuse_bits[bits] = __float_as_uint(infuse::bits_to_float<T>(storage));
    cuda_bits[bits] = __float_as_uint(cuda_conversion<T>::decode(bits));
  }
}

unsigned grid_for(std::size_t count) {
  return static_cast<unsigned>(std::min<std::size_t>((count + 255) / 256, 4096));
}

std::string hex(std::uint32_t bits) {
  char text[16];
  std::snprintf(text, sizeof text, "0x%X", static_cast<unsigned>(bits));
  return text;
}

// Counts disagreements and keeps the first few for the failure message.
struct mismatches {
  int count = 0;
  std::string text;
  void add(const std::string& what) {
    if (count++ < 8) text += what + "\n";
  }
};

bool is_nan_bits(std::uint32_t bits) {
  return (bits & 0x7FFFFFFFu) > 0x7F800000u;
}

}  // namespace

TEST_CASE_TEMPLATE("device conversions equal CUDA's and the host's bit for bit", T, infuse::half,
                   infuse::bfloat16, infuse::fp8_e4m3, infuse::fp8_e5m2) {
  INFUSE_RANDOM(rng);
  const reference::encoder encoder(reference::spec_of(reference::format_of<T>::value));

  SUBCASE("decoding every bit pattern") {
    const std::uint32_t count = encoder.spec().pattern_count();
    thrust::device_vector<std::uint32_t> infuse_device(count);
    thrust::device_vector<std::uint32_t> cuda_device(count);
    decode_kernel<T><<<grid_for(count), 256>>>(count, raw(infuse_device), raw(cuda_device));
    check_launch();
    const std::vector<std::uint32_t> infuse_bits = to_host(infuse_device);
    const std::vector<std::uint32_t> cuda_bits = to_host(cuda_device);
    mismatches log;
    for (std::uint32_t bits = 0; bits < count; ++bits) {
      const std::uint32_t host = std::bit_cast<std::uint32_t>(
          infuse::bits_to_float<T>(static_cast<infuse::storage_type_t<T>>(bits)));
      // NaN payloads are not part of the contract on the device: any NaN for a NaN.
      const bool like_cuda = infuse_bits[bits] == cuda_bits[bits] ||
                             (is_nan_bits(infuse_bits[bits]) && is_nan_bits(cuda_bits[bits]));
      if (!like_cuda || infuse_bits[bits] != host) {
        log.add(hex(bits) + ": device " + hex(infuse_bits[bits]) + ", CUDA " +
                hex(cuda_bits[bits]) + ", host " + hex(host));
      }
    }
    CHECK_MESSAGE(log.count == 0, log.count << " mismatches:\n" << log.text);
  }

  SUBCASE("encoding values, ties, near-ties, specials and random floats") {
    const std::vector<float> probes = reference::probe_floats(encoder, rng.engine(), 1 << 20);
    const thrust::device_vector<float> inputs(probes.begin(), probes.end());
    thrust::device_vector<std::uint32_t> infuse_device(probes.size());
    thrust::device_vector<std::uint32_t> cuda_device(probes.size());
    for (const saturation mode : {saturation::finite, saturation::none}) {
      CAPTURE(static_cast<int>(mode));
      encode_kernel<T><<<grid_for(probes.size()), 256>>>(raw(inputs), probes.size(), mode,
                                                         raw(infuse_device), raw(cuda_device));
      check_launch();
      const std::vector<std::uint32_t> infuse_bits = to_host(infuse_device);
      const std::vector<std::uint32_t> cuda_bits = to_host(cuda_device);
      // CUDA converts to half and bfloat16 only without saturation.
      const bool cuda_has_mode = cuda_conversion<T>::saturates || mode == saturation::none;
      mismatches log;
      for (std::size_t i = 0; i < probes.size(); ++i) {
        const std::uint32_t host = infuse::float_to_bits<T>(probes[i], mode);
        if (infuse_bits[i] != host || (cuda_has_mode && infuse_bits[i] != cuda_bits[i])) {
          log.add(hex(std::bit_cast<std::uint32_t>(probes[i])) + ": device " + hex(infuse_bits[i]) +
                  ", CUDA " + hex(cuda_bits[i]) + ", host " + hex(host));
        }
      }
      CHECK_MESSAGE(log.count == 0, log.count << " mismatches:\n" << log.text);
    }
  }
}
