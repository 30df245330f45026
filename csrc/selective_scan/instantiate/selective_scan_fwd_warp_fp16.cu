// One dtype per file so ninja compiles them in parallel. Unverified kernel: see selective_scan_fwd_warp_kernel.cuh.
#include "selective_scan/selective_scan_fwd_warp_kernel.cuh"

namespace linmix {
template void selective_scan_fwd_warp_cuda<DType::kFloat16>(const SelectiveScanParams&, cudaStream_t);
}  // namespace linmix
