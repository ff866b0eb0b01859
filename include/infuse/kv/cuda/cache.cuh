// The quantized paged KV cache on device memory: kv::cache<Layout, KQuant, VQuant,
// kv::device_pages>. The bookkeeping is kv::cache's own (kv/page_pool.hpp), on the host; the page
// bytes and the metadata (key bounds, attention mass) live in device memory, and the byte
// operations run on the cache's stream:
//
//   infuse::exec::cuda exec(stream);
//   kv::cache<kv::paged<16>, quant::int_<4, 32>, quant::int_<4, 32>, kv::device_pages> cache(
//       pages, {8, 128}, {8, 128}, kv::device_pages{exec});
//   cache.append(exec, seqs, counts, k, v);   // k, v: device views (rows, heads, head_dim) of
//                                            // float or half
//   auto batch = cache.view(seqs);           // batch.view(): a cache_view of device memory
//   cache.compact(exec, seqs, kept_indptr, kept);
//
// Append quantizes each row in one kernel (kv/cuda/append.cuh) into the same bytes the host cache
// writes, and folds the keys into the same bounds; compaction moves records and mass on the
// device (kv/cuda/compact.cuh). The schemes it encodes are quant::none and quant::int_. Every
// operation is asynchronous on the stream of kv::device_pages::exec (append and compact take that
// same exec); the host bookkeeping is current when the call returns. Copies to the host
// (pool().to_host(), metadata().key_min_to_host(), ...) wait for the stream. See
// docs/policies.md#the-quantized-paged-kv-cache.
#pragma once

#include "infuse/core/config.hpp"

#if !defined(INFUSE_CUDA_COMPILER)
#error "infuse/kv/cuda/cache.cuh is CUDA code: include it from a .cu file compiled by nvcc"
#endif

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "infuse/core/error.hpp"
#include "infuse/core/memory.hpp"
#include "infuse/core/view.hpp"
#include "infuse/exec/cuda.cuh"
#include "infuse/kv/cache_view.hpp"
#include "infuse/kv/cuda/append.cuh"
#include "infuse/kv/cuda/compact.cuh"
#include "infuse/kv/format.hpp"
#include "infuse/kv/page_pool.hpp"

namespace infuse::kv {

namespace detail {

// A device array's contents on the host, after the stream's work so far.
template <class T>
std::vector<T> download(const device_buffer<T>& buffer, const exec::cuda& exec) {
  exec.synchronize();
  return buffer.to_host();
}

// Grows `buffer` to at least `size` elements (its contents are not kept).
template <class T>
void reserve(device_buffer<T>& buffer, std::int64_t size) {
  if (buffer.size() < size) buffer = device_buffer<T>(size);
}

// Copies `count` elements host to device on the stream (the host array may change on return).
template <class T>
void upload(T* device, const T* host, std::size_t count, const exec::cuda& exec) {
  if (count == 0) return;
  exec::cuda::check(
      cudaMemcpyAsync(device, host, count * sizeof(T), cudaMemcpyHostToDevice, exec.stream()),
      "cudaMemcpyAsync to the device");
}

}  // namespace detail

// A ledger and its pages in device memory: capacity * page_bytes bytes, zeroed at first.
class device_page_pool : public page_ledger {
 public:
  device_page_pool(std::int32_t capacity, std::int64_t page_bytes, const exec::cuda& exec)
      : page_ledger(capacity),
        page_bytes_(page_bytes),
        exec_(exec),
        bytes_(std::int64_t{capacity} * page_bytes) {
    exec::cuda::check(cudaMemsetAsync(bytes_.data(), 0, bytes_.bytes(), exec_.stream()),
                      "cudaMemsetAsync");
  }

  [[nodiscard]] std::int64_t page_bytes() const { return page_bytes_; }
  // The first byte of page 0 (device memory).
  [[nodiscard]] std::uint8_t* data() const { return bytes_.data(); }
  // Every page's bytes, page after page, as kv::page_pool::all_bytes() holds them on the host.
  [[nodiscard]] std::vector<std::uint8_t> to_host() const {
    return detail::download(bytes_, exec_);
  }

 private:
  std::int64_t page_bytes_;
  exec::cuda exec_;
  device_buffer<std::uint8_t> bytes_;  // (capacity, page_bytes)
};

// kv::page_metadata's arrays in device memory (the covered slots stay on the host, where the
// cache's bookkeeping reads them): key_min, key_max (pages, k.heads, k.head_dim) and mass
// (pages, slots, k.heads).
class device_page_metadata {
 public:
  device_page_metadata(std::int32_t pages, std::int32_t k_heads, std::int32_t k_head_dim,
                       std::int32_t slots, const exec::cuda& exec)
      : bounds_per_page_(std::int64_t{k_heads} * k_head_dim),
        mass_per_page_(std::int64_t{slots} * k_heads),
        exec_(exec),
        key_min_(std::vector<half>(static_cast<std::size_t>(pages * bounds_per_page_),
                                   page_metadata::no_minimum)),
        key_max_(std::vector<half>(static_cast<std::size_t>(pages * bounds_per_page_),
                                   page_metadata::no_maximum)),
        mass_(pages * mass_per_page_),
        covered_(static_cast<std::size_t>(pages), 0) {
    exec::cuda::check(cudaMemsetAsync(mass_.data(), 0, mass_.bytes(), exec_.stream()),
                      "cudaMemsetAsync");
  }

  [[nodiscard]] std::int64_t bounds_per_page() const { return bounds_per_page_; }
  [[nodiscard]] std::int64_t mass_per_page() const { return mass_per_page_; }
  [[nodiscard]] std::int64_t bytes_per_page() const {
    return std::int64_t{sizeof(half)} * 2 * bounds_per_page_ +
           std::int64_t{sizeof(float)} * mass_per_page_;
  }

  // Device pointers to a page's values (page 0: the whole array).
  [[nodiscard]] half* key_min(std::int32_t page = 0) const {
    return key_min_.data() + page * bounds_per_page_;
  }
  [[nodiscard]] half* key_max(std::int32_t page = 0) const {
    return key_max_.data() + page * bounds_per_page_;
  }
  [[nodiscard]] float* mass(std::int32_t page = 0) const {
    return mass_.data() + page * mass_per_page_;
  }

  [[nodiscard]] std::int32_t covered(std::int32_t page) const {
    return covered_[static_cast<std::size_t>(page)];
  }
  void set_covered(std::int32_t page, std::int32_t slots) {
    covered_[static_cast<std::size_t>(page)] = slots;
  }

  // The whole arrays on the host, laid out as kv::page_metadata's.
  [[nodiscard]] std::vector<half> key_min_to_host() const {
    return detail::download(key_min_, exec_);
  }
  [[nodiscard]] std::vector<half> key_max_to_host() const {
    return detail::download(key_max_, exec_);
  }
  [[nodiscard]] std::vector<float> mass_to_host() const { return detail::download(mass_, exec_); }

  // Page `to` takes every metadata value of page `from`.
  void copy_page(std::int32_t from, std::int32_t to) {
    copy(key_min_, from, to, bounds_per_page_);
    copy(key_max_, from, to, bounds_per_page_);
    copy(mass_, from, to, mass_per_page_);
    covered_[static_cast<std::size_t>(to)] = covered_[static_cast<std::size_t>(from)];
  }

  // Equal bit for bit.
  friend bool operator==(const device_page_metadata& a, const device_page_metadata& b) {
    const auto same = [](const auto& x, const auto& y) {
      return x.size() == y.size() && std::memcmp(x.data(), y.data(), sizeof(x[0]) * x.size()) == 0;
    };
    return a.covered_ == b.covered_ && same(a.key_min_to_host(), b.key_min_to_host()) &&
           same(a.key_max_to_host(), b.key_max_to_host()) &&
           same(a.mass_to_host(), b.mass_to_host());
  }

 private:
  template <class T>
  void copy(device_buffer<T>& values, std::int32_t from, std::int32_t to, std::int64_t per_page) {
    exec::cuda::check(
        cudaMemcpyAsync(values.data() + to * per_page, values.data() + from * per_page,
                        sizeof(T) * static_cast<std::size_t>(per_page), cudaMemcpyDeviceToDevice,
                        exec_.stream()),
        "cudaMemcpyAsync of a page's metadata");
  }

  std::int64_t bounds_per_page_;
  std::int64_t mass_per_page_;
  exec::cuda exec_;
  device_buffer<half> key_min_;
  device_buffer<half> key_max_;
  device_buffer<float> mass_;
  std::vector<std::int32_t> covered_;  // (pages)
};

// What a device cache's view(batch) returns: the batch's page table, on the host and uploaded to
// device memory this object owns, and the device kv::cache_view over it. Valid until the cache
// changes a sequence of the batch or is destroyed; movable, not copyable.
template <class Layout, class KQuant, class VQuant>
class device_cache_batch {
 public:
  using view_type = cache_view<Layout, KQuant, VQuant, device_memory>;

  // Uploads the table on exec's stream, so the cache's kernels that follow find it there.
  device_cache_batch(page_table<Layout::page_size> table, view_type view, const exec::cuda& exec)
      : table_(std::move(table)),
        indptr_(std::ssize(table_.indptr)),
        indices_(std::ssize(table_.indices)),
        last_page_len_(std::ssize(table_.last_page_len)),
        view_(view) {
    detail::upload(indptr_.data(), table_.indptr.data(), table_.indptr.size(), exec);
    detail::upload(indices_.data(), table_.indices.data(), table_.indices.size(), exec);
    detail::upload(last_page_len_.data(), table_.last_page_len.data(), table_.last_page_len.size(),
                   exec);
    view_.table = {indptr_.data(), indices_.data(), last_page_len_.data(),
                   static_cast<std::int32_t>(table_.last_page_len.size())};
  }

  [[nodiscard]] const page_table<Layout::page_size>& table() const { return table_; }
  [[nodiscard]] const view_type& view() const { return view_; }

 private:
  page_table<Layout::page_size> table_;
  device_buffer<std::int32_t> indptr_;  // moving a device_buffer keeps its memory: view_ stays
  device_buffer<std::int32_t> indices_;
  device_buffer<std::int32_t> last_page_len_;
  view_type view_;
};

struct device_pages;

// The bytes and metadata of a cache's pages in device memory, and the byte operations on them,
// each on the cache's stream.
template <class Format>
class device_page_storage {
  static_assert(!is_per_channel<typename decltype(Format::k)::scheme> && !Format::has_flags,
                "infuse: kv::device_pages stores per-token arrangements; kv::per_channel keys and "
                "kv::mixed records are kept on host memory (kv::host_pages); see "
                "docs/policies.md#kivi-and-zipvl-arrangements");
  using k_scheme = typename decltype(Format::k)::scheme;
  using v_scheme = typename decltype(Format::v)::scheme;
  static_assert(detail::device_encodable<k_scheme> && detail::device_encodable<v_scheme>,
                "infuse: kv::device_pages encodes K and V on the device for quant::none and "
                "quant::int_ schemes; see docs/policies.md#the-quantized-paged-kv-cache");

 public:
  device_page_storage(std::int32_t capacity, const Format& format, const device_pages& alloc);

  [[nodiscard]] const Format& format() const { return format_; }
  [[nodiscard]] page_ledger& ledger() { return pool_; }
  [[nodiscard]] const page_ledger& ledger() const { return pool_; }
  [[nodiscard]] const device_page_pool& pool() const { return pool_; }
  [[nodiscard]] const device_page_metadata& metadata() const { return metadata_; }
  [[nodiscard]] std::int64_t metadata_bytes_per_page() const { return metadata_.bytes_per_page(); }
  [[nodiscard]] std::int32_t covered(std::int32_t page) const { return metadata_.covered(page); }
  void set_covered(std::int32_t page, std::int32_t slots) { metadata_.set_covered(page, slots); }

  [[nodiscard]] std::uint8_t* pages() { return pool_.data(); }
  [[nodiscard]] half* key_min() { return metadata_.key_min(); }
  [[nodiscard]] half* key_max() { return metadata_.key_max(); }
  [[nodiscard]] float* mass() { return metadata_.mass(); }

  // What cache::view(batch) returns: the table on the host and uploaded on the cache's stream.
  template <class Batch, class Table>
  Batch make_batch(Table table, const typename Batch::view_type& view) const {
    return Batch(std::move(table), view, exec_);
  }

  // The exec an append or a compaction is given runs on the cache's stream (the cache orders
  // its operations by that stream alone).
  void check_exec(const exec::cuda& exec, const char* call) const {
    require(exec.stream() == exec_.stream(), call, "exec", static_cast<const void*>(exec.stream()),
            "an exec::cuda on the cache's stream (kv::device_pages::exec)");
  }

  // Device room for `runs` page runs and `moves` token moves, before the cache changes anything.
  void prepare(std::int64_t runs, std::int64_t moves) {
    detail::reserve(runs_, runs);
    detail::reserve(moves_, moves);
    detail::reserve(staging_, staging_format(moves).page_bytes());
    detail::reserve(staging_mass_, moves * format_.k.heads);
  }

  void copy_page(std::int32_t from, std::int32_t to) {
    exec::cuda::check(cudaMemcpyAsync(pool_.data() + to * format_.page_bytes(),
                                      pool_.data() + from * format_.page_bytes(),
                                      static_cast<std::size_t>(format_.page_bytes()),
                                      cudaMemcpyDeviceToDevice, exec_.stream()),
                      "cudaMemcpyAsync of a page");
    metadata_.copy_page(from, to);
  }

  void clear_mass(std::span<const page_run> runs) {
    if (runs.empty()) return;
    detail::upload(runs_.data(), runs.data(), runs.size(), exec_);
    exec_.launch(detail::clear_mass_kernel<Format>, dim3(static_cast<unsigned>(runs.size())),
                 dim3(detail::append_threads), 0, format_, runs_.data(), metadata_.mass());
  }

  // One run goes to the kernel as an argument (truncate, copy on write); more are uploaded.
  void fold(std::span<const page_run> runs) {
    if (runs.empty()) return;
    const page_run* listed = nullptr;
    if (runs.size() > 1) {
      detail::upload(runs_.data(), runs.data(), runs.size(), exec_);
      listed = runs_.data();
    }
    exec_.launch(detail::fold_bounds_kernel<Format>, dim3(static_cast<unsigned>(runs.size())),
                 dim3(detail::append_threads), 0, format_, listed, runs.front(),
                 static_cast<const std::uint8_t*>(pool_.data()), metadata_.key_min(),
                 metadata_.key_max());
  }

  // Quantizes the rows of k and v into the runs' slots (a warp per vector), then folds the keys
  // of each run into its page's bounds (a block per run).
  template <class Row>
  void write(const exec::cuda& /*exec: the cache's stream, checked*/,
             std::span<const page_run> runs, view<const Row, 3, device_memory> k,
             view<const Row, 3, device_memory> v) {
    if (runs.empty()) return;
    detail::upload(runs_.data(), runs.data(), runs.size(), exec_);
    const std::int64_t warps = k.extent(0) * (format_.k.heads + format_.v.heads);
    const std::int64_t blocks =
        std::min((warps + detail::append_threads / 32 - 1) / (detail::append_threads / 32),
                 detail::most_append_blocks);
    exec_.launch(detail::encode_rows_kernel<Format, Row>, dim3(static_cast<unsigned>(blocks)),
                 dim3(detail::append_threads), 0, format_, runs_.data(),
                 static_cast<std::int32_t>(runs.size()), k, v, pool_.data());
    exec_.launch(detail::fold_bounds_kernel<Format>, dim3(static_cast<unsigned>(runs.size())),
                 dim3(detail::append_threads), 0, format_,
                 static_cast<const page_run*>(runs_.data()), runs.front(),
                 static_cast<const std::uint8_t*>(pool_.data()), metadata_.key_min(),
                 metadata_.key_max());
  }

  // Gathers every moved token into the staging page, then scatters it to its destination.
  void move(const exec::cuda& /*exec: the cache's stream, checked*/,
            std::span<const token_move> moves) {
    if (moves.empty()) return;
    detail::upload(moves_.data(), moves.data(), moves.size(), exec_);
    const auto count = static_cast<std::int64_t>(moves.size());
    using from_space = detail::token_space<Format, const std::uint8_t, const float>;
    using to_space = detail::token_space<Format, std::uint8_t, float>;
    const Format staging = staging_format(count);
    const dim3 grid(static_cast<unsigned>(count));
    exec_.launch(detail::move_tokens_kernel<Format>, grid, dim3(detail::move_threads), 0,
                 from_space{format_, pool_.data(), metadata_.mass()},
                 to_space{staging, staging_.data(), staging_mass_.data()},
                 static_cast<const token_move*>(moves_.data()), true);
    exec_.launch(detail::move_tokens_kernel<Format>, grid, dim3(detail::move_threads), 0,
                 from_space{staging, staging_.data(), staging_mass_.data()},
                 to_space{format_, pool_.data(), metadata_.mass()},
                 static_cast<const token_move*>(moves_.data()), false);
  }

  friend bool operator==(const device_page_storage& a, const device_page_storage& b) {
    return static_cast<const page_ledger&>(a.pool_) == static_cast<const page_ledger&>(b.pool_) &&
           a.pool_.to_host() == b.pool_.to_host() && a.metadata_ == b.metadata_;
  }

 private:
  // The staging area of `moves` tokens: one page of that many slots.
  Format staging_format(std::int64_t moves) const {
    Format staging = format_;
    staging.slots = static_cast<std::int32_t>(moves);
    return staging;
  }

  Format format_;
  exec::cuda exec_;
  device_page_pool pool_;
  device_page_metadata metadata_;
  device_buffer<page_run> runs_;
  device_buffer<token_move> moves_;
  device_buffer<std::uint8_t> staging_;
  device_buffer<float> staging_mass_;
};

// Pages and metadata in device memory, every operation on `exec`'s stream.
struct device_pages {
  using memory_space = device_memory;
  using exec_type = exec::cuda;
  template <class Format>
  using storage = device_page_storage<Format>;
  template <class Layout, class KQuant, class VQuant>
  using batch = device_cache_batch<Layout, KQuant, VQuant>;

  exec::cuda exec{};
};

static_assert(page_memory<device_pages>);

template <class Format>
device_page_storage<Format>::device_page_storage(std::int32_t capacity, const Format& format,
                                                 const device_pages& alloc)
    : format_(format),
      exec_(alloc.exec),
      pool_(capacity, format.page_bytes(), alloc.exec),
      metadata_(capacity, format.k.heads, format.k.head_dim, format.slots, alloc.exec) {}

}  // namespace infuse::kv
