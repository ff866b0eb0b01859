// Compile-time names of schemes ("int4_g128", "fp8_e4m3_ch"), for messages and benchmark labels.
#pragma once

#include <cstddef>

#include "infuse/quant/scheme.hpp"

namespace infuse::quant::detail {

template <std::size_t N>
struct fixed_name {
  char text[N + 1] = {};
  constexpr const char* c_str() const { return text; }
};

constexpr std::size_t length(const char* s) {
  std::size_t n = 0;
  while (s[n] != '\0') ++n;
  return n;
}

// The decimal digits of a nonnegative number, into `out`; returns the count written.
constexpr std::size_t write_number(char* out, int value) {
  char digits[12] = {};
  std::size_t count = 0;
  do {
    digits[count++] = static_cast<char>('0' + value % 10);
    value /= 10;
  } while (value > 0);
  for (std::size_t i = 0; i < count; ++i) out[i] = digits[count - 1 - i];
  return count;
}

// "<prefix><bits>_<group><suffix>", the group as "g128", "ch" (per channel) or "t" (per tensor);
// bits < 0 leaves the number out.
template <std::size_t Capacity>
constexpr fixed_name<Capacity> scheme_name(const char* prefix, int bits, int group,
                                           const char* suffix) {
  fixed_name<Capacity> name;
  std::size_t at = 0;
  for (std::size_t i = 0; i < length(prefix); ++i) name.text[at++] = prefix[i];
  if (bits >= 0) at += write_number(name.text + at, bits);
  name.text[at++] = '_';
  if (group == per_channel) {
    name.text[at++] = 'c';
    name.text[at++] = 'h';
  } else if (group == per_tensor) {
    name.text[at++] = 't';
  } else {
    name.text[at++] = 'g';
    at += write_number(name.text + at, group);
  }
  for (std::size_t i = 0; i < length(suffix); ++i) name.text[at++] = suffix[i];
  return name;
}

}  // namespace infuse::quant::detail
