// What a rejected call said: the argument its infuse::error names.
#pragma once

#include <string>

#include "infuse/core/error.hpp"

namespace infuse::test {

// The name of the argument the call's error names, or "(no error)".
template <class Call>
std::string argument_of(Call call) {
  try {
    call();
  } catch (const infuse::error& failure) {
    return failure.argument();
  }
  return "(no error)";
}

}  // namespace infuse::test
