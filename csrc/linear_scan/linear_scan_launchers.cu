// linear_scan's launcher table (linear_scan_cuda.h), for the nvcc build and the CUDA emulator's.
#include "linear_scan/linear_scan_cuda.h"

namespace linmix {
const LinearScanCudaLaunchers& LinearScanCudaLaunchers::get() {
  static constexpr LinearScanCudaLaunchers table{LINMIX_PER_CUDA_DTYPE(linear_scan_fwd_cuda),
                                                 LINMIX_PER_CUDA_DTYPE(linear_scan_bwd_cuda),
                                                 LINMIX_PER_CUDA_DTYPE(linear_scan_bwd_one_writer_cuda)};
  return table;
}
}  // namespace linmix
