// The one device/dtype dispatch of the torch glue. Each op is written once, as a template on Backend, and
// registered per dispatch key: TORCH_LIBRARY_IMPL(linmix, CPU, m) binds op<Backend::kCPU>,
// TORCH_LIBRARY_IMPL(linmix, CUDA, m) binds op<Backend::kCUDA>; nothing branches on is_cpu().
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/checks.h"
#include "common/static_switch.h"
#include "common/stream.h"
#ifdef LINMIX_WITH_CUDA
#include "common/torch_stream.h"
#endif

namespace linmix {

enum class Backend { kCPU, kCUDA };

// Runs the backend's launcher for the dtype of `like` (taken at run time):
//   CPU:  cpu(DType), the CPU twin, which switches on the dtype itself;
//   CUDA: cuda.template operator()<dt>(stream) for dt in {fp32, fp16, bf16}, under a guard for `like`'s
//         device, on torch's current stream. fp64 on CUDA is an error (check_float_dtype reports it first).
template <Backend backend, typename CpuFn, typename CudaFn>
void launch(const at::Tensor& like, CpuFn&& cpu, CudaFn&& cuda) {
  const DType dt = to_linmix_dtype(like.scalar_type());
  if constexpr (backend == Backend::kCPU) {
    cpu(dt);
  } else {
#ifdef LINMIX_WITH_CUDA
    const c10::cuda::CUDAGuard guard(like.device());
    LINMIX_DTYPE_SWITCH(dt, kDT, [&] {
      if constexpr (kDT == DType::kFloat64) {
        TORCH_CHECK(false, "linmix: float64 runs on the CPU backend only");
      } else {
        cuda.template operator()<kDT>(current_stream());
      }
    });
#else
    TORCH_CHECK(false, "linmix: this build has no CUDA backend");
#endif
  }
}

}  // namespace linmix
