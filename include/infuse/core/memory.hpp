// Memory spaces: where the bytes behind a pointer live, carried in the type of every view.
//
// A view's type names its space (infuse::view<float, 2, device_memory>), and each execution
// backend names the space it reads (exec::cpu reads host_memory, exec::cuda device_memory), so
// handing a CPU kernel device memory is a compile error instead of a segfault.
// See docs/policies.md#memory-spaces.
#pragma once

#include <concepts>
#include <type_traits>

namespace infuse {

// The opt-in identifier of a memory space: a space says
// `using identifier = memory_space_identifier;`, so no type becomes a space by accident.
struct memory_space_identifier {};

// Ordinary host memory (new, malloc, std::vector, mmap'd weights).
struct host_memory {
  using identifier = memory_space_identifier;
  static constexpr const char* name = "host";
};

// Global memory of the current CUDA device (cudaMalloc, cudaMallocAsync).
struct device_memory {
  using identifier = memory_space_identifier;
  static constexpr const char* name = "device";
};

template <class S>
concept memory_space = requires {
  typename S::identifier;
  { S::name } -> std::convertible_to<const char*>;
} && std::same_as<typename S::identifier, memory_space_identifier>;

static_assert(memory_space<host_memory>);
static_assert(memory_space<device_memory>);

// Whether code that runs against the memory space `Reader` (a backend's memory_space) may
// dereference memory of `Space`. Only a space's own code may; a space readable from several
// backends (managed memory, say) specializes this to true for each of them.
template <memory_space Space, memory_space Reader>
inline constexpr bool accessible_from = std::is_same_v<Space, Reader>;

}  // namespace infuse
