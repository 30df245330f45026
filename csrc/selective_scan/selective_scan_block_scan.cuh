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

// Warp-level scan of per-lane aggregates in scan order (lane 0 first; kReverse: lane 31 first). Returns the
// inclusive prefix of this lane (the composition of every lane up to it, in scan order) and sets `excl` to the
// exclusive one (identity for the first lane). Must be called by all 32 lanes.
template <bool kReverse>
__device__ __forceinline__ ScanPair<float> warp_scan_pairs(ScanPair<float> agg, ScanPair<float>& excl) {
  constexpr unsigned kFull = 0xffffffffu;
  const int lane = threadIdx.x % 32;
  // Kogge-Stone inclusive scan; the neighbour's partial comes earlier in scan order.
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const float oa = kReverse ? __shfl_down_sync(kFull, agg.a, off) : __shfl_up_sync(kFull, agg.a, off);
    const float ob = kReverse ? __shfl_down_sync(kFull, agg.b, off) : __shfl_up_sync(kFull, agg.b, off);
    if (kReverse ? lane + off < 32 : lane >= off) agg = scan_combine(ScanPair<float>{oa, ob}, agg);
  }
  // Exclusive prefix of this lane = inclusive prefix of the previous lane in scan order.
  excl.a = kReverse ? __shfl_down_sync(kFull, agg.a, 1) : __shfl_up_sync(kFull, agg.a, 1);
  excl.b = kReverse ? __shfl_down_sync(kFull, agg.b, 1) : __shfl_up_sync(kFull, agg.b, 1);
  if (lane == (kReverse ? 31 : 0)) excl = ScanPair<float>{1.f, 0.f};
  return agg;
}

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
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  ScanPair<float> excl;
  agg = warp_scan_pairs<kReverse>(agg, excl);
  if (lane == (kReverse ? 0 : 31)) s_warp[warp] = agg;  // the warp's total
  __syncthreads();
  float h = carry;
  if (kReverse) {
    for (int w = kNWarps - 1; w > warp; --w) h = scan_step(s_warp[w].a, h, s_warp[w].b);
  } else {
    for (int w = 0; w < warp; ++w) h = scan_step(s_warp[w].a, h, s_warp[w].b);
  }
  return scan_step(excl.a, h, excl.b);
}

// B or C of (batch, channel, state) at the times of this thread's items: a row pointer for variable
// layouts (input dtype, unit stride in time), a single fp32 value for fixed ones.
template <typename T>
struct BCRow {
  const T* row = nullptr;
  float fixed = 0.f;
};

// State n's row given `base`, the offset at state 0 (ss_bc_offset(v, b, d, 0, dim)), hoisted out of state loops.
template <typename T>
__device__ __forceinline__ BCRow<T> bc_row_at(const BCView& v, int64_t base, int64_t n) {
  const int64_t off = base + n * v.n_stride;
  BCRow<T> r;
  if (v.variable) {
    r.row = static_cast<const T*>(v.ptr) + off;
  } else {
    r.fixed = static_cast<const float*>(v.ptr)[off];
  }
  return r;
}

// `begin`: the first step of a packed sequence, where its variable rows start.
template <typename T>
__device__ __forceinline__ BCRow<T> bc_row(const BCView& v, int64_t b, int64_t d, int64_t n, int64_t dim,
                                           int64_t begin = 0) {
  BCRow<T> r = bc_row_at<T>(v, ss_bc_offset(v, b, d, 0, dim), n);
  if (r.row) r.row += begin;
  return r;
}

// The sequence block blockIdx.x walks (ss_seq): dense, (batch, channel) = blockIdx.x, the whole row; packed
// (kVarlen), (sequence, channel) = blockIdx.x, its span of row 0, read from the offsets.
template <bool kVarlen>
__device__ __forceinline__ SsSeq ss_block_seq(const SelectiveScanParams& p) {
  const int64_t bd = blockIdx.x;
  if (kVarlen) return ss_seq(p, bd / p.dim, bd % p.dim);
  return {bd, bd / p.dim, 0, p.seqlen, p.n_chunks, bd * p.n_chunks * p.dstate};
}

// What both backward kernels (selective_scan_bwd_kernel.cuh, selective_scan_bwd_tiled_kernel.cuh) read for
// channel di of batch element bi: its A row, bias and D, and its (L) rows of u, delta, z and dout.
template <typename T>
struct SsBwdChannel {
  const float* A;  // (n)
  float bias, Dv;
  const T* u;  // (L) rows
  const T* delta;
  const T* z;  // null when absent
  const T* dout;
};
template <typename T>
__device__ __forceinline__ SsBwdChannel<T> ss_bwd_channel(const SelectiveScanParams& p, int64_t bi, int64_t di) {
  SsBwdChannel<T> c;
  c.A = static_cast<const float*>(p.A) + di * p.dstate;
  c.bias = p.delta_bias ? static_cast<const float*>(p.delta_bias)[di] : 0.f;
  c.Dv = p.D ? static_cast<const float*>(p.D)[di] : 0.f;
  c.u = p.u.at<const T>(bi, di);
  c.delta = p.delta.at<const T>(bi, di);
  c.z = p.z.ptr ? p.z.at<const T>(bi, di) : nullptr;
  c.dout = p.dout.at<const T>(bi, di);
  return c;
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

// The forward's output of a thread's steps: y silu(z) (y without z), stored in the input dtype from step t0.
template <int kItems, typename T>
__device__ __forceinline__ void ss_store_out(T* out, const T* z, int64_t t0, int64_t n_valid, float (&r_y)[kItems]) {
  if (z) {
    float r_z[kItems];
    load_items<kItems>(z + t0, n_valid, r_z, 0.f);
#pragma unroll
    for (int k = 0; k < kItems; ++k) r_y[k] *= silu(r_z[k]);
  }
  store_items<kItems>(out + t0, n_valid, r_y);
}

// Per-thread pieces of the backward kernels (ss_thread_pairs and ss_thread_states also serve the warp forward).
// A thread owns kItems consecutive steps, n_valid of them inside the sequence (possibly <= 0); steps past the end
// are the identity.

// The steps' inputs as fp32 (0 past the end), from step t0 of the rows u, delta, dout, z (z null when absent):
// u, the raw delta, dout; δ; dy = dout silu(z); the D terms y = D u, du = dy D; dδ = 0. Adds Σ dy u to dD.
template <int kItems, typename T>
__device__ __forceinline__ void bwd_load_steps(const T* u, const T* delta, const T* dout, const T* z, int64_t t0,
                                               int64_t n_valid,
                                               float bias, float Dv, bool softplus, float (&r_u)[kItems],
                                               float (&r_raw)[kItems], float (&r_dout)[kItems], float (&r_dl)[kItems],
                                               float (&r_dy)[kItems], float (&r_y)[kItems], float (&r_du)[kItems],
                                               float (&r_ddl)[kItems], float& dD) {
  load_items<kItems>(u + t0, n_valid, r_u, 0.f);
  load_items<kItems>(delta + t0, n_valid, r_raw, 0.f);
  load_items<kItems>(dout + t0, n_valid, r_dout, 0.f);
  if (z) {
    float r_z[kItems];
    load_items<kItems>(z + t0, n_valid, r_z, 0.f);
#pragma unroll
    for (int k = 0; k < kItems; ++k) r_dy[k] = ss_gate_dy(r_dout[k], r_z[k]);  // 0 past the end (dout = 0)
  } else {
#pragma unroll
    for (int k = 0; k < kItems; ++k) r_dy[k] = r_dout[k];
  }
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    r_dl[k] = k < n_valid ? ss_delta(r_raw[k], bias, softplus) : 0.f;
    r_y[k] = Dv * r_u[k];
    r_du[k] = r_dy[k] * Dv;
    r_ddl[k] = 0.f;
    dD += r_dy[k] * r_u[k];
  }
}

// One state's forward pairs of the steps (forward and backward): r_a = exp(δA) (1 past the end); returns their
// composition.
template <int kItems>
__device__ __forceinline__ ScanPair<float> ss_thread_pairs(const float (&r_dl)[kItems], float coef,
                                                             const float (&r_b)[kItems], const float (&r_u)[kItems],
                                                             int64_t n_valid, float (&r_a)[kItems]) {
  ScanPair<float> agg{1.f, 0.f};
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const ScanPair<float> st =
        k < n_valid ? ss_forward_pair(r_dl[k], coef, r_b[k], r_dl[k] * r_u[k]) : ScanPair<float>{1.f, 0.f};
    r_a[k] = st.a;
    agg = scan_combine(agg, st);
  }
  return agg;
}

// Recomputes the states from h, the state before the first step: r_hp[k] = h before step k; adds C h to y.
template <int kItems>
__device__ __forceinline__ void ss_thread_states(float h, const float (&r_a)[kItems], const float (&r_b)[kItems],
                                                     const float (&r_dl)[kItems], const float (&r_u)[kItems],
                                                     const float (&r_c)[kItems], float (&r_hp)[kItems],
                                                     float (&r_y)[kItems]) {
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    r_hp[k] = h;
    h = scan_step(r_a[k], h, r_b[k] * r_dl[k] * r_u[k]);
    r_y[k] += r_c[k] * h;
  }
}

// The composition of the steps' adjoint pairs, backwards in time (padded steps: a = 1, C dy = 0, the identity).
template <int kItems>
__device__ __forceinline__ ScanPair<float> bwd_adjoint_pairs(const float (&r_a)[kItems], const float (&r_c)[kItems],
                                                             const float (&r_dy)[kItems]) {
  ScanPair<float> adj{1.f, 0.f};
#pragma unroll
  for (int k = kItems - 1; k >= 0; --k) adj = scan_combine(adj, ss_adjoint_pair(r_a[k], r_c[k] * r_dy[k]));
  return adj;
}

// One state's gradients of the steps, given s, the adjoint entering the last step from later ones: adds into
// du, dδ and dA, sets dB_t and dC_t (0 past the end), returns the adjoint at the first step.
template <int kItems>
__device__ __forceinline__ float bwd_step_grads(float s, float An, const float (&r_a)[kItems],
                                                const float (&r_hp)[kItems], const float (&r_dl)[kItems],
                                                const float (&r_b)[kItems], const float (&r_u)[kItems],
                                                const float (&r_c)[kItems], const float (&r_dy)[kItems],
                                                int64_t n_valid, float (&r_du)[kItems], float (&r_ddl)[kItems],
                                                float& dA, float (&r_dBt)[kItems], float (&r_dCt)[kItems]) {
#pragma unroll
  for (int k = kItems - 1; k >= 0; --k) {
    const float g = r_c[k] * r_dy[k] + s;  // dL/dh_t
    s = r_a[k] * g;
    r_dBt[k] = r_dCt[k] = 0.f;
    if (k >= n_valid) continue;
    const SSStepGrad<float> gr = ss_step_grad(g, r_hp[k], r_a[k], r_dl[k], An, r_b[k], r_u[k]);
    r_dBt[k] = gr.dB;
    r_dCt[k] = r_dy[k] * scan_step(r_a[k], r_hp[k], r_b[k] * r_dl[k] * r_u[k]);
    r_du[k] += gr.du;
    r_ddl[k] += gr.ddelta;
    dA += gr.dA;
  }
  return s;
}

using SelectiveScanDefaultTraits = SelectiveScanTraits<128, 8>;

// Launches a block-per-(sequence, channel) kernel (forward or backward, dense or varlen) with `smem_floats` floats
// of dynamic shared memory.
template <typename Traits, typename Kernel>
void selective_scan_launch(Kernel kernel, int64_t smem_floats, const SelectiveScanParams& p, cudaStream_t stream) {
  if (p.batch * p.dim == 0) return;
  const size_t smem = size_t(smem_floats) * sizeof(float);
  opt_in_smem(kernel, smem);
  launch_kernel(kernel, checked_grid("selective_scan", "(b d)", p.batch * p.dim), Traits::kThreads, smem, stream, p);
}

}  // namespace linmix
