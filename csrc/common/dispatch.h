// The one device/dtype dispatch of the torch glue. Each op is written once, as a template on Backend, and
// registered per dispatch key: the CPU library binds op<Backend::kCPU> (STABLE_TORCH_LIBRARY_IMPL(linmix, CPU, m)),
// the CUDA library op<Backend::kCUDA>; nothing branches on is_cpu(). Torch's stable ABI only.
#pragma once

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>

#include <string>

#include "common/checks.h"
#include "common/emulation.h"
#include "common/stream.h"

namespace linmix {

enum class Backend { kCPU, kCUDA };

// Whether a call of this backend on `like` runs CUDA kernels: always on the CUDA backend; on the CPU backend when
// LINMIX_EMULATE_CUDA=1 sends fp32/fp16/bf16 calls through the emulated kernels (common/emulation.h). Glue that
// chooses a path for the device (not just a launcher) asks this, so emulation takes the CUDA path entirely.
template <Backend backend>
bool runs_cuda_kernels(const Tensor& like) {
  if constexpr (backend == Backend::kCUDA) {
    return true;
  } else {
    return like.scalar_type() != ScalarType::Double && emulate_cuda();
  }
}

// A Python UserWarning (torch's warning handler), e.g. for a kernel that runs before it has been GPU-verified.
inline void warn(const std::string& message) { aoti_torch_warn("linmix", __FILE__, __LINE__, message.c_str()); }

// Runs the launcher for the dtype of `like` (taken at run time):
//   CPU:  cpu(DType), the CPU twin, which switches on the dtype itself; or, when runs_cuda_kernels, the CUDA
//         path on the emulated kernels;
//   CUDA: cuda(launchers, DType, stream) with the op's launcher table `Launchers` (common/launchers.h), under a
//         guard for `like`'s device, on torch's current stream. fp64 on CUDA is an error (check_float_dtype
//         reports it first).
template <Backend backend, typename Launchers, typename CpuFn, typename CudaFn>
void launch(const Tensor& like, CpuFn&& cpu, CudaFn&& cuda) {
  const DType dt = to_linmix_dtype(like.scalar_type());
  if constexpr (backend == Backend::kCPU) {
    if (runs_cuda_kernels<backend>(like)) {
      cuda(emulated_launchers<Launchers>(), dt, cudaStream_t{nullptr});
    } else {
      cpu(dt);
    }
  } else {
#ifdef LINMIX_WITH_CUDA
    const torch::stable::accelerator::DeviceGuard guard(like.get_device_index());
    LINMIX_CHECK(dt != DType::kFloat64, "linmix: float64 runs on the CPU backend only");
    const auto stream = torch::stable::accelerator::getCurrentStream(like.get_device_index());
    cuda(Launchers::get(), dt, static_cast<cudaStream_t>(stream.nativeHandle()));
#else
    detail::fail("linmix: this build has no CUDA backend");
#endif
  }
}

}  // namespace linmix

// Registration: every *_torch.cpp is compiled into the CPU library (schemas and CPU implementations) and, in a
// CUDA build, again into the CUDA library (CUDA implementations only), which loads only where torch has CUDA.
// LINMIX_BACKEND is the backend the implementations registered by this compilation run on.
#ifdef LINMIX_CUDA_LIBRARY
#define LINMIX_OP_SCHEMAS(m) \
  [[maybe_unused]] static void linmix_schemas_in_cpu_library(torch::stable::detail::StableLibrary& m)
#define LINMIX_OP_IMPLS(m) STABLE_TORCH_LIBRARY_IMPL(linmix, CUDA, m)
#define LINMIX_BACKEND ::linmix::Backend::kCUDA
#else
#define LINMIX_OP_SCHEMAS(m) STABLE_TORCH_LIBRARY_FRAGMENT(linmix, m)
#define LINMIX_OP_IMPLS(m) STABLE_TORCH_LIBRARY_IMPL(linmix, CPU, m)
#define LINMIX_BACKEND ::linmix::Backend::kCPU
#endif
