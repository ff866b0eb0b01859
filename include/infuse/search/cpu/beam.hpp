// search::beam_step on the CPU: requests split over the threads; per request one pass over each
// beam's logits, then the merge of search/beam.hpp.
#pragma once

#include <cstdint>

#include "infuse/core/error.hpp"
#include "infuse/core/view.hpp"
#include "infuse/exec/cpu.hpp"
#include "infuse/search/beam.hpp"

namespace infuse::search {

template <int Width>
void beam_step(const exec::cpu& exec, const beam_inputs<host_memory>& in, const beam_params& params,
               const beam_pool<host_memory>& pool, const beam_outputs<host_memory>& out) {
  static_assert(Width >= 1, "infuse: beam_step needs a Width of at least one beam");
  detail::require_beam_step<Width>(in, params, pool, out);
  const std::int64_t vocab = in.logits.extent(2);
  exec.parallel_for(in.logits.extent(0), [&](std::int64_t request) {
    detail::top_candidates<2 * Width> merged;
    bool invalid = false;
    for (int b = 0; b < Width; ++b) {
      detail::beam_row_state<2 * Width> row;
      const float* logits = &in.logits(request, b, 0);
      for (std::int64_t x = 0; x < vocab; ++x) row.add(logits[x], b, static_cast<std::int32_t>(x));
      invalid = invalid || row.invalid;
      const float base = in.beam_scores(request, b) - row.softmax.lse();
      for (const auto& c : row.top.best) {
        if (c.token >= 0) merged.add({base + c.score, c.beam, c.token});
      }
    }
    const detail::beam_request_outputs<host_memory> request_out{&out, request};
    if (invalid) {
      detail::beam_invalid<Width>(params, request_out);
      out.status(request) = beam_status::invalid_logits;
      return;
    }
    detail::beam_merge<Width>(merged, params,
                              detail::beam_request_pool<host_memory>{&pool, request}, request_out);
    out.status(request) = beam_status::ok;
  });
}

}  // namespace infuse::search
