// The one device/dtype dispatch of the torch glue. Each op is written once, as a template on Backend, and
// registered per dispatch key: TORCH_LIBRARY_IMPL(linmix, CPU, m) binds op<Backend::kCPU>,
// TORCH_LIBRARY_IMPL(linmix, CUDA, m) binds op<Backend::kCUDA>; nothing branches on is_cpu().
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/checks.h"
#include "common/emulation.h"
#include "common/stream.h"
#ifdef LINMIX_WITH_CUDA
#include "common/torch_stream.h"
#endif

namespace linmix {

enum class Backend { kCPU, kCUDA };

// Whether a call of this backend on `like` runs CUDA kernels: always on the CUDA backend; on the CPU backend when
// LINMIX_EMULATE_CUDA=1 sends fp32/fp16/bf16 calls through the emulated kernels (common/emulation.h). Glue that
// chooses a path for the device (not just a launcher) asks this, so emulation takes the CUDA path entirely.
template <Backend backend>
bool runs_cuda_kernels(const at::Tensor& like) {
  if constexpr (backend == Backend::kCUDA) {
    return true;
  } else {
    return like.scalar_type() != at::kDouble && emulate_cuda();
  }
}

// Runs the launcher for the dtype of `like` (taken at run time):
//   CPU:  cpu(DType), the CPU twin, which switches on the dtype itself; or, when runs_cuda_kernels, the CUDA
//         path on the emulated kernels;
//   CUDA: cuda(launchers, DType, stream) with the op's launcher table `Launchers` (common/launchers.h), under a
//         guard for `like`'s device, on torch's current stream. fp64 on CUDA is an error (check_float_dtype
//         reports it first).
template <Backend backend, typename Launchers, typename CpuFn, typename CudaFn>
void launch(const at::Tensor& like, CpuFn&& cpu, CudaFn&& cuda) {
  const DType dt = to_linmix_dtype(like.scalar_type());
  if constexpr (backend == Backend::kCPU) {
    if (runs_cuda_kernels<backend>(like)) {
      cuda(emulated_launchers<Launchers>(), dt, cudaStream_t{nullptr});
    } else {
      cpu(dt);
    }
  } else {
#ifdef LINMIX_WITH_CUDA
    const c10::cuda::CUDAGuard guard(like.device());
    TORCH_CHECK(dt != DType::kFloat64, "linmix: float64 runs on the CPU backend only");
    cuda(Launchers::get(), dt, current_stream());
#else
    TORCH_CHECK(false, "linmix: this build has no CUDA backend");
#endif
  }
}

}  // namespace linmix
