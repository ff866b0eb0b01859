// exec::cpu: the host backend, OpenMP threads over host memory.
//
//   infuse::exec::cpu exec(8);  // 8 threads; exec::cpu{} takes OpenMP's default
//   exec.parallel_for(n, [&](std::int64_t i) { ... });
//   exec.parallel_for_ranges(n, [&](int thread, std::int64_t begin, std::int64_t end) { ... });
//
// Work is split statically: thread t of T gets one contiguous block of [0, n), the blocks differ
// in length by at most one. A kernel that needs scratch per thread sizes it by threads() and
// indexes it by the thread argument of parallel_for_ranges.
//
// Compiled without OpenMP (a .cu file without -Xcompiler=-fopenmp, say) the backend has one thread
// and runs everything on the calling thread.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <string_view>
#include <utility>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "infuse/core/error.hpp"
#include "infuse/core/memory.hpp"
#include "infuse/exec/backend.hpp"

namespace infuse::exec {

class cpu {
 public:
  using memory_space = host_memory;
  static constexpr std::string_view name = "cpu";

  // `threads` = 0 takes OpenMP's default, omp_get_max_threads() (OMP_NUM_THREADS when set).
  explicit cpu(int threads = 0) : threads_(threads == 0 ? default_threads() : threads) {
    require(threads >= 0, "infuse::exec::cpu", "threads", threads,
            "0 (OpenMP's default) or a positive thread count");
#if !defined(_OPENMP)
    threads_ = 1;
#endif
  }

  [[nodiscard]] int threads() const noexcept { return threads_; }

  // Nothing is asynchronous here: every call has finished when it returns.
  void synchronize() const noexcept {}

  // Calls body(i) for every i in [0, n), each exactly once, over min(threads(), n) threads.
  template <class Body>
  void parallel_for(std::int64_t n, Body&& body) const {
    parallel_for_ranges(n, [&body](int, std::int64_t begin, std::int64_t end) {
      for (std::int64_t i = begin; i < end; ++i) body(i);
    });
  }

  // Calls body(thread, begin, end) once for each thread that gets a nonempty block [begin, end)
  // of [0, n); thread is in [0, threads()). The first exception thrown by any call of `body` is
  // rethrown here after every thread has finished (an exception must not leave an OpenMP region);
  // the other threads' blocks run to completion or to their own exception.
  template <class Body>
  void parallel_for_ranges(std::int64_t n, Body&& body) const {
    require(n >= 0, "infuse::exec::cpu::parallel_for", "n", n, "a nonnegative count");
    if (n == 0) return;
    [[maybe_unused]] const int team = static_cast<int>(std::min<std::int64_t>(threads_, n));
    std::exception_ptr failure;
#if defined(_OPENMP)
#pragma omp parallel num_threads(team)
#endif
    {
      try {
        // The team can be smaller than asked (nested regions, OMP_THREAD_LIMIT): split over the
        // threads that actually run.
        const auto [thread, size] = team_position();
        const std::int64_t block = n / size;
        const std::int64_t rest = n % size;
        const std::int64_t begin = thread * block + std::min<std::int64_t>(thread, rest);
        const std::int64_t end = begin + block + (thread < rest ? 1 : 0);
        if (begin < end) body(thread, begin, end);
      } catch (...) {
#if defined(_OPENMP)
#pragma omp critical(infuse_exec_cpu_failure)
#endif
        if (!failure) failure = std::current_exception();
      }
    }
    if (failure) std::rethrow_exception(failure);
  }

 private:
  struct position {
    int thread;
    int size;
  };

  static int default_threads() {
#if defined(_OPENMP)
    return omp_get_max_threads();
#else
    return 1;
#endif
  }

  static position team_position() {
#if defined(_OPENMP)
    return {omp_get_thread_num(), omp_get_num_threads()};
#else
    return {0, 1};
#endif
  }

  int threads_;
};

static_assert(backend<cpu>, "infuse: exec::cpu must satisfy exec::backend");

}  // namespace infuse::exec
