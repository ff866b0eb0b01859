// search::row_stats on the CPU: rows split over the threads, one sequential pass per row.
#pragma once

#include <cstdint>

#include "infuse/exec/cpu.hpp"
#include "infuse/search/row_stats.hpp"

namespace infuse::search {

// logits (rows,vocab) with any row stride, stats (rows).
template <class Logits, class Stats>
void row_stats(const exec::cpu& exec, Logits logits, Stats stats) {
  detail::require_row_stats<exec::cpu>(logits, stats);
  const std::int64_t vocab = logits.extent(1);
  exec.parallel_for(logits.extent(0), [&](std::int64_t row) {
    stats(row) = row_stats(vocab == 0 ? nullptr : &logits(row, 0), vocab);
  });
}

}  // namespace infuse::search
