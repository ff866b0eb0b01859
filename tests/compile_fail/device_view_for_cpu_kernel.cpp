// expect: infuse: this view lives in a memory space the execution backend cannot read
// A CPU kernel handed device memory: the view's type says where its memory lives, and the CPU
// backend reads host memory only (docs/policies.md#memory-spaces).
#include <cstdint>

#include "infuse/core/concepts.hpp"
#include "infuse/exec/cpu.hpp"

// A kernel entry point as the library writes them.
template <class Exec, class X>
void scale(const Exec& exec, X x, float factor) {
  infuse::static_check_view<Exec, 1, X>();
  exec.parallel_for(x.extent(0), [&](std::int64_t i) { x(i) *= factor; });
}

int main() {
  float storage[4] = {1, 2, 3, 4};
#ifdef INFUSE_COMPILE_FAIL
  const infuse::device_view<float, 1> x(storage, {4});
#else
  const infuse::host_view<float, 1> x(storage, {4});
#endif
  scale(infuse::exec::cpu{}, x, 2.0f);
}
