// search::verify_chain and search::verify_tree on the CPU: requests split over the threads, each
// walked sequentially (search/verify.hpp has the rule and the keys).
#pragma once

#include <cstdint>
#include <string>

#include "infuse/core/error.hpp"
#include "infuse/core/view.hpp"
#include "infuse/exec/cpu.hpp"
#include "infuse/search/verify.hpp"

namespace infuse::search {

namespace detail {

// Runs the walk of one request and writes its outputs (all -1 / 0 on a bad status).
template <acceptance Rule, class Children, class Rows, class Space>
void verify_request(const Children& children, const Rows& rows, std::int64_t vocab,
                    std::uint64_t seed, std::int64_t position, const verify_result<Space>& out,
                    std::int64_t request) {
  clear_emitted(out, request);
  const emit_into<host_memory> emit{&out, request, true};
  const verify_outcome outcome =
      verify_walk<Rule == acceptance::greedy>(children, rows, sequential_row_ops{vocab}, vocab,
                                              seed, static_cast<std::uint64_t>(position), emit);
  store_outcome(out, request, outcome);
}

}  // namespace detail

// Chain verification of every request (search/verify.hpp). Throws infuse::error naming the
// argument, before writing anything, on mismatched shapes or a row that is not contiguous.
template <acceptance Rule = acceptance::sampled>
void verify_chain(const exec::cpu& exec, const chain_drafts<host_memory>& in,
                  const verify_result<host_memory>& out) {
  const detail::verify_shape shape = detail::require_chain<Rule>(in, out);
  const std::int64_t n = shape.length;
  const std::int64_t vocab = shape.vocab;
  exec.parallel_for(shape.batch, [&](std::int64_t request) {
    detail::verify_request<Rule>(detail::chain_children{n},
                                 detail::chain_rows<host_memory>{&in, request}, vocab,
                                 in.seeds(request), in.positions(request), out, request);
  });
}

// Tree verification of every request (search/verify.hpp). Also throws when a parent index is not
// -1 at node 0 and in [0, v) at node v.
template <acceptance Rule = acceptance::sampled>
void verify_tree(const exec::cpu& exec, const tree_drafts<host_memory>& in,
                 const verify_result<host_memory>& out) {
  const detail::verify_shape shape = detail::require_tree<Rule>(in, out);
  const std::int64_t batch = shape.batch;
  const std::int64_t nodes = shape.length;
  const std::int64_t vocab = shape.vocab;
  const char* call = detail::verify_tree_call;
  for (std::int64_t request = 0; request < batch; ++request) {
    for (std::int64_t v = 0; v < nodes; ++v) {
      const std::int32_t parent = in.parents(request, v);
      if (v == 0 ? parent != -1 : (parent < 0 || parent >= v)) {
        throw error(
            call, "in.parents(" + std::to_string(request) + ", " + std::to_string(v) + ")",
            std::to_string(parent),
            v == 0 ? "-1 (node 0 is the root)" : "a parent in [0, node) (topological order)");
      }
    }
  }
  exec.parallel_for(batch, [&](std::int64_t request) {
    detail::verify_request<Rule>(detail::tree_children{&in.parents(request, 0), nodes},
                                 detail::tree_rows<host_memory>{&in, request}, vocab,
                                 in.seeds(request), in.positions(request), out, request);
  });
}

}  // namespace infuse::search
