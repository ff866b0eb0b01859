// The CUDA body of KV compaction (kv/cuda/cache.cuh launches it): the kept tokens' K/V records
// and attention mass move to their new slots, the counterpart of kv/cpu/compact.hpp's moves.
//
// The host moves tokens one after another in ascending order, where every source is read before
// a later move overwrites it. On the device all tokens move at once, so a source may be another
// move's destination (keeping positions 1 and 2 moves 1 to 0 and 2 to 1): the moves go through a
// staging area instead, gathered in one launch and scattered in the next. The staging area is
// laid out as one page of `moves` slots in the cache's own page format, so both launches are the
// same copy between two page formats.
#pragma once

#include "infuse/core/config.hpp"

#if !defined(INFUSE_CUDA_COMPILER)
#error "infuse/kv/cuda/compact.cuh is CUDA code: include it from a .cu file compiled by nvcc"
#endif

#include <cuda_runtime.h>

#include <cstdint>

#include "infuse/kv/format.hpp"
#include "infuse/kv/layout.hpp"
#include "infuse/kv/page_pool.hpp"

namespace infuse::kv::detail {

inline constexpr int move_threads = 128;

// Where a token's records and mass are: a page format, its pages and its mass array.
template <class Format, class Byte, class Mass>
struct token_space {
  Format format;
  Byte* pages;
  Mass* mass;  // (pages, format.slots, format.k.heads)
};

// The byte offset of the record (slot, head) of `region` (0: K codes, 1: K params, 2: V codes,
// 3: V params) in a page, its heads and its record bytes.
template <class Order, class K, class V>
__device__ void region_record(const page_format<Order, K, V>& f, int region, std::int32_t slot,
                              std::int32_t head, std::int64_t& offset, std::int64_t& bytes) {
  switch (region) {
    case 0:
      bytes = f.k.code_bytes();
      offset = f.k_codes_offset() + Order::offset(slot, head, 0, f.slots, f.k.heads, bytes);
      break;
    case 1:
      bytes = f.k.param_bytes();
      offset = f.k_params_offset() + Order::offset(slot, head, 0, f.slots, f.k.heads, bytes);
      break;
    case 2:
      bytes = f.v.code_bytes();
      offset = f.v_codes_offset() + Order::offset(slot, head, 0, f.slots, f.v.heads, bytes);
      break;
    default:
      bytes = f.v.param_bytes();
      offset = f.v_params_offset() + Order::offset(slot, head, 0, f.slots, f.v.heads, bytes);
      break;
  }
}

// One block per move m: gathering copies moves[m].from to staging slot m, scattering copies
// staging slot m to moves[m].to. Records are whole 4-byte words (code and parameter records are
// multiples of 4 bytes at multiples of 4).
template <class Format>
__global__ void __launch_bounds__(move_threads)
    move_tokens_kernel(token_space<Format, const std::uint8_t, const float> from,
                       token_space<Format, std::uint8_t, float> to, const token_move* moves,
                       bool gather) {
  const std::int32_t m = blockIdx.x;
  const token_location src = gather ? moves[m].from : token_location{0, m};
  const token_location dst = gather ? token_location{0, m} : moves[m].to;
  const Format& f = from.format;
  for (int region = 0; region < 4; ++region) {
    const std::int32_t heads = region < 2 ? f.k.heads : f.v.heads;
    for (std::int32_t head = 0; head < heads; ++head) {
      std::int64_t from_offset = 0;
      std::int64_t to_offset = 0;
      std::int64_t bytes = 0;
      region_record(from.format, region, src.slot, head, from_offset, bytes);
      region_record(to.format, region, dst.slot, head, to_offset, bytes);
      const auto* source = reinterpret_cast<const std::uint32_t*>(
          from.pages + src.page * from.format.page_bytes() + from_offset);
      auto* target = reinterpret_cast<std::uint32_t*>(to.pages + dst.page * to.format.page_bytes() +
                                                      to_offset);
      for (std::int64_t w = threadIdx.x; w < bytes / 4; w += move_threads) target[w] = source[w];
    }
  }
  const std::int32_t mass_heads = f.k.heads;
  float* target = to.mass + (std::int64_t{dst.page} * to.format.slots + dst.slot) * mass_heads;
  const float* source =
      from.mass + (std::int64_t{src.page} * from.format.slots + src.slot) * mass_heads;
  for (std::int32_t h = threadIdx.x; h < mass_heads; h += move_threads) target[h] = source[h];
}

}  // namespace infuse::kv::detail
