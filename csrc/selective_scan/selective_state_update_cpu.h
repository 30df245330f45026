#pragma once

#include "common/dtype.h"
#include "selective_scan/selective_state_update_common.h"

namespace linmix {

// x_dtype: x, z and out; state_dtype: the state cache. Accumulation in fp32 (fp64 for fp64 x).
void selective_state_update_cpu(const SelectiveStateUpdateParams& p, DType x_dtype, DType state_dtype);

}  // namespace linmix
