// infuse for .cu files compiled by nvcc: everything in <infuse/infuse.hpp> and the CUDA backend.
#pragma once

#include "infuse/attention/cuda/decode.cuh"
#include "infuse/attention/cuda/prefill.cuh"
#include "infuse/exec/cuda.cuh"
#include "infuse/gemm/cuda/gemv.cuh"
#include "infuse/infuse.hpp"
#include "infuse/kv/cuda/cache.cuh"
#include "infuse/quant/cuda/quantize.cuh"
#include "infuse/search/cuda/beam.cuh"
#include "infuse/search/cuda/fused_head.cuh"
#include "infuse/search/cuda/particles.cuh"
#include "infuse/search/cuda/row_stats.cuh"
#include "infuse/search/cuda/sample.cuh"
#include "infuse/search/cuda/verify.cuh"
