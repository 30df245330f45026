// One dtype x direction per file so ninja compiles them in parallel.
#include "linear_scan/linear_scan_fwd_kernel.cuh"

namespace linmix {
template void linear_scan_fwd_cuda<DType::kFloat32>(const LinearScanParams&, cudaStream_t);
}  // namespace linmix
