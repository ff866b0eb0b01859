// The attention tests' KV store (tests/unit/attention/store.hpp) copied to the device: the pool,
// the page table and the key bounds in device buffers, and the cache view a CUDA body reads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "infuse/core/memory.hpp"
#include "infuse/exec/cuda.cuh"
#include "infuse/kv/cache_view.hpp"
#include "unit/attention/store.hpp"

namespace infuse::test {

template <class T>
device_buffer<T> to_device(const std::vector<T>& host) {
  return device_buffer<T>(std::span<const T>(host));
}

// Relative error ||out - ref|| / ||ref|| (ref all zeros: ||out||), and whether every value of
// out is finite where ref is.
inline double relative_difference(const std::vector<float>& out, const std::vector<float>& ref) {
  double diff = 0.0;
  double norm = 0.0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    if (!(std::isfinite(out[i]) || out[i] == ref[i])) return INFINITY;
    if (std::isinf(ref[i])) continue;  // -inf lse of an empty selection, compared exactly above
    diff += (double{out[i]} - ref[i]) * (double{out[i]} - ref[i]);
    norm += double{ref[i]} * ref[i];
  }
  return norm > 0.0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

template <class Layout, class K, class V>
struct device_store {
  using host_store = kv_store<Layout, K, V>;
  using view_type = kv::cache_view<Layout, K, V, device_memory>;

  device_buffer<float> pool;  // the pool's bytes, as floats (cudaMalloc aligns to 256)
  device_buffer<std::int32_t> indptr, indices, last_page_len, lengths;
  device_buffer<infuse::half> key_min, key_max;
  device_buffer<float> mass;
  view_type view;

  explicit device_store(host_store& st)
      : pool(to_device(st.storage)),
        indptr(to_device(st.indptr)),
        indices(to_device(st.indices)),
        last_page_len(to_device(st.last_page_len)),
        lengths(to_device(st.lengths)),
        key_min(to_device(st.key_min)),
        key_max(to_device(st.key_max)),
        mass(to_device(st.mass)) {
    const auto host = st.view();
    view.pages = reinterpret_cast<std::uint8_t*>(pool.data());
    view.pool_pages = host.pool_pages;
    view.format = host.format;
    if constexpr (Layout::is_paged) {
      view.table = {indptr.data(), indices.data(), last_page_len.data(), host.table.sequences};
    } else {
      view.table = {lengths.data(), host.table.sequences, host.table.capacity};
    }
    view.key_min = key_min.data();
    view.key_max = key_max.data();
    view.mass = mass.data();
  }

  // The pool's bytes back on the host, to compare what a body wrote into it.
  std::vector<float> pool_on_host() const { return pool.to_host(); }
};

}  // namespace infuse::test
