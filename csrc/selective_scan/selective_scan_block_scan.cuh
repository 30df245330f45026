// Kernel traits and the block-level scan the selective-scan kernels build on.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_check.h"
#include "common/cuda_utils.cuh"
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

// B or C of (batch, channel, state) at the times of this thread's items: a row pointer for variable
// layouts (input dtype, unit stride in time), a single fp32 value for fixed ones.
template <typename T>
struct BCRow {
  const T* row = nullptr;
  float fixed = 0.f;
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

// A thread's kItems consecutive elements starting at p (n_valid of them in range, possibly <= 0) as fp32,
// `fill` past the end. Whole in-range, 16-byte aligned runs use 128-bit loads (rows are unit-stride in
// time, and t0 is a multiple of kItems, so this is the common case for aligned rows).
template <int kItems, typename T>
__device__ __forceinline__ void load_items(const T* p, int64_t n_valid, float (&r)[kItems], float fill) {
  constexpr int kVecs = kItems * int(sizeof(T)) / 16;
  if (kVecs * 16 == kItems * int(sizeof(T)) && n_valid >= kItems && reinterpret_cast<uintptr_t>(p) % 16 == 0) {
    union {
      uint4 v[kVecs > 0 ? kVecs : 1];
      T e[kItems];
    } buf;
#pragma unroll
    for (int i = 0; i < kVecs; ++i) buf.v[i] = reinterpret_cast<const uint4*>(p)[i];
#pragma unroll
    for (int k = 0; k < kItems; ++k) r[k] = to_float(buf.e[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kItems; ++k) r[k] = k < n_valid ? to_float(p[k]) : fill;
  }
}

// Stores the first min(n_valid, kItems) of r at p, with 128-bit stores when the run is whole and aligned.
template <int kItems, typename T>
__device__ __forceinline__ void store_items(T* p, int64_t n_valid, const float (&r)[kItems]) {
  constexpr int kVecs = kItems * int(sizeof(T)) / 16;
  if (kVecs * 16 == kItems * int(sizeof(T)) && n_valid >= kItems && reinterpret_cast<uintptr_t>(p) % 16 == 0) {
    union {
      uint4 v[kVecs > 0 ? kVecs : 1];
      T e[kItems];
    } buf;
#pragma unroll
    for (int k = 0; k < kItems; ++k) buf.e[k] = from_float<T>(r[k]);
#pragma unroll
    for (int i = 0; i < kVecs; ++i) reinterpret_cast<uint4*>(p)[i] = buf.v[i];
  } else {
#pragma unroll
    for (int k = 0; k < kItems; ++k)
      if (k < n_valid) p[k] = from_float<T>(r[k]);
  }
}

// B or C at this thread's items: the variable row's values, or the fixed value repeated (0 past the end).
template <int kItems, typename T>
__device__ __forceinline__ void load_bc_items(const BCRow<T>& bc, int64_t t0, int64_t L, float (&r)[kItems]) {
  if (bc.row) {
    load_items<kItems>(bc.row + t0, L - t0, r, 0.f);
  } else {
#pragma unroll
    for (int k = 0; k < kItems; ++k) r[k] = t0 + k < L ? bc.fixed : 0.f;
  }
}

using SelectiveScanDefaultTraits = SelectiveScanTraits<128, 8>;

}  // namespace linmix
