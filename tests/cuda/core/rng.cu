// The device draws the same random numbers as the host: Philox words and uniform floats bit for
// bit; normal and Gumbel draws within a few ulp, since CUDA's logf, sinf and cosf (1 to 2 ulp)
// are not the host's. cuRAND's Philox4_32_10 is an independent implementation of the same
// generator with the same word mapping, so its curand4() must give our bits too.
#include <curand_kernel.h>
#include <doctest/doctest.h>
#include <thrust/device_vector.h>

#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "infuse/core/rng.hpp"
#include "support/cuda.cuh"
#include "support/random.hpp"

namespace {

using infuse::rng::u32x2;
using infuse::rng::u32x4;
using infuse::test::check_launch;
using infuse::test::raw;
using infuse::test::to_host;

struct draw_request {
  std::uint64_t seed;
  std::uint64_t stream;
  std::uint64_t counter;
};

struct draw_result {
  u32x4 bits;
  u32x4 curand_bits;  // drawn on the device only
  float uniform[4];
  float uniform_positive[4];
  float uniform_open[4];
  float normal[4];
  float gumbel[4];
};

// What one request draws; the host and the device run this same function.
INFUSE_HOST_DEVICE draw_result draw(const draw_request& request) {
  draw_result result{};
  result.bits = infuse::rng::philox(request.seed, request.stream).bits(request.counter);
  for (int w = 0; w < 4; ++w) {
    const std::uint32_t word = result.bits.word[w];
    result.uniform[w] = infuse::rng::uniform(word);
    result.uniform_positive[w] = infuse::rng::uniform_positive(word);
    result.uniform_open[w] = infuse::rng::uniform_open(word);
    result.gumbel[w] = infuse::rng::gumbel(word);
  }
  for (int w = 0; w < 4; w += 2) {
    const infuse::rng::float_pair pair =
        infuse::rng::standard_normal_pair(result.bits.word[w], result.bits.word[w + 1]);
    result.normal[w] = pair.first;
    result.normal[w + 1] = pair.second;
  }
  return result;
}

// cuRAND's Philox after curand_init(seed, stream, 4 * counter); its device API runs on the device.
__device__ u32x4 curand_bits(const draw_request& request) {
  curandStatePhilox4_32_10_t state;
  curand_init(request.seed, request.stream, 4 * request.counter, &state);
  const uint4 bits = curand4(&state);
  return {{bits.x, bits.y, bits.z, bits.w}};
}

__global__ void draw_kernel(const draw_request* requests, std::size_t count, draw_result* results) {
  const std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x;
  if (i >= count) return;
  results[i] = draw(requests[i]);
  results[i].curand_bits = curand_bits(requests[i]);
}

__global__ void philox_kernel(const u32x4* counters, const u32x2* keys, std::size_t count,
                              u32x4* outputs) {
  const std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x;
  if (i < count) outputs[i] = infuse::rng::philox4x32_10(counters[i], keys[i]);
}

constexpr unsigned block = 128;
unsigned blocks_for(std::size_t count) {
  return static_cast<unsigned>((count + block - 1) / block);
}

// A few ulp, relative, with an absolute floor of as much near 1 (for results near 0).
bool within_ulps(float device, float host) {
  return std::abs(device - host) <= 8 * FLT_EPSILON * (std::abs(host) + 1.0f);
}

}  // namespace

TEST_CASE("device Philox4x32-10 gives the known answers and the host's words") {
  INFUSE_RANDOM(random);
  // The published vectors (Random123 kat_vectors), then random counters and keys.
  std::vector<u32x4> counters = {{{0, 0, 0, 0}},
                                 {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}},
                                 {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}}};
  std::vector<u32x2> keys = {{{0, 0}}, {{0xffffffff, 0xffffffff}}, {{0xa4093822, 0x299f31d0}}};
  const std::vector<u32x4> known = {{{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
                                    {{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
                                    {{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}}};
  for (int i = 0; i < 10000; ++i) {
    counters.push_back({{random.bits32(), random.bits32(), random.bits32(), random.bits32()}});
    keys.push_back({{random.bits32(), random.bits32()}});
  }
  const thrust::device_vector<u32x4> device_counters(counters.begin(), counters.end());
  const thrust::device_vector<u32x2> device_keys(keys.begin(), keys.end());
  thrust::device_vector<u32x4> device_outputs(counters.size());
  philox_kernel<<<blocks_for(counters.size()), block>>>(raw(device_counters), raw(device_keys),
                                                        counters.size(), raw(device_outputs));
  check_launch();
  const std::vector<u32x4> outputs = to_host(device_outputs);

  for (std::size_t i = 0; i < known.size(); ++i) CHECK(outputs[i] == known[i]);
  std::size_t mismatches = 0;
  for (std::size_t i = 0; i < counters.size(); ++i) {
    mismatches += outputs[i] == infuse::rng::philox4x32_10(counters[i], keys[i]) ? 0 : 1;
  }
  CHECK(mismatches == 0);
}

TEST_CASE("device draws equal the host's, and cuRAND's Philox gives the same words") {
  INFUSE_RANDOM(random);
  std::vector<draw_request> requests;
  const std::uint64_t seed = random.engine()();
  for (std::uint64_t stream = 0; stream < 64; ++stream) {
    for (std::uint64_t counter = 0; counter < 64; ++counter) {
      requests.push_back({seed, stream, counter});
    }
  }
  for (int i = 0; i < 4096; ++i) {
    // cuRAND takes the offset 4 * counter as a 64-bit number: counters below 2^62.
    requests.push_back({random.engine()(), random.engine()(), random.engine()() >> 2});
  }
  const thrust::device_vector<draw_request> device_requests(requests.begin(), requests.end());
  thrust::device_vector<draw_result> device_results(requests.size());
  draw_kernel<<<blocks_for(requests.size()), block>>>(raw(device_requests), requests.size(),
                                                      raw(device_results));
  check_launch();
  const std::vector<draw_result> results = to_host(device_results);

  std::size_t bits = 0, curand = 0, uniforms = 0, normals = 0, gumbels = 0;
  for (std::size_t i = 0; i < requests.size(); ++i) {
    const draw_result& device = results[i];
    const draw_result host = draw(requests[i]);
    bits += device.bits == host.bits ? 0 : 1;
    curand += device.curand_bits == host.bits ? 0 : 1;
    for (int w = 0; w < 4; ++w) {
      const bool exact = device.uniform[w] == host.uniform[w] &&
                         device.uniform_positive[w] == host.uniform_positive[w] &&
                         device.uniform_open[w] == host.uniform_open[w];
      uniforms += exact ? 0 : 1;
      normals += within_ulps(device.normal[w], host.normal[w]) ? 0 : 1;
      gumbels += within_ulps(device.gumbel[w], host.gumbel[w]) ? 0 : 1;
    }
  }
  CHECK(bits == 0);
  CHECK(curand == 0);
  CHECK(uniforms == 0);
  CHECK(normals == 0);
  CHECK(gumbels == 0);
}
