// DType -> CPU element type (torch's header-only Half/BFloat16 are layout-compatible with CUDA's) and its
// accumulation type: fp32 for every activation dtype, fp64 for fp64 (the CPU-only test dtype).
#pragma once

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <type_traits>

#include "common/dtype.h"

namespace linmix {

template <DType dt> struct CpuTypeOf;
template <> struct CpuTypeOf<DType::kFloat32> { using type = float; };
template <> struct CpuTypeOf<DType::kFloat16> { using type = torch::headeronly::Half; };
template <> struct CpuTypeOf<DType::kBFloat16> { using type = torch::headeronly::BFloat16; };
template <> struct CpuTypeOf<DType::kFloat64> { using type = double; };
template <DType dt> using cpu_t = typename CpuTypeOf<dt>::type;

// Accumulation type; fp32 "state" tensors become fp64 too when the inputs are fp64.
template <DType dt> using cpu_acc_t = std::conditional_t<dt == DType::kFloat64, double, float>;

}  // namespace linmix
