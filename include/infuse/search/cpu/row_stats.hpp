// search::row_stats on the CPU: rows split over the threads, one sequential pass per row.
#pragma once

#include <cstdint>

#include "infuse/core/concepts.hpp"
#include "infuse/core/error.hpp"
#include "infuse/core/view.hpp"
#include "infuse/exec/cpu.hpp"
#include "infuse/search/row_stats.hpp"

namespace infuse::search {

// logits (rows,vocab) with any row stride, stats (rows).
template <class Logits, class Stats>
void row_stats(const exec::cpu& exec, Logits logits, Stats stats) {
  static_check_view<exec::cpu, 2, Logits>();
  static_check_view<exec::cpu, 1, Stats>();
  static_assert(std::is_same_v<typename Logits::value_type, float> &&
                    std::is_same_v<typename Stats::element_type, row_statistics>,
                "infuse: row_stats reads float logits and writes row_statistics");
  constexpr const char* call = "infuse::search::row_stats";
  require_view(logits, call, "logits", {any_extent, any_extent});
  require_view(stats, call, "stats", {{logits.extent(0), "logits.extent(0), the rows"}});
  const std::int64_t vocab = logits.extent(1);
  exec.parallel_for(logits.extent(0), [&](std::int64_t row) {
    stats(row) = row_stats(vocab == 0 ? nullptr : &logits(row, 0), vocab);
  });
}

}  // namespace infuse::search
