// infuse for .cu files compiled by nvcc: everything in <infuse/infuse.hpp> and the CUDA backend.
#pragma once

#include "infuse/exec/cuda.cuh"
#include "infuse/infuse.hpp"
