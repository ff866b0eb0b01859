// infuse_eval: how much of dense attention each sparsity policy and each KV retention rule keeps,
// at budgets from 1/4 to 1/64 of the context, on synthetic and captured workloads (workload.hpp,
// retrieval.hpp). Every number comes from infuse's own kernels: attention::decode (with
// token_weights for the dense softmax weights), kv::cache, kv::retain::select and compact.
//
// Per (workload, policy, budget), over the evaluation queries:
//   rel. error   ||o - o_dense|| / ||o_dense|| over the query heads' outputs of a step
//   mass         dense softmax weight of the tokens the policy read (kept), per query head
//   recall@32    of dense's 32 heaviest tokens per query head that weigh more than the uniform
//                1 / length (tokens below it are ties of the background), the share read (kept)
//   KV read      bytes of K and V records read per step (tokens read x KV heads)
//   us / step    one decode call (no optional outputs; the fastest of 5, 1 with --quick), and
//                dense's time over it
// Sparsity policies read the full cache; retention rules compress the prompt first (scored by the
// observation queries' attention), then the evaluation queries arrive.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <span>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "infuse/attention/attention.hpp"
#include "infuse/attention/cpu/decode.hpp"
#include "infuse/core/float_types.hpp"
#include "infuse/exec/cpu.hpp"
#include "infuse/kv/cpu/compact.hpp"
#include "infuse/kv/metadata.hpp"
#include "infuse/kv/page_pool.hpp"
#include "infuse/kv/retain.hpp"
#include "infuse/quant/quant.hpp"
#include "infuse/sparse/sparse.hpp"
#include "retrieval.hpp"
#include "workload.hpp"

namespace infuse::eval {
namespace {

namespace retain = kv::retain;

constexpr int page_size = 16;
using layout = kv::paged<page_size, kv::hnd>;
using scheme = quant::none<half>;
using kv_cache = kv::cache<layout, scheme, scheme>;
using view_type = kv::cache_view<layout, scheme, scheme>;
template <class Sparsity>
using attn = attention::attention<layout, scheme, scheme, Sparsity>;

constexpr std::int64_t recall_k = 32;
// Recycled attention records at the last observation query; the evaluation steps never reach the
// next full step.
constexpr int recycled_period = 1 << 30;

using clock_type = std::chrono::steady_clock;

double seconds_since(clock_type::time_point start) {
  return std::chrono::duration<double>(clock_type::now() - start).count();
}

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "infuse_eval: FAILED: %s\n", what.c_str());
  std::exit(1);
}

host_view<const float, 3> token_rows(const std::vector<float>& rows, const workload& w,
                                     std::int64_t first, std::int64_t count) {
  return host_view<const float, 3>(rows.data() + first * w.token_floats(),
                                   {count, w.kv_heads, w.head_dim});
}

// One decode call over the single sequence of `view`, its workspace kept between calls.
class decoder {
 public:
  decoder(const exec::cpu& exec, int repeats) : exec_(exec), repeats_(repeats) {}

  [[nodiscard]] const exec::cpu& exec() const { return exec_; }

  template <class Sparsity, class... Outputs>
  void run(const view_type& view, const workload& w, const float* q, float* out,
           const typename Sparsity::params& params, Outputs... outputs) {
    using decode = attn<Sparsity>;
    workspace_.resize(
        static_cast<std::size_t>(decode::decode_workspace_bytes(exec_, w.q_heads, view, params)));
    decode::decode(exec_, host_view<const float, 3>(q, {1, w.q_heads, w.head_dim}), view,
                   host_view<float, 3>(out, {1, w.q_heads, w.head_dim}), params, {}, workspace_,
                   outputs...);
  }

  // The same call without optional outputs: its fastest time of `repeats`.
  template <class Sparsity>
  double timed(const view_type& view, const workload& w, const float* q, float* out,
               const typename Sparsity::params& params) {
    double best = INFINITY;
    for (int i = 0; i < repeats_; ++i) {
      const auto start = clock_type::now();
      run<Sparsity>(view, w, q, out, params);
      best = std::min(best, seconds_since(start));
    }
    return best;
  }

 private:
  exec::cpu exec_;
  int repeats_;
  std::vector<std::byte> workspace_;
};

attention::token_weights weights_output(std::vector<float>& weights, const workload& w,
                                        std::int64_t tokens) {
  return {host_view<float, 3>(weights.data(), {1, w.q_heads, tokens})};
}

// A workload in the cache, and dense decode's answers to its evaluation queries.
struct prepared {
  const workload* w;
  kv::sequence_id id = 0;
  kv_cache prompt;  // tokens [0, length - 1), attention mass of the observation queries
  kv_cache full;    // every token
  std::vector<float> observation;    // (observed, q_heads, prompt length): dense weights
  std::vector<float> dense_out;      // (steps, q_heads, head_dim)
  std::vector<float> dense_weights;  // (steps, q_heads, length)
  std::vector<std::int32_t> top;     // (steps, q_heads, recall_k): dense's heaviest tokens
                                     // above the uniform weight, then -1
  double dense_seconds = 0.0;        // per step
  double float64_error = 0.0;        // dense decode against float64, step 0
  double token_head_bytes = 0.0;     // K and V of one token and KV head

  explicit prepared(const workload& work)
      : w(&work),
        prompt(static_cast<std::int32_t>(work.length / page_size + 1),
               {work.kv_heads, work.head_dim}, {work.kv_heads, work.head_dim}),
        full(prompt) {}  // both filled by prepare()

  [[nodiscard]] const float* dense_weights_of(std::int64_t step, std::int32_t q_head) const {
    return dense_weights.data() + (step * w->q_heads + q_head) * w->length;
  }
};

// ||a - b|| / ||b|| in float64.
double relative_error(std::span<const float> a, std::span<const float> b) {
  double diff = 0.0, norm = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff += (double{a[i]} - b[i]) * (double{a[i]} - b[i]);
    norm += double{b[i]} * b[i];
  }
  return norm > 0.0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

// Dense attention of evaluation query 0 in float64 over the dequantized K/V of the cache: the
// check that dense decode is the truth the table measures against.
double float64_check(const prepared& p, const view_type& view) {
  const workload& w = *p.w;
  const auto& f = view.format;
  const double scale = 1.0 / std::sqrt(double(w.head_dim));
  std::vector<double> scores(static_cast<std::size_t>(w.length));
  std::vector<float> out(static_cast<std::size_t>(w.query_floats()));
  for (std::int32_t h = 0; h < w.q_heads; ++h) {
    const std::int32_t kh = h / w.group();
    const float* q = w.evaluation_query(0) + std::int64_t{h} * w.head_dim;
    double top = -INFINITY;
    for (std::int64_t t = 0; t < w.length; ++t) {
      const kv::token_address at = view.locate(0, t);
      const std::uint8_t* codes = f.k_codes(at.page, at.slot, kh);
      const std::uint8_t* params = f.k_params(at.page, at.slot, kh);
      double dot = 0.0;
      for (std::int32_t d = 0; d < w.head_dim; ++d)
        dot += double{q[d]} * f.k.value(codes, params, d);
      scores[t] = dot * scale;
      top = std::max(top, scores[t]);
    }
    double sum = 0.0;
    std::vector<double> acc(static_cast<std::size_t>(w.head_dim), 0.0);
    for (std::int64_t t = 0; t < w.length; ++t) {
      const double e = std::exp(scores[t] - top);
      sum += e;
      const kv::token_address at = view.locate(0, t);
      const std::uint8_t* codes = f.v_codes(at.page, at.slot, kh);
      const std::uint8_t* params = f.v_params(at.page, at.slot, kh);
      for (std::int32_t d = 0; d < w.head_dim; ++d) acc[d] += e * f.v.value(codes, params, d);
    }
    for (std::int32_t d = 0; d < w.head_dim; ++d)
      out[std::int64_t{h} * w.head_dim + d] = static_cast<float>(acc[d] / sum);
  }
  return relative_error(std::span(p.dense_out).first(out.size()), out);
}

// Fills the caches: the prompt up to the observation queries, then each observation query after
// its own token (dense, its weights kept, its mass accumulated), then the last token; and dense
// decode's outputs and weights for every evaluation query.
void prepare(prepared& p, decoder& d) {
  const workload& w = *p.w;
  const exec::cpu& exec = d.exec();
  const kv::sequence_id id = p.prompt.create();
  p.id = id;
  const std::span<const kv::sequence_id> batch(&id, 1);
  const std::int64_t prompt_length = w.prompt_length();
  const std::int64_t first_observed = prompt_length - w.observed;
  const std::int64_t prefix[1] = {first_observed};
  p.prompt.append(exec, batch, prefix, token_rows(w.keys, w, 0, first_observed),
                  token_rows(w.values, w, 0, first_observed));
  const std::int64_t one[1] = {1};
  p.observation.assign(static_cast<std::size_t>(w.observed * w.q_heads * prompt_length), 0.0f);
  std::vector<float> out(static_cast<std::size_t>(w.query_floats()));
  std::vector<float> weights(static_cast<std::size_t>(w.q_heads * prompt_length));
  for (std::int64_t i = 0; i < w.observed; ++i) {
    const std::int64_t t = first_observed + i;
    p.prompt.append(exec, batch, one, token_rows(w.keys, w, t, 1), token_rows(w.values, w, t, 1));
    const auto cache = p.prompt.view(batch);
    d.run<sparse::causal>(cache.view(), w, w.observation_query(i), out.data(), {},
                          weights_output(weights, w, prompt_length), attention::accumulate_mass{});
    std::copy(weights.begin(), weights.end(),
              p.observation.begin() + i * w.q_heads * prompt_length);
  }
  p.full = p.prompt;
  p.full.append(exec, batch, one, token_rows(w.keys, w, prompt_length, 1),
                token_rows(w.values, w, prompt_length, 1));

  const auto cache = p.full.view(batch);
  p.dense_out.resize(static_cast<std::size_t>(w.steps * w.query_floats()));
  p.dense_weights.resize(static_cast<std::size_t>(w.steps * w.q_heads * w.length));
  p.top.resize(static_cast<std::size_t>(w.steps * w.q_heads * recall_k));
  std::vector<float> step_weights(static_cast<std::size_t>(w.q_heads * w.length));
  std::vector<std::int32_t> order(static_cast<std::size_t>(w.length));
  for (std::int64_t s = 0; s < w.steps; ++s) {
    float* dense_out = p.dense_out.data() + s * w.query_floats();
    d.run<sparse::dense>(cache.view(), w, w.evaluation_query(s), dense_out, {},
                         weights_output(step_weights, w, w.length));
    std::copy(step_weights.begin(), step_weights.end(),
              p.dense_weights.begin() + s * w.q_heads * w.length);
    p.dense_seconds +=
        d.timed<sparse::dense>(cache.view(), w, w.evaluation_query(s), out.data(), {}) /
        double(w.steps);
    for (std::int32_t h = 0; h < w.q_heads; ++h) {
      const float* weight = p.dense_weights_of(s, h);
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + recall_k, order.end(),
                        [&](std::int32_t a, std::int32_t b) { return weight[a] > weight[b]; });
      const double uniform = 1.0 / double(w.length);
      for (std::int64_t i = 0; i < recall_k; ++i) {
        p.top[(s * w.q_heads + h) * recall_k + i] = weight[order[i]] > uniform ? order[i] : -1;
      }
    }
  }
  if (w.focus >= 0) {
    for (std::int64_t i = 0; i < w.steps * w.q_heads; ++i) {
      if (p.top[i * recall_k] != w.focus)
        fail(w.name + ": dense attention's heaviest token is " +
             std::to_string(p.top[i * recall_k]) + ", not the planted token " +
             std::to_string(w.focus));
    }
  }
  p.float64_error = float64_check(p, cache.view());
  if (!(p.float64_error < 1e-5))
    fail(w.name + ": dense decode differs from the float64 reference by " +
         std::to_string(p.float64_error));
  p.token_head_bytes = double(p.full.bytes_per_token()) / w.kv_heads;
}

// The measurements of one policy at one budget, summed over the evaluation steps.
struct tally {
  double error = 0.0, mass = 0.0, recall = 0.0, token_heads = 0.0, seconds = 0.0;
  double compress_seconds = -1.0;  // retention only
  std::int64_t steps = 0;
};

// Adds one evaluation step: `out` the policy's output, read[kv_head * length + t] whether it read
// (kept) token t for that KV head.
void score_step(const prepared& p, std::int64_t step, std::span<const float> out,
                const std::vector<char>& read, double seconds, tally& t) {
  const workload& w = *p.w;
  t.error += relative_error(
      out, std::span(p.dense_out)
               .subspan(static_cast<std::size_t>(step * w.query_floats()), out.size()));
  for (std::int32_t h = 0; h < w.q_heads; ++h) {
    const char* row = read.data() + std::int64_t{h / w.group()} * w.length;
    const float* weight = p.dense_weights_of(step, h);
    double mass = 0.0;
    for (std::int64_t k = 0; k < w.length; ++k) mass += row[k] ? weight[k] : 0.0;
    const std::int32_t* top = p.top.data() + (step * w.q_heads + h) * recall_k;
    std::int64_t heavy = 0, found = 0;
    for (std::int64_t i = 0; i < recall_k && top[i] >= 0; ++i) {
      ++heavy;
      found += row[top[i]] ? 1 : 0;
    }
    t.mass += mass / w.q_heads;
    t.recall += (heavy == 0 ? 1.0 : double(found) / double(heavy)) / w.q_heads;
  }
  t.token_heads += double(std::count(read.begin(), read.end(), char{1}));
  t.seconds += seconds;
  ++t.steps;
}

// The tokens Sparsity reads for the query q, per KV head: its select() and visible(), asked the
// way the kernel asks them.
template <class Sparsity>
std::vector<char> read_mask(const view_type& view, const workload& w, const float* q,
                            const typename Sparsity::params& params) {
  const std::int64_t length = view.length(0);
  std::vector<char> mask(static_cast<std::size_t>(w.kv_heads * length), 0);
  std::vector<float> scratch(static_cast<std::size_t>(4 * (length / page_size + 2)));
  const float scale = attention::score_transform::from({}, w.head_dim).scale;
  const std::int32_t sequence = 0;
  std::vector<sparse::token_range> ranges;
  for (std::int32_t h = 0; h < w.kv_heads; ++h) {
    sparse::query_context c =
        attention::decode_query_context(view, sequence, h, w.group(), scale, &sequence);
    c.q = q + std::int64_t{h} * w.group() * w.head_dim;
    c.scratch = scratch.data();
    c.scratch_floats = static_cast<std::int64_t>(scratch.size());
    ranges.resize(static_cast<std::size_t>(Sparsity::max_ranges(params, c)) + 1);
    const std::int64_t count = Sparsity::select(params, c, ranges.data());
    for (std::int64_t r = 0; r < count; ++r) {
      for (std::int64_t t = ranges[r].begin; t < ranges[r].end; ++t) {
        if (Sparsity::visible(params, {sequence, length - 1, t, length}))
          mask[static_cast<std::size_t>(h * length + t)] = 1;
      }
    }
  }
  return mask;
}

// Sparsity over the full cache; params_for(step) gives each evaluation step's parameters.
template <class Sparsity, class ParamsFor>
tally evaluate_sparsity(prepared& p, decoder& d, ParamsFor&& params_for) {
  const workload& w = *p.w;
  const auto cache = p.full.view(std::span(&p.id, 1));
  std::vector<float> out(static_cast<std::size_t>(w.query_floats()));
  std::vector<float> weights(static_cast<std::size_t>(w.q_heads * w.length));
  tally t;
  for (std::int64_t s = 0; s < w.steps; ++s) {
    const typename Sparsity::params params = params_for(s);
    const float* q = w.evaluation_query(s);
    d.run<Sparsity>(cache.view(), w, q, out.data(), params, weights_output(weights, w, w.length));
    const std::vector<char> read = read_mask<Sparsity>(cache.view(), w, q, params);
    // What the kernel weighted it must have read.
    for (std::int32_t h = 0; h < w.q_heads; ++h) {
      for (std::int64_t k = 0; k < w.length; ++k) {
        if (weights[h * w.length + k] != 0.0f && !read[(h / w.group()) * w.length + k])
          fail(std::string(Sparsity::name) + " on " + w.name + ": the kernel weighted token " +
               std::to_string(k) + " that select() did not choose");
      }
    }
    const double seconds = d.timed<Sparsity>(cache.view(), w, q, out.data(), params);
    score_step(p, s, out, read, seconds, t);
  }
  return t;
}

template <class Rule>
inline constexpr bool is_merge = false;
template <int Budget, float Threshold, int Recent>
inline constexpr bool is_merge<retain::merge<Budget, Threshold, Recent>> = true;

// Retention: a copy of the prompt's cache compressed by `rule` (select, compact, shorten, key
// bounds recomputed), then the last token, then dense decode of the evaluation queries.
template <class Rule>
tally evaluate_retention(prepared& p, decoder& d, const Rule& rule) {
  const workload& w = *p.w;
  const exec::cpu& exec = d.exec();
  kv_cache cache = p.prompt;
  const std::span<const kv::sequence_id> batch(&p.id, 1);
  const std::int64_t prompt_length = w.prompt_length();
  tally t;
  const auto start = clock_type::now();
  std::vector<std::int32_t> kept;
  {
    const auto compressed = cache.view(batch);
    const view_type& view = compressed.view();
    if constexpr (Rule::source == retain::score_source::observation) {
      const std::int64_t prefix = prompt_length - rule.observation_window;
      kept = retain::select(
          rule, view, 0,
          host_view<const float, 3>(p.observation.data(), {w.observed, w.q_heads, prefix},
                                    {w.q_heads * prompt_length, prompt_length, 1}));
    } else {
      kept = retain::select(rule, view, 0);
    }
    const host_view<const std::int32_t, 1> kept_view(kept.data(), {std::ssize(kept)});
    if constexpr (is_merge<Rule>) {
      std::vector<std::uint64_t> workspace(static_cast<std::size_t>(
          retain::merge_workspace_bytes(exec, view, prompt_length, std::ssize(kept)) / 8 + 1));
      retain::compact_merged(exec, rule, view, 0, kept_view,
                             host_view<std::int32_t, 1>(nullptr, {0}),
                             host_view<std::byte, 1>(reinterpret_cast<std::byte*>(workspace.data()),
                                                     {std::int64_t(workspace.size() * 8)}));
    } else {
      const std::int32_t sequences[1] = {0};
      const std::int32_t kept_indptr[2] = {0, static_cast<std::int32_t>(kept.size())};
      std::int64_t new_length[1] = {0};
      retain::compact(exec, view, host_view<const std::int32_t, 1>(sequences, {1}),
                      host_view<const std::int32_t, 1>(kept_indptr, {2}), kept_view,
                      host_view<std::int64_t, 1>(new_length, {1}));
    }
  }
  cache.truncate(p.id, prompt_length - std::ssize(kept));
  kv::update_key_bounds(cache.view(batch).view(), 0, 0, std::ssize(kept));
  t.compress_seconds = seconds_since(start);
  const std::int64_t one[1] = {1};
  cache.append(exec, batch, one, token_rows(w.keys, w, prompt_length, 1),
               token_rows(w.values, w, prompt_length, 1));

  std::vector<char> read(static_cast<std::size_t>(w.kv_heads * w.length), 0);
  for (std::int32_t h = 0; h < w.kv_heads; ++h) {
    for (const std::int32_t k : kept) read[h * w.length + k] = 1;
    read[h * w.length + prompt_length] = 1;
  }
  const auto compressed = cache.view(batch);
  std::vector<float> out(static_cast<std::size_t>(w.query_floats()));
  for (std::int64_t s = 0; s < w.steps; ++s) {
    const double seconds =
        d.timed<sparse::dense>(compressed.view(), w, w.evaluation_query(s), out.data(), {});
    score_step(p, s, out, read, seconds, t);
  }
  return t;
}

// sparse::recycled at a top-K of `budget` tokens (a compile-time size of its recorded set),
// recorded at the last observation query from its dense weights.
template <int TopK>
tally evaluate_recycled(prepared& p, decoder& d) {
  using policy = sparse::recycled<TopK, recycled_period>;
  const workload& w = *p.w;
  std::vector<typename policy::state> states(static_cast<std::size_t>(w.kv_heads));
  const std::int64_t prompt_length = w.prompt_length();
  const std::int64_t lengths[1] = {prompt_length};
  policy::record(
      {0, states.data()},
      host_view<const float, 3>(p.observation.data() + (w.observed - 1) * w.q_heads * prompt_length,
                                {1, w.q_heads, prompt_length}),
      lengths, w.kv_heads);
  return evaluate_sparsity<policy>(p, d, [&](std::int64_t step) {
    return typename policy::params{step + 1, states.data()};
  });
}

template <int... TopK>
tally evaluate_recycled_at(std::int64_t budget, prepared& p, decoder& d,
                           std::integer_sequence<int, TopK...>) {
  tally t;
  const bool found = ((budget == TopK ? (t = evaluate_recycled<TopK>(p, d), true) : false) || ...);
  if (!found) fail("no sparse::recycled instantiation for a top-K of " + std::to_string(budget));
  return t;
}

// The budgets of lengths 1024 to 16384 at 1/4 .. 1/64.
using recycled_sizes = std::integer_sequence<int, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096>;

// sparse::block_sparse given the pages of highest dense mass (summed over every head) of each
// step: an oracle page selection, the bound of what any page-level rule can reach.
tally evaluate_oracle_blocks(prepared& p, decoder& d, std::int64_t budget) {
  const workload& w = *p.w;
  const std::int64_t blocks = (w.length + page_size - 1) / page_size;
  const std::int64_t chosen = std::min(blocks, budget / page_size);
  std::vector<double> block_mass(static_cast<std::size_t>(blocks));
  std::vector<std::int32_t> indices(static_cast<std::size_t>(blocks));
  const std::int32_t indptr[2] = {0, static_cast<std::int32_t>(chosen)};
  return evaluate_sparsity<sparse::block_sparse>(p, d, [&](std::int64_t step) {
    std::fill(block_mass.begin(), block_mass.end(), 0.0);
    for (std::int32_t h = 0; h < w.q_heads; ++h) {
      const float* weight = p.dense_weights_of(step, h);
      for (std::int64_t k = 0; k < w.length; ++k) block_mass[k / page_size] += weight[k];
    }
    std::iota(indices.begin(), indices.end(), 0);
    std::partial_sort(
        indices.begin(), indices.begin() + chosen, indices.end(),
        [&](std::int32_t a, std::int32_t b) { return block_mass[a] > block_mass[b]; });
    std::sort(indices.begin(), indices.begin() + chosen);
    return sparse::block_sparse::params{page_size, 1, indptr, indices.data()};
  });
}

// ---- the table ----------------------------------------------------------------------------------

struct row {
  std::string kind, policy, budget;
  tally t;
};

std::string fixed(double x, int digits) {
  char text[64];
  std::snprintf(text, sizeof text, "%.*f", digits, x);
  return text;
}

std::string scientific(double x) {
  char text[64];
  std::snprintf(text, sizeof text, "%.2e", x);
  return text;
}

void print_table(const prepared& p, const std::vector<row>& rows) {
  const workload& w = *p.w;
  std::printf(
      "\n### %s\n\n%s. Length %lld, %d query / %d KV heads, head dim %d, f16 KV; %lld "
      "evaluation and %lld observation queries. Dense: %.1f us/step; dense decode vs "
      "float64: %.1e.\n\n",
      w.name.c_str(), w.about.c_str(), static_cast<long long>(w.length), w.q_heads, w.kv_heads,
      w.head_dim, static_cast<long long>(w.steps), static_cast<long long>(w.observed),
      p.dense_seconds * 1e6, p.float64_error);
  std::printf(
      "| kind | policy | budget | KV read / step | of dense | rel. error | mass | "
      "recall@%lld | us / step | speedup | compress ms |\n",
      static_cast<long long>(recall_k));
  std::printf("|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|\n");
  const double dense_token_heads = double(w.length) * w.kv_heads;
  for (const row& r : rows) {
    const double n = double(r.t.steps);
    const double token_heads = r.t.token_heads / n;
    const double seconds = r.t.seconds / n;
    std::printf("| %s | %s | %s | %s KiB | %s%% | %s | %s | %s | %s | %s | %s |\n", r.kind.c_str(),
                r.policy.c_str(), r.budget.c_str(),
                fixed(token_heads * p.token_head_bytes / 1024.0, 0).c_str(),
                fixed(100.0 * token_heads / dense_token_heads, 1).c_str(),
                scientific(r.t.error / n).c_str(), fixed(r.t.mass / n, 3).c_str(),
                fixed(r.t.recall / n, 3).c_str(), fixed(seconds * 1e6, 0).c_str(),
                fixed(p.dense_seconds / seconds, 2).c_str(),
                r.t.compress_seconds < 0.0 ? "-" : fixed(r.t.compress_seconds * 1e3, 1).c_str());
  }
}

// Dense read through the same path must score as the truth: error 0, mass 1, recall 1.
void require_exact(const workload& w, const row& r) {
  const double n = double(r.t.steps);
  if (!(r.t.error / n <= 1e-6) || !(std::fabs(r.t.mass / n - 1.0) <= 1e-4) || r.t.recall / n != 1.0)
    fail(w.name + ": " + r.policy + " scores error " + std::to_string(r.t.error / n) + ", mass " +
         std::to_string(r.t.mass / n) + ", recall " + std::to_string(r.t.recall / n) +
         " (expected 0, 1, 1)");
}

std::vector<row> evaluate(prepared& p, decoder& d) {
  const workload& w = *p.w;
  std::vector<row> rows;
  rows.push_back({"sparsity", "dense", "all",
                  evaluate_sparsity<sparse::dense>(
                      p, d, [](std::int64_t) { return sparse::dense::params{}; })});
  require_exact(w, rows.back());
  rows.push_back({"retention", "keep_all", "all", evaluate_retention(p, d, retain::keep_all{})});
  require_exact(w, rows.back());

  std::vector<row> sparsity, retention;
  for (const std::int64_t divisor : {4, 8, 16, 32, 64}) {
    const std::int64_t budget = w.length / divisor;
    const std::string label = "1/" + std::to_string(divisor) + " (" + std::to_string(budget) + ")";
    const auto add = [&](std::vector<row>& to, const char* kind, const char* name, tally t) {
      to.push_back({kind, name, label, t});
    };
    add(sparsity, "sparsity", "window", evaluate_sparsity<sparse::window>(p, d, [&](std::int64_t) {
          return sparse::window::params{4, budget - 4};
        }));
    add(sparsity, "sparsity", "quest",
        evaluate_sparsity<sparse::quest<16>>(
            p, d, [&](std::int64_t) { return sparse::quest<16>::params{budget / page_size}; }));
    add(sparsity, "sparsity", "recycled", evaluate_recycled_at(budget, p, d, recycled_sizes{}));
    add(sparsity, "sparsity", "block_sparse (oracle pages)", evaluate_oracle_blocks(p, d, budget));
    add(retention, "retention", "streaming",
        evaluate_retention(p, d, retain::streaming<>{4, budget - 4}));
    add(retention, "retention", "heavy_hitter",
        evaluate_retention(p, d, retain::heavy_hitter<>{budget, budget / 8}));
    add(retention, "retention", "snapkv",
        evaluate_retention(p, d, retain::snapkv<>{budget, w.observed}));
    add(retention, "retention", "merge",
        evaluate_retention(p, d, retain::merge<>{budget, budget / 8}));
  }
  for (const float share : {0.5f, 0.8f, 0.9f, 0.95f, 0.99f}) {
    sparsity.push_back({"sparsity", "coverage", "mass " + fixed(share, 2),
                        evaluate_sparsity<sparse::coverage<90>>(p, d, [&](std::int64_t) {
                          return sparse::coverage<90>::params{share};
                        })});
  }
  // Grouped by policy, budgets in order.
  for (auto* group : {&sparsity, &retention}) {
    std::stable_sort(group->begin(), group->end(),
                     [](const row& a, const row& b) { return a.policy < b.policy; });
    rows.insert(rows.end(), group->begin(), group->end());
  }
  return rows;
}

// ---- the command line ---------------------------------------------------------------------------

struct options {
  std::int64_t length = 4096;
  std::uint64_t seed = 1;
  std::vector<std::string> workloads{"diffuse", "needle", "sink_local", "drifting", "retrieval"};
  bool quick = false;
};

constexpr const char* usage =
    "usage: infuse_eval [--length N] [--seed S] [--workloads a,b,...] [--quick] [--help]\n"
    "\n"
    "Scores infuse's attention sparsity policies and KV retention rules against dense decode\n"
    "attention at budgets 1/4 .. 1/64 of the context and prints one markdown table per workload.\n"
    "\n"
    "  --length N         context length: a power of two from 1024 to 16384 (default 4096)\n"
    "  --seed S           seed of the synthetic workloads and the passkey prompt (default 1)\n"
    "  --workloads LIST   comma-separated, from diffuse, needle, sink_local, drifting, retrieval\n"
    "                     (default: all)\n"
    "  --quick            length 1024 and 4 evaluation queries: the smoke test\n";

[[noreturn]] void bad_usage(const std::string& what) {
  std::fprintf(stderr, "infuse_eval: %s\n\n%s", what.c_str(), usage);
  std::exit(2);
}

std::int64_t parse_number(const std::string& flag, const char* text) {
  char* end = nullptr;
  const long long value = std::strtoll(text, &end, 10);
  if (end == text || *end != '\0' || value < 0)
    bad_usage(flag + " takes a non-negative integer, not '" + text + "'");
  return value;
}

options parse(int argc, char** argv) {
  options o;
  bool length_given = false;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    const auto value = [&]() -> const char* {
      if (i + 1 >= argc) bad_usage(flag + " needs a value");
      return argv[++i];
    };
    if (flag == "--help" || flag == "-h") {
      std::printf("%s", usage);
      std::exit(0);
    } else if (flag == "--length") {
      o.length = parse_number(flag, value());
      length_given = true;
    } else if (flag == "--seed") {
      o.seed = static_cast<std::uint64_t>(parse_number(flag, value()));
    } else if (flag == "--workloads") {
      o.workloads.clear();
      std::stringstream list(value());
      for (std::string name; std::getline(list, name, ',');) {
        if (name != "diffuse" && name != "needle" && name != "sink_local" && name != "drifting" &&
            name != "retrieval")
          bad_usage("unknown workload '" + name + "'");
        o.workloads.push_back(name);
      }
      if (o.workloads.empty()) bad_usage("--workloads names no workload");
    } else if (flag == "--quick") {
      o.quick = true;
    } else {
      bad_usage("unknown argument '" + flag + "'");
    }
  }
  if (o.quick && !length_given) o.length = 1024;
  if (o.length < 1024 || o.length > 16384 || (o.length & (o.length - 1)) != 0)
    bad_usage("--length must be a power of two from 1024 to 16384, not " +
              std::to_string(o.length));
  return o;
}

workload make(const std::string& name, const options& o, const exec::cpu& exec) {
  // SnapKV keeps its observation window whole: no larger than the smallest budget.
  const synthetic_shape shape{o.length, std::min<std::int64_t>(32, o.length / 64), o.quick ? 4 : 8};
  // Each workload its own stream of random numbers.
  const std::uint64_t seed = o.seed * 16 + name.size();
  if (name == "diffuse") return diffuse(shape, seed);
  if (name == "needle") return needle(shape, seed + 1);
  if (name == "sink_local") return sink_local(shape, seed + 2);
  if (name == "drifting") return drifting(shape, seed + 3);
  return retrieval(shape.length, shape.observed, o.seed, exec);
}

}  // namespace
}  // namespace infuse::eval

int main(int argc, char** argv) {
  using namespace infuse::eval;
  const options o = parse(argc, argv);
  const infuse::exec::cpu exec;
  std::printf("## infuse_eval: length %lld, seed %llu%s, %d threads\n",
              static_cast<long long>(o.length), static_cast<unsigned long long>(o.seed),
              o.quick ? ", quick" : "", exec.threads());
  try {
    decoder d(exec, o.quick ? 1 : 5);
    for (const std::string& name : o.workloads) {
      const auto start = clock_type::now();
      const workload w = make(name, o, exec);
      prepared p(w);
      prepare(p, d);
      print_table(p, evaluate(p, d));
      std::printf("\n(%s: %.1f s)\n", name.c_str(), seconds_since(start));
      std::fflush(stdout);
    }
  } catch (const std::exception& e) {
    fail(e.what());
  }
  return 0;
}
