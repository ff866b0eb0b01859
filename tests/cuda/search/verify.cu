// The CUDA verifiers and row statistics against the CPU ones: the same tokens, accepted counts and
// statuses for the same inputs and seeds (search/verify.hpp explains why they agree), and row
// statistics within float rounding.
#include <doctest/doctest.h>
#include <thrust/device_vector.h>

#include <cstdint>
#include <vector>

#include "infuse/search/cpu/row_stats.hpp"
#include "infuse/search/cpu/verify.hpp"
#include "infuse/search/cuda/row_stats.cuh"
#include "infuse/search/cuda/verify.cuh"
#include "reference/search.hpp"
#include "support/cuda.cuh"
#include "support/random.hpp"

namespace {

using infuse::device_memory;
using infuse::device_view;
using infuse::host_memory;
using infuse::host_view;
using infuse::search::acceptance;
using infuse::search::verify_status;
using infuse::test::raw;
using infuse::test::to_host;

struct chain_inputs {
  std::int64_t batch, n, vocab;
  std::vector<std::int32_t> drafts;
  std::vector<float> q, p;
  std::vector<std::uint64_t> seeds;
  std::vector<std::int64_t> positions;
};

chain_inputs random_chain(infuse::test::seeded_rng& rng, std::int64_t batch, std::int64_t n,
                          std::int64_t vocab) {
  chain_inputs in{batch, n, vocab, {}, {}, {}, {}, {}};
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t i = 0; i <= n; ++i) {
      const auto p_row = infuse::reference::random_probabilities(rng, vocab);
      in.p.insert(in.p.end(), p_row.begin(), p_row.end());
      if (i == n) continue;
      // Drafts close to the target, so that chains get long
      auto q_row = p_row;
      for (auto& value : q_row) value *= static_cast<float>(rng.uniform(0.5, 1.5));
      double total = 0.0;
      for (const float value : q_row) total += value;
      for (auto& value : q_row) value = static_cast<float>(value / total);
      in.q.insert(in.q.end(), q_row.begin(), q_row.end());
      in.drafts.push_back(infuse::reference::draw(std::span<const float>(q_row), rng.engine()));
    }
    in.seeds.push_back(rng.engine()());
    in.positions.push_back(rng.integer(0, 100000));
  }
  return in;
}

}  // namespace

TEST_CASE("CUDA verify_chain decides exactly as the CPU") {
  INFUSE_RANDOM(rng);
  for (const std::int64_t vocab : {7, 1000, 32000}) {
    const auto in = random_chain(rng, 64, 5, vocab);
    const std::int64_t b = in.batch, n = in.n;
    std::vector<std::int32_t> accepted(b), tokens(b * (n + 1));
    std::vector<verify_status> status(b);
    const infuse::search::verify_result<host_memory> host_out{
        host_view<std::int32_t, 1>(accepted.data(), {b}),
        host_view<std::int32_t, 2>(tokens.data(), {b, n + 1}),
        {},
        host_view<verify_status, 1>(status.data(), {b})};
    const infuse::search::chain_drafts<host_memory> host_in{
        host_view<const std::int32_t, 2>(in.drafts.data(), {b, n}),
        host_view<const float, 3>(in.q.data(), {b, n, vocab}),
        host_view<const float, 3>(in.p.data(), {b, n + 1, vocab}),
        host_view<const std::uint64_t, 1>(in.seeds.data(), {b}),
        host_view<const std::int64_t, 1>(in.positions.data(), {b})};

    thrust::device_vector<std::int32_t> d_drafts(in.drafts.begin(), in.drafts.end());
    thrust::device_vector<float> d_q(in.q.begin(), in.q.end()), d_p(in.p.begin(), in.p.end());
    thrust::device_vector<std::uint64_t> d_seeds(in.seeds.begin(), in.seeds.end());
    thrust::device_vector<std::int64_t> d_positions(in.positions.begin(), in.positions.end());
    thrust::device_vector<std::int32_t> d_accepted(b), d_tokens(b * (n + 1));
    thrust::device_vector<verify_status> d_status(b);
    const infuse::search::chain_drafts<device_memory> device_in{
        device_view<const std::int32_t, 2>(raw(d_drafts), {b, n}),
        device_view<const float, 3>(raw(d_q), {b, n, vocab}),
        device_view<const float, 3>(raw(d_p), {b, n + 1, vocab}),
        device_view<const std::uint64_t, 1>(raw(d_seeds), {b}),
        device_view<const std::int64_t, 1>(raw(d_positions), {b})};
    const infuse::search::verify_result<device_memory> device_out{
        device_view<std::int32_t, 1>(raw(d_accepted), {b}),
        device_view<std::int32_t, 2>(raw(d_tokens), {b, n + 1}),
        {},
        device_view<verify_status, 1>(raw(d_status), {b})};
    CAPTURE(vocab);
    for (const bool greedy : {false, true}) {
      CAPTURE(greedy);
      if (greedy) {
        infuse::search::verify_chain<acceptance::greedy>(infuse::exec::cpu{}, host_in, host_out);
        infuse::search::verify_chain<acceptance::greedy>(infuse::exec::cuda{}, device_in,
                                                         device_out);
      } else {
        infuse::search::verify_chain(infuse::exec::cpu{}, host_in, host_out);
        infuse::search::verify_chain(infuse::exec::cuda{}, device_in, device_out);
      }
      infuse::test::check_launch();
      CHECK(to_host(d_accepted) == accepted);
      CHECK(to_host(d_tokens) == tokens);
      CHECK(to_host(d_status) == status);
    }
  }
}

TEST_CASE("CUDA verify_tree decides exactly as the CPU, NaN rows flagged alike") {
  INFUSE_RANDOM(rng);
  const std::vector<std::int32_t> shape = {-1, 0, 0, 1, 1, 2, 3};
  const std::int64_t nodes = 7, batch = 32, vocab = 3000;
  std::vector<std::int32_t> parents, tokens;
  std::vector<float> q, p;
  std::vector<std::uint64_t> seeds;
  std::vector<std::int64_t> positions(batch, 5);
  for (std::int64_t b = 0; b < batch; ++b) {
    std::vector<std::vector<float>> q_rows;
    for (std::int64_t v = 0; v < nodes; ++v) {
      q_rows.push_back(infuse::reference::random_probabilities(rng, vocab, 1.0));
      const auto p_row = infuse::reference::random_probabilities(rng, vocab, 1.0);
      q.insert(q.end(), q_rows.back().begin(), q_rows.back().end());
      p.insert(p.end(), p_row.begin(), p_row.end());
    }
    for (std::int64_t v = 0; v < nodes; ++v) {
      parents.push_back(shape[v]);
      tokens.push_back(
          v == 0 ? -1
                 : infuse::reference::draw(std::span<const float>(q_rows[shape[v]]), rng.engine()));
    }
    seeds.push_back(rng.engine()());
  }
  // Request 3's root row at its first child's token, which every walk reads (a NaN elsewhere in
  // the row is read only when that child is rejected).
  p[3 * nodes * vocab + tokens[3 * nodes + 1]] = NAN;
  std::vector<std::int32_t> accepted(batch), emitted(batch * nodes), path(batch * nodes);
  std::vector<verify_status> status(batch);
  infuse::search::verify_tree(infuse::exec::cpu{},
                              {host_view<const std::int32_t, 2>(parents.data(), {batch, nodes}),
                               host_view<const std::int32_t, 2>(tokens.data(), {batch, nodes}),
                               host_view<const float, 3>(q.data(), {batch, nodes, vocab}),
                               host_view<const float, 3>(p.data(), {batch, nodes, vocab}),
                               host_view<const std::uint64_t, 1>(seeds.data(), {batch}),
                               host_view<const std::int64_t, 1>(positions.data(), {batch})},
                              {host_view<std::int32_t, 1>(accepted.data(), {batch}),
                               host_view<std::int32_t, 2>(emitted.data(), {batch, nodes}),
                               host_view<std::int32_t, 2>(path.data(), {batch, nodes}),
                               host_view<verify_status, 1>(status.data(), {batch})});
  thrust::device_vector<std::int32_t> d_parents(parents.begin(), parents.end());
  thrust::device_vector<std::int32_t> d_tokens(tokens.begin(), tokens.end());
  thrust::device_vector<float> d_q(q.begin(), q.end()), d_p(p.begin(), p.end());
  thrust::device_vector<std::uint64_t> d_seeds(seeds.begin(), seeds.end());
  thrust::device_vector<std::int64_t> d_positions(positions.begin(), positions.end());
  thrust::device_vector<std::int32_t> d_accepted(batch), d_emitted(batch * nodes);
  thrust::device_vector<std::int32_t> d_path(batch * nodes);
  thrust::device_vector<verify_status> d_status(batch);
  infuse::search::verify_tree(infuse::exec::cuda{},
                              {device_view<const std::int32_t, 2>(raw(d_parents), {batch, nodes}),
                               device_view<const std::int32_t, 2>(raw(d_tokens), {batch, nodes}),
                               device_view<const float, 3>(raw(d_q), {batch, nodes, vocab}),
                               device_view<const float, 3>(raw(d_p), {batch, nodes, vocab}),
                               device_view<const std::uint64_t, 1>(raw(d_seeds), {batch}),
                               device_view<const std::int64_t, 1>(raw(d_positions), {batch})},
                              {device_view<std::int32_t, 1>(raw(d_accepted), {batch}),
                               device_view<std::int32_t, 2>(raw(d_emitted), {batch, nodes}),
                               device_view<std::int32_t, 2>(raw(d_path), {batch, nodes}),
                               device_view<verify_status, 1>(raw(d_status), {batch})});
  infuse::test::check_launch();
  CHECK(status[3] == verify_status::invalid_probability);
  CHECK(to_host(d_accepted) == accepted);
  CHECK(to_host(d_emitted) == emitted);
  CHECK(to_host(d_path) == path);
  CHECK(to_host(d_status) == status);
}

TEST_CASE("CUDA row_stats matches the CPU") {
  INFUSE_RANDOM(rng);
  const std::int64_t rows = 9, vocab = 128256;
  auto logits = rng.normals<float>(rows * vocab, 3.0);
  logits[4 * vocab + 5] = NAN;
  std::vector<infuse::search::row_statistics> host(rows);
  infuse::search::row_stats(infuse::exec::cpu{},
                            host_view<const float, 2>(logits.data(), {rows, vocab}),
                            host_view<infuse::search::row_statistics, 1>(host.data(), {rows}));
  thrust::device_vector<float> d_logits(logits.begin(), logits.end());
  thrust::device_vector<infuse::search::row_statistics> d_stats(rows);
  infuse::search::row_stats(infuse::exec::cuda{},
                            device_view<const float, 2>(raw(d_logits), {rows, vocab}),
                            device_view<infuse::search::row_statistics, 1>(raw(d_stats), {rows}));
  infuse::test::check_launch();
  const auto device = to_host(d_stats);
  for (std::int64_t r = 0; r < rows; ++r) {
    CAPTURE(r);
    CHECK(device[r].flags == host[r].flags);
    CHECK(device[r].argmax == host[r].argmax);
    if (host[r].flags != infuse::search::row_flag::ok) continue;
    CHECK(device[r].entropy == doctest::Approx(host[r].entropy).epsilon(1e-4));
    CHECK(std::abs(device[r].log_sum_exp - host[r].log_sum_exp) < 1e-4);
    CHECK(device[r].margin == doctest::Approx(host[r].margin).epsilon(1e-6));
  }
}
