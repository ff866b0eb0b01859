// Everything of kv/: layouts, the page byte map, the cache view a kernel reads, the per-page
// metadata, the quantized paged cache, and retention (rules, budgets, compaction on the CPU).
// See docs/policies.md#the-quantized-paged-kv-cache.
#pragma once

#include "infuse/kv/cache_view.hpp"
#include "infuse/kv/cpu/compact.hpp"
#include "infuse/kv/format.hpp"
#include "infuse/kv/layout.hpp"
#include "infuse/kv/metadata.hpp"
#include "infuse/kv/page_pool.hpp"
#include "infuse/kv/retain.hpp"
