// One dtype x direction per file so ninja compiles them in parallel.
#include "selective_scan/selective_scan_bwd_kernel.cuh"

namespace linmix {
template void selective_scan_bwd_cuda<DType::kFloat16>(const SelectiveScanParams&, cudaStream_t);
template void selective_scan_bwd_varlen_cuda<DType::kFloat16>(const SelectiveScanParams&, cudaStream_t);
}  // namespace linmix
