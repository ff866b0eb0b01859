#include "infuse/search/cpu/verify.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "reference/search.hpp"
#include "support/random.hpp"

namespace {

using infuse::host_memory;
using infuse::host_view;
using infuse::search::acceptance;
using infuse::search::verify_status;
using row = std::vector<float>;

constexpr double significance = 1e-6;

// The outputs of a verification of `batch` requests with rows of `emitted` tokens.
struct outputs {
  std::vector<std::int32_t> accepted;
  std::vector<std::int32_t> tokens;
  std::vector<std::int32_t> path;
  std::vector<verify_status> status;
  std::int64_t emitted;

  outputs(std::int64_t batch, std::int64_t emitted_tokens, bool with_path)
      : accepted(batch, 99),
        tokens(batch * emitted_tokens, 99),
        path(with_path ? batch * emitted_tokens : 0, 99),
        status(batch, verify_status::ok),
        emitted(emitted_tokens) {}

  infuse::search::verify_result<host_memory> views() {
    const auto batch = static_cast<std::int64_t>(accepted.size());
    return {host_view<std::int32_t, 1>(accepted.data(), {batch}),
            host_view<std::int32_t, 2>(tokens.data(), {batch, emitted}),
            host_view<std::int32_t, 2>(path.data(), {path.empty() ? 0 : batch, emitted}),
            host_view<verify_status, 1>(status.data(), {batch})};
  }
  std::int32_t token(std::int64_t request, std::int64_t k) const {
    return tokens[request * emitted + k];
  }
};

// `rows` stacked into one array (rows, vocab), shared by every request through a batch stride 0.
std::vector<float> stack(const std::vector<row>& rows) {
  std::vector<float> flat;
  for (const auto& r : rows) flat.insert(flat.end(), r.begin(), r.end());
  return flat;
}

double overlap(const row& p, const row& q) {
  double sum = 0.0;
  for (std::size_t x = 0; x < p.size(); ++x) sum += std::min(p[x], q[x]);
  return sum;
}

void check_distribution(const std::vector<std::int64_t>& counts, const row& expected,
                        const char* what) {
  const std::vector<double> probabilities(expected.begin(), expected.end());
  const auto test = infuse::reference::chi_square(counts, probabilities);
  INFO(std::string(what) << ": chi-square " << test.statistic << " with " << test.degrees_of_freedom
                         << " degrees of freedom, p = " << test.p_value);
  CHECK(test.p_value > significance);
}

// A chain of n drafts over `vocab` tokens whose rows are the same for every request.
struct chain_case {
  std::int64_t trials, n, vocab;
  std::vector<row> q, p;  // n and n + 1 rows
  std::vector<float> q_flat, p_flat;
  std::vector<std::int32_t> drafts;
  std::vector<std::uint64_t> seeds;
  std::vector<std::int64_t> positions;

  // Random rows.
  chain_case(infuse::test::seeded_rng& rng, std::int64_t trials, std::int64_t n, std::int64_t vocab)
      : chain_case(rng, trials, random_rows(rng, n, vocab), random_rows(rng, n + 1, vocab)) {}

  // Given rows: n draft rows and n + 1 target rows.
  chain_case(infuse::test::seeded_rng& rng, std::int64_t trials, std::vector<row> draft_rows,
             std::vector<row> target_rows)
      : trials(trials),
        n(static_cast<std::int64_t>(draft_rows.size())),
        vocab(static_cast<std::int64_t>(target_rows[0].size())),
        q(std::move(draft_rows)),
        p(std::move(target_rows)) {
    q_flat = stack(q);
    p_flat = stack(p);
    drafts.resize(trials * n);
    for (std::int64_t t = 0; t < trials; ++t) {
      for (std::int64_t i = 0; i < n; ++i) {
        drafts[t * n + i] = infuse::reference::draw(std::span<const float>(q[i]), rng.engine());
      }
    }
    const std::uint64_t base = rng.engine()();
    for (std::int64_t t = 0; t < trials; ++t) seeds.push_back(base + t);
    positions.assign(trials, 1000);
  }

  static std::vector<row> random_rows(infuse::test::seeded_rng& rng, std::int64_t count,
                                      std::int64_t vocab) {
    std::vector<row> rows;
    for (std::int64_t i = 0; i < count; ++i) {
      rows.push_back(infuse::reference::random_probabilities(rng, vocab));
    }
    return rows;
  }

  infuse::search::chain_drafts<host_memory> views() const {
    return {host_view<const std::int32_t, 2>(drafts.data(), {trials, n}),
            host_view<const float, 3>(q_flat.data(), {trials, n, vocab}, {0, vocab, 1}),
            host_view<const float, 3>(p_flat.data(), {trials, n + 1, vocab}, {0, vocab, 1}),
            host_view<const std::uint64_t, 1>(seeds.data(), {trials}),
            host_view<const std::int64_t, 1>(positions.data(), {trials})};
  }
};

// Counts of the k-th emitted token among the requests that emitted one.
std::vector<std::int64_t> emitted_counts(const outputs& out, std::int64_t k, std::int64_t vocab) {
  std::vector<std::int64_t> counts(vocab, 0);
  for (std::size_t t = 0; t < out.accepted.size(); ++t) {
    if (out.accepted[t] >= k) ++counts[out.token(static_cast<std::int64_t>(t), k)];
  }
  return counts;
}

}  // namespace

TEST_CASE("verify_chain is lossless: emitted tokens follow p, acceptance is sum min(p, q)") {
  INFUSE_RANDOM(rng);
  const chain_case chain(rng, 1'000'000, 3, 6);
  outputs out(chain.trials, chain.n + 1, false);
  infuse::search::verify_chain(infuse::exec::cpu{}, chain.views(), out.views());
  REQUIRE(std::count(out.status.begin(), out.status.end(), verify_status::ok) ==
          std::ssize(out.status));

  for (std::int64_t k = 0; k <= chain.n; ++k) {
    CAPTURE(k);
    check_distribution(emitted_counts(out, k, chain.vocab), chain.p[k], "emitted token k");
  }
  // Acceptance of d_k given d_1..d_{k-1} accepted: a binomial proportion with mean alpha_k.
  for (std::int64_t k = 0; k < chain.n; ++k) {
    std::int64_t reached = 0;
    std::int64_t accepted = 0;
    for (const auto count : out.accepted) {
      reached += count >= k ? 1 : 0;
      accepted += count > k ? 1 : 0;
    }
    const double alpha = overlap(chain.p[k], chain.q[k]);
    const double rate = static_cast<double>(accepted) / static_cast<double>(reached);
    const double sigma = std::sqrt(alpha * (1.0 - alpha) / static_cast<double>(reached));
    CAPTURE(k);
    CAPTURE(alpha);
    CHECK(std::abs(rate - alpha) < 5.0 * sigma + 1e-12);
  }
}

TEST_CASE("the lossless test rejects a verifier that resamples from p instead of the residual") {
  INFUSE_RANDOM(rng);
  // Rows far apart, so that the bug's bias, min(p, q) - sum(min(p, q)) p, is large for every seed.
  const chain_case chain(
      rng, 1'000'000, {{0.05f, 0.05f, 0.1f, 0.2f, 0.3f, 0.3f}},
      {{0.3f, 0.3f, 0.2f, 0.1f, 0.05f, 0.05f}, {0.5f, 0.1f, 0.1f, 0.1f, 0.1f, 0.1f}});
  outputs out(chain.trials, 2, false);
  infuse::search::verify_chain(infuse::exec::cpu{}, chain.views(), out.views());
  // The planted bug: a rejected request draws its token from p_1 (same keys) instead of the
  // residual max(0, p_1 - q_1).
  const infuse::search::detail::sequential_row_ops ops{chain.vocab};
  std::vector<std::int64_t> counts(chain.vocab, 0);
  for (std::int64_t t = 0; t < chain.trials; ++t) {
    std::int32_t token = out.token(t, 0);
    if (out.accepted[t] == 0) {
      const float v =
          infuse::search::random_uniform({chain.seeds[t], 1000, infuse::search::salt::residual});
      token = ops.residual_pick(chain.p[0].data(), nullptr, 0.0,
                                v * ops.residual_sum(chain.p[0].data(), nullptr, 0.0));
    }
    ++counts[token];
  }
  const std::vector<double> expected(chain.p[0].begin(), chain.p[0].end());
  const auto test = infuse::reference::chi_square(counts, expected);
  INFO("planted bug: chi-square " << test.statistic << ", p = " << test.p_value);
  CHECK(test.p_value < significance);
}

TEST_CASE("verify_chain greedy: accept while the draft is the argmax") {
  // vocab 4, 3 drafts; argmax of p rows: 2, 1, 3, 0 (row 1 has a tie 1/3: the lower id wins)
  const std::vector<float> p = {0.1f, 0.2f, 0.6f, 0.1f, 0.1f, 0.4f, 0.1f, 0.4f,
                                0.0f, 0.1f, 0.2f, 0.7f, 0.9f, 0.1f, 0.0f, 0.0f};
  const std::vector<std::int32_t> drafts = {2, 1, 3, 2, 3, 3, 0, 1, 3};
  const std::vector<std::uint64_t> seeds = {1, 2, 3};
  const std::vector<std::int64_t> positions = {0, 0, 0};
  const infuse::search::chain_drafts<host_memory> in{
      host_view<const std::int32_t, 2>(drafts.data(), {3, 3}),
      {},
      host_view<const float, 3>(p.data(), {3, 4, 4}, {0, 4, 1}),
      host_view<const std::uint64_t, 1>(seeds.data(), {3}),
      host_view<const std::int64_t, 1>(positions.data(), {3})};
  outputs out(3, 4, false);
  infuse::search::verify_chain<acceptance::greedy>(infuse::exec::cpu{}, in, out.views());
  CHECK(out.accepted == std::vector<std::int32_t>{3, 1, 0});
  CHECK(out.tokens == std::vector<std::int32_t>{2, 1, 3, 0, 2, 1, -1, -1, 2, -1, -1, -1});
}

TEST_CASE("verify_chain flags NaN rows and bad tokens per request, and checks shapes first") {
  std::vector<float> q = {0.5f, 0.5f, 0.5f, 0.5f};
  std::vector<float> p = {0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f};
  const std::vector<std::int32_t> drafts = {0, 7};
  const std::vector<std::uint64_t> seeds = {1, 2};
  const std::vector<std::int64_t> positions = {0, 0};
  p[0] = NAN;  // request 0 reads p_1(0)
  const infuse::search::chain_drafts<host_memory> in{
      host_view<const std::int32_t, 2>(drafts.data(), {2, 1}),
      host_view<const float, 3>(q.data(), {2, 1, 2}),
      host_view<const float, 3>(p.data(), {2, 2, 2}),
      host_view<const std::uint64_t, 1>(seeds.data(), {2}),
      host_view<const std::int64_t, 1>(positions.data(), {2})};
  outputs out(2, 2, false);
  infuse::search::verify_chain(infuse::exec::cpu{}, in, out.views());
  CHECK(out.status[0] == verify_status::invalid_probability);
  CHECK(out.status[1] == verify_status::invalid_token);
  CHECK(out.accepted == std::vector<std::int32_t>{0, 0});
  CHECK(out.tokens == std::vector<std::int32_t>{-1, -1, -1, -1});

  outputs untouched(2, 3, false);
  CHECK_THROWS_WITH_AS(infuse::search::verify_chain(infuse::exec::cpu{}, in, untouched.views()),
                       doctest::Contains("out.tokens.extent(1) is 3, expected 2"), infuse::error);
  auto wrong_q = in;
  wrong_q.draft_probs = host_view<const float, 3>(q.data(), {2, 1, 1});
  CHECK_THROWS_WITH_AS(infuse::search::verify_chain(infuse::exec::cpu{}, wrong_q, out.views()),
                       doctest::Contains("in.draft_probs.extent(2)"), infuse::error);
  CHECK(untouched.accepted == std::vector<std::int32_t>{99, 99});
}

namespace {

// Root 0 with children 1, 2, 3 (drawn from q_0); node 1 with children 4, 5 (from q_1); node 2 with
// child 6 (from q_2).
const std::vector<std::int32_t> tree_parents = {-1, 0, 0, 0, 1, 1, 2};
constexpr std::int64_t tree_nodes = 7;

struct tree_case {
  std::int64_t trials, vocab;
  std::vector<row> q, p;
  std::vector<float> q_flat, p_flat;
  std::vector<std::int32_t> parents, tokens;
  std::vector<std::uint64_t> seeds;
  std::vector<std::int64_t> positions;

  tree_case(infuse::test::seeded_rng& rng, std::int64_t trials, std::int64_t vocab)
      : trials(trials), vocab(vocab) {
    for (std::int64_t v = 0; v < tree_nodes; ++v) {
      q.push_back(infuse::reference::random_probabilities(rng, vocab));
      p.push_back(infuse::reference::random_probabilities(rng, vocab));
    }
    q_flat = stack(q);
    p_flat = stack(p);
    tokens.resize(trials * tree_nodes, -1);
    for (std::int64_t t = 0; t < trials; ++t) {
      parents.insert(parents.end(), tree_parents.begin(), tree_parents.end());
      for (std::int64_t v = 1; v < tree_nodes; ++v) {
        tokens[t * tree_nodes + v] =
            infuse::reference::draw(std::span<const float>(q[tree_parents[v]]), rng.engine());
      }
    }
    const std::uint64_t base = rng.engine()();
    for (std::int64_t t = 0; t < trials; ++t) seeds.push_back(base + t);
    positions.assign(trials, 7);
  }

  infuse::search::tree_drafts<host_memory> views() const {
    return {host_view<const std::int32_t, 2>(parents.data(), {trials, tree_nodes}),
            host_view<const std::int32_t, 2>(tokens.data(), {trials, tree_nodes}),
            host_view<const float, 3>(q_flat.data(), {trials, tree_nodes, vocab}, {0, vocab, 1}),
            host_view<const float, 3>(p_flat.data(), {trials, tree_nodes, vocab}, {0, vocab, 1}),
            host_view<const std::uint64_t, 1>(seeds.data(), {trials}),
            host_view<const std::int64_t, 1>(positions.data(), {trials})};
  }
};

}  // namespace

TEST_CASE("verify_tree is lossless: the first token follows p_0, the next p of the accepted node") {
  INFUSE_RANDOM(rng);
  const tree_case tree(rng, 1'000'000, 5);
  outputs out(tree.trials, tree_nodes, true);
  infuse::search::verify_tree(infuse::exec::cpu{}, tree.views(), out.views());
  REQUIRE(std::count(out.status.begin(), out.status.end(), verify_status::ok) ==
          std::ssize(out.status));
  check_distribution(emitted_counts(out, 0, tree.vocab), tree.p[0], "first token");
  for (const std::int32_t node : {1, 2}) {
    std::vector<std::int64_t> counts(tree.vocab, 0);
    for (std::int64_t t = 0; t < tree.trials; ++t) {
      if (out.accepted[t] >= 1 && out.path[t * tree_nodes] == node) ++counts[out.token(t, 1)];
    }
    CAPTURE(node);
    check_distribution(counts, tree.p[node], "second token after the node");
  }
  // Path consistency: emitted tokens along the path are the nodes' tokens, parents chain up.
  for (std::int64_t t = 0; t < 1000; ++t) {
    std::int32_t parent = 0;
    for (std::int32_t k = 0; k < out.accepted[t]; ++k) {
      const std::int32_t node = out.path[t * tree_nodes + k];
      REQUIRE(node > 0);
      CHECK(tree_parents[node] == parent);
      CHECK(out.token(t, k) == tree.tokens[t * tree_nodes + node]);
      parent = node;
    }
  }
}

TEST_CASE("verify_tree on a chain-shaped tree decides exactly as verify_chain") {
  INFUSE_RANDOM(rng);
  const chain_case chain(rng, 2000, 4, 50);
  std::vector<std::int32_t> parents, tokens;
  for (std::int64_t t = 0; t < chain.trials; ++t) {
    for (std::int64_t v = 0; v <= chain.n; ++v) {
      parents.push_back(static_cast<std::int32_t>(v) - 1);
      tokens.push_back(v == 0 ? -1 : chain.drafts[t * chain.n + v - 1]);
    }
  }
  // The chain's last node has no draft row; the tree's gets a copy of its target row (unread).
  const std::int64_t nodes = chain.n + 1;
  std::vector<float> q_nodes = chain.q_flat;
  q_nodes.insert(q_nodes.end(), chain.p.back().begin(), chain.p.back().end());
  const infuse::search::tree_drafts<host_memory> in{
      host_view<const std::int32_t, 2>(parents.data(), {chain.trials, nodes}),
      host_view<const std::int32_t, 2>(tokens.data(), {chain.trials, nodes}),
      host_view<const float, 3>(q_nodes.data(), {chain.trials, nodes, chain.vocab},
                                {0, chain.vocab, 1}),
      host_view<const float, 3>(chain.p_flat.data(), {chain.trials, nodes, chain.vocab},
                                {0, chain.vocab, 1}),
      host_view<const std::uint64_t, 1>(chain.seeds.data(), {chain.trials}),
      host_view<const std::int64_t, 1>(chain.positions.data(), {chain.trials})};
  outputs from_tree(chain.trials, nodes, true);
  outputs from_chain(chain.trials, nodes, false);
  infuse::search::verify_tree(infuse::exec::cpu{}, in, from_tree.views());
  infuse::search::verify_chain(infuse::exec::cpu{}, chain.views(), from_chain.views());
  CHECK(from_tree.accepted == from_chain.accepted);
  CHECK(from_tree.tokens == from_chain.tokens);
  infuse::search::verify_tree<acceptance::greedy>(infuse::exec::cpu{}, in, from_tree.views());
  infuse::search::verify_chain<acceptance::greedy>(infuse::exec::cpu{}, chain.views(),
                                                   from_chain.views());
  CHECK(from_tree.accepted == from_chain.accepted);
  CHECK(from_tree.tokens == from_chain.tokens);
}

TEST_CASE("verify_tree rejects parents out of topological order before writing") {
  INFUSE_RANDOM(rng);
  tree_case tree(rng, 2, 4);
  tree.parents[tree_nodes + 3] = 5;  // request 1, node 3: parent after the node
  outputs out(2, tree_nodes, true);
  CHECK_THROWS_WITH_AS(infuse::search::verify_tree(infuse::exec::cpu{}, tree.views(), out.views()),
                       doctest::Contains("in.parents(1, 3) is 5"), infuse::error);
  CHECK(out.accepted == std::vector<std::int32_t>{99, 99});
}

TEST_CASE("verify_chain is batch invariant: a request decides alike alone and in a batch") {
  INFUSE_RANDOM(rng);
  const chain_case chain(rng, 500, 4, 40);
  outputs batch(chain.trials, chain.n + 1, false);
  infuse::search::verify_chain(infuse::exec::cpu(2), chain.views(), batch.views());
  for (const std::int64_t request : {std::int64_t{0}, std::int64_t{217}, chain.trials - 1}) {
    const auto all = chain.views();
    const infuse::search::chain_drafts<host_memory> alone{
        host_view<const std::int32_t, 2>(&all.tokens(request, 0), {1, chain.n}),
        host_view<const float, 3>(&all.draft_probs(request, 0, 0), {1, chain.n, chain.vocab}),
        host_view<const float, 3>(&all.target_probs(request, 0, 0), {1, chain.n + 1, chain.vocab}),
        host_view<const std::uint64_t, 1>(&all.seeds(request), {1}),
        host_view<const std::int64_t, 1>(&all.positions(request), {1})};
    outputs single(1, chain.n + 1, false);
    infuse::search::verify_chain(infuse::exec::cpu(1), alone, single.views());
    CAPTURE(request);
    CHECK(single.accepted[0] == batch.accepted[request]);
    for (std::int64_t k = 0; k <= chain.n; ++k)
      CHECK(single.token(0, k) == batch.token(request, k));
  }
}
