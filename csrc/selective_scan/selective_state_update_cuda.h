// Declaration of the CUDA selective_state_update launcher (defined in instantiate/*.cu), torch-free.
#pragma once

#include "common/dtype.h"
#include "common/stream.h"
#include "selective_scan/selective_state_update_common.h"

namespace linmix {
// xdt: x, z and out; sdt: the state cache (fp32, fp16 or bf16). Not yet run on a GPU: the glue calls it
// only when unverified_kernels_enabled().
template <DType xdt, DType sdt>
void selective_state_update_cuda(const SelectiveStateUpdateParams& p, cudaStream_t stream);
}  // namespace linmix
