// infuse::view: a non-owning pointer + extents + strides whose type carries its memory space.
//
//   infuse::host_view<const float, 3> q(ptr, {batch, heads, head_dim});  // (batch,heads,head_dim)
//   q(b, h, d) == ptr[(b * heads + h) * head_dim + d]
//
// Extents and strides count elements, as std::int64_t. A view is trivially copyable and a few words
// long, so kernels take it by value, on the host and on the device. `T` may be const; a view of T
// converts to a view of const T, never across memory spaces.
//
// require_view() is the host-side check of a view argument that every entry point runs before any
// work: extents, pointer and stride layout, with a message naming the argument.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

#include "infuse/core/config.hpp"
#include "infuse/core/error.hpp"
#include "infuse/core/memory.hpp"

namespace infuse {

// A fixed number of extents, strides or indices. A plain aggregate rather than std::array, whose
// members are not __device__ functions.
template <int N>
struct index_array {
  std::int64_t values[N];

  INFUSE_HOST_DEVICE constexpr std::int64_t& operator[](int i) { return values[i]; }
  INFUSE_HOST_DEVICE constexpr const std::int64_t& operator[](int i) const { return values[i]; }
};

template <class T, int Rank, memory_space Space>
class view {
  static_assert(Rank >= 1, "infuse: a view has rank 1 or more; see docs/policies.md#views");

 public:
  using element_type = T;
  using value_type = std::remove_cv_t<T>;
  using memory_space = Space;
  using index_type = index_array<Rank>;
  static constexpr int rank = Rank;

  // An empty view: null data, every extent 0.
  view() = default;

  // Row-major (the last index is contiguous).
  INFUSE_HOST_DEVICE constexpr view(T* data, const index_type& extents)
      : data_(data), extents_(extents), strides_(row_major_strides(extents)) {}

  INFUSE_HOST_DEVICE constexpr view(T* data, const index_type& extents, const index_type& strides)
      : data_(data), extents_(extents), strides_(strides) {}

  // view<T> -> view<const T> (a qualification conversion, as std::mdspan allows).
  template <class U>
  INFUSE_HOST_DEVICE constexpr view(const view<U, Rank, Space>& other)  // NOLINT: implicit
    requires std::is_convertible_v<U (*)[], T (*)[]>
      : data_(other.data()), extents_(other.extents()), strides_(other.strides()) {}

  INFUSE_HOST_DEVICE constexpr T* data() const { return data_; }
  INFUSE_HOST_DEVICE constexpr std::int64_t extent(int d) const { return extents_[d]; }
  INFUSE_HOST_DEVICE constexpr std::int64_t stride(int d) const { return strides_[d]; }
  INFUSE_HOST_DEVICE constexpr const index_type& extents() const { return extents_; }
  INFUSE_HOST_DEVICE constexpr const index_type& strides() const { return strides_; }

  // The number of elements, the product of the extents.
  INFUSE_HOST_DEVICE constexpr std::int64_t size() const {
    std::int64_t count = 1;
    for (int d = 0; d < Rank; ++d) count *= extents_[d];
    return count;
  }

  // Whether the elements fill data()[0, size()) in row-major order. A dimension of extent 1 may
  // have any stride, since it is never stepped over; an empty view is contiguous.
  INFUSE_HOST_DEVICE constexpr bool is_contiguous() const {
    if (size() == 0) return true;
    const index_type row_major = row_major_strides(extents_);
    for (int d = 0; d < Rank; ++d) {
      if (extents_[d] != 1 && strides_[d] != row_major[d]) return false;
    }
    return true;
  }

  template <class... Index>
  INFUSE_HOST_DEVICE constexpr T& operator()(Index... indices) const {
    static_assert(static_cast<int>(sizeof...(Index)) == Rank,
                  "infuse: a view is indexed with exactly as many indices as its rank; "
                  "see docs/policies.md#views");
    static_assert((std::is_integral_v<Index> && ...),
                  "infuse: view indices are integers; see docs/policies.md#views");
    std::int64_t offset = 0;
    int d = 0;
    ((offset += static_cast<std::int64_t>(indices) * strides_[d++]), ...);
    return data_[offset];
  }

  INFUSE_HOST_DEVICE static constexpr index_type row_major_strides(const index_type& extents) {
    index_type strides{};
    std::int64_t step = 1;
    for (int d = Rank - 1; d >= 0; --d) {
      strides[d] = step;
      step *= extents[d];
    }
    return strides;
  }

 private:
  T* data_ = nullptr;
  index_type extents_{};
  index_type strides_{};
};

template <class T, int Rank>
using host_view = view<T, Rank, host_memory>;
template <class T, int Rank>
using device_view = view<T, Rank, device_memory>;

// ---- host-side validation -----------------------------------------------------------------------

// What require_view expects of one extent: a value, or any_extent, and optionally the name of the
// quantity for the message ("q.extent(2) is 63, expected 64 (head_dim)").
struct expected_extent {
  constexpr expected_extent(std::int64_t value, std::string_view name = {})  // NOLINT: implicit
      : value(value), name(name) {}
  std::int64_t value;
  std::string_view name;
};
inline constexpr std::int64_t any_extent = -1;

// What require_view expects of the strides. Most kernels vectorize along the last dimension and
// accept any stride in the others (a slice of a larger tensor, a transposed head layout).
enum class stride_rule {
  any,         // every stride accepted
  unit_inner,  // the last dimension is contiguous: stride(rank - 1) == 1
  contiguous,  // the whole view is row-major contiguous (is_contiguous())
};

// Throws infuse::error unless `x` has the expected extents, a non-null pointer when it holds any
// element, and strides that obey `strides`. The message names `argument` with the faulty part:
//   "infuse::attention::decode: q.extent(2) is 63, expected 64 (head_dim)"
template <class T, int Rank, class Space>
void require_view(const view<T, Rank, Space>& x, std::string_view call, std::string_view argument,
                  const expected_extent (&extents)[Rank],
                  stride_rule strides = stride_rule::unit_inner) {
  const auto fail = [&](std::string_view part, int d, std::int64_t value,
                        const std::string& expected) {
    std::string name(argument);
    name.append(".").append(part).append("(").append(std::to_string(d)).append(")");
    throw error(call, name, std::to_string(value), expected);
  };
  for (int d = 0; d < Rank; ++d) {
    if (x.extent(d) < 0) fail("extent", d, x.extent(d), "a nonnegative extent");
    const expected_extent& want = extents[d];
    if (want.value != any_extent && x.extent(d) != want.value) {
      std::string expected = std::to_string(want.value);
      if (!want.name.empty()) expected.append(" (").append(want.name).append(")");
      fail("extent", d, x.extent(d), expected);
    }
  }
  if (x.size() == 0) return;  // no element is ever read: any pointer and strides will do
  if (x.data() == nullptr) {
    throw error(call, std::string(argument) + ".data()", "null",
                "a pointer to " + std::to_string(x.size()) + " elements");
  }
  if (strides == stride_rule::unit_inner && x.extent(Rank - 1) != 1 && x.stride(Rank - 1) != 1) {
    fail("stride", Rank - 1, x.stride(Rank - 1), "1 (the last dimension must be contiguous)");
  }
  if (strides == stride_rule::contiguous && !x.is_contiguous()) {
    const auto row_major = view<T, Rank, Space>::row_major_strides(x.extents());
    for (int d = 0; d < Rank; ++d) {
      if (x.extent(d) != 1 && x.stride(d) != row_major[d]) {
        fail("stride", d, x.stride(d),
             std::to_string(row_major[d]) + " (the view must be row-major contiguous)");
      }
    }
  }
}

}  // namespace infuse
