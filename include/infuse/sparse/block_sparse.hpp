// sparse::block_sparse: a run-time list of KV blocks per row, in CSR form. The keys are cut into
// blocks of block_size tokens; row r reads blocks indices[indptr[r] .. indptr[r + 1]), strictly
// ascending. In decode, row r is sequence r of the batch; blocks past the sequence's end are
// clipped away, and a sequence without a row reads nothing. See docs/policies.md#sparsity-policies.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "infuse/core/config.hpp"
#include "infuse/core/error.hpp"
#include "infuse/sparse/policy.hpp"

namespace infuse::sparse {

struct block_sparse {
  using identifier = policy_identifier;
  static constexpr const char* name = "block_sparse";

  struct params {
    std::int64_t block_size = 0;            // tokens per KV block, at least 1
    std::int32_t rows = 0;                  // rows of the list
    const std::int32_t* indptr = nullptr;   // (rows + 1), from 0, never decreasing
    const std::int32_t* indices = nullptr;  // (indptr[rows]) block indices, ascending in a row
  };

  static void check(const params& p, std::string_view call) {
    require(p.block_size >= 1, call, "sparsity.block_size", p.block_size, "at least 1");
    require(p.rows >= 0, call, "sparsity.rows", p.rows, "at least 0");
    require(p.indptr != nullptr, call, "sparsity.indptr", p.indptr,
            "a pointer to rows + 1 offsets");
    require(p.indptr[0] == 0, call, "sparsity.indptr[0]", p.indptr[0], "0");
    for (std::int32_t r = 0; r < p.rows; ++r) {
      require(p.indptr[r + 1] >= p.indptr[r], call,
              "sparsity.indptr[" + std::to_string(r + 1) + "]", p.indptr[r + 1],
              "at least the entry before it (indptr never decreases)");
    }
    require(p.indptr[p.rows] == 0 || p.indices != nullptr, call, "sparsity.indices", p.indices,
            "a pointer to indptr[rows] block indices");
    for (std::int32_t r = 0; r < p.rows; ++r) {
      for (std::int32_t i = p.indptr[r]; i < p.indptr[r + 1]; ++i) {
        const bool ascending =
            i == p.indptr[r] ? p.indices[i] >= 0 : p.indices[i] > p.indices[i - 1];
        require(ascending, call, "sparsity.indices[" + std::to_string(i) + "]", p.indices[i],
                "a block index of at least 0, above the one before it in its row");
      }
    }
  }

  INFUSE_HOST_DEVICE static std::int64_t max_ranges(const params& p, const query_context& q) {
    return q.sequence < p.rows ? p.indptr[q.sequence + 1] - p.indptr[q.sequence] : 0;
  }

  INFUSE_HOST_DEVICE static std::int64_t select(const params& p, const query_context& q,
                                                token_range* out) {
    if (q.sequence >= p.rows) return 0;
    const std::int64_t end = q.query_end < q.length ? q.query_end : q.length;
    std::int64_t count = 0;
    for (std::int32_t i = p.indptr[q.sequence]; i < p.indptr[q.sequence + 1]; ++i) {
      const std::int64_t begin = std::int64_t{p.indices[i]} * p.block_size;
      if (begin >= end) break;
      const std::int64_t stop = begin + p.block_size < end ? begin + p.block_size : end;
      if (count > 0 && out[count - 1].end == begin) {
        out[count - 1].end = stop;
      } else {
        out[count++] = {begin, stop};
      }
    }
    return count;
  }

  INFUSE_HOST_DEVICE static bool visible(const params&, const mask_context& m) {
    return m.key_position <= m.query_position;
  }
};

static_assert(policy<block_sparse>,
              "infuse: sparse::block_sparse must satisfy sparse::policy; see "
              "docs/policies.md#sparsity-policies");

}  // namespace infuse::sparse
