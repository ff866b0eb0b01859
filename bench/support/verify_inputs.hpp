// The inputs and the result check of the chain verification benchmarks (bench/cpu/verify.cpp,
// bench/cuda/verify.cu), on the host: both backends verify the same requests, and the CUDA one
// copies them to the device.
#pragma once

#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "harness.hpp"
#include "infuse/search/verify.hpp"

namespace infuse::bench {

// `batch` requests of `draft_tokens` draft tokens over `vocab` tokens, in the layouts of
// search::chain_drafts. p rows are e^N(0, 2) normalised, q = p times a uniform jitter in
// [0.7, 1.3], renormalised, and each draft is drawn from its q row: a request accepts a few
// tokens and then either rejects or draws the bonus token.
struct chain_inputs {
  std::vector<float> q;                 // (batch,draft_tokens,vocab)
  std::vector<float> p;                 // (batch,draft_tokens+1,vocab)
  std::vector<std::int32_t> drafts;     // (batch,draft_tokens)
  std::vector<std::uint64_t> seeds;     // (batch)
  std::vector<std::int64_t> positions;  // (batch)
};

inline chain_inputs make_chain_inputs(std::int64_t batch, std::int64_t draft_tokens,
                                      std::int64_t vocab) {
  chain_inputs data;
  std::mt19937_64 engine(1234);
  std::normal_distribution<double> normal(0.0, 2.0);
  std::uniform_real_distribution<double> jitter(0.7, 1.3);
  const auto normalise = [](std::vector<double>& row) {
    double total = 0.0;
    for (const double w : row) total += w;
    for (double& w : row) w /= total;
  };
  std::vector<double> p_row(vocab), q_row(vocab);
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t i = 0; i <= draft_tokens; ++i) {
      for (auto& w : p_row) w = std::exp(normal(engine));
      normalise(p_row);
      data.p.insert(data.p.end(), p_row.begin(), p_row.end());
      if (i == draft_tokens) continue;
      for (std::int64_t x = 0; x < vocab; ++x) q_row[x] = p_row[x] * jitter(engine);
      normalise(q_row);
      data.q.insert(data.q.end(), q_row.begin(), q_row.end());
      std::discrete_distribution<std::int32_t> draft(q_row.begin(), q_row.end());
      data.drafts.push_back(draft(engine));
    }
    data.seeds.push_back(engine());
    data.positions.push_back(100);
  }
  return data;
}

// Checks the outputs of verify_chain copied to the host: every request has status ok and a final
// token in [0, vocab). Reports the first failure through report_error and returns false.
inline bool check_chain_results(benchmark::State& state, std::span<const std::int32_t> accepted,
                                std::span<const std::int32_t> tokens,
                                std::span<const search::verify_status> status,
                                std::int64_t vocab) {
  const std::int64_t batch = std::ssize(accepted);
  const std::int64_t emitted = batch == 0 ? 0 : std::ssize(tokens) / batch;
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::int32_t last = tokens[b * emitted + accepted[b]];
    if (status[b] != search::verify_status::ok || last < 0 || last >= vocab) {
      report_error(state, "request " + std::to_string(b) + " has status " +
                              std::to_string(static_cast<int>(status[b])) + " and final token " +
                              std::to_string(last));
      return false;
    }
  }
  return true;
}

}  // namespace infuse::bench
