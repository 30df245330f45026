// Declaration of the CUDA selective_state_update launcher (defined in instantiate/*.cu), torch-free.
#pragma once

#include "common/dtype.h"
#include "common/launchers.h"
#include "common/stream.h"
#include "selective_scan/selective_state_update_common.h"

namespace linmix {
// xdt: x, z and out; sdt: the state cache (fp32, fp16 or bf16). Not yet run on a GPU: the glue calls it
// only when switched on (KernelFamily::kSelectiveStateUpdate, common/kernels.h).
template <DType xdt, DType sdt>
void selective_state_update_cuda(const SelectiveStateUpdateParams& p, cudaStream_t stream);

// The launcher table (common/launchers.h): update[x dtype](state dtype, p, stream); get() is in
// selective_scan_launchers.cu.
struct SelectiveStateUpdateCudaLaunchers {
  static constexpr const char* kName = "selective_state_update";
  PerCudaDtype<void(DType, const SelectiveStateUpdateParams&, cudaStream_t)> update;
  static const SelectiveStateUpdateCudaLaunchers& get();
};
}  // namespace linmix
