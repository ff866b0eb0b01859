// The CUDA resampling and beam step against the CPU ones: the same parents for the same keys, the
// same beams (scores within float rounding: the device's exp2 is ex2.approx).
#include <doctest/doctest.h>
#include <thrust/device_vector.h>

#include <cstdint>
#include <vector>

#include "infuse/search/cpu/beam.hpp"
#include "infuse/search/cpu/particles.hpp"
#include "infuse/search/cuda/beam.cuh"
#include "infuse/search/cuda/particles.cuh"
#include "support/cuda.cuh"
#include "support/random.hpp"

namespace {

using infuse::device_view;
using infuse::host_view;
using infuse::search::particle_status;
using infuse::test::raw;
using infuse::test::to_host;

}  // namespace

TEST_CASE("CUDA resample picks the same parents as the CPU") {
  INFUSE_RANDOM(rng);
  const std::int64_t groups = 300, n = 64;
  auto log_weights = rng.normals<float>(groups * n, 2.0);
  log_weights[5 * n + 1] = NAN;
  std::vector<std::uint64_t> seeds(groups);
  for (auto& seed : seeds) seed = rng.engine()();
  const std::vector<std::int64_t> positions(groups, 11);
  for (const auto method :
       {infuse::search::resampling::multinomial, infuse::search::resampling::systematic}) {
    std::vector<std::int32_t> parents(groups * n);
    std::vector<particle_status> status(groups);
    infuse::search::resample(infuse::exec::cpu{}, method,
                             host_view<const float, 2>(log_weights.data(), {groups, n}),
                             host_view<const std::uint64_t, 1>(seeds.data(), {groups}),
                             host_view<const std::int64_t, 1>(positions.data(), {groups}),
                             host_view<std::int32_t, 2>(parents.data(), {groups, n}),
                             host_view<particle_status, 1>(status.data(), {groups}));
    thrust::device_vector<float> d_weights(log_weights.begin(), log_weights.end());
    thrust::device_vector<std::uint64_t> d_seeds(seeds.begin(), seeds.end());
    thrust::device_vector<std::int64_t> d_positions(positions.begin(), positions.end());
    thrust::device_vector<std::int32_t> d_parents(groups * n);
    thrust::device_vector<particle_status> d_status(groups);
    infuse::search::resample(infuse::exec::cuda{}, method,
                             device_view<const float, 2>(raw(d_weights), {groups, n}),
                             device_view<const std::uint64_t, 1>(raw(d_seeds), {groups}),
                             device_view<const std::int64_t, 1>(raw(d_positions), {groups}),
                             device_view<std::int32_t, 2>(raw(d_parents), {groups, n}),
                             device_view<particle_status, 1>(raw(d_status), {groups}));
    infuse::test::check_launch();
    CHECK(status[5] == particle_status::invalid_weights);
    CHECK(to_host(d_status) == status);
    CHECK(to_host(d_parents) == parents);
  }
}

TEST_CASE("CUDA beam_step takes the same beams as the CPU") {
  INFUSE_RANDOM(rng);
  constexpr int width = 4;
  const std::int64_t requests = 8, vocab = 32000;
  const auto logits = rng.normals<float>(requests * width * vocab, 3.0);
  std::vector<float> scores(requests * width);
  for (auto& score : scores) score = static_cast<float>(rng.uniform(-20.0, -1.0));
  std::vector<float> pool_scores(requests * width, -3.0f);
  std::vector<std::int32_t> pool_size(requests, 2);
  std::vector<std::uint8_t> done(requests, 0);
  infuse::search::beam_params params;
  params.eos_token = 3;
  params.generated_length = 5;
  std::vector<std::int32_t> parent(requests * width), token(requests * width);
  std::vector<std::int32_t> finished(requests * width);
  std::vector<float> new_scores(requests * width);
  std::vector<infuse::search::beam_status> status(requests);

  thrust::device_vector<float> d_logits(logits.begin(), logits.end());
  thrust::device_vector<float> d_scores(scores.begin(), scores.end());
  thrust::device_vector<float> d_pool_scores(pool_scores.begin(), pool_scores.end());
  thrust::device_vector<std::int32_t> d_pool_size(pool_size.begin(), pool_size.end());
  thrust::device_vector<std::uint8_t> d_done(done.begin(), done.end());
  thrust::device_vector<std::int32_t> d_parent(requests * width), d_token(requests * width);
  thrust::device_vector<std::int32_t> d_finished(requests * width);
  thrust::device_vector<float> d_new_scores(requests * width);
  thrust::device_vector<infuse::search::beam_status> d_status(requests);

  infuse::search::beam_step<width>(
      infuse::exec::cpu{},
      {host_view<const float, 3>(logits.data(), {requests, width, vocab}),
       host_view<const float, 2>(scores.data(), {requests, width})},
      params,
      {host_view<float, 2>(pool_scores.data(), {requests, width}),
       host_view<std::int32_t, 1>(pool_size.data(), {requests}),
       host_view<std::uint8_t, 1>(done.data(), {requests})},
      {host_view<std::int32_t, 2>(parent.data(), {requests, width}),
       host_view<std::int32_t, 2>(token.data(), {requests, width}),
       host_view<float, 2>(new_scores.data(), {requests, width}),
       host_view<std::int32_t, 2>(finished.data(), {requests, width}),
       host_view<infuse::search::beam_status, 1>(status.data(), {requests})});
  infuse::search::beam_step<width>(
      infuse::exec::cuda{},
      {device_view<const float, 3>(raw(d_logits), {requests, width, vocab}),
       device_view<const float, 2>(raw(d_scores), {requests, width})},
      params,
      {device_view<float, 2>(raw(d_pool_scores), {requests, width}),
       device_view<std::int32_t, 1>(raw(d_pool_size), {requests}),
       device_view<std::uint8_t, 1>(raw(d_done), {requests})},
      {device_view<std::int32_t, 2>(raw(d_parent), {requests, width}),
       device_view<std::int32_t, 2>(raw(d_token), {requests, width}),
       device_view<float, 2>(raw(d_new_scores), {requests, width}),
       device_view<std::int32_t, 2>(raw(d_finished), {requests, width}),
       device_view<infuse::search::beam_status, 1>(raw(d_status), {requests})});
  infuse::test::check_launch();
  CHECK(to_host(d_parent) == parent);
  CHECK(to_host(d_token) == token);
  CHECK(to_host(d_finished) == finished);
  CHECK(to_host(d_pool_size) == pool_size);
  CHECK(to_host(d_done) == done);
  const auto device_scores = to_host(d_new_scores);
  for (std::size_t i = 0; i < new_scores.size(); ++i) {
    CHECK(device_scores[i] == doctest::Approx(new_scores[i]).epsilon(1e-5));
  }
}
