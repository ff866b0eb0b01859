// The check every key-bounds test makes: stored bounds are the float extremes of the keys
// rounded outward to half (kv/metadata.hpp), bit for bit.
#pragma once

#include <cstring>
#include <vector>

#include "infuse/core/float_types.hpp"

namespace infuse::test {

inline bool bounds_are(half stored_min, half stored_max, float lo, float hi) {
  return stored_min.bits() == half_at_most(lo).bits() &&
         stored_max.bits() == half_at_least(hi).bits();
}

// Whether got holds the values at want bit for bit (NaN and -0 included).
template <class T>
bool same_bits(const std::vector<T>& got, const T* want) {
  return std::memcmp(got.data(), want, got.size() * sizeof(T)) == 0;
}

}  // namespace infuse::test
