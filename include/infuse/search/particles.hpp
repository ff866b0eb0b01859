// Particle search: resampling of N particles by weight (sequential Monte Carlo, particle filtering
// over partial generations), best-of-N selection, and the Rollover Budget Forcing helper.
//
//   search::resample(exec, resampling::systematic, log_weights, seeds, positions, parents, status);
//     log_weights (groups,n), seeds/positions/status (groups), parents (groups,n)
//
// Resampling draws n parents from the normalised weights w_i = e^(l_i) / sum_j e^(l_j) and returns
// them in ascending order (particle i is copied count_i times, next to each other, which keeps
// forks of KV pages local):
//   multinomial: n independent draws; count_i ~ Binomial(n, w_i). The n sorted uniforms come from
//     n + 1 exponential spacings (U_(k) = (E_1 + ... + E_k) / (E_1 + ... + E_{n+1})), so one walk
//     along the cumulative weights places them without sorting or scratch memory;
//   systematic: the points (k + u) / n for one uniform u; |count_i - n w_i| < 1.
// Keys: the words random_word({seed, position, salt::resample}, k). Both backends run the same
// float64 walk; multinomial's exponentials go through log(), whose host and device results may
// differ in the last bit, so CPU and CUDA agree unless a point falls within that of a boundary.
//
// Bad input: a log-weight NaN or +inf, or all of them -inf (no particle has weight), sets
// particle_status::invalid_weights for the group and its parents to the identity 0..n-1.
#pragma once

#include <cmath>
#include <cstdint>

#include "infuse/core/config.hpp"
#include "infuse/core/error.hpp"
#include "infuse/core/rng.hpp"
#include "infuse/core/view.hpp"
#include "infuse/search/random.hpp"

namespace infuse::search {

enum class resampling { multinomial, systematic };

enum class particle_status : std::uint8_t {
  ok = 0,
  invalid_weights = 1,
};

namespace detail {

// The exponential E_k of multinomial resampling's spacings, from the k-th word of the key.
INFUSE_HOST_DEVICE inline double spacing(const draw_key& key, std::int64_t k) {
  return -log(static_cast<double>(rng::uniform_positive(random_word(key, k))));
}

// Resamples group g: log_weights (groups,n) and parents (groups,n) are views.
template <class LogWeights, class Parents>
INFUSE_HOST_DEVICE particle_status resample_group(resampling method, const draw_key& key,
                                                  const LogWeights& log_weights,
                                                  const Parents& parents, std::int64_t g) {
  const std::int64_t n = log_weights.extent(1);
  const auto log_weight = [&](std::int64_t i) { return log_weights(g, i); };
  const auto parent = [&](std::int64_t k) -> std::int32_t& { return parents(g, k); };
  if (n == 0) return particle_status::ok;
  float max = -INFINITY;
  std::int64_t last_positive = -1;
  bool invalid = false;
  for (std::int64_t i = 0; i < n; ++i) {
    const float l = log_weight(i);
    if (!(l < INFINITY)) invalid = true;
    if (l > -INFINITY) last_positive = i;
    max = l > max ? l : max;
  }
  if (invalid || last_positive < 0) {
    for (std::int64_t k = 0; k < n; ++k) parent(k) = static_cast<std::int32_t>(k);
    return particle_status::invalid_weights;
  }
  const auto weight = [&](std::int64_t i) { return exp(static_cast<double>(log_weight(i)) - max); };
  double total = 0.0;
  for (std::int64_t i = 0; i < n; ++i) total += weight(i);
  double spacings = 0.0;  // multinomial: E_1 + ... + E_{n+1}
  if (method == resampling::multinomial) {
    for (std::int64_t k = 0; k <= n; ++k) spacings += spacing(key, k);
  }
  const double offset = random_uniform(key, 0);  // systematic
  double below = 0.0;                            // the cumulative weight before particle i
  double partial = 0.0;
  std::int64_t i = 0;
  double w = weight(0);
  for (std::int64_t k = 0; k < n; ++k) {
    double point;
    if (method == resampling::multinomial) {
      partial += spacing(key, k);
      point = partial / spacings * total;
    } else {
      point = (static_cast<double>(k) + offset) / static_cast<double>(n) * total;
    }
    while (i < last_positive && below + w <= point) {
      below += w;
      w = weight(++i);
    }
    parent(k) = static_cast<std::int32_t>(i);
  }
  return particle_status::ok;
}

// The shape checks of resample, shared by the backends.
template <class Space>
void require_resample(const view<const float, 2, Space>& log_weights,
                      const view<const std::uint64_t, 1, Space>& seeds,
                      const view<const std::int64_t, 1, Space>& positions,
                      const view<std::int32_t, 2, Space>& parents,
                      const view<particle_status, 1, Space>& status) {
  constexpr const char* call = "infuse::search::resample";
  const std::int64_t groups = log_weights.extent(0);
  require_view(log_weights, call, "log_weights", {any_extent, any_extent}, stride_rule::any);
  require(log_weights.extent(1) <= 2147483647, call, "log_weights.extent(1)", log_weights.extent(1),
          "at most 2^31 - 1 particles (parents are int32)");
  require_view(seeds, call, "seeds", {{groups, "the groups"}}, stride_rule::any);
  require_view(positions, call, "positions", {{groups, "the groups"}}, stride_rule::any);
  require_view(parents, call, "parents",
               {{groups, "the groups"}, {log_weights.extent(1), "the particles"}},
               stride_rule::any);
  require_view(status, call, "status", {{groups, "the groups"}}, stride_rule::any);
}

}  // namespace detail

// The index of the best of `n` scores, the lowest index on a tie; NaN never wins; -1 when there
// is no score that is not NaN.
INFUSE_HOST_DEVICE inline std::int32_t best_of_n(const float* scores, std::int64_t n) {
  std::int32_t best = -1;
  for (std::int64_t i = 0; i < n; ++i) {
    if (scores[i] != scores[i]) continue;
    if (best < 0 || scores[i] > scores[best]) best = static_cast<std::int32_t>(i);
  }
  return best;
}

// Rollover Budget Forcing (Kim et al., "Inference-Time Scaling for Flow Models via Stochastic
// Generation and Rollover Budget Forcing", 2025): a total budget of steps (function evaluations,
// candidate generations) is split evenly over the stages, and what a stage leaves unused, having
// found what it needed early, rolls over to the next stage. The rule implemented:
//   share(s) = floor(total / stages) + (s < total % stages ? 1 : 0)  (the shares sum to total),
//   allowance(s) = share(s) + carry, where carry is what stages before s left unused,
//   finish(used): carry = allowance(s) - used, with used clamped to [0, allowance(s)].
// The last stage's allowance is thus everything not yet spent.
class rollover_budget {
 public:
  INFUSE_HOST_DEVICE constexpr rollover_budget(std::int64_t total, std::int64_t stages)
      : total_(total < 0 ? 0 : total), stages_(stages < 1 ? 1 : stages) {}

  INFUSE_HOST_DEVICE constexpr std::int64_t stage() const { return stage_; }
  INFUSE_HOST_DEVICE constexpr bool done() const { return stage_ >= stages_; }

  // The steps the current stage may spend (0 once every stage has finished).
  INFUSE_HOST_DEVICE constexpr std::int64_t allowance() const {
    return done() ? 0 : share(stage_) + carry_;
  }

  // Ends the current stage having spent `used` steps; returns the steps carried to the next.
  INFUSE_HOST_DEVICE constexpr std::int64_t finish(std::int64_t used) {
    if (done()) return 0;
    const std::int64_t allowed = allowance();
    const std::int64_t spent = used < 0 ? 0 : (used > allowed ? allowed : used);
    carry_ = allowed - spent;
    ++stage_;
    return carry_;
  }

 private:
  INFUSE_HOST_DEVICE constexpr std::int64_t share(std::int64_t s) const {
    return total_ / stages_ + (s < total_ % stages_ ? 1 : 0);
  }

  std::int64_t total_;
  std::int64_t stages_;
  std::int64_t stage_ = 0;
  std::int64_t carry_ = 0;
};

}  // namespace infuse::search
