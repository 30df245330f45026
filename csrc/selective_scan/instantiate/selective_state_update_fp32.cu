// One x dtype per file (each with the three state dtypes) so ninja compiles them in parallel.
#include "selective_scan/selective_state_update_kernel.cuh"

namespace linmix {
template void selective_state_update_cuda<DType::kFloat32, DType::kFloat32>(const SelectiveStateUpdateParams&, cudaStream_t);
template void selective_state_update_cuda<DType::kFloat32, DType::kFloat16>(const SelectiveStateUpdateParams&, cudaStream_t);
template void selective_state_update_cuda<DType::kFloat32, DType::kBFloat16>(const SelectiveStateUpdateParams&, cudaStream_t);
}  // namespace linmix
