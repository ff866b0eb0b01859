// search::sample_from_head and greedy_from_head on CUDA: the same token, log-probability bits and
// status as the CUDA gemv followed by sample (any head), and as the exact definition that the CPU
// body matches token for token (tests/unit/search/fused_head.cpp), on heads whose logits every
// backend computes exactly: int8 codes with a power-of-two scale times small integer hidden
// states, so every partial sum is exact whatever the order of the additions. (The CPU body is
// built with Highway for the host's SIMD target, which nvcc's front end cannot compile, so the
// comparison with it goes through reference::exact_sample.)
#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "infuse/gemm/cuda/gemv.cuh"
#include "infuse/quant/quant.hpp"
#include "infuse/search/cuda/fused_head.cuh"
#include "infuse/search/cuda/sample.cuh"
#include "reference/sampling.hpp"
#include "support/cuda.cuh"
#include "support/errors.hpp"
#include "support/random.hpp"

namespace {

namespace s = infuse::search;
namespace quant = infuse::quant;
using infuse::device_buffer;
using infuse::device_memory;
using infuse::device_view;
using filters = s::filters<s::filter::temperature, s::filter::top_k, s::filter::top_p,
                           s::filter::min_p, s::filter::token_bitmask>;
using scheme = quant::int_<8, 32>;
constexpr std::int64_t hidden_size = 256;

template <class T>
device_buffer<T> upload(const std::vector<T>& host) {
  return device_buffer<T>(std::span<const T>(host));
}

// A head with codes u in [0, 256) and scale 1/16 (weights (u - 128) / 16), hidden states in
// [-3, 3]: each logit is a multiple of 1/16 below 2^17 in magnitude, exact in float.
struct exact_head {
  std::vector<std::uint8_t> codes;
  std::vector<float> scales, hidden;
  std::int64_t vocab, rows;

  exact_head(infuse::test::seeded_rng& rng, std::int64_t vocab_size, std::int64_t row_count)
      : vocab(vocab_size), rows(row_count) {
    const quant::matrix<scheme> shape{nullptr, nullptr, nullptr, vocab, hidden_size};
    codes.resize(std::size_t(vocab * shape.blocks_per_row() * scheme::block_bytes));
    for (auto& c : codes) c = std::uint8_t(rng.integer(0, 255));
    scales.assign(std::size_t(shape.group_count() * scheme::scales_per_group), 0.0625f);
    for (std::int64_t i = 0; i < rows * hidden_size; ++i) {
      hidden.push_back(float(rng.integer(-3, 3)));
    }
  }

  quant::matrix<scheme> host_matrix() const {
    return {codes.data(), scales.data(), nullptr, vocab, hidden_size};
  }
  // Row r's logits, exactly (float64 sums of exact products).
  std::vector<float> logits(std::int64_t r) const {
    const auto w = host_matrix();
    std::vector<float> out(static_cast<std::size_t>(vocab));
    for (std::int64_t t = 0; t < vocab; ++t) {
      double sum = 0.0;
      for (std::int64_t k = 0; k < hidden_size; ++k) {
        sum += double(w(t, k)) * hidden[std::size_t(r * hidden_size + k)];
      }
      out[std::size_t(t)] = float(sum);
    }
    return out;
  }
};

// The head, the requests (one per row) and the outputs on the device.
struct device_call {
  device_buffer<std::uint8_t> codes;
  device_buffer<float> scales, hidden, temperature, top_p, min_p, logits;
  device_buffer<std::int32_t> request, top_k, token;
  device_buffer<std::int64_t> position;
  device_buffer<std::uint64_t> seed;
  device_buffer<std::uint32_t> bitmask;
  device_buffer<float> logprob;
  device_buffer<s::row_status> status;
  device_buffer<std::byte> workspace;
  s::sample_params<device_memory, filters> params;
  std::int64_t vocab, rows;

  device_call(const exact_head& h, const std::vector<infuse::reference::sampling_case>& cases,
              const std::vector<std::uint64_t>& seeds, const std::vector<std::int64_t>& positions)
      : codes(upload(h.codes)),
        scales(upload(h.scales)),
        hidden(upload(h.hidden)),
        vocab(h.vocab),
        rows(h.rows) {
    std::vector<float> temps, ps, mins;
    std::vector<std::int32_t> ks, requests;
    std::vector<std::uint32_t> masks;
    for (std::int64_t r = 0; r < rows; ++r) {
      const auto& c = cases[std::size_t(r)];
      requests.push_back(std::int32_t(r));
      temps.push_back(float(c.temperature));
      ks.push_back(std::int32_t(c.top_k));
      ps.push_back(float(c.top_p));
      mins.push_back(float(c.min_p));
      masks.insert(masks.end(), c.bitmask.begin(), c.bitmask.end());
    }
    temperature = upload(temps);
    top_k = upload(ks);
    top_p = upload(ps);
    min_p = upload(mins);
    bitmask = upload(masks);
    request = upload(requests);
    position = upload(positions);
    seed = upload(seeds);
    token = device_buffer<std::int32_t>(rows);
    logprob = device_buffer<float>(rows);
    status = device_buffer<s::row_status>(rows);
    logits = device_buffer<float>(rows * vocab);
    const infuse::exec::cuda exec;
    workspace =
        device_buffer<std::byte>(std::max(s::head_workspace_bytes<filters>(exec, rows, vocab),
                                          s::sample_workspace_bytes<filters>(exec, rows, vocab)));
    params.seed = seed.as_view();
    params.temperature = temperature.as_view();
    params.top_k = top_k.as_view();
    params.top_p = top_p.as_view();
    params.min_p = min_p.as_view();
    params.bitmask = bitmask.as_view({rows, (vocab + 31) / 32});
  }

  quant::matrix<scheme, device_memory> w() const {
    return {codes.as_view().data(), scales.as_view().data(), nullptr, vocab, hidden_size};
  }
  device_view<const float, 2> x() const { return hidden.as_view({rows, hidden_size}); }
  s::sample_rows<device_memory> sample_rows() const {
    return {request.as_view(), position.as_view()};
  }
  s::sample_outputs<device_memory> outputs() const {
    return {token.as_view(), logprob.as_view(), status.as_view(), {}, {}};
  }

  struct result {
    std::vector<std::int32_t> token;
    std::vector<float> logprob;
    std::vector<s::row_status> status;
  };
  result fetch() const { return {token.to_host(), logprob.to_host(), status.to_host()}; }

  result fused() {
    const infuse::exec::cuda exec;
    s::sample_from_head(exec, w(), x(), sample_rows(), params, outputs(), workspace.as_view());
    exec.synchronize();
    infuse::test::check_launch();
    return fetch();
  }
  result unfused() {
    const infuse::exec::cuda exec;
    infuse::gemv(exec, w(), x(), logits.as_view({rows, vocab}));
    s::sample(exec, logits.as_view({rows, vocab}), sample_rows(), params, outputs(),
              workspace.as_view());
    exec.synchronize();
    infuse::test::check_launch();
    return fetch();
  }
};

infuse::reference::sampling_case random_case(infuse::test::seeded_rng& rng,
                                             std::vector<float> logits) {
  const auto vocab = std::int64_t(logits.size());
  infuse::reference::sampling_case c;
  c.logits = std::move(logits);
  c.temperature = rng.uniform() < 0.2 ? 0.0 : rng.uniform(0.3, 1.5);
  c.top_k = rng.uniform() < 0.7 ? rng.integer(1, 256) : rng.integer(-1, vocab + 5);
  c.top_p = rng.uniform() < 0.3 ? 1.0 : rng.uniform(0.05, 1.0);
  c.min_p = rng.uniform() < 0.3 ? 0.0 : rng.uniform(0.0, 0.3);
  for (std::int64_t w = 0; w < (vocab + 31) / 32; ++w)
    c.bitmask.push_back(rng.bits32() | rng.bits32());
  return c;
}

}  // namespace

TEST_CASE("sample_from_head on CUDA: gemv + sample's token, and the exact definition's") {
  INFUSE_RANDOM(rng);
  for (const std::int64_t vocab : {37, 1100, 128256}) {
    for (const std::int64_t rows : {1, 7, 9}) {
      INFO("vocab " << vocab << ", rows " << rows);
      const exact_head h(rng, vocab, rows);
      std::vector<infuse::reference::sampling_case> cases;
      std::vector<std::uint64_t> seeds;
      std::vector<std::int64_t> positions;
      for (std::int64_t r = 0; r < rows; ++r) {
        cases.push_back(random_case(rng, h.logits(r)));
        seeds.push_back((std::uint64_t{rng.bits32()} << 32) | rng.bits32());
        positions.push_back(rng.integer(0, 1 << 30));
      }
      device_call call(h, cases, seeds, positions);
      const auto fused = call.fused();
      const auto unfused = call.unfused();
      for (std::int64_t r = 0; r < rows; ++r) {
        const auto i = std::size_t(r);
        INFO("row " << r);
        const auto want = infuse::reference::exact_sample(
            cases[i], s::detail::sample_bits(seeds[i], std::uint64_t(positions[i])));
        CHECK(fused.status[i] == unfused.status[i]);
        CHECK(fused.token[i] == unfused.token[i]);
        CHECK(std::bit_cast<std::uint32_t>(fused.logprob[i]) ==
              std::bit_cast<std::uint32_t>(unfused.logprob[i]));
        CHECK(int(fused.status[i]) == want.status);
        CHECK(fused.token[i] == want.token);
      }
    }
  }
}

TEST_CASE("greedy_from_head on CUDA: the exact argmax; bad arguments throw") {
  INFUSE_RANDOM(rng);
  const exact_head h(rng, 5000, 3);
  device_call call(
      h,
      {random_case(rng, h.logits(0)), random_case(rng, h.logits(1)), random_case(rng, h.logits(2))},
      {1, 2, 3}, {4, 5, 6});
  const infuse::exec::cuda exec;
  s::greedy_from_head(exec, call.w(), call.x(), call.outputs(), call.workspace.as_view());
  exec.synchronize();
  infuse::test::check_launch();
  const auto got = call.fetch();
  for (std::int64_t r = 0; r < 3; ++r) {
    const auto logits = h.logits(r);
    std::int32_t best = 0;
    for (std::int32_t t = 1; t < 5000; ++t) {
      if (logits[std::size_t(t)] > logits[std::size_t(best)]) best = t;
    }
    CHECK(got.token[std::size_t(r)] == best);
    CHECK(got.status[std::size_t(r)] == s::row_status::ok);
  }
  using infuse::test::argument_of;
  auto null_codes = call.w();
  null_codes.codes = nullptr;
  CHECK(argument_of([&] {
          s::sample_from_head(exec, null_codes, call.x(), call.sample_rows(), call.params,
                              call.outputs(), call.workspace.as_view());
        }) == "w.codes");
  CHECK(argument_of([&] {
          s::sample_from_head(exec, call.w(), call.hidden.as_view({0, hidden_size}),
                              call.sample_rows(), call.params, call.outputs(),
                              call.workspace.as_view());
        }) == "hidden.extent(0)");
  CHECK(argument_of([&] {
          s::greedy_from_head(exec, call.w(), call.x(), call.outputs(),
                              device_view<std::byte, 1>(call.workspace.as_view().data(), {0}));
        }) == "workspace.extent(0)");
}
