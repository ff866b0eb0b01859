// infuse for host code: the core types, the CPU backend and every policy.
// A .cu file includes <infuse/cuda.cuh> instead, which adds the CUDA backend.
#pragma once

#include "infuse/core/concepts.hpp"
#include "infuse/core/config.hpp"
#include "infuse/core/error.hpp"
#include "infuse/core/float_types.hpp"
#include "infuse/core/math.hpp"
#include "infuse/core/memory.hpp"
#include "infuse/core/rng.hpp"
#include "infuse/core/view.hpp"
#include "infuse/exec/backend.hpp"
#include "infuse/exec/cpu.hpp"
#include "infuse/gemm/cpu/gemv.hpp"
#include "infuse/gemm/gemv.hpp"
#include "infuse/quant/quant.hpp"
