// Every quantization scheme, the quantized-matrix view and host quantization.
// See docs/policies.md#quantization-schemes.
#pragma once

#include "infuse/quant/bcq.hpp"
#include "infuse/quant/fp8.hpp"
#include "infuse/quant/import.hpp"
#include "infuse/quant/int.hpp"
#include "infuse/quant/matrix.hpp"
#include "infuse/quant/none.hpp"
#include "infuse/quant/scheme.hpp"
