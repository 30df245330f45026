// One dtype x direction per file so ninja compiles them in parallel.
#include "selective_scan/selective_scan_fwd_kernel.cuh"

namespace linmix {
template void selective_scan_fwd_cuda<DType::kFloat32>(const SelectiveScanParams&, cudaStream_t);
template void selective_scan_fwd_varlen_cuda<DType::kFloat32>(const SelectiveScanParams&, cudaStream_t);
}  // namespace linmix
