#include <doctest/doctest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "infuse/core/concepts.hpp"
#include "infuse/exec/cuda.cuh"
#include "support/random.hpp"

namespace {

using infuse::device_buffer;
using infuse::exec::cuda;

// out(i, j) = offset + 100 i + j, one block per row, one thread per column.
__global__ void write_indices(infuse::device_view<int, 2> out, int offset) {
  const std::int64_t i = blockIdx.x;
  const std::int64_t j = threadIdx.x;
  if (i < out.extent(0) && j < out.extent(1)) out(i, j) = offset + static_cast<int>(100 * i + j);
}

// A host-side entry point as the library writes them: compile-time checks, then the launch.
template <class Exec, class Out>
void fill_rows(const Exec& exec, Out out, int offset) {
  infuse::static_check_view<Exec, 2, Out>();
  exec.launch(write_indices, dim3(static_cast<unsigned>(out.extent(0))),
              dim3(static_cast<unsigned>(out.extent(1))), 0, out, offset);
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

}  // namespace

static_assert(infuse::exec::backend<cuda>);
static_assert(infuse::readable_by<infuse::device_view<const float, 2>, cuda>);
static_assert(!infuse::readable_by<infuse::host_view<float, 2>, cuda>);

TEST_CASE("exec::cuda launches a kernel that writes through a device view") {
  INFUSE_RANDOM(rng);
  const auto rows = rng.integer(1, 40);
  const auto cols = rng.integer(1, 300);
  const int offset = static_cast<int>(rng.integer(-1000, 1000));
  CAPTURE(rows);
  CAPTURE(cols);

  device_buffer<int> buffer(rows * cols);
  const cuda exec;
  fill_rows(exec, buffer.as_view({rows, cols}), offset);
  exec.synchronize();
  std::vector<int> values = buffer.to_host();
  for (std::int64_t i = 0; i < rows; ++i) {
    for (std::int64_t j = 0; j < cols; ++j) {
      REQUIRE(values[i * cols + j] == offset + 100 * i + j);
    }
  }

  // The same kernel through a transposed (column-major) view: strides are honored on the device.
  const infuse::device_view<int, 2> transposed(buffer.data(), {rows, cols}, {1, rows});
  fill_rows(exec, transposed, offset);
  exec.synchronize();
  values = buffer.to_host();
  for (std::int64_t i = 0; i < rows; ++i) {
    for (std::int64_t j = 0; j < cols; ++j) {
      REQUIRE(values[j * rows + i] == offset + 100 * i + j);
    }
  }
}

TEST_CASE("exec::cuda launches on the stream it holds") {
  cudaStream_t stream = nullptr;
  cuda::check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  const cuda exec(stream);
  CHECK(exec.stream() == stream);
  CHECK(cuda{}.stream() == nullptr);

  device_buffer<int> buffer(4 * 32);
  fill_rows(exec, buffer.as_view({4, 32}), 7);
  exec.synchronize();
  const std::vector<int> values = buffer.to_host();
  CHECK(values[0] == 7);
  CHECK(values[3 * 32 + 31] == 7 + 331);
  cuda::check(cudaStreamDestroy(stream), "cudaStreamDestroy");
}

TEST_CASE("a launch shape no device accepts throws before anything is launched") {
  device_buffer<int> buffer(2048);
  buffer.copy_from(std::vector<int>(2048, -1));
  const cuda exec;
  const auto out = buffer.as_view({1, 2048});
  try {
    exec.launch(write_indices, dim3(1), dim3(2048), 0, out, 0);
    FAIL("a block of 2048 threads was launched");
  } catch (const infuse::error& failure) {
    CHECK(std::string(failure.what()) ==
          "infuse::exec::cuda::launch: block is 2048x1x1, expected at most 1024 threads per block "
          "(and block.z at most 64)");
    CHECK(failure.argument() == "block");
  }
  CHECK_THROWS_WITH_AS(exec.launch(write_indices, dim3(0, 1, 1), dim3(32), 0, out, 0),
                       "infuse::exec::cuda::launch: grid is 0x1x1, expected every grid dimension "
                       "at least 1",
                       infuse::error);
  CHECK_THROWS_AS(exec.launch(write_indices, dim3(1), dim3(8, 8, 128), 0, out, 0), infuse::error);
  CHECK_THROWS_AS(exec.launch(write_indices, dim3(1, 70000), dim3(32), 0, out, 0), infuse::error);
  CHECK_THROWS_AS(exec.launch(write_indices, dim3(1), dim3(32), std::size_t{1} << 30, out, 0),
                  infuse::error);
  CHECK(cudaGetLastError() == cudaSuccess);
  exec.synchronize();
  CHECK(buffer.to_host() == std::vector<int>(2048, -1));  // nothing ran
}

// In the test suite "deliberate_cuda_errors", which scripts/gpu-check leaves out of its
// compute-sanitizer runs: the sanitizer reports every refused API call, wanted or not.
TEST_CASE("a launch CUDA refuses throws infuse::error with the CUDA message and the shape" *
          doctest::test_suite("deliberate_cuda_errors")) {
  // 64 KiB of dynamic shared memory is within every supported device's opt-in limit, so the
  // validation lets it through, but the kernel has not opted in (cudaFuncSetAttribute): CUDA
  // refuses the launch itself.
  device_buffer<int> buffer(32);
  const cuda exec;
  try {
    exec.launch(write_indices, dim3(1), dim3(32), 64 * 1024, buffer.as_view({1, 32}), 0);
    FAIL("the launch did not fail");
  } catch (const infuse::error& failure) {
    const std::string message = failure.what();
    CAPTURE(message);
    CHECK(contains(message, "infuse::exec::cuda: launch of "));
    CHECK(contains(message, "write_indices"));
    CHECK(contains(message, std::string(" failed: ") + cudaGetErrorString(cudaErrorInvalidValue)));
    CHECK(contains(message, "(grid 1x1x1, block 32x1x1, shared 65536 bytes)"));
  }
  // The error was consumed by the check: the next launch works.
  CHECK(cudaGetLastError() == cudaSuccess);
  fill_rows(exec, buffer.as_view({1, 32}), 5);
  exec.synchronize();
  CHECK(buffer.to_host()[31] == 36);
}

TEST_CASE("cuda::check turns a CUDA status into infuse::error naming the call") {
  CHECK_NOTHROW(cuda::check(cudaSuccess, "cudaMemcpy"));
  CHECK_THROWS_WITH_AS(cuda::check(cudaErrorInvalidValue, "cudaMemcpy"),
                       (std::string("infuse::exec::cuda: cudaMemcpy failed: ") +
                        cudaGetErrorString(cudaErrorInvalidValue) + " (cudaErrorInvalidValue)")
                           .c_str(),
                       infuse::error);
}

TEST_CASE("device_buffer: round trip, views, moves and bad sizes") {
  INFUSE_RANDOM(rng);
  const auto count = static_cast<std::size_t>(rng.integer(1, 5000));
  const std::vector<float> values = rng.normals<float>(count);
  device_buffer<float> buffer{std::span<const float>(values)};
  CHECK(buffer.size() == std::ssize(values));
  CHECK(buffer.bytes() == count * sizeof(float));
  CHECK(buffer.data() != nullptr);
  CHECK(buffer.to_host() == values);

  const infuse::device_view<float, 1> whole = buffer.as_view();
  CHECK(whole.data() == buffer.data());
  CHECK(whole.extent(0) == buffer.size());
  const auto shaped = buffer.as_view({1, buffer.size()});
  CHECK(shaped.extent(1) == buffer.size());
  CHECK(shaped.stride(0) == buffer.size());
  CHECK_THROWS_AS((void)buffer.as_view({2, buffer.size()}), infuse::error);
  CHECK_THROWS_AS((void)buffer.as_view({-1, 4}), infuse::error);
  CHECK_THROWS_AS(buffer.copy_from(std::vector<float>(values.size() + 1)), infuse::error);

  float* const memory = buffer.data();
  device_buffer<float> moved(std::move(buffer));
  CHECK(moved.data() == memory);
  CHECK(buffer.data() == nullptr);  // NOLINT(bugprone-use-after-move): the moved-from state
  CHECK(buffer.size() == 0);
  CHECK(buffer.bytes() == 0);
  CHECK(moved.bytes() == count * sizeof(float));
  CHECK(moved.to_host() == values);

  const device_buffer<float3> vectors(3);  // bytes() counts sizeof(T), 12 here
  CHECK(vectors.bytes() == 36);

  device_buffer<float> empty(0);
  CHECK(empty.data() == nullptr);
  CHECK(empty.bytes() == 0);
  CHECK(empty.to_host().empty());
  CHECK_THROWS_WITH_AS(device_buffer<float>(-1),
                       "infuse::device_buffer: size is -1, expected a nonnegative element count",
                       infuse::error);
}
