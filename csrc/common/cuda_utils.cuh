// Device primitives and launch helpers shared by every op's kernels (CUDA only, torch-free).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

#include "common/cuda_check.h"
#include "common/launch.h"
#include "common/shared_memory.h"

namespace linmix {

// Sum over the 32 lanes of a warp; every lane gets the total. All lanes must call it.
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// A block's shared memory beyond the default 48 KiB needs an explicit opt-in per kernel and device; the
// 48 KiB count the kernel's static shared memory plus `bytes`, the dynamic part. The largest dynamic size
// granted so far is cached per (kernel, device), so a launch pays the driver calls only when it needs more
// than before on that device.
template <typename Kernel>
void opt_in_smem(Kernel kernel, size_t bytes) {
  int device = 0;
  LINMIX_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> granted;
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& have = granted[{reinterpret_cast<const void*>(kernel), device}];
  if (bytes <= have) return;
  cudaFuncAttributes attr;
  LINMIX_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  if (attr.sharedSizeBytes + bytes > kDefaultBlockSharedBytes) {
    LINMIX_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
  have = bytes;
}

// The launch grid (x, y, z), checked against the hardware limits (x < 2^31, y and z <= 65535) before the
// narrowing to unsigned; `what` says which problem sizes map to the grid, for the error message.
inline dim3 checked_grid(const char* op, const char* what, int64_t x, int64_t y = 1, int64_t z = 1) {
  if (x < 1 || x > 2147483647 || y < 1 || y > 65535 || z < 1 || z > 65535) {
    throw std::runtime_error(std::string("linmix.") + op + ": the CUDA grid " + what + " = (" + std::to_string(x) +
                             ", " + std::to_string(y) + ", " + std::to_string(z) +
                             ") exceeds the limits (x < 2^31, y and z <= 65535)");
  }
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(y), static_cast<unsigned>(z));
}

}  // namespace linmix
