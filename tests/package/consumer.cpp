// A program that uses infuse the way an engine's own code would. The package tests build it
// through each route a user takes (find_package, add_subdirectory, meson subproject, pkg-config)
// and run it; it exits nonzero, naming each failed check, when a result is wrong.
#include <infuse/infuse.hpp>

#include <atomic>
#include <cstdio>
#include <string>
#include <vector>

namespace {

int failures = 0;

void check(bool passed, const char* what) {
  if (!passed) {
    std::fprintf(stderr, "consumer: FAILED: %s\n", what);
    ++failures;
  }
}

}  // namespace

int main() {
  check(float(infuse::half(1.5f)) == 1.5f, "half(1.5f) reads back as 1.5f");
  check(float(infuse::fp8_e4m3(1000.0f)) == 448.0f, "fp8_e4m3(1000.0f) saturates to 448");

  // Without OpenMP's flags exec::cpu falls back to one thread, so this proves they reached us.
  const infuse::exec::cpu exec{2};
  check(exec.threads() == 2, "exec::cpu{2} has two OpenMP threads");
  constexpr int count = 1000;
  std::vector<std::atomic<int>> visits(count);
  exec.parallel_for(count, [&](auto index) { visits[index].fetch_add(1); });
  int visited_once = 0;
  for (const auto& visit : visits) visited_once += visit.load() == 1;
  check(visited_once == count, "parallel_for visits every index exactly once");

  try {
    infuse::require(false, "consumer", "group_size", 48, "a power of two");
    check(false, "require(false, ...) throws");
  } catch (const infuse::error& failure) {
    check(std::string(failure.what()).find("group_size") != std::string::npos,
          "the infuse::error message names the argument");
  }

  if (failures == 0) std::printf("consumer: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
