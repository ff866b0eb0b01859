#include <doctest/doctest.h>

#include <string>

#include "infuse/core/error.hpp"

TEST_CASE("infuse::error names the call, the argument, its value and what was expected") {
  try {
    infuse::require(7 % 4 == 0, "infuse::gemv", "k", 7, "a multiple of 4");
    FAIL("require did not throw");
  } catch (const infuse::error& failure) {
    CHECK(std::string(failure.what()) == "infuse::gemv: k is 7, expected a multiple of 4");
    CHECK(failure.argument() == "k");
  }
  const float* missing = nullptr;
  CHECK_THROWS_WITH_AS(infuse::require(missing != nullptr, "infuse::op", "x", missing, "a pointer"),
                       "infuse::op: x is null, expected a pointer", infuse::error);
  CHECK_THROWS_WITH_AS(infuse::require(false, "infuse::op", "mode", "fast", "\"exact\""),
                       "infuse::op: mode is \"fast\", expected \"exact\"", infuse::error);
  CHECK_NOTHROW(infuse::require(true, "infuse::op", "x", 1, "anything"));
}
