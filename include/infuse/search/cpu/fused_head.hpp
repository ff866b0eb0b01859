// search::sample_from_head and search::greedy_from_head on exec::cpu (declared in
// search/fused_head.hpp).
//
// Pass 1, OpenMP threads over contiguous ranges of vocabulary tiles (tile_rows rows of w): the
// tile's logits for every batch row go to the thread's small tile buffer, computed by gemv's own
// row kernels (the same batch tiles of up to 8 rows as its run_tiles, hence the same
// floats as gemv), and each batch row's state in the thread's slot takes the tile in: maximum,
// lowest-id argmax, NaN flag, allowed count, and for a top-k row the tokens offered to the
// thread's top_k_buffer (search/cpu/sample.hpp), whose running threshold never exceeds the row's
// k-th largest logit, so that it keeps every token of the top-k set.
// Pass 2, threads over batch rows: the threads' states merge (threads hold increasing token
// ranges), and the row is sampled by cpu_sample::sample_row over the kept tokens, given as its
// list of tokens with an all-clear mask: the same code as sample(), on a set that holds the
// row's maximum and top-k set, hence the same token, log-probability and top-n outputs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <new>
#include <type_traits>
#include <utility>

#include "infuse/exec/cpu.hpp"
#include "infuse/gemm/cpu/gemv.hpp"
#include "infuse/search/cpu/sample.hpp"
#include "infuse/search/fused_head.hpp"

namespace infuse::search::detail {

namespace cpu_head {

namespace hn = hwy::HWY_NAMESPACE;
using cpu_sample::float_tag;
using cpu_sample::max_lanes;

// Vocabulary rows per tile: a multiple of 32 (whole bitmask words) and of 4 (the row kernels'
// step); the tile's logits of 8 batch rows stay within 16 KiB.
inline constexpr std::int64_t tile_rows = 512;
// The top_k_buffer's capacity for any k <= max_fused_top_k: min(max(4 k, 1024), vocab).
inline constexpr std::int64_t buffer_capacity = std::max<std::int64_t>(4 * max_fused_top_k, 1024);

constexpr std::int64_t round_up(std::int64_t bytes) {
  return (bytes + 63) / 64 * 64;
}

// One batch row as one thread of pass 1 has seen it.
struct row_state {
  cpu_sample::row_summary summary;
  bool top_k;                       // the row keeps its top-k tokens in `buffer`
  cpu_sample::top_k_buffer buffer;  // of k = 1 when not
};

// Byte sizes inside a thread's slot of pass 1: the tile buffer, then per batch row its state and
// the arrays of its top_k_buffer.
struct pass_layout {
  std::int64_t batch;

  std::int64_t tile_bytes() const { return round_up(tile_rows * batch * std::int64_t{4}); }
  static constexpr std::int64_t state_bytes = round_up(sizeof(row_state));
  static constexpr std::int64_t array_bytes = round_up((buffer_capacity + max_lanes) * 8);
  static constexpr std::int64_t row_bytes = state_bytes + 3 * array_bytes;
  std::int64_t slot_bytes() const { return tile_bytes() + batch * row_bytes; }

  float* tile(std::byte* slot) const { return reinterpret_cast<float*>(slot); }
  std::byte* row(std::byte* slot, std::int64_t b) const {
    return slot + tile_bytes() + b * row_bytes;
  }
  row_state* state(std::byte* slot, std::int64_t b) const {
    return std::launder(reinterpret_cast<row_state*>(row(slot, b)));
  }
  // The arrays the buffer uses: probe logits and tokens, and its selection scratch.
  cpu_sample::row_scratch buffer_scratch(std::byte* slot, std::int64_t b) const {
    std::byte* arrays = row(slot, b) + state_bytes;
    cpu_sample::row_scratch s{};
    s.probe_logits = reinterpret_cast<float*>(arrays);
    s.probe_tokens = reinterpret_cast<std::int32_t*>(arrays + array_bytes);
    s.radix = reinterpret_cast<std::uint64_t*>(arrays + 2 * array_bytes);
    return s;
  }
};

// The tile's logits of one batch row, [first, first + count) of the vocabulary, taken into the
// row's state. mask: the row's bitmask words (null: every token allowed).
inline void take_tile(const float* logits, std::int64_t first, std::int64_t count,
                      const std::uint32_t* mask, row_state& state) {
  auto& summary = state.summary;
  const bool top_k = state.top_k;
  const auto visit = [&](std::int32_t token, float logit) {
    summary.observe(token, logit);
    if (top_k) state.buffer.offer(token, logit);
  };
  if (mask != nullptr) {
    for (std::int64_t w = 0; w < (count + 31) / 32; ++w) {
      std::uint32_t bits = mask[first / 32 + w];
      if (count - 32 * w < 32) bits &= (1u << (count - 32 * w)) - 1u;
      for (; bits != 0; bits &= bits - 1u) {
        const std::int64_t t = 32 * w + __builtin_ctz(bits);
        visit(static_cast<std::int32_t>(first + t), logits[t]);
      }
    }
    return;
  }
  const float_tag d;
  const auto lanes = static_cast<std::int64_t>(hn::Lanes(d));
  auto vmax = hn::Set(d, -INFINITY);
  auto nan = hn::Zero(d);  // NaN lanes as all-ones bits
  bool strict = state.buffer.strict();
  auto limit = hn::Set(d, top_k ? state.buffer.threshold() : INFINITY);
  std::int64_t t = 0;
  for (; t + lanes <= count; t += lanes) {
    const auto x = hn::LoadU(d, logits + t);
    vmax = hn::Max(vmax, x);
    nan = hn::Or(nan, hn::VecFromMask(d, hn::IsNaN(x)));
    if (top_k) {
      const auto keep = strict ? hn::Gt(x, limit) : hn::Ge(x, limit);
      if (!hn::AllFalse(d, keep)) {
        state.buffer.offer(d, x, keep, first + t);
        strict = state.buffer.strict();
        limit = hn::Set(d, state.buffer.threshold());
      }
    }
  }
  const float vector_max = hn::GetLane(hn::MaxOfLanes(d, vmax));
  const bool vector_nan = !hn::AllFalse(d, hn::MaskFromVec(nan));
  summary.nan = summary.nan || vector_nan;
  // Earlier tiles hold lower ids: only a strictly larger maximum moves the argmax here.
  if (!vector_nan && vector_max > summary.max) {
    summary.max = vector_max;
    summary.argmax =
        static_cast<std::int32_t>(first + cpu_sample::first_equal(logits, t, vector_max));
  }
  summary.allowed += t;
  for (; t < count; ++t) visit(static_cast<std::int32_t>(first + t), logits[t]);
}

// Rows [first, first + count) of w as a matrix of their own (the row kernels index from 0).
template <class S>
quant::matrix<S, host_memory> row_range(const quant::matrix<S, host_memory>& w, std::int64_t first,
                                        std::int64_t count) {
  const std::int64_t group = w.group_index(first, 0);
  return {w.block(first, 0), w.scales + group * S::scales_per_group,
          S::has_zero ? w.zeros + group : nullptr, count, w.cols};
}

// Rows [first, first + count) of w times every batch row, in gemv's batch tiles of up to 8 rows
// (its kernels' results depend on the batch tile), into `store`.
template <class S, class Kernels>
void tile_times_batch(const quant::matrix<S, host_memory>& w, std::int64_t first,
                      std::int64_t count, std::int64_t batch,
                      const gemm::cpu::detail::epilogue& store, const Kernels& kernels) {
  namespace g = gemm::cpu::detail;
  const quant::matrix<S, host_memory> rows = row_range(w, first, count);
  const auto* none = static_cast<const quant::matrix<S, host_memory>*>(nullptr);
  for (std::int64_t b0 = 0; b0 < batch; b0 += gemm::cpu::max_batch_tile) {
    const int tile =
        static_cast<int>(std::min<std::int64_t>(gemm::cpu::max_batch_tile, batch - b0));
    [&]<int... Batch>(std::integer_sequence<int, Batch...>) {
      ((tile == Batch + 1
            ? g::rows_times_batch<S, Batch + 1>(kernels.template operator()<Batch + 1>(b0), rows,
                                                none, 0, count, b0, store)
            : void()),
       ...);
    }
    (std::make_integer_sequence<int, gemm::cpu::max_batch_tile>());
  }
}

// The kernels of gemv for the batch tile at b0, as gemv_body makes them.
template <class S, class Activations>
struct head_kernels {
  host_view<const float, 2> x;
  gemm::cpu::detail::int8_x_layout int8_layout;
  bool same_group;

  head_kernels(const exec::cpu& exec, const quant::matrix<S, host_memory>& w,
               host_view<const float, 2> hidden, const Activations& activations)
      : x(hidden), int8_layout{}, same_group(false) {
    if constexpr (std::is_same_v<Activations, gemm::int8_activations>) {
      namespace g = gemm::cpu::detail;
      int8_layout = g::int8_x_layout::of(activations.workspace, w.cols);
      exec.parallel_for(x.extent(0), [&](std::int64_t b) {
        g::quantize_activations<S::bits, g::has_vnni>(&x(b, 0), w.cols, w.group_size(), int8_layout,
                                                      b);
      });
      same_group = w.group_size() % (g::step_blocks<S::bits> * quant::block_size) == 0 ||
                   w.groups_per_row() == 1;
    }
  }

  template <int Batch>
  auto operator()(std::int64_t b0) const {
    namespace g = gemm::cpu::detail;
    if constexpr (std::is_same_v<Activations, gemm::int8_activations>) {
      g::int8_rows<S, Batch, g::has_vnni> kernel{{}, same_group};
      for (int b = 0; b < Batch; ++b) kernel.x[b] = int8_layout.row(b0 + b);
      return kernel;
    } else {
      return g::float_rows<S, Batch>{&x(b0, 0), x.stride(0)};
    }
  }
};

// Whether a row's result follows from pass 1's summaries: greedy, or a top-k set the buffer holds.
inline bool uses_top_k(const cpu_sample::row_filters& f, std::int64_t vocab) {
  return f.temperature != 0.0f && f.top_k > 0 && f.top_k < vocab;
}
inline bool fusable_row(const cpu_sample::row_filters& f, std::int64_t vocab) {
  return f.temperature == 0.0f || (uses_top_k(f, vocab) && f.top_k <= max_fused_top_k);
}

// Whether a call is decided from pass 1's summaries (see search/fused_head.hpp); it may still
// fall back when a top-k buffer drops ties.
template <class Set>
bool fusable_call(const sample_rows<host_memory>& rows,
                  const sample_params<host_memory, Set>* params, std::int64_t batch,
                  std::int64_t vocab) {
  if (!fusable_filters<Set>) return false;
  for (std::int64_t r = 0; r < batch; ++r) {
    if (!fusable_row(cpu_sample::filters_of(rows, params, r), vocab)) return false;
  }
  return true;
}

}  // namespace cpu_head

template <>
struct head_body<exec::cpu> {
  template <class Set>
  static std::int64_t workspace_bytes(const exec::cpu& exec, std::int64_t rows,
                                      std::int64_t vocab) {
    if (rows == 0) return 0;
    const std::int64_t threads = exec.threads();
    const std::int64_t fused = threads * cpu_head::pass_layout{rows}.slot_bytes() +
                               std::min(threads, rows) * cpu_sample::scratch_layout::of(vocab).slot;
    return 64 + std::max(fused, through_logits_bytes<Set>(exec, rows, vocab));
  }

  // Greedy when params is null; arguments already checked but for the parameter values.
  template <class Set, class S, class Activations>
  static void sample(const exec::cpu& exec, const quant::matrix<S, host_memory>& w,
                     host_view<const float, 2> hidden, const sample_rows<host_memory>& rows,
                     const sample_params<host_memory, Set>* params,
                     const sample_outputs<host_memory>& out,
                     const view<std::byte, 1, host_memory>& workspace,
                     const Activations& activations) {
    using namespace cpu_head;
    const std::int64_t vocab = w.rows;
    const std::int64_t batch = hidden.extent(0);
    if (params != nullptr) validate_sample_values<Set>(vocab, rows, *params);
    std::byte* const base = aligned_base(workspace.data());
    if (!fusable_call(rows, params, batch, vocab) ||
        !fused_pass<Set>(exec, w, hidden, rows, params, out, base, activations)) {
      sample_through_logits<Set>(exec, w, hidden, rows, params, out, base, activations);
    }
  }

 private:
  // Both passes; false (nothing written) when a top-k buffer may have dropped ties of its row's
  // k-th largest logit.
  template <class Set, class S, class Activations>
  static bool fused_pass(const exec::cpu& exec, const quant::matrix<S, host_memory>& w,
                         host_view<const float, 2> hidden, const sample_rows<host_memory>& rows,
                         const sample_params<host_memory, Set>* params,
                         const sample_outputs<host_memory>& out, std::byte* base,
                         const Activations& activations) {
    using namespace cpu_head;
    const std::int64_t vocab = w.rows;
    const std::int64_t batch = hidden.extent(0);
    const std::int64_t words = (vocab + 31) / 32;
    const pass_layout layout{batch};
    const int threads = exec.threads();
    const auto slot = [&](int thread) { return base + thread * layout.slot_bytes(); };
    const auto mask_of = [&](std::int64_t r) -> const std::uint32_t* {
      if constexpr (Set::template has<filter::token_bitmask>) {
        if (params != nullptr) return &params->bitmask(rows.request(r), 0);
      }
      return nullptr;
    };
    for (int thread = 0; thread < threads; ++thread) {
      for (std::int64_t r = 0; r < batch; ++r) {
        const auto f = cpu_sample::filters_of(rows, params, r);
        const bool top_k = uses_top_k(f, vocab);
        new (layout.row(slot(thread), r))
            row_state{{},
                      top_k,
                      cpu_sample::top_k_buffer(layout.buffer_scratch(slot(thread), r),
                                               top_k ? f.top_k : 1, vocab)};
      }
    }
    const head_kernels<S, Activations> kernels(exec, w, hidden, activations);
    const std::int64_t tiles = (vocab + tile_rows - 1) / tile_rows;
    exec.parallel_for_ranges(tiles, [&](int thread, std::int64_t begin, std::int64_t end) {
      float* tile = layout.tile(slot(thread));
      const gemm::cpu::detail::epilogue store{
          nullptr, gemm::act::none, false, gemm::act::none, nullptr, 0, tile, tile_rows};
      for (std::int64_t t = begin; t < end; ++t) {
        const std::int64_t first = t * tile_rows;
        const std::int64_t count = std::min(tile_rows, vocab - first);
        tile_times_batch(w, first, count, batch, store, kernels);
        for (std::int64_t r = 0; r < batch; ++r) {
          take_tile(tile + r * tile_rows, first, count, mask_of(r), *layout.state(slot(thread), r));
        }
      }
    });
    for (int thread = 0; thread < threads; ++thread) {
      for (std::int64_t r = 0; r < batch; ++r) {
        const row_state& state = *layout.state(slot(thread), r);
        if (state.top_k && state.buffer.strict()) return false;
      }
    }
    // Pass 2: per row, the merged summary and sample_row over the kept tokens.
    std::byte* sample_base = base + threads * layout.slot_bytes();
    const cpu_sample::scratch_layout sample_layout = cpu_sample::scratch_layout::of(vocab);
    exec.parallel_for_ranges(batch, [&](int thread, std::int64_t begin, std::int64_t end) {
      const auto scratch =
          cpu_sample::row_scratch::at(sample_base + thread * sample_layout.slot, sample_layout);
      std::fill(scratch.mask, scratch.mask + words, 0u);
      for (std::int64_t r = begin; r < end; ++r) {
        const auto f = cpu_sample::filters_of(rows, params, r);
        const bool top_k = uses_top_k(f, vocab);
        const cpu_sample::row_writer writer{out, r, f.temperature};
        cpu_sample::row_summary merged;
        std::int64_t listed = 0;
        for (int thread_seen = 0; thread_seen < threads; ++thread_seen) {
          const row_state& state = *layout.state(slot(thread_seen), r);
          const auto& s = state.summary;
          merged.nan = merged.nan || s.nan;
          merged.allowed += s.allowed;
          if (s.allowed > 0 && (s.max > merged.max || merged.allowed == s.allowed)) {
            merged.max = s.max;
            merged.argmax = s.argmax;
          }
          for (std::int64_t i = 0; top_k && i < state.buffer.size(); ++i) {
            scratch.listed[listed++] = {state.buffer.tokens()[i], state.buffer.logits()[i]};
          }
        }
        if (merged.nan) {
          writer.finish({0, NAN, row_status::nan_logits});
          continue;
        }
        if (!top_k && merged.allowed > 0) scratch.listed[listed++] = {merged.argmax, merged.max};
        const cpu_sample::row_input row{nullptr, vocab, scratch.mask, scratch.listed, listed};
        writer.finish(cpu_sample::sample_row(row, f, scratch, writer));
      }
    });
    return true;
  }
};

}  // namespace infuse::search::detail
