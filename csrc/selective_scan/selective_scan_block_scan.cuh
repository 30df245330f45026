// Kernel traits and the block-level scan the selective-scan kernels build on.
#pragma once

#include <cuda_runtime.h>

#include "common/cuda_check.h"
#include "common/dtype.h"
#include "common/math.h"
#include "selective_scan/params.h"
#include "selective_scan/selective_scan_common.h"

namespace linmix {

template <int kThreads_, int kItems_>
struct SelectiveScanTraits {
  static constexpr int kThreads = kThreads_;
  static constexpr int kItems = kItems_;  // consecutive time steps per thread, scanned in registers
  static constexpr int kNWarps = kThreads / 32;
  static constexpr int kChunk = kThreads * kItems;
  static_assert(kThreads % 32 == 0 && kNWarps >= 1 && kNWarps <= 32, "whole warps, one aggregate slot per warp");
  static_assert(kChunk == kSelectiveScanChunk, "one block iteration is one checkpoint chunk");
};

// Block-wide scan of per-thread aggregates with a carry. Thread j holds `agg`, the composition (in scan
// order) of the steps of its items. Returns the value entering thread j's first item: `carry` advanced
// through the aggregates of every thread before j in scan order. Forward scan order is thread 0 first;
// kReverse scans from the last thread down (for the adjoint, which runs backwards in time).
//
// One __syncthreads. `s_warp` (kNWarps slots) is read after it, so two consecutive calls must use
// different buffers: callers alternate between two, which is race-free because a call's writes
// follow the previous call's barrier, and every read of the call before that precedes that barrier.
// Must be called by all threads of the block.
template <int kNWarps, bool kReverse>
__device__ __forceinline__ float block_scan_carry_in(ScanPair<float> agg, float carry, ScanPair<float>* s_warp) {
  constexpr unsigned kFull = 0xffffffffu;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // Kogge-Stone inclusive scan inside the warp; the neighbour's partial comes earlier in scan order.
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const float oa = kReverse ? __shfl_down_sync(kFull, agg.a, off) : __shfl_up_sync(kFull, agg.a, off);
    const float ob = kReverse ? __shfl_down_sync(kFull, agg.b, off) : __shfl_up_sync(kFull, agg.b, off);
    if (kReverse ? lane + off < 32 : lane >= off) agg = scan_combine(ScanPair<float>{oa, ob}, agg);
  }
  // Exclusive prefix of this lane = inclusive prefix of the previous lane in scan order.
  float ea = kReverse ? __shfl_down_sync(kFull, agg.a, 1) : __shfl_up_sync(kFull, agg.a, 1);
  float eb = kReverse ? __shfl_down_sync(kFull, agg.b, 1) : __shfl_up_sync(kFull, agg.b, 1);
  if (lane == (kReverse ? 31 : 0)) ea = 1.f, eb = 0.f;
  if (lane == (kReverse ? 0 : 31)) s_warp[warp] = agg;  // the warp's total
  __syncthreads();
  float h = carry;
  if (kReverse) {
    for (int w = kNWarps - 1; w > warp; --w) h = scan_step(s_warp[w].a, h, s_warp[w].b);
  } else {
    for (int w = 0; w < warp; ++w) h = scan_step(s_warp[w].a, h, s_warp[w].b);
  }
  return scan_step(ea, h, eb);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// B or C of (batch, channel, state) at the times of this thread's items: a row pointer for variable
// layouts (input dtype, unit stride in time), a single fp32 value for fixed ones.
template <typename T>
struct BCRow {
  const T* row = nullptr;
  float fixed = 0.f;
  __device__ __forceinline__ float at(int64_t t) const { return row ? to_float(row[t]) : fixed; }
};

template <typename T>
__device__ __forceinline__ BCRow<T> bc_row(const BCView& v, int64_t b, int64_t d, int64_t n, int64_t dim) {
  const int64_t off = ss_bc_offset(v, b, d, n, dim);
  BCRow<T> r;
  if (v.variable) {
    r.row = static_cast<const T*>(v.ptr) + off;
  } else {
    r.fixed = static_cast<const float*>(v.ptr)[off];
  }
  return r;
}

template <typename T>
__device__ __forceinline__ const T* bdl_row(const BDLView& v, int64_t b, int64_t d) {
  return static_cast<const T*>(v.ptr) + b * v.batch_stride + d * v.dim_stride;
}
template <typename T>
__device__ __forceinline__ T* bdl_row_mut(const BDLView& v, int64_t b, int64_t d) {
  return static_cast<T*>(v.ptr) + b * v.batch_stride + d * v.dim_stride;
}

using SelectiveScanDefaultTraits = SelectiveScanTraits<128, 8>;

// Dynamic shared memory beyond the default 48 KiB needs an explicit opt-in per kernel.
template <typename Kernel>
void opt_in_smem(Kernel kernel, size_t smem) {
  if (smem > 48 * 1024) {
    LINMIX_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  }
}

}  // namespace linmix
