// The device runs the same online softmax and log-sum-exp merges as the host, through the same
// functions. Results are not bit-identical: the device's fast_exp2 is ex2.approx (relative error
// about 2^-22) where the host calls exp2f (under an ulp), and nvcc fuses multiply-adds that the
// host compiler may leave apart. So outputs agree to a few ulp per weight, plus the rounding of
// the accumulation, and both agree with the float64 reference.
#include <doctest/doctest.h>
#include <thrust/device_vector.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <span>
#include <vector>

#include "infuse/core/math.hpp"
#include "reference/compare.hpp"
#include "reference/softmax.hpp"
#include "support/cuda.cuh"
#include "support/random.hpp"
#include "support/tolerance.hpp"

namespace {

using infuse::log_base;
using infuse::reference::base_tag;
using infuse::reference::ln_base;
using infuse::test::check_launch;
using infuse::test::raw;
using infuse::test::to_host;
constexpr double tolerance = infuse::test::tolerance<float>::relative;

// Chunk [begin, end) of the keys through an online softmax: its normalised output (dim floats)
// and natural lse. One thread per chunk on the device, a loop on the host.
template <log_base Base>
INFUSE_HOST_DEVICE void run_chunk(const float* scores, const float* values, std::size_t dim,
                                  std::size_t begin, std::size_t end, float* output, float* lse) {
  infuse::softmax_state<Base> state;
  for (std::size_t d = 0; d < dim; ++d) output[d] = 0.0f;
  for (std::size_t i = begin; i < end; ++i) {
    const infuse::softmax_rescale factors = state.add(scores[i]);
    for (std::size_t d = 0; d < dim; ++d) {
      output[d] = output[d] * factors.previous + factors.incoming * values[i * dim + d];
    }
  }
  const float inverse_sum = state.inverse_sum();
  for (std::size_t d = 0; d < dim; ++d) output[d] *= inverse_sum;
  *lse = state.natural_lse();
}

template <log_base Base>
__global__ void run_chunks(const float* scores, const float* values, std::size_t dim,
                           const std::size_t* cuts, std::size_t chunks, float* outputs,
                           float* lses) {
  const std::size_t c = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x;
  if (c < chunks) {
    run_chunk<Base>(scores, values, dim, cuts[c], cuts[c + 1], outputs + c * dim, lses + c);
  }
}

// The split-KV reduction of the chunks' partials, and the same folded pairwise in place:
// lses_out[0] and lses_out[1] are their lses.
INFUSE_HOST_DEVICE void merge_chunks(const float* outputs, const float* lses, std::size_t chunks,
                                     std::size_t dim, float* all_at_once, float* folded,
                                     float* lses_out) {
  lses_out[0] = infuse::merge_partials(outputs, dim, lses, chunks, all_at_once, dim);
  float lse = lses[0];
  for (std::size_t d = 0; d < dim; ++d) folded[d] = outputs[d];
  for (std::size_t c = 1; c < chunks; ++c) {
    lse = infuse::merge_partials({folded, lse}, {outputs + c * dim, lses[c]}, folded, dim);
  }
  lses_out[1] = lse;
}

__global__ void merge_chunks_kernel(const float* outputs, const float* lses, std::size_t chunks,
                                    std::size_t dim, float* all_at_once, float* folded,
                                    float* lses_out) {
  merge_chunks(outputs, lses, chunks, dim, all_at_once, folded, lses_out);
}

__global__ void fast_exp2_kernel(const float* x, std::size_t count, float* power) {
  const std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x;
  if (i < count) power[i] = infuse::fast_exp2(x[i]);
}

__global__ void log_sum_exp_kernel(const float* scores, std::size_t count, float* lse) {
  *lse = infuse::log_sum_exp(scores, count);
}

// Device and host lses differ by the exponentials' few ulp, and by the float rounding of |lse|.
void check_same_lse(float device, float host) {
  if (std::isnan(host)) {
    CHECK(std::isnan(device));
  } else if (std::isinf(host)) {
    CHECK(device == host);
  } else {
    CHECK(std::abs(device - host) <= 8 * FLT_EPSILON * (std::abs(host) + 1.0f));
  }
}

// ||device - host|| / ||host||: host stands in for the exact value.
double device_host_error(const std::vector<float>& device, const std::vector<float>& host) {
  const std::vector<double> host_double(host.begin(), host.end());
  return infuse::reference::relative_error(device, host_double);
}

// Positive values: the relative error of a weighted average is then not inflated by cancellation.
constexpr double device_host_tolerance = 4e-6;

}  // namespace

TEST_CASE("device fast_exp2 is 2^x within 2^-21, flushing subnormal results to 0") {
  std::vector<float> x;
  for (float value = -140.0f; value < 128.0f; value += 0.00731f) x.push_back(value);
  for (const float special : {-INFINITY, INFINITY, 0.0f, -126.0f, 127.0f}) x.push_back(special);
  const thrust::device_vector<float> device_x(x.begin(), x.end());
  thrust::device_vector<float> device_power(x.size());
  fast_exp2_kernel<<<static_cast<unsigned>((x.size() + 255) / 256), 256>>>(raw(device_x), x.size(),
                                                                           raw(device_power));
  check_launch();
  const std::vector<float> power = to_host(device_power);
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double exact = std::exp2(static_cast<double>(x[i]));
    const bool flushed = exact < 0x1p-126 && power[i] == 0.0f;
    const bool close = std::abs(power[i] - exact) <= 0x1p-21 * exact;
    wrong += flushed || close || (std::isinf(exact) && power[i] == INFINITY) ? 0 : 1;
  }
  CHECK(wrong == 0);
}

TEST_CASE_TEMPLATE("device online softmax and merges agree with the host and float64", Base,
                   base_tag<log_base::e>, base_tag<log_base::two>) {
  constexpr log_base base = Base::value;
  INFUSE_RANDOM(random);
  for (int trial = 0; trial < 10; ++trial) {
    const auto count = static_cast<std::size_t>(random.integer(1, 2048));
    const std::size_t dims[] = {1, 64, 128};
    const std::size_t dim = dims[random.integer(0, 2)];
    const auto chunks = static_cast<std::size_t>(random.integer(1, 64));
    CAPTURE(count);
    CAPTURE(dim);
    CAPTURE(chunks);
    std::vector<float> scores(count);
    for (float& score : scores) {
      score = random.integer(0, 20) == 0 ? -INFINITY : static_cast<float>(random.normal(0.0, 4.0));
    }
    std::vector<float> values(count * dim);
    for (float& value : values) value = static_cast<float>(random.uniform(0.5, 1.5));
    std::vector<std::size_t> cuts{0, count};
    for (std::size_t c = 1; c < chunks; ++c) {
      cuts.push_back(static_cast<std::size_t>(random.integer(0, static_cast<std::int64_t>(count))));
    }
    std::sort(cuts.begin(), cuts.end());

    // Host.
    std::vector<float> outputs(chunks * dim);
    std::vector<float> lses(chunks);
    for (std::size_t c = 0; c < chunks; ++c) {
      run_chunk<base>(scores.data(), values.data(), dim, cuts[c], cuts[c + 1],
                      outputs.data() + c * dim, &lses[c]);
    }
    std::vector<float> all_at_once(dim), folded(dim), merged_lses(2);
    merge_chunks(outputs.data(), lses.data(), chunks, dim, all_at_once.data(), folded.data(),
                 merged_lses.data());

    // Device: the chunks, then the merges of the device's own partials and of the host's.
    const thrust::device_vector<float> device_scores(scores.begin(), scores.end());
    const thrust::device_vector<float> device_values(values.begin(), values.end());
    const thrust::device_vector<std::size_t> device_cuts(cuts.begin(), cuts.end());
    thrust::device_vector<float> device_outputs(outputs.size()), device_lses(chunks);
    run_chunks<base><<<static_cast<unsigned>((chunks + 31) / 32), 32>>>(
        raw(device_scores), raw(device_values), dim, raw(device_cuts), chunks, raw(device_outputs),
        raw(device_lses));
    check_launch();
    thrust::device_vector<float> device_all_at_once(dim), device_folded(dim), device_merged_lses(2);
    merge_chunks_kernel<<<1, 1>>>(raw(device_outputs), raw(device_lses), chunks, dim,
                                  raw(device_all_at_once), raw(device_folded),
                                  raw(device_merged_lses));
    check_launch();
    const thrust::device_vector<float> host_partials(outputs.begin(), outputs.end());
    const thrust::device_vector<float> host_partial_lses(lses.begin(), lses.end());
    thrust::device_vector<float> same_all_at_once(dim), same_folded(dim), same_merged_lses(2);
    merge_chunks_kernel<<<1, 1>>>(raw(host_partials), raw(host_partial_lses), chunks, dim,
                                  raw(same_all_at_once), raw(same_folded), raw(same_merged_lses));
    check_launch();

    {
      INFO("the chunks' partials");
      CHECK(device_host_error(to_host(device_outputs), outputs) <= device_host_tolerance);
      const std::vector<float> device_chunk_lses = to_host(device_lses);
      for (std::size_t c = 0; c < chunks; ++c) check_same_lse(device_chunk_lses[c], lses[c]);
    }
    {
      // Each weight is off by a few ulp, and the fold's roundings over up to 64 partials follow.
      INFO("merging the same partials: only the merge weights' exponentials differ");
      const std::vector<float> same_lses = to_host(same_merged_lses);
      for (const auto& [device, host] : {std::pair{to_host(same_all_at_once), all_at_once},
                                         std::pair{to_host(same_folded), folded}}) {
        for (std::size_t d = 0; d < dim; ++d) {
          CHECK(std::abs(device[d] - host[d]) <= 32 * FLT_EPSILON * std::abs(host[d]));
        }
      }
      check_same_lse(same_lses[0], merged_lses[0]);
      check_same_lse(same_lses[1], merged_lses[1]);
    }
    {
      INFO("the device end to end, against the host and float64");
      const std::span<const float> all_scores(scores);
      const std::vector<double> reference = infuse::reference::softmax_weighted_sum(
          all_scores, std::span<const float>(values), dim, ln_base<base>);
      const double reference_lse = infuse::reference::log_sum_exp(all_scores, ln_base<base>);
      const std::vector<float> device_lses_out = to_host(device_merged_lses);
      for (const auto& [device, host] : {std::pair{to_host(device_all_at_once), all_at_once},
                                         std::pair{to_host(device_folded), folded}}) {
        CHECK(device_host_error(device, host) <= device_host_tolerance);
        CHECK(infuse::reference::relative_error(device, reference) <= tolerance);
      }
      for (std::size_t k = 0; k < 2; ++k) {
        check_same_lse(device_lses_out[k], merged_lses[k]);
        if (reference_lse == -INFINITY) {
          CHECK(device_lses_out[k] == -INFINITY);
        } else {
          const double error = std::abs(device_lses_out[k] - reference_lse);
          CHECK(error <= tolerance * std::max(1.0, std::abs(reference_lse)));
        }
      }
    }
  }
}

TEST_CASE("device merges of empty and non-finite partials give the documented results") {
  constexpr std::size_t dim = 3;
  // Partials: empty (its output NaN, never read), finite, NaN lse, +inf lse.
  const std::vector<float> outputs = {NAN,  NAN,  NAN,  1.0f, 2.0f, 3.0f,
                                      4.0f, 5.0f, 6.0f, 7.0f, 8.0f, 9.0f};
  const thrust::device_vector<float> device_outputs(outputs.begin(), outputs.end());
  struct expectation {
    std::vector<float> lses;
    float lse;           // NaN: expect NaN
    float first_output;  // NaN: expect NaN
  };
  const expectation cases[] = {
      {{-INFINITY, -INFINITY}, -INFINITY, 0.0f},
      {{-INFINITY, 0.5f}, 0.5f, 1.0f},
      {{-INFINITY, 0.5f, NAN}, NAN, NAN},
      {{-INFINITY, 0.5f, 1.0f, INFINITY}, NAN, NAN},
  };
  for (const expectation& expected : cases) {
    CAPTURE(expected.lses.size());
    const thrust::device_vector<float> device_lses(expected.lses.begin(), expected.lses.end());
    thrust::device_vector<float> all_at_once(dim), folded(dim), lses_out(2);
    merge_chunks_kernel<<<1, 1>>>(raw(device_outputs), raw(device_lses), expected.lses.size(), dim,
                                  raw(all_at_once), raw(folded), raw(lses_out));
    check_launch();
    for (const float lse : to_host(lses_out)) check_same_lse(lse, expected.lse);
    for (const thrust::device_vector<float>* out : {&all_at_once, &folded}) {
      const float first = to_host(*out)[0];
      if (std::isnan(expected.first_output)) {
        CHECK(std::isnan(first));
      } else {
        CHECK(std::abs(first - expected.first_output) <= 4 * FLT_EPSILON * expected.first_output);
      }
    }
  }
}

TEST_CASE("device log_sum_exp agrees with the host") {
  INFUSE_RANDOM(random);
  const std::vector<float> scores = random.normals(3000, 30.0);
  const thrust::device_vector<float> device_scores(scores.begin(), scores.end());
  thrust::device_vector<float> device_lse(1);
  log_sum_exp_kernel<<<1, 1>>>(raw(device_scores), scores.size(), raw(device_lse));
  check_launch();
  check_same_lse(to_host(device_lse)[0], infuse::log_sum_exp(scores));
  log_sum_exp_kernel<<<1, 1>>>(raw(device_scores), 0, raw(device_lse));
  check_launch();
  CHECK(to_host(device_lse)[0] == -INFINITY);
}
