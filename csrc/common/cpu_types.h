// DType -> CPU element type (torch's header-only Half/BFloat16 are layout-compatible with CUDA's) and its
// accumulation type: fp32 for every activation dtype, fp64 for fp64 (the CPU-only test dtype).
#pragma once

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <bit>
#include <cstdint>
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

// An accumulation-type value as element type T, for stores. bf16 rounds as torch's conversion does (to nearest
// even, every NaN to 0x7fc0: bit-identical) but by integer arithmetic and a select, not torch's NaN test and
// branch per element, which kept every loop that stores bf16 scalar. Half keeps torch's conversion.
template <typename T, typename A>
inline T cpu_cast(A v) {
  if constexpr (std::is_same_v<T, torch::headeronly::BFloat16>) {
    const uint32_t u = std::bit_cast<uint32_t>(static_cast<float>(v));
    const uint32_t rounded = (u + UINT32_C(0x7fff) + ((u >> 16) & 1)) >> 16;
    const bool nan = (u & UINT32_C(0x7fffffff)) > UINT32_C(0x7f800000);
    return T(static_cast<uint16_t>(nan ? UINT32_C(0x7fc0) : rounded), T::from_bits());
  } else {
    return static_cast<T>(v);
  }
}

}  // namespace linmix
