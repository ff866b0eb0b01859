// infuse::error: the one exception type of the host API.
//
// Every host entry point validates its arguments before touching any output and throws
// infuse::error whose message names the call, the argument, the value it had and what was expected:
//   "infuse::gemv: k is 100, expected a multiple of the group size 32"
#pragma once

#include <concepts>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

#include "infuse/core/config.hpp"

namespace infuse {

class error : public std::runtime_error {
 public:
  // A complete message, for failures that are not about one argument (a CUDA launch, say).
  explicit error(const std::string& message) : std::runtime_error(message) {}

  error(std::string_view call, std::string_view argument, std::string_view value,
        std::string_view expected)
      : std::runtime_error(compose(call, argument, value, expected)), argument_(argument) {}

  // The name of the offending argument; empty for failures that name none.
  [[nodiscard]] const std::string& argument() const noexcept { return argument_; }

 private:
  static std::string compose(std::string_view call, std::string_view argument,
                             std::string_view value, std::string_view expected) {
    std::string message;
    message.append(call).append(": ").append(argument).append(" is ").append(value);
    message.append(", expected ").append(expected);
    return message;
  }
  std::string argument_;
};

namespace detail {

// How a value reads in an error message.
template <class T>
std::string describe(const T& value) {
  if constexpr (std::is_same_v<T, bool>) {
    return value ? "true" : "false";
  } else if constexpr (std::is_pointer_v<T> || std::is_null_pointer_v<T>) {
    if (value == nullptr) return "null";
    std::ostringstream out;
    out << static_cast<const void*>(value);
    return out.str();
  } else if constexpr (std::is_enum_v<T>) {
    return std::to_string(static_cast<std::underlying_type_t<T>>(value));
  } else if constexpr (std::is_convertible_v<const T&, std::string_view>) {
    std::string quoted(1, '"');
    quoted.append(std::string_view(value)).push_back('"');
    return quoted;
  } else {
    std::ostringstream out;
    out.precision(9);
    out << value;
    return out.str();
  }
}

}  // namespace detail

// Throws infuse::error unless `condition` holds. `expected` is only read on failure.
template <class Value>
void require(bool condition, std::string_view call, std::string_view argument, const Value& value,
             std::string_view expected) {
  if (!condition) [[unlikely]] {
    throw error(call, argument, detail::describe(value), expected);
  }
}

}  // namespace infuse
