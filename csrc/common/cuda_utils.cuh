// Device primitives and launch helpers shared by every op's kernels (CUDA only, torch-free).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <map>
#include <mutex>
#include <utility>

#include "common/cuda_check.h"

namespace linmix {

// Sum over the 32 lanes of a warp; every lane gets the total. All lanes must call it.
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Dynamic shared memory beyond the default 48 KiB needs an explicit opt-in per kernel and device. The
// largest size granted so far is cached per (kernel, device), so a launch pays the driver call only when it
// needs more than before on that device.
template <typename Kernel>
void opt_in_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return;
  int device = 0;
  LINMIX_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> granted;
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& have = granted[{reinterpret_cast<const void*>(kernel), device}];
  if (bytes <= have) return;
  LINMIX_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  have = bytes;
}

}  // namespace linmix
