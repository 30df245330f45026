// One dtype x direction per file so ninja compiles them in parallel.
#include "linear_scan/linear_scan_bwd_kernel.cuh"

namespace linmix {
template void linear_scan_bwd_cuda<DType::kFloat32>(const LinearScanParams&, cudaStream_t);
template void linear_scan_bwd_one_writer_cuda<DType::kFloat32>(const LinearScanParams&, cudaStream_t);
}  // namespace linmix
