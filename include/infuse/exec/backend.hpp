// exec::backend: what every execution backend provides, checked where a kernel takes one.
//
// A backend is the first argument of every kernel call (infuse::gemv<...>(exec, ...)): its type
// picks the kernel body (cpu/ or cuda/) and names the memory space that body can read; its value
// carries the run-time resources (the thread count, the CUDA stream). Shipped: exec::cpu
// (exec/cpu.hpp) and exec::cuda (exec/cuda.cuh). See docs/policies.md#exec-backend.
#pragma once

#include <concepts>
#include <string_view>

#include "infuse/core/config.hpp"
#include "infuse/core/memory.hpp"

namespace infuse::exec {

template <class E>
concept backend = memory_space<typename E::memory_space> && std::copy_constructible<E> &&
                  requires(const E& exec) {
                    // for messages and benchmark labels: "cpu", "cuda"
                    { E::name } -> std::convertible_to<std::string_view>;
                    // waits until the work issued through `exec` is done and visible to the host
                    exec.synchronize();
                  };

// The check at the top of every kernel entry point that takes a backend.
template <class E>
INFUSE_HOST_DEVICE constexpr void static_check_backend() {
  static_assert(backend<E>,
                "infuse: this type is not an execution backend (infuse::exec::backend): it needs "
                "`using memory_space = ...` naming an infuse memory space, a static `name` and a "
                "const `synchronize()`, and must be copyable; see docs/policies.md#exec-backend");
}

}  // namespace infuse::exec
