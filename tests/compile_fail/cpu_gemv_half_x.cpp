// expect: infuse: the CPU gemv takes float x
// The CPU gemv handed half activations: half and bfloat16 x are converted as they are read on
// CUDA only; on the CPU, x is float (docs/policies.md#quantized-gemv).
#include <cstdint>

#include "infuse/core/float_types.hpp"
#include "infuse/exec/cpu.hpp"
#include "infuse/gemm/cpu/gemv.hpp"
#include "infuse/gemm/gemv.hpp"
#include "infuse/quant/int.hpp"

int main() {
  using scheme = infuse::quant::int_<4, 32>;
  std::uint8_t codes[16] = {};
  float scales[1] = {1.0f};
  const infuse::quant::matrix<scheme, infuse::host_memory> w{codes, scales, nullptr, 1, 32};
  float y_storage[1] = {};
  const infuse::host_view<float, 2> y(y_storage, {1, 1});
#ifdef INFUSE_COMPILE_FAIL
  infuse::half x_storage[32] = {};
  const infuse::host_view<const infuse::half, 2> x(x_storage, {1, 32});
#else
  float x_storage[32] = {};
  const infuse::host_view<const float, 2> x(x_storage, {1, 32});
#endif
  infuse::gemv(infuse::exec::cpu{}, w, x, y);
}
