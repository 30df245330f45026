// The element types the kernels are instantiated for, and loads/stores through fp32.
// Torch-free: CPU code uses c10's Half/BFloat16 (layout-compatible with CUDA's __half/__nv_bfloat16), kernel
// source (nvcc or the CUDA emulator) uses the CUDA types. The torch glue reinterprets data pointers accordingly.
#pragma once

#include "common/math.h"

#if defined(LINMIX_KERNEL_SOURCE)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace linmix {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

#if defined(LINMIX_KERNEL_SOURCE)
LINMIX_HD float to_float(float x) { return x; }
LINMIX_HD float to_float(__half x) { return __half2float(x); }
LINMIX_HD float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
LINMIX_HD T from_float(float x);
template <>
LINMIX_HD float from_float<float>(float x) { return x; }
template <>
LINMIX_HD __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
LINMIX_HD __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
#endif

}  // namespace linmix

#if defined(LINMIX_KERNEL_SOURCE)
namespace linmix {
template <DType dt> struct CudaTypeOf;
template <> struct CudaTypeOf<DType::kFloat32> { using type = float; };
template <> struct CudaTypeOf<DType::kFloat16> { using type = __half; };
template <> struct CudaTypeOf<DType::kBFloat16> { using type = __nv_bfloat16; };
template <DType dt> using cuda_t = typename CudaTypeOf<dt>::type;
}  // namespace linmix
#endif
