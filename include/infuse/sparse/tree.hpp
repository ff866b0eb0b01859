// sparse::tree: a token-tree mask over the new tokens of each sequence (speculative verification
// of a draft tree, as SpecInfer and Medusa do). See docs/policies.md#sparsity-policies.
//
// Sequence b writes n_b new tokens after a prefix; every new token sees the whole prefix, and
// among the new tokens the mask decides: row i, bit j set means new token i sees new token j
// (usually its ancestors and itself). Bits are packed 32 to a word, LSB first; a row is
// row_words(n_b) = ceil(n_b / 32) words, and sequence b's n_b rows sit at
// words[word_offsets[b] ..], so word_offsets[b + 1] - word_offsets[b] = mask_words(n_b).
// `q_indptr` is the same CSR array of new-token counts that prefill takes: the mask knows its
// own row length from it, and prefill checks that it agrees (check_batch).
#pragma once

#include <bit>
#include <cstdint>
#include <string>
#include <string_view>

#include "infuse/core/config.hpp"
#include "infuse/core/error.hpp"
#include "infuse/sparse/policy.hpp"

namespace infuse::sparse {

struct tree {
  using identifier = policy_identifier;
  static constexpr const char* name = "tree";

  struct params {
    const std::uint32_t* words = nullptr;        // the packed rows of every sequence
    const std::int64_t* word_offsets = nullptr;  // (sequences + 1): each sequence's first word
    const std::int32_t* q_indptr = nullptr;      // (sequences + 1): new tokens, as prefill's
    std::int32_t sequences = 0;
  };

  // Words of one row, and of the whole mask, of a sequence with n new tokens.
  INFUSE_HOST_DEVICE static constexpr std::int64_t row_words(std::int64_t n) {
    return (n + 31) / 32;
  }
  INFUSE_HOST_DEVICE static constexpr std::int64_t mask_words(std::int64_t n) {
    return n * row_words(n);
  }

  static void check(const params& p, std::string_view call) {
    require(p.sequences >= 0, call, "sparsity.sequences", p.sequences, "at least 0");
    if (p.sequences == 0) return;
    require(p.q_indptr != nullptr, call, "sparsity.q_indptr", p.q_indptr, "a pointer");
    require(p.word_offsets != nullptr, call, "sparsity.word_offsets", p.word_offsets, "a pointer");
    require(p.q_indptr[0] == 0, call, "sparsity.q_indptr[0]", p.q_indptr[0], "0");
    require(p.word_offsets[0] == 0, call, "sparsity.word_offsets[0]", p.word_offsets[0], "0");
    for (std::int32_t s = 0; s < p.sequences; ++s) {
      const std::int64_t n = std::int64_t{p.q_indptr[s + 1]} - p.q_indptr[s];
      require(n >= 0, call, "sparsity.q_indptr[" + std::to_string(s + 1) + "]", p.q_indptr[s + 1],
              "at least the entry before it (q_indptr never decreases)");
      const std::int64_t words = p.word_offsets[s + 1] - p.word_offsets[s];
      require(words == mask_words(n), call, "sparsity.word_offsets[" + std::to_string(s + 1) + "]",
              p.word_offsets[s + 1],
              "a mask of " + std::to_string(mask_words(n)) + " words after the entry before it (" +
                  std::to_string(n) + " rows of " + std::to_string(row_words(n)) + " words)");
    }
    const bool any = p.word_offsets[p.sequences] > 0;
    require(!any || p.words != nullptr, call, "sparsity.words", p.words, "a pointer");
  }

  // Prefill's check that the mask describes its batch: the same new-token counts.
  static void check_batch(const params& p, const std::int32_t* q_indptr, std::int32_t batch,
                          std::string_view call) {
    require(p.sequences == batch, call, "sparsity.sequences", p.sequences,
            "the batch size " + std::to_string(batch));
    for (std::int32_t s = 0; s <= batch; ++s) {
      require(p.q_indptr[s] == q_indptr[s], call, "sparsity.q_indptr[" + std::to_string(s) + "]",
              p.q_indptr[s],
              "q_indptr[" + std::to_string(s) + "] = " + std::to_string(q_indptr[s]));
    }
  }

  INFUSE_HOST_DEVICE static std::int64_t max_ranges(const params&, const query_context&) {
    return 1;
  }

  // The prefix and the new tokens up to the last one any query of the tile sees.
  INFUSE_HOST_DEVICE static std::int64_t select(const params& p, const query_context& q,
                                                token_range* out) {
    const std::int64_t n = q.length - q.new_begin;
    const std::int64_t stride = row_words(n);
    std::int64_t end = q.new_begin;
    for (std::int64_t position = q.query_begin; position < q.query_end; ++position) {
      const std::int64_t row = position - q.new_begin;
      if (row < 0 || row >= n) continue;
      const std::uint32_t* words = p.words + p.word_offsets[q.sequence] + row * stride;
      for (std::int64_t w = stride - 1; w >= 0; --w) {
        if (words[w] == 0) continue;
        const std::int64_t last = q.new_begin + w * 32 + (31 - std::countl_zero(words[w]));
        if (last + 1 > end) end = last + 1;
        break;
      }
    }
    if (end > q.length) end = q.length;
    if (end <= 0) return 0;
    out[0] = {0, end};
    return 1;
  }

  INFUSE_HOST_DEVICE static bool visible(const params& p, const mask_context& m) {
    const std::int64_t column = m.key_position - m.new_begin;
    if (column < 0) return true;  // the prefix
    const std::int64_t row = m.query_position - m.new_begin;
    const std::int64_t n = std::int64_t{p.q_indptr[m.sequence + 1]} - p.q_indptr[m.sequence];
    if (row < 0 || row >= n || column >= n) return false;
    const std::uint32_t word =
        p.words[p.word_offsets[m.sequence] + row * row_words(n) + column / 32];
    return ((word >> (column % 32)) & 1u) != 0;
  }
};

static_assert(policy<tree>);

}  // namespace infuse::sparse
