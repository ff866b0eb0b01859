// expect: infuse: this view has a different rank than the operation expects
// A (rows,cols) matrix handed to an operation on (batch,rows,cols) tensors
// (docs/policies.md#views).
#include <cstdint>

#include "infuse/core/concepts.hpp"
#include "infuse/exec/cpu.hpp"

template <class Exec, class X>
void zero_batches(const Exec& exec, X x) {  // x: (batch,rows,cols)
  infuse::static_check_view<Exec, 3, X>();
  exec.parallel_for(x.extent(0), [&](std::int64_t b) {
    for (std::int64_t i = 0; i < x.extent(1); ++i) {
      for (std::int64_t j = 0; j < x.extent(2); ++j) x(b, i, j) = 0.0f;
    }
  });
}

int main() {
  float storage[6] = {};
#ifdef INFUSE_COMPILE_FAIL
  const infuse::host_view<float, 2> x(storage, {2, 3});  // (2,3)
  zero_batches(infuse::exec::cpu{}, x);
#else
  const infuse::host_view<float, 3> x(storage, {1, 2, 3});  // (1,2,3)
  zero_batches(infuse::exec::cpu{}, x);
#endif
}
