// expect: infuse: a view is indexed with exactly as many indices as its rank
// A rank-3 view read with two indices (docs/policies.md#views).
#include "infuse/core/view.hpp"

int main() {
  float storage[24] = {};
  const infuse::host_view<float, 3> x(storage, {2, 3, 4});  // (2,3,4)
#ifdef INFUSE_COMPILE_FAIL
  return static_cast<int>(x(1, 2));
#else
  return static_cast<int>(x(1, 2, 3));
#endif
}
