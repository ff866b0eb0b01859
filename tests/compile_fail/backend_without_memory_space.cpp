// expect: infuse: this type is not an execution backend
// A user-written backend that does not say which memory space it reads, passed where a backend is
// required (docs/policies.md#exec-backend).
#include <cstdint>
#include <string_view>

#include "infuse/core/concepts.hpp"
#include "infuse/core/memory.hpp"

struct serial_backend {
#ifndef INFUSE_COMPILE_FAIL
  using memory_space = infuse::host_memory;
#endif
  static constexpr std::string_view name = "serial";
  void synchronize() const {}
};

template <class Exec, class X>
void fill(const Exec&, X x, float value) {
  infuse::static_check_view<Exec, 1, X>();
  for (std::int64_t i = 0; i < x.extent(0); ++i) x(i) = value;
}

int main() {
  float storage[4] = {};
  fill(serial_backend{}, infuse::host_view<float, 1>(storage, {4}), 1.0f);
}
