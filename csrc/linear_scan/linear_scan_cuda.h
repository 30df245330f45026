// Declarations of the CUDA launchers (defined in instantiate/*.cu), torch-free.
#pragma once

#include "common/dtype.h"
#include "common/kernels.h"
#include "common/launchers.h"
#include "common/stream.h"
#include "linear_scan/params.h"

namespace linmix {
template <DType dt> void linear_scan_fwd_cuda(const LinearScanParams& p, cudaStream_t stream);
template <DType dt> void linear_scan_bwd_cuda(const LinearScanParams& p, cudaStream_t stream);
// The backward with one writer of dh0 (KernelFamily::kLinearScanBwdOneWriter).
template <DType dt> void linear_scan_bwd_one_writer_cuda(const LinearScanParams& p, cudaStream_t stream);

// The launcher table (common/launchers.h); get() is in linear_scan_launchers.cu.
struct LinearScanCudaLaunchers {
  static constexpr const char* kName = "linear_scan";
  PerCudaDtype<void(const LinearScanParams&, cudaStream_t)> fwd, bwd, bwd_one_writer;
  static const LinearScanCudaLaunchers& get();
};

// The backward the registry picks (common/kernels.h): the one-writer instance when switched on.
inline void linear_scan_bwd_launch(const LinearScanCudaLaunchers& cuda, DType dt, const LinearScanParams& p,
                                   cudaStream_t stream) {
  (kernel_enabled(KernelFamily::kLinearScanBwdOneWriter) ? cuda.bwd_one_writer : cuda.bwd)(dt, p, stream);
}
}  // namespace linmix
