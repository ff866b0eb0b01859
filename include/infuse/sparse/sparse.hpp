// Every attention sparsity policy. See docs/policies.md#sparsity-policies.
#pragma once

#include "infuse/sparse/block_sparse.hpp"
#include "infuse/sparse/coverage.hpp"
#include "infuse/sparse/dense.hpp"
#include "infuse/sparse/policy.hpp"
#include "infuse/sparse/quest.hpp"
#include "infuse/sparse/recycled.hpp"
#include "infuse/sparse/tree.hpp"
#include "infuse/sparse/window.hpp"
