// Concepts and compile-time checks shared by every kernel.
//
// A kernel entry point starts with one static_check_view per view argument:
//   template <class Exec, class Q, class Out>
//   void op(const Exec& exec, Q q, Out out) {
//     infuse::static_check_view<Exec, 3, Q>();    // (batch,heads,head_dim)
//     infuse::static_check_view<Exec, 2, Out>();  // (batch,heads)
// so that a wrong backend, a wrong rank or memory the backend cannot read stops the build with a
// message from docs/policies.md, not a page of substitution failures (or a segfault at run time).
#pragma once

#include <type_traits>

#include "infuse/core/config.hpp"
#include "infuse/core/memory.hpp"
#include "infuse/core/view.hpp"
#include "infuse/exec/backend.hpp"

namespace infuse {

namespace detail {

template <class V>
inline constexpr bool is_view = false;
template <class T, int Rank, class Space>
inline constexpr bool is_view<view<T, Rank, Space>> = true;

}  // namespace detail

// Any infuse::view (cv-qualified or not).
template <class V>
concept view_type = detail::is_view<std::remove_cv_t<V>>;

// The backend `Exec` may dereference the memory of view `V`.
template <class V, class Exec>
concept readable_by = view_type<V> && exec::backend<Exec> &&
                      accessible_from<typename V::memory_space, typename Exec::memory_space>;

// The compile-time check of one view argument of a kernel running on `Exec`: Exec is a backend,
// View is an infuse::view of rank `Rank` in memory that Exec can read. Each fault gives exactly one
// message, the first that applies.
template <class Exec, int Rank, class View>
INFUSE_HOST_DEVICE constexpr void static_check_view() {
  exec::static_check_backend<Exec>();
  static_assert(view_type<View>,
                "infuse: this argument is not an infuse::view (wrap the pointer: "
                "infuse::host_view<T, Rank>(data, {extents...})); see docs/policies.md#views");
  if constexpr (exec::backend<Exec> && view_type<View>) {
    static_assert(View::rank == Rank,
                  "infuse: this view has a different rank than the operation expects (compare "
                  "the Rank in its type, view<T, Rank, Space>, with the shape the operation "
                  "documents); see docs/policies.md#views");
    static_assert(readable_by<View, Exec>,
                  "infuse: this view lives in a memory space the execution backend cannot read (a "
                  "CPU kernel was handed device memory, or a CUDA kernel host memory); see "
                  "docs/policies.md#memory-spaces");
  }
}

}  // namespace infuse
