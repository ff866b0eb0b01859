// Sampling and greedy decoding: the filters (policy tags), their per-request parameters, the
// outputs, and the math that both backends share. The CPU body is search/cpu/sample.hpp, the CUDA
// body search/cuda/sample.cuh; both define the same result, token for token.
//
//   namespace s = infuse::search;
//   using filters = s::filters<s::filter::temperature, s::filter::top_k, s::filter::top_p>;
//   s::sample_params<infuse::host_memory, filters> params;   // one member per filter present
//   params.seed = seeds;  params.temperature = temps;  params.top_k = ks;  params.top_p = ps;
//   std::vector<std::byte> scratch(s::sample_workspace_bytes<filters>(exec, rows, vocab));
//   s::sample(exec, logits, {row_request, row_position}, params, out, {scratch.data(), {n}});
//
// The call allocates nothing: its scratch is the caller's `workspace`, at least
// sample_workspace_bytes<Set>(exec, rows, vocab) bytes of the backend's memory (any alignment).
// The size depends on the backend, the filters, the row count and the vocabulary only, so one
// buffer sized for the largest batch serves every call (and every CUDA graph replay).
//
// The distribution a row samples from (its "filtered distribution"), in this order:
//   1. a_i = x_i + bias_i                                  (logit_bias)
//   2. a_i = a_i > 0 ? a_i / r : a_i * r   for tokens seen  (penalties: repetition r)
//      a_i = a_i - count_i * frequency - presence          (penalties: counts of tokens seen)
//   3. tokens whose bitmask bit is clear are removed       (token_bitmask)
//   4. d_i = (a_i - max_j a_j) / T                          (temperature; T = 0 means greedy)
//      w_i = exp(d_i), and W_i = floor(w_i * 2^40), an integer weight (below)
//   5. top_k: keep the tokens whose a_i is at least the k-th largest a (every tie kept);
//      top_p: of those, keep the tokens whose W_i is at least the largest threshold v for which
//             the kept tokens with W >= v hold at least p of the top-k mass (every tie kept);
//      min_p: keep tokens with w_i >= min_p (w of the most likely token is 1).
//   6. the token is the first (in token-id order) whose running sum of kept W exceeds
//      floor(u * sum of kept W), u the 64-bit uniform from random_word(key, 0) and (key, 1) with
//      key = draw_key{seed of the row's request, position of the row, salt::sample}.
//
// Why integers: the sums and the cut of step 5 and 6 are exact, hence independent of the order
// in which a backend adds (a CPU loop, a GPU block scan); and exp is detail::portable_exp, built
// from correctly rounded operations only (fma, multiply, rint), so W_i is bit-identical on the
// host and the device. CPU and CUDA therefore pick the same token from the same logits and key.
// The one caveat is the compiler: the host must not contract a * b + c into fma (g++ does not in
// ISO mode, -std=c++20; -ffp-contract=fast or -ffast-math breaks the guarantee). Tokens with
// w < 2^-40 have weight 0 and are never drawn.
//
// Bad input. Host checks throw infuse::error naming the argument before anything is written:
// shapes, a row's request out of range, temperature < 0 or NaN, top_p outside (0, 1], min_p
// outside [0, 1], penalty or bias lists not sorted or out of the vocabulary. top_k <= 0 means no
// top-k filter; top_k above the vocabulary is clamped. Per row (output `status`):
//   - a NaN logit among the allowed tokens: status nan_logits, token 0, log-probability NaN;
//   - no allowed token (bitmask all clear, or every logit -inf): status no_token_allowed, token 0,
//     log-probability NaN;
//   - +inf logits: the distribution is uniform over the allowed +inf tokens;
//   - otherwise status ok and a token of the filtered distribution.
// A row never gets a token outside [0, vocab).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "infuse/core/concepts.hpp"
#include "infuse/core/config.hpp"
#include "infuse/core/error.hpp"
#include "infuse/core/memory.hpp"
#include "infuse/core/view.hpp"
#include "infuse/search/random.hpp"

namespace infuse::search {

// ---- filters --------------------------------------------------------------------------------------

// The opt-in identifier of a sampling filter: `using identifier = filter_identifier;`.
struct filter_identifier {};

namespace filter {
struct temperature {
  using identifier = filter_identifier;
};
struct top_k {
  using identifier = filter_identifier;
};
struct top_p {
  using identifier = filter_identifier;
};
struct min_p {
  using identifier = filter_identifier;
};
struct token_bitmask {
  using identifier = filter_identifier;
};
struct penalties {
  using identifier = filter_identifier;
};
struct logit_bias {
  using identifier = filter_identifier;
};
}  // namespace filter

template <class F>
concept sampling_filter = requires { typename F::identifier; } &&
                          std::is_same_v<typename F::identifier, filter_identifier>;

static_assert(sampling_filter<filter::temperature> && sampling_filter<filter::top_k> &&
                  sampling_filter<filter::top_p> && sampling_filter<filter::min_p> &&
                  sampling_filter<filter::token_bitmask> && sampling_filter<filter::penalties> &&
                  sampling_filter<filter::logit_bias>,
              "infuse: every shipped filter is a sampling_filter");

// A set of filters, as one template argument.
template <class... Filters>
struct filters {
  template <class F>
  static constexpr bool has = (std::is_same_v<F, Filters> || ...);
};

namespace detail {
template <class T>
inline constexpr bool is_filters = false;
template <class... F>
inline constexpr bool is_filters<filters<F...>> = true;

template <class F>
constexpr bool known_filter() {
  return std::is_same_v<F, filter::temperature> || std::is_same_v<F, filter::top_k> ||
         std::is_same_v<F, filter::top_p> || std::is_same_v<F, filter::min_p> ||
         std::is_same_v<F, filter::token_bitmask> || std::is_same_v<F, filter::penalties> ||
         std::is_same_v<F, filter::logit_bias>;
}

template <class Set>
struct filter_set_check;
template <class... F>
struct filter_set_check<filters<F...>> {
  static constexpr bool all_filters = (sampling_filter<F> && ...);
  static constexpr bool all_known = (known_filter<F>() && ...);
};
}  // namespace detail

// ---- parameters ---------------------------------------------------------------------------------

// Which request each row samples for, and the position of the token it decides (the key of its
// randomness). Several rows may share a request (n > 1 samples: give them different positions or
// seeds, or they draw the same token).
template <class Space>
struct sample_rows {
  view<const std::int32_t, 1, Space> request;   // (rows)
  view<const std::int64_t, 1, Space> position;  // (rows)
};

namespace detail {

// The parameters of one filter, arrays over requests; a member exists only when its filter does.
template <class Filter, class Space>
struct filter_params {};

template <class Space>
struct filter_params<filter::temperature, Space> {
  view<const float, 1, Space> temperature;  // (requests) >= 0; 0 = greedy
};
template <class Space>
struct filter_params<filter::top_k, Space> {
  view<const std::int32_t, 1, Space> top_k;  // (requests) <= 0: no limit; clamped to the vocab
};
template <class Space>
struct filter_params<filter::top_p, Space> {
  view<const float, 1, Space> top_p;  // (requests) in (0, 1]
};
template <class Space>
struct filter_params<filter::min_p, Space> {
  view<const float, 1, Space> min_p;  // (requests) in [0, 1]
};
template <class Space>
struct filter_params<filter::token_bitmask, Space> {
  // (requests,words) words = ceil(vocab / 32); bit t % 32 of word t / 32 set = token t allowed
  view<const std::uint32_t, 2, Space> bitmask;
};
template <class Space>
struct filter_params<filter::penalties, Space> {
  // Request r's previous tokens are penalty_tokens[penalty_offsets[r], penalty_offsets[r + 1]),
  // strictly increasing token ids, each with its count (>= 1) of occurrences.
  view<const std::int32_t, 1, Space> penalty_offsets;  // (requests + 1)
  view<const std::int32_t, 1, Space> penalty_tokens;   // (entries)
  view<const std::int32_t, 1, Space> penalty_counts;   // (entries)
  view<const float, 1, Space> presence_penalty;        // (requests) subtracted once if seen
  view<const float, 1, Space> frequency_penalty;       // (requests) subtracted per occurrence
  view<const float, 1, Space> repetition_penalty;      // (requests) > 0; 1 = none
};
template <class Space>
struct filter_params<filter::logit_bias, Space> {
  // Request r's biases are (bias_tokens[j], bias_values[j]) for j in
  // [bias_offsets[r], bias_offsets[r + 1]), strictly increasing token ids.
  view<const std::int32_t, 1, Space> bias_offsets;  // (requests + 1)
  view<const std::int32_t, 1, Space> bias_tokens;   // (entries)
  view<const float, 1, Space> bias_values;          // (entries)
};

template <class Space, class Set>
struct params_of;
template <class Space, class... F>
struct params_of<Space, filters<F...>> : filter_params<F, Space>... {};

}  // namespace detail

// The per-request parameters of sample<Set>: `seed` always, and the members of each filter in Set.
template <class Space, class Set>
struct sample_params : detail::params_of<Space, Set> {
  static_assert(detail::is_filters<Set>,
                "infuse: the filters of sample_params are given as search::filters<...>; see "
                "docs/policies.md#decoding-search");
  view<const std::uint64_t, 1, Space> seed;  // (requests)
};

// ---- outputs --------------------------------------------------------------------------------------

enum class row_status : std::uint8_t {
  ok = 0,
  nan_logits = 1,        // a NaN among the allowed logits: token 0, log-probability NaN
  no_token_allowed = 2,  // no allowed token with a logit above -inf: token 0, log-probability NaN
  invalid_parameter = 3,  // CUDA only: a parameter value the host could not check (it lives in
                          // device memory) is out of range: token 0, log-probability NaN
};

template <class Space>
struct sample_outputs {
  view<std::int32_t, 1, Space> token;  // (rows)
  view<float, 1, Space> logprob;       // (rows) of the token under the filtered distribution
  view<row_status, 1, Space> status;   // (rows)
  // Optional (empty views: not written): the n most likely tokens of the filtered distribution,
  // most likely first (ties: lower id first), with their log-probabilities; slots beyond the
  // number of kept tokens hold token -1 and -inf.
  view<std::int32_t, 2, Space> top_tokens;  // (rows,n)
  view<float, 2, Space> top_logprobs;       // (rows,n)
};

// ---- math shared by both backends ----------------------------------------------------------------

namespace detail {

// Integer weights: W = floor(w * 2^40) for w in [0, 1]. A vocabulary below 2^23 tokens sums to
// less than 2^63.
inline constexpr int weight_bits = 40;
inline constexpr std::int64_t max_vocab = std::int64_t{1} << 23;

// Products and sums that the device compiler must not fuse into fma (nvcc does so by default),
// so that the host and device results are the same correctly rounded values.
INFUSE_HOST_DEVICE INFUSE_FORCE_INLINE float multiply_rn(float a, float b) {
#if defined(INFUSE_DEVICE_PASS)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// exp(d) for d <= 0, bit-identical on every backend: 2^(d log2 e) with the exponent split into
// n + r, |r| <= 1/2, and 2^r by its Taylor series to degree 7 (truncation below 1e-8 relative)
// evaluated with fma. Every step is a correctly rounded IEEE operation (the last, a product by a
// power of two, is exact). 0 below d = -30, where
// the integer weight floor(w * 2^40) is 0 anyway.
INFUSE_HOST_DEVICE inline float portable_exp(float d) {
  if (!(d >= -30.0f)) return 0.0f;
  const float t = fmaf(d, 1.44269504088896341f, 0.0f);  // fma(.., +0): never contracted further
  const float n = rintf(t);
  const float r = t - n;  // exact: n is the integer nearest t
  // ln(2)^k / k!, k = 7 .. 0
  float p = 1.52527338e-5f;
  p = fmaf(p, r, 1.54035304e-4f);
  p = fmaf(p, r, 1.33335581e-3f);
  p = fmaf(p, r, 9.61812911e-3f);
  p = fmaf(p, r, 5.55041087e-2f);
  p = fmaf(p, r, 2.40226507e-1f);
  p = fmaf(p, r, 6.93147181e-1f);
  p = fmaf(p, r, 1.0f);
  // times 2^n, n in [-44, 0], built from its bits (exact; ldexpf is a library call on the host)
  const std::uint32_t scale_bits = static_cast<std::uint32_t>(static_cast<int>(n) + 127) << 23;
  float scale = 0.0f;
  __builtin_memcpy(&scale, &scale_bits, sizeof scale);
  return p * scale;
}

INFUSE_HOST_DEVICE INFUSE_FORCE_INLINE std::uint64_t integer_weight(float w) {
  return static_cast<std::uint64_t>(multiply_rn(w, 0x1p40f));
}

// The relative weight of a token with adjusted logit a in a row whose maximum is `max`:
// exp((a - max) / T); a = max = +inf counts as the maximum itself.
INFUSE_HOST_DEVICE inline float relative_weight(float a, float max, float temperature) {
  if (a == max) return 1.0f;
  return portable_exp((a - max) / temperature);
}

// The adjusted logit of a token that a penalty or a bias names (steps 1 and 2 above).
INFUSE_HOST_DEVICE inline float penalized(float a, std::int32_t count, float presence,
                                          float frequency, float repetition) {
  a = a > 0.0f ? a / repetition : multiply_rn(a, repetition);
  a = fmaf(-static_cast<float>(count), frequency, a);
  return a - presence;
}

// floor(random * total / 2^64) exactly: the draw's place in [0, total).
INFUSE_HOST_DEVICE inline std::uint64_t scaled_draw(std::uint64_t random, std::uint64_t total) {
#if defined(INFUSE_DEVICE_PASS)
  return __umul64hi(random, total);
#else
  __extension__ using uint128 = unsigned __int128;
  return static_cast<std::uint64_t>((static_cast<uint128>(random) * total) >> 64);
#endif
}

// The 64 random bits that pick the token: words 0 and 1 of the draw.
INFUSE_HOST_DEVICE inline std::uint64_t sample_bits(std::uint64_t seed, std::uint64_t position) {
  const draw_key key{seed, position, salt::sample};
  return (std::uint64_t{random_word(key, 1)} << 32) | random_word(key, 0);
}

// A float's bits as an unsigned key with the same order (-0 below +0; NaN never reaches it).
INFUSE_HOST_DEVICE INFUSE_FORCE_INLINE std::uint32_t ordered_key(float value) {
  std::uint32_t bits = 0;
  __builtin_memcpy(&bits, &value, sizeof bits);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// The top-p mass that the kept set must reach: ceil(p * total) as an integer.
INFUSE_HOST_DEVICE inline std::uint64_t top_p_mass(float p, std::uint64_t total) {
  const double target = static_cast<double>(p) * static_cast<double>(total);
  const auto floor_target = static_cast<std::uint64_t>(target);
  return static_cast<double>(floor_target) < target ? floor_target + 1 : floor_target;
}

inline constexpr const char* sample_call = "infuse::search::sample";

// Host checks of everything but the logits' values, shared by the backends (views of device
// memory are checked for shape only; their values are checked where they are read).
template <class Space, class Set, class Logits>
void validate_sample(const Logits& logits, const sample_rows<Space>& rows,
                     const sample_params<Space, Set>& params, const sample_outputs<Space>& out) {
  const std::int64_t row_count = logits.extent(0);
  const std::int64_t vocab = logits.extent(1);
  require_view(logits, sample_call, "logits", {any_extent, any_extent});
  require(vocab >= 1 && vocab < max_vocab, sample_call, "logits.extent(1)", vocab,
          "a vocabulary of 1 to 2^23 - 1 tokens");
  require_view(rows.request, sample_call, "rows.request", {{row_count, "rows"}});
  require_view(rows.position, sample_call, "rows.position", {{row_count, "rows"}});
  const std::int64_t requests = params.seed.extent(0);
  require_view(params.seed, sample_call, "params.seed", {any_extent});
  const auto per_request = [&](const auto& v, const char* name) {
    require_view(v, sample_call, name, {{requests, "requests = params.seed.extent(0)"}});
  };
  if constexpr (Set::template has<filter::temperature>) per_request(params.temperature, "params.temperature");
  if constexpr (Set::template has<filter::top_k>) per_request(params.top_k, "params.top_k");
  if constexpr (Set::template has<filter::top_p>) per_request(params.top_p, "params.top_p");
  if constexpr (Set::template has<filter::min_p>) per_request(params.min_p, "params.min_p");
  if constexpr (Set::template has<filter::token_bitmask>) {
    require_view(params.bitmask, sample_call, "params.bitmask",
                 {{requests, "requests"}, {(vocab + 31) / 32, "ceil(vocab / 32)"}});
  }
  if constexpr (Set::template has<filter::penalties>) {
    require_view(params.penalty_offsets, sample_call, "params.penalty_offsets",
                 {{requests + 1, "requests + 1"}});
    require_view(params.penalty_tokens, sample_call, "params.penalty_tokens", {any_extent});
    require_view(params.penalty_counts, sample_call, "params.penalty_counts",
                 {{params.penalty_tokens.extent(0), "params.penalty_tokens.extent(0)"}});
    per_request(params.presence_penalty, "params.presence_penalty");
    per_request(params.frequency_penalty, "params.frequency_penalty");
    per_request(params.repetition_penalty, "params.repetition_penalty");
  }
  if constexpr (Set::template has<filter::logit_bias>) {
    require_view(params.bias_offsets, sample_call, "params.bias_offsets",
                 {{requests + 1, "requests + 1"}});
    require_view(params.bias_tokens, sample_call, "params.bias_tokens", {any_extent});
    require_view(params.bias_values, sample_call, "params.bias_values",
                 {{params.bias_tokens.extent(0), "params.bias_tokens.extent(0)"}});
  }
  require_view(out.token, sample_call, "out.token", {{row_count, "rows"}});
  require_view(out.logprob, sample_call, "out.logprob", {{row_count, "rows"}});
  require_view(out.status, sample_call, "out.status", {{row_count, "rows"}});
  const std::int64_t top_n = out.top_tokens.extent(1);
  if (out.top_tokens.size() > 0 || out.top_logprobs.size() > 0) {
    require_view(out.top_tokens, sample_call, "out.top_tokens", {{row_count, "rows"}, any_extent});
    require_view(out.top_logprobs, sample_call, "out.top_logprobs",
                 {{row_count, "rows"}, {top_n, "out.top_tokens.extent(1)"}});
  }
}

// Host checks of the parameter values (host memory only).
template <class Set>
void validate_sample_values(std::int64_t vocab, const sample_rows<host_memory>& rows,
                            const sample_params<host_memory, Set>& params) {
  const std::int64_t requests = params.seed.extent(0);
  for (std::int64_t r = 0; r < rows.request.extent(0); ++r) {
    const std::int32_t request = rows.request(r);
    require(request >= 0 && request < requests, sample_call,
            "rows.request[" + std::to_string(r) + "]", request,
            "a request in [0, " + std::to_string(requests) + ")");
  }
  for (std::int64_t q = 0; q < requests; ++q) {
    const auto name = [q](const char* member) {
      return std::string("params.") + member + "[" + std::to_string(q) + "]";
    };
    if constexpr (Set::template has<filter::temperature>) {
      const float t = params.temperature(q);
      require(t >= 0.0f && t < INFINITY, sample_call, name("temperature"), t,
              "a finite temperature >= 0 (0 = greedy)");
    }
    if constexpr (Set::template has<filter::top_p>) {
      const float p = params.top_p(q);
      require(p > 0.0f && p <= 1.0f, sample_call, name("top_p"), p, "a value in (0, 1]");
    }
    if constexpr (Set::template has<filter::min_p>) {
      const float p = params.min_p(q);
      require(p >= 0.0f && p <= 1.0f, sample_call, name("min_p"), p, "a value in [0, 1]");
    }
    const auto check_list = [&](const auto& offsets, const auto& tokens, const char* offsets_name,
                                const char* tokens_name) {
      const std::int32_t begin = offsets(q);
      const std::int32_t end = offsets(q + 1);
      require(begin >= 0 && begin <= end && end <= tokens.extent(0), sample_call,
              name(offsets_name), begin, "nondecreasing offsets within the token list");
      for (std::int32_t j = begin; j < end; ++j) {
        const std::int32_t token = tokens(j);
        require(token >= 0 && token < vocab && (j == begin || token > tokens(j - 1)), sample_call,
                std::string("params.") + tokens_name + "[" + std::to_string(j) + "]", token,
                "token ids in [0, vocab), strictly increasing within each request");
      }
    };
    if constexpr (Set::template has<filter::penalties>) {
      check_list(params.penalty_offsets, params.penalty_tokens, "penalty_offsets",
                 "penalty_tokens");
      const float r = params.repetition_penalty(q);
      require(r > 0.0f && r < INFINITY, sample_call, name("repetition_penalty"), r,
              "a finite factor > 0 (1 = none)");
      require(std::isfinite(params.presence_penalty(q)), sample_call, name("presence_penalty"),
              params.presence_penalty(q), "a finite value");
      require(std::isfinite(params.frequency_penalty(q)), sample_call, name("frequency_penalty"),
              params.frequency_penalty(q), "a finite value");
      for (std::int32_t j = params.penalty_offsets(q); j < params.penalty_offsets(q + 1); ++j) {
        require(params.penalty_counts(j) >= 1, sample_call,
                "params.penalty_counts[" + std::to_string(j) + "]", params.penalty_counts(j),
                "a count >= 1");
      }
    }
    if constexpr (Set::template has<filter::logit_bias>) {
      check_list(params.bias_offsets, params.bias_tokens, "bias_offsets", "bias_tokens");
    }
  }
}

template <class Exec, class Set, class Logits, class Space>
constexpr void static_check_sample() {
  static_check_view<Exec, 2, Logits>();
  static_assert(is_filters<Set>,
                "infuse: search::sample takes its filters as one search::filters<...> argument; "
                "see docs/policies.md#decoding-search");
  if constexpr (is_filters<Set>) {
    static_assert(filter_set_check<Set>::all_filters,
                  "infuse: a filter of search::sample is not a sampling_filter (it needs "
                  "`using identifier = infuse::search::filter_identifier;`); see "
                  "docs/policies.md#decoding-search");
    static_assert(filter_set_check<Set>::all_known,
                  "infuse: search::sample has no body for this filter: the shipped filters are "
                  "temperature, top_k, top_p, min_p, token_bitmask, penalties and logit_bias; see "
                  "docs/policies.md#decoding-search");
  }
  static_assert(std::is_same_v<typename Exec::memory_space, Space>,
                "infuse: the rows, parameters and outputs of search::sample live in the memory "
                "of its backend; see docs/policies.md#memory-spaces");
  static_assert(std::is_same_v<typename std::remove_cv_t<Logits>::value_type, float>,
                "infuse: search::sample takes float logits; see docs/policies.md#decoding-search");
}

}  // namespace detail

namespace detail {
// The body of sample and greedy on one backend: specialized by search/cpu/sample.hpp (exec::cpu)
// and search/cuda/sample.cuh (exec::cuda).
template <class Exec>
struct sample_body {
  static_assert(sizeof(Exec) == 0,
                "infuse: could not find a search::sample body for this backend: include "
                "infuse/search/cpu/sample.hpp (exec::cpu) or infuse/search/cuda/sample.cuh "
                "(exec::cuda); see docs/policies.md#decoding-search");
};
}  // namespace detail

// The bytes of workspace that sample<Set> needs on `exec` for up to `rows` rows of `vocab` tokens
// (0 when it needs none). A buffer of this size serves any call with at most `rows` rows.
template <class Set, class Exec>
std::int64_t sample_workspace_bytes(const Exec& exec, std::int64_t rows, std::int64_t vocab) {
  static_assert(detail::is_filters<Set>,
                "infuse: search::sample takes its filters as one search::filters<...> argument; "
                "see docs/policies.md#decoding-search");
  constexpr const char* call = "infuse::search::sample_workspace_bytes";
  require(rows >= 0, call, "rows", rows, "a nonnegative row count");
  require(vocab >= 1 && vocab < detail::max_vocab, call, "vocab", vocab,
          "a vocabulary of 1 to 2^23 - 1 tokens");
  return detail::sample_body<Exec>::template workspace_bytes<Set>(exec, rows, vocab);
}

// Samples one token per row of `logits` (rows,vocab) (any row stride, contiguous rows) from the
// filtered distribution described at the top of this file, with `workspace` as scratch (see
// sample_workspace_bytes). Throws infuse::error before writing anything when an argument is
// malformed.
template <class Set, class Exec, class Logits, class Space>
void sample(const Exec& exec, Logits logits, const sample_rows<Space>& rows,
            const sample_params<Space, Set>& params, const sample_outputs<Space>& out,
            const view<std::byte, 1, Space>& workspace) {
  detail::static_check_sample<Exec, Set, Logits, Space>();
  detail::validate_sample(logits, rows, params, out);
  const std::int64_t needed = sample_workspace_bytes<Set>(exec, logits.extent(0), logits.extent(1));
  require(workspace.extent(0) >= needed, detail::sample_call, "workspace.extent(0)",
          workspace.extent(0),
          "at least " + std::to_string(needed) + " bytes (search::sample_workspace_bytes)");
  require_view(workspace, detail::sample_call, "workspace", {any_extent});
  detail::sample_body<Exec>::template sample<Set>(exec, logits, rows, params, out, workspace);
}

// The most likely token of each row (the lowest id among equal maxima), log-probability 0 (the
// greedy distribution is a point mass); NaN and all -inf rows get the statuses of sample. Greedy
// needs no workspace.
template <class Exec, class Logits, class Space>
void greedy(const Exec& exec, Logits logits, const sample_outputs<Space>& out) {
  detail::static_check_sample<Exec, filters<>, Logits, Space>();
  const std::int64_t row_count = logits.extent(0);
  require_view(logits, detail::sample_call, "logits", {any_extent, any_extent});
  require(logits.extent(1) >= 1 && logits.extent(1) < detail::max_vocab, "infuse::search::greedy",
          "logits.extent(1)", logits.extent(1), "a vocabulary of 1 to 2^23 - 1 tokens");
  require_view(out.token, "infuse::search::greedy", "out.token", {{row_count, "rows"}});
  require_view(out.logprob, "infuse::search::greedy", "out.logprob", {{row_count, "rows"}});
  require_view(out.status, "infuse::search::greedy", "out.status", {{row_count, "rows"}});
  if (out.top_tokens.size() > 0 || out.top_logprobs.size() > 0) {
    require_view(out.top_tokens, "infuse::search::greedy", "out.top_tokens",
                 {{row_count, "rows"}, any_extent});
    require_view(out.top_logprobs, "infuse::search::greedy", "out.top_logprobs",
                 {{row_count, "rows"}, {out.top_tokens.extent(1), "out.top_tokens.extent(1)"}});
  }
  detail::sample_body<Exec>::greedy(exec, logits, out);
}

}  // namespace infuse::search
