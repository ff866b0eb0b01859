// exec::cuda: the CUDA backend, a stream over device memory; and device_buffer, owned device memory
// for tests and examples (the library's kernels never allocate).
//
//   infuse::exec::cuda exec(stream);                      // exec::cuda{} uses the default stream
//   exec.launch(my_kernel, grid, block, shared_bytes, args...);
//   exec.synchronize();
//
// Every launch is validated before it is issued and checked after (cudaGetLastError), and every
// runtime call goes through cuda::check, so a failure surfaces as infuse::error at the call that
// caused it, with the CUDA error string:
//   "infuse::exec::cuda: launch of fill(infuse::view<int, 1, infuse::device_memory>, int) failed:
//    invalid argument (grid 1x1x1, block 256x1x1, shared 65536 bytes)"
#pragma once

#include "infuse/core/config.hpp"

#if !defined(INFUSE_CUDA_COMPILER)
#error "infuse/exec/cuda.cuh is CUDA code: include it from a .cu file compiled by nvcc"
#endif

#include <cuda_runtime.h>

#if defined(__GNUC__)
#include <cxxabi.h>
#endif

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "infuse/core/error.hpp"
#include "infuse/core/memory.hpp"
#include "infuse/core/view.hpp"
#include "infuse/exec/backend.hpp"

namespace infuse::exec {

class cuda {
 public:
  using memory_space = device_memory;
  static constexpr std::string_view name = "cuda";

  // Does not take ownership of `stream`; 0 is the legacy default stream.
  explicit cuda(cudaStream_t stream = nullptr) : stream_(stream) {}

  [[nodiscard]] cudaStream_t stream() const noexcept { return stream_; }

  // Throws infuse::error unless `status` is cudaSuccess; `what` names the call that returned it.
  static void check(cudaError_t status, std::string_view what) {
    if (status != cudaSuccess) [[unlikely]] {
      throw error(std::string("infuse::exec::cuda: ") + std::string(what) + " failed: " +
                  cudaGetErrorString(status) + " (" + cudaGetErrorName(status) + ")");
    }
  }

  void synchronize() const { check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }

  // Launches kernel<<<grid, block, shared_bytes, stream()>>>(args...). The shape is validated
  // first (no CUDA call is made for a shape no device accepts), the launch checked after.
  template <class... Params, class... Args>
  void launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared_bytes,
              Args&&... args) const {
    validate_shape(grid, block, shared_bytes);
    kernel<<<grid, block, shared_bytes, stream_>>>(std::forward<Args>(args)...);
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) [[unlikely]] {
      throw error("infuse::exec::cuda: launch of " +
                  kernel_name(reinterpret_cast<const void*>(kernel)) + " failed: " +
                  cudaGetErrorString(status) + " (" + describe_shape(grid, block, shared_bytes) +
                  ")");
    }
  }

 private:
  // Limits of every CUDA device infuse supports (compute capability 7.0 and later).
  static constexpr std::uint64_t max_block_threads = 1024;
  static constexpr unsigned max_block_z = 64;
  static constexpr unsigned max_grid_y = 65535;
  static constexpr unsigned max_grid_z = 65535;
  static constexpr unsigned max_grid_x = 2147483647u;
  // Dynamic shared memory every kernel may use without opting in.
  static constexpr std::size_t default_shared_bytes = 48 * 1024;

  static std::string describe_dims(dim3 dims) {
    return std::to_string(dims.x) + "x" + std::to_string(dims.y) + "x" + std::to_string(dims.z);
  }

  static std::string describe_shape(dim3 grid, dim3 block, std::size_t shared_bytes) {
    return "grid " + describe_dims(grid) + ", block " + describe_dims(block) + ", shared " +
           std::to_string(shared_bytes) + " bytes";
  }

  void validate_shape(dim3 grid, dim3 block, std::size_t shared_bytes) const {
    const auto fail_unless = [](bool valid, std::string_view argument, dim3 dims,
                                std::string_view expected) {
      if (!valid) {
        throw error("infuse::exec::cuda::launch", argument, describe_dims(dims), expected);
      }
    };
    fail_unless(grid.x >= 1 && grid.y >= 1 && grid.z >= 1, "grid", grid,
                "every grid dimension at least 1");
    fail_unless(grid.x <= max_grid_x && grid.y <= max_grid_y && grid.z <= max_grid_z, "grid", grid,
                "at most 2147483647x65535x65535 blocks");
    fail_unless(block.x >= 1 && block.y >= 1 && block.z >= 1, "block", block,
                "every block dimension at least 1");
    fail_unless(std::uint64_t{block.x} * block.y * block.z <= max_block_threads &&
                    block.z <= max_block_z,
                "block", block, "at most 1024 threads per block (and block.z at most 64)");
    // Only a launch asking for more than the default costs a query of the device's limit.
    if (shared_bytes > default_shared_bytes) {
      int device = 0;
      int optin_limit = 0;
      check(cudaGetDevice(&device), "cudaGetDevice");
      check(cudaDeviceGetAttribute(&optin_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
            "cudaDeviceGetAttribute(cudaDevAttrMaxSharedMemoryPerBlockOptin)");
      require(shared_bytes <= static_cast<std::size_t>(optin_limit), "infuse::exec::cuda::launch",
              "shared_bytes", shared_bytes,
              "at most " + std::to_string(optin_limit) + " bytes, this device's limit per block");
    }
  }

  // The kernel's name for messages, demangled where the host compiler allows.
  static std::string kernel_name(const void* kernel) {
    const char* mangled = nullptr;
    if (cudaFuncGetName(&mangled, kernel) != cudaSuccess || mangled == nullptr) {
      cudaGetLastError();  // the launch error is the one to report, not this lookup's
      return "a kernel";
    }
#if defined(__GNUC__)
    int status = 0;
    char* demangled = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
    if (status == 0 && demangled != nullptr) {
      std::string name(demangled);
      std::free(demangled);
      return name;
    }
#endif
    return mangled;
  }

  cudaStream_t stream_;
};

static_assert(backend<cuda>, "infuse: exec::cuda must satisfy exec::backend");

}  // namespace infuse::exec

namespace infuse {

// Owns `size()` elements of T in device memory (cudaMalloc), freed on destruction; move-only.
// Copies to and from the host are synchronous (cudaMemcpy).
template <class T>
class device_buffer {
  static_assert(std::is_trivially_copyable_v<T>,
                "infuse: device_buffer holds trivially copyable elements (they are copied "
                "bytewise between host and device)");

 public:
  device_buffer() = default;

  explicit device_buffer(std::int64_t size) : size_(size) {
    require(size >= 0, "infuse::device_buffer", "size", size, "a nonnegative element count");
    if (size > 0) {
      void* memory = nullptr;
      exec::cuda::check(cudaMalloc(&memory, bytes()),
                        "cudaMalloc of " + std::to_string(bytes()) + " bytes");
      data_ = static_cast<T*>(memory);
    }
  }

  // A buffer holding a copy of `host`.
  explicit device_buffer(std::span<const T> host) : device_buffer(std::ssize(host)) {
    copy_from(host);
  }

  device_buffer(device_buffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  device_buffer& operator=(device_buffer&& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(size_, other.size_);
    return *this;
  }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;

  // A destructor cannot throw: a failing cudaFree (after a sticky kernel fault) is left to the next
  // checked call, which reports the fault itself.
  ~device_buffer() { cudaFree(data_); }

  [[nodiscard]] T* data() const noexcept { return data_; }
  [[nodiscard]] std::int64_t size() const noexcept { return size_; }
  [[nodiscard]] std::size_t bytes() const noexcept {
    return static_cast<std::size_t>(size_) * sizeof(T);
  }

  // The whole buffer as a rank-1 view, or its first product(extents) elements, row-major.
  [[nodiscard]] device_view<T, 1> as_view() const { return as_view({size_}); }
  template <int Rank>
  [[nodiscard]] device_view<T, Rank> as_view(const std::int64_t (&extents)[Rank]) const {
    index_array<Rank> shape{};
    for (int d = 0; d < Rank; ++d) {
      require(extents[d] >= 0, "infuse::device_buffer::as_view", "extents", extents[d],
              "nonnegative extents");
      shape[d] = extents[d];
    }
    const device_view<T, Rank> shaped(data_, shape);
    require(shaped.size() <= size_, "infuse::device_buffer::as_view", "extents", shaped.size(),
            "at most the buffer's " + std::to_string(size_) + " elements");
    return shaped;
  }

  void copy_from(std::span<const T> host) {
    require(std::ssize(host) == size_, "infuse::device_buffer::copy_from", "host.size()",
            host.size(), "the buffer's size " + std::to_string(size_));
    if (size_ > 0) {
      exec::cuda::check(cudaMemcpy(data_, host.data(), bytes(), cudaMemcpyHostToDevice),
                        "cudaMemcpy to the device");
    }
  }

  [[nodiscard]] std::vector<T> to_host() const {
    std::vector<T> host(static_cast<std::size_t>(size_));
    if (size_ > 0) {
      exec::cuda::check(cudaMemcpy(host.data(), data_, bytes(), cudaMemcpyDeviceToHost),
                        "cudaMemcpy to the host");
    }
    return host;
  }

 private:
  T* data_ = nullptr;
  std::int64_t size_ = 0;
};

}  // namespace infuse
