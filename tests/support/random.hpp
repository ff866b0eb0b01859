// Seeded random inputs for tests. Each generator takes its seed from INFUSE_TEST_SEED when set,
// otherwise a fresh one, and INFUSE_RANDOM() registers it with doctest so that a failing check
// prints the seed to rerun with.
#pragma once

#include <doctest/doctest.h>

#include <cstdint>
#include <cstdlib>
#include <random>
#include <vector>

namespace infuse::test {

inline std::uint64_t test_seed() {
  if (const char* fixed = std::getenv("INFUSE_TEST_SEED")) return std::strtoull(fixed, nullptr, 0);
  std::random_device device;
  return (std::uint64_t{device()} << 32) | device();
}

class seeded_rng {
 public:
  seeded_rng() : seed_(test_seed()), engine_(seed_) {}
  [[nodiscard]] std::uint64_t seed() const { return seed_; }
  std::mt19937_64& engine() { return engine_; }

  double uniform(double lo = 0.0, double hi = 1.0) {
    return std::uniform_real_distribution<double>(lo, hi)(engine_);
  }
  double normal(double mean = 0.0, double stddev = 1.0) {
    return std::normal_distribution<double>(mean, stddev)(engine_);
  }
  std::int64_t integer(std::int64_t lo, std::int64_t hi) {  // inclusive range
    return std::uniform_int_distribution<std::int64_t>(lo, hi)(engine_);
  }
  std::uint32_t bits32() { return static_cast<std::uint32_t>(engine_()); }

  template <class T = float>
  std::vector<T> normals(std::size_t count, double stddev = 1.0) {
    std::vector<T> values(count);
    for (auto& value : values) value = static_cast<T>(normal(0.0, stddev));
    return values;
  }

 private:
  std::uint64_t seed_;
  std::mt19937_64 engine_;
};

}  // namespace infuse::test

// Declares `name`, a seeded_rng whose seed every failing check in this scope prints.
#define INFUSE_RANDOM(name)               \
  ::infuse::test::seeded_rng name;        \
  INFO("rerun with INFUSE_TEST_SEED=" << name.seed())
