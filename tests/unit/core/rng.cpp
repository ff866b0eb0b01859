#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "infuse/core/rng.hpp"
#include "support/random.hpp"

namespace {

using infuse::rng::u32x2;
using infuse::rng::u32x4;

// Every statistical check below fails by chance with probability below 1e-6.
// Standard normal quantiles: one-sided 1e-6, two-sided 1e-6, and two-sided 1e-6 / 24.
constexpr double z_one_sided = 4.753;
constexpr double z_two_sided = 4.892;
constexpr double z_two_sided_24 = 5.48;

// The chi-square quantile with `df` degrees of freedom at the normal quantile z, by the
// Wilson-Hilferty approximation (1931): accurate to a fraction of a percent for df > 30.
double chi_square_quantile(double df, double z) {
  const double spread = 2.0 / (9.0 * df);
  return df * std::pow(1.0 - spread + z * std::sqrt(spread), 3.0);
}

// sqrt(n) times the Kolmogorov-Smirnov distance of the samples from `cdf`; the asymptotic tail
// P(sqrt(n) D > x) ~ 2 exp(-2 x^2) puts the 1e-6 quantile at sqrt(ln(2e6) / 2) = 2.693.
constexpr double kolmogorov_quantile = 2.693;
double kolmogorov_statistic(std::vector<float> samples, const std::function<double(double)>& cdf) {
  std::sort(samples.begin(), samples.end());
  const auto n = static_cast<double>(samples.size());
  double distance = 0.0;
  for (std::size_t i = 0; i < samples.size(); ++i) {
    const double expected = cdf(samples[i]);
    distance = std::max({distance, static_cast<double>(i + 1) / n - expected,
                         expected - static_cast<double>(i) / n});
  }
  return std::sqrt(n) * distance;
}

// sqrt(n) times the Pearson correlation: about standard normal for independent samples.
double correlation_statistic(const std::vector<float>& x, const std::vector<float>& y) {
  const auto n = static_cast<double>(x.size());
  double mean_x = 0.0, mean_y = 0.0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    mean_x += x[i] / n;
    mean_y += y[i] / n;
  }
  double xy = 0.0, xx = 0.0, yy = 0.0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    xy += (x[i] - mean_x) * (y[i] - mean_y);
    xx += (x[i] - mean_x) * (x[i] - mean_x);
    yy += (y[i] - mean_y) * (y[i] - mean_y);
  }
  return std::sqrt(n) * xy / std::sqrt(xx * yy);
}

// The 4 * count words of counters 0 .. count - 1, in order.
std::vector<std::uint32_t> words(const infuse::rng::philox& generator, std::size_t count) {
  std::vector<std::uint32_t> out;
  out.reserve(4 * count);
  for (std::uint64_t counter = 0; counter < count; ++counter) {
    const u32x4 bits = generator.bits(counter);
    out.insert(out.end(), std::begin(bits.word), std::end(bits.word));
  }
  return out;
}

std::uint64_t random_u64(infuse::test::seeded_rng& random) {
  return random.engine()();
}

// Published known-answer vectors of Philox4x32-10: the kat_vectors file of the Random123
// distribution (Salmon et al., 2011); cuRAND's curand_Philox4x32_10 gives the same.
struct known_answer {
  u32x4 counter;
  u32x2 key;
  u32x4 output;
};
constexpr known_answer known_answers[] = {
    {{{0, 0, 0, 0}}, {{0, 0}}, {{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}}},
    {{{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}},
     {{0xffffffff, 0xffffffff}},
     {{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}}},
    {{{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}},
     {{0xa4093822, 0x299f31d0}},
     {{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}}},
};

// The bijection is constexpr: the first vector holds at compile time too.
static_assert(infuse::rng::philox4x32_10(known_answers[0].counter, known_answers[0].key) ==
              known_answers[0].output);

}  // namespace

TEST_CASE("Philox4x32-10 gives the published known answers") {
  for (const known_answer& answer : known_answers) {
    const u32x4 output = infuse::rng::philox4x32_10(answer.counter, answer.key);
    for (int w = 0; w < 4; ++w) {
      CAPTURE(w);
      CHECK(output.word[w] == answer.output.word[w]);
    }
  }
}

TEST_CASE("philox maps seed, stream and counter to the documented words") {
  // The known answers again, through the keyed generator.
  CHECK(infuse::rng::philox(0, 0).bits(0) == known_answers[0].output);
  CHECK(infuse::rng::philox(~0ull, ~0ull).bits(~0ull) == known_answers[1].output);
  CHECK(infuse::rng::philox(0x299f31d0a4093822ull, 0x0370734413198a2eull)
            .bits(0x85a308d3243f6a88ull) == known_answers[2].output);

  INFUSE_RANDOM(random);
  for (int trial = 0; trial < 100; ++trial) {
    const std::uint64_t seed = random_u64(random);
    const std::uint64_t stream = random_u64(random);
    const std::uint64_t counter = random_u64(random);
    const auto low = [](std::uint64_t value) { return static_cast<std::uint32_t>(value); };
    const auto high = [](std::uint64_t value) { return static_cast<std::uint32_t>(value >> 32); };
    CHECK(infuse::rng::philox(seed, stream).bits(counter) ==
          infuse::rng::philox4x32_10({{low(counter), high(counter), low(stream), high(stream)}},
                                     {{low(seed), high(seed)}}));
  }
}

TEST_CASE("uniform conversions are exact and stay inside their intervals") {
  using infuse::rng::uniform;
  using infuse::rng::uniform_open;
  using infuse::rng::uniform_positive;
  CHECK(uniform(0) == 0.0f);
  CHECK(uniform(0xff) == 0.0f);  // the low 8 bits are not used
  CHECK(uniform(0x100) == 0x1p-24f);
  CHECK(uniform(0x80000000u) == 0.5f);
  CHECK(uniform(0xffffffffu) == 1.0f - 0x1p-24f);
  CHECK(uniform_positive(0) == 0x1p-24f);
  CHECK(uniform_positive(0x100) == 0x1p-23f);
  CHECK(uniform_positive(0xffffffffu) == 1.0f);
  CHECK(uniform_open(0) == 0x1p-24f);
  CHECK(uniform_open(0x200) == 3 * 0x1p-24f);
  CHECK(uniform_open(0xffffffffu) == 1.0f - 0x1p-24f);
  CHECK(uniform_open(0x7fffffffu) + uniform_open(0x80000000u) == 1.0f);

  INFUSE_RANDOM(random);
  for (int trial = 0; trial < 10000; ++trial) {
    const std::uint32_t bits = random.bits32();
    CHECK(uniform(bits) == static_cast<float>(bits >> 8) / 16777216.0f);
    CHECK(uniform_positive(bits) - uniform(bits) == 0x1p-24f);
  }
}

TEST_CASE("normal and Gumbel draws are finite at the extremes of their inputs") {
  for (const std::uint32_t radius : {0u, 1u, 0xffffffffu}) {
    for (const std::uint32_t angle : {0u, 0x40000000u, 0xffffffffu}) {
      const infuse::rng::float_pair pair = infuse::rng::standard_normal_pair(radius, angle);
      CHECK(std::isfinite(pair.first));
      CHECK(std::isfinite(pair.second));
      CHECK(std::hypot(pair.first, pair.second) <= 5.78f);
    }
  }
  CHECK(infuse::rng::gumbel(0) == doctest::Approx(-std::log(24 * std::log(2.0))).epsilon(1e-6));
  CHECK(infuse::rng::gumbel(0xffffffffu) == doctest::Approx(16.6355).epsilon(1e-4));
}

TEST_CASE("philox uniforms pass statistical tests") {
  INFUSE_RANDOM(random);
  const infuse::rng::philox generator(random_u64(random), random_u64(random));
  const std::vector<std::uint32_t> draws = words(generator, 250'000);  // 1e6 words
  const auto n = static_cast<double>(draws.size());

  SUBCASE("chi-square over 64 bins") {
    constexpr int bins = 64;
    std::vector<double> counts(bins, 0.0);
    for (const std::uint32_t bits : draws) {
      counts[static_cast<std::size_t>(infuse::rng::uniform(bits) * bins)] += 1.0;
    }
    double chi_square = 0.0;
    for (const double count : counts) chi_square += (count - n / bins) * (count - n / bins);
    chi_square /= n / bins;
    CHECK(chi_square < chi_square_quantile(bins - 1, z_one_sided));
  }
  SUBCASE("each of the 24 bits of the uniform is a fair coin") {
    for (int bit = 0; bit < 24; ++bit) {
      double ones = 0.0;
      for (const std::uint32_t bits : draws) {
        const auto scaled = static_cast<std::uint32_t>(infuse::rng::uniform(bits) * 0x1p24f);
        ones += (scaled >> bit) & 1u;
      }
      CAPTURE(bit);
      CHECK(std::abs(ones - n / 2) / std::sqrt(n / 4) < z_two_sided_24);
    }
  }
}

TEST_CASE("adjacent streams, counters and seeds are uncorrelated") {
  INFUSE_RANDOM(random);
  const std::uint64_t seed = random_u64(random);
  const std::uint64_t stream = random_u64(random) >> 1;  // room for stream + 1
  constexpr std::size_t count = 250'000;
  const auto uniforms = [](const std::vector<std::uint32_t>& bits) {
    std::vector<float> out;
    for (const std::uint32_t word : bits) out.push_back(infuse::rng::uniform(word));
    return out;
  };
  const std::vector<float> base = uniforms(words(infuse::rng::philox(seed, stream), count));
  const std::vector<float> next_stream =
      uniforms(words(infuse::rng::philox(seed, stream + 1), count));
  const std::vector<float> next_seed =
      uniforms(words(infuse::rng::philox(seed + 1, stream), count));
  // Counter c + 1 against counter c: the same sequence shifted by one output of four words.
  const std::vector<float> shifted(base.begin() + 4, base.end());
  const std::vector<float> unshifted(base.begin(), base.end() - 4);

  CHECK(std::abs(correlation_statistic(base, next_stream)) < z_two_sided);
  CHECK(std::abs(correlation_statistic(base, next_seed)) < z_two_sided);
  CHECK(std::abs(correlation_statistic(unshifted, shifted)) < z_two_sided);
  // Neighbouring words of one output.
  const std::vector<float> next_word(base.begin() + 1, base.end());
  const std::vector<float> this_word(base.begin(), base.end() - 1);
  CHECK(std::abs(correlation_statistic(this_word, next_word)) < z_two_sided);
}

TEST_CASE("standard normals and Gumbel draws follow their distributions") {
  INFUSE_RANDOM(random);
  const infuse::rng::philox generator(random_u64(random), random_u64(random));
  const std::vector<std::uint32_t> draws = words(generator, 250'000);

  std::vector<float> first;
  std::vector<float> second;
  for (std::size_t i = 0; i < draws.size(); i += 2) {
    const infuse::rng::float_pair pair = infuse::rng::standard_normal_pair(draws[i], draws[i + 1]);
    first.push_back(pair.first);
    second.push_back(pair.second);
  }
  const auto normal_cdf = [](double x) { return 0.5 * std::erfc(-x / std::sqrt(2.0)); };
  CHECK(kolmogorov_statistic(first, normal_cdf) < kolmogorov_quantile);
  CHECK(kolmogorov_statistic(second, normal_cdf) < kolmogorov_quantile);
  CHECK(std::abs(correlation_statistic(first, second)) < z_two_sided);

  std::vector<float> gumbels;
  for (const std::uint32_t bits : draws) gumbels.push_back(infuse::rng::gumbel(bits));
  const auto gumbel_cdf = [](double x) { return std::exp(-std::exp(-x)); };
  CHECK(kolmogorov_statistic(gumbels, gumbel_cdf) < kolmogorov_quantile);
}
