// CUDA fixed-point RNN, forward and backward, with the iteration loop on the device.
//
// One iteration is two kernels:
//   mix  (linmix_fixed_point_{fwd,bwd}_mix_kernel): one warp per token. The Householder chain needs the
//        R dot products u_i · v over all D channels of the token before any channel can be updated, so a
//        warp owns a token's full row: one pass over D (R accumulators per lane, shuffle all-reduce), then
//        the scalar chain (fixed_point_common.h, with the token's Gram matrix computed once per call)
//        gives R coefficients k_i. It writes only those (B, T, R) scalars, not a mixed (B, T, D) row.
//   scan (linmix_fixed_point_{fwd,bwd}_scan_kernel): the linear_scan layout, grid (B, D / 32), lanes on
//        channels and warps on time (block_chunk_scan, common/channel_scan.cuh). The scan input is rebuilt per channel
//        from the coefficients, b = (1 - lam)(u - sum_i k_i u_i[d]) (adjoint: g + sum_i k_i u_i[d]), so
//        the mixed row never round-trips through memory. Its epilogue writes the new state and the
//        per-token max |new - old| and max |new| (warp max over 32 channels, one atomicMax per warp and
//        token); the block that finishes last for a batch element (a completion counter) reduces the
//        per-token ratios over T into the element's residual, records n_iter and sets its converged flag.
// Both kernels of the next iteration read that flag first and return at once for converged elements, so
// the host launches max_iter iterations without synchronising and a CUDA graph can capture the loop.
// States ping-pong between two fp32 buffers: iteration l reads buf[(l - 1) & 1] and writes buf[l & 1];
// a final select kernel puts each element's last iterate (buf[n & 1]) into h and h^{n-1} into h_prev.
//
// Backward: the Gram kernel, then f(h_prev) once (mix + scan without tracking) for h_{t-1} in dlam, then
// adjoint iterations on s (the same two kernels with the transposed chain and a reverse scan of
// coefficient lam_{t+1}), then linmix_fixed_point_bwd_grads_kernel: one warp per token, one step's VJP.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>

#include "common/channel_scan.cuh"
#include "common/cuda_check.h"
#include "common/cuda_utils.cuh"
#include "common/dtype.h"
#include "common/math.h"
#include "fixed_point/fixed_point_common.h"
#include "fixed_point/fixed_point_cuda.h"
#include "fixed_point/params.h"

namespace linmix {

constexpr int kFpWarpsPerBlock = 8;  // token-per-warp kernels: 8 tokens per 256-thread block
constexpr int kFpMaxR = kFixedPointMaxRank;
using FixedPointScanTraits = ChannelScanDefaultTraits;

// Device-side views of the workspace (see FixedPointWorkspace).
struct FixedPointWork {
  float* gram;            // (B, T, R, R)
  float* coef;            // (B, T, R)
  unsigned int* tok_diff; // (B, T) float bits
  unsigned int* tok_norm; // (B, T) float bits
  int* done;              // (B,)
  int* counter;           // (B,)
  int* n_iter;            // (B,) iterations run (forward: p.n_iter)
  float* residual;        // (B,) last residual (forward: p.residual)
};

// What one iteration launch reads and writes.
struct FixedPointIter {
  const float* src;  // (B, T, D) previous iterate: h^{l-1} (forward) or s^{l-1} (adjoint)
  float* dst;        // (B, T, D) this iterate
  int iter;          // l, 1-based
  bool track;        // residual + convergence flag (false: plain f(src) for every element)
};

__device__ __forceinline__ float warp_nan_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = nan_max(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// (B, T) token index of this warp in a token-per-warp kernel, or -1 past the end.
__device__ __forceinline__ int64_t warp_token(const FixedPointParams& p) {
  const int64_t tok = int64_t(blockIdx.x) * kFpWarpsPerBlock + threadIdx.x / 32;
  return tok < p.batch * p.seqlen ? tok : -1;
}

template <typename T>
__device__ __forceinline__ void load_betas(const FixedPointParams& p, int64_t tok, float (&beta)[kFpMaxR]) {
  const T* g_beta = static_cast<const T*>(p.hh_beta) + tok * p.rank;  // (R,)
#pragma unroll
  for (int i = 0; i < kFpMaxR; ++i) beta[i] = i < p.rank ? to_float(g_beta[i]) : 0.f;
}

// G_ij = u_i · u_j per token. grid: ceil(B T / 8); block: 256 (a warp per token).
template <typename T>
__global__ void __launch_bounds__(32 * kFpWarpsPerBlock) linmix_fixed_point_fwd_gram_kernel(FixedPointParams p,
                                                                                            float* gram) {
  const int64_t tok = warp_token(p);
  if (tok < 0) return;
  const int lane = threadIdx.x % 32, R = static_cast<int>(p.rank);
  const int64_t D = p.dim;
  const T* g_u = static_cast<const T*>(p.hh_u) + tok * R * D;  // (R, D)
  float* g_gram = gram + tok * R * R;                          // (R, R)
  for (int i = 0; i < R; ++i) {
    float acc[kFpMaxR];
#pragma unroll
    for (int j = 0; j < kFpMaxR; ++j) acc[j] = 0.f;
    for (int64_t d = lane; d < D; d += 32) {
      const float ui = to_float(g_u[i * D + d]);
#pragma unroll
      for (int j = 0; j < kFpMaxR; ++j) {
        if (j <= i) acc[j] += ui * to_float(g_u[j * D + d]);
      }
    }
#pragma unroll
    for (int j = 0; j < kFpMaxR; ++j) {
      if (j <= i) {
        const float v = warp_sum(acc[j]);
        if (lane == 0) g_gram[i * R + j] = g_gram[j * R + i] = v;
      }
    }
  }
}

// Chain coefficients of one iteration. Forward: a_i = u_i · (u - h_prev), forward chain.
// Adjoint: a_i = u_i · ((1 - lam) s_prev), transposed chain. grid: ceil(B T / 8); block: 256.
template <typename T, bool kAdjoint>
__device__ __forceinline__ void fixed_point_mix(const FixedPointParams& p, const FixedPointWork& w,
                                                const FixedPointIter& it) {
  const int64_t tok = warp_token(p);
  if (tok < 0) return;
  const int64_t bi = tok / p.seqlen, D = p.dim;
  if (it.track && w.done[bi]) return;
  const int lane = threadIdx.x % 32, R = static_cast<int>(p.rank);
  const T* g_u = static_cast<const T*>(p.hh_u) + tok * R * D;  // (R, D)
  const T* g_x = static_cast<const T*>(kAdjoint ? p.lam : p.u) + tok * D;  // (D,)
  const float* g_src = it.src + tok * D;                                     // (D,)
  float a[kFpMaxR];
#pragma unroll
  for (int i = 0; i < kFpMaxR; ++i) a[i] = 0.f;
  for (int64_t d = lane; d < D; d += 32) {
    const float x = to_float(g_x[d]);
    const float v = kAdjoint ? fixed_point_adjoint_pre(x, g_src[d]) : x - g_src[d];
#pragma unroll
    for (int i = 0; i < kFpMaxR; ++i) {
      if (i < R) a[i] += to_float(g_u[i * D + d]) * v;
    }
  }
#pragma unroll
  for (int i = 0; i < kFpMaxR; ++i) {
    if (i < R) a[i] = warp_sum(a[i]);
  }
  float beta[kFpMaxR], c[kFpMaxR], k[kFpMaxR];
  load_betas<T>(p, tok, beta);
  if constexpr (kAdjoint) {
    householder_chain_bwd(R, beta, a, w.gram + tok * R * R, c, k);
  } else {
    householder_chain_fwd(R, beta, a, w.gram + tok * R * R, c, k);
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < kFpMaxR; ++i) {
      if (i < R) w.coef[tok * R + i] = k[i];
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(32 * kFpWarpsPerBlock)
    linmix_fixed_point_fwd_mix_kernel(FixedPointParams p, FixedPointWork w, FixedPointIter it) {
  fixed_point_mix<T, false>(p, w, it);
}
template <typename T>
__global__ void __launch_bounds__(32 * kFpWarpsPerBlock)
    linmix_fixed_point_bwd_mix_kernel(FixedPointParams p, FixedPointWork w, FixedPointIter it) {
  fixed_point_mix<T, true>(p, w, it);
}

// The scan of one iteration and its convergence bookkeeping. grid: (B, ceil(D / 32)); block: Traits::kThreads.
// Forward: h_t = lam_t h_{t-1} + (1 - lam_t)(u_t - sum_i k_i u_i). Adjoint (reverse in time):
// s_t = lam_{t+1} s_{t+1} + g_t + sum_i k_i u_i.
template <typename Traits, typename T, bool kAdjoint>
__device__ __forceinline__ void fixed_point_scan(const FixedPointParams& p, const FixedPointWork& w,
                                                 const FixedPointIter& it) {
  __shared__ ScanPair<float> s_agg[Traits::kNWarps * 32];
  __shared__ float s_red[Traits::kNWarps];
  __shared__ bool s_last;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t bi = blockIdx.x, L = p.seqlen, D = p.dim;
  if (it.track && w.done[bi]) return;  // uniform over the block, before any barrier
  const int R = static_cast<int>(p.rank);
  const int64_t d = int64_t(blockIdx.y) * 32 + lane;
  const bool active = d < D;
  const T* g_lam = static_cast<const T*>(p.lam);
  const T* g_x = static_cast<const T*>(kAdjoint ? p.dh : p.u);
  const T* g_u = static_cast<const T*>(p.hh_u);
  float carry = 0.f;
  for (int64_t c0 = 0; c0 < L; c0 += Traits::kChunk) {
    float r_a[Traits::kItems], r_b[Traits::kItems], r_old[Traits::kItems];
#pragma unroll
    for (int j = 0; j < Traits::kItems; ++j) {
      const int64_t s = c0 + warp * Traits::kItems + j;
      const int64_t t = kAdjoint ? L - 1 - s : s;
      r_a[j] = 1.f, r_b[j] = 0.f, r_old[j] = 0.f;  // identity step past the end / inactive lanes
      if (active && s < L) {
        const int64_t tok = bi * L + t, off = tok * D + d;
        const float* g_coef = w.coef + tok * R;  // (R,)
        float mix = 0.f;
        for (int i = 0; i < R; ++i) mix += g_coef[i] * to_float(g_u[(tok * R + i) * D + d]);
        const float x = to_float(g_x[off]);
        if constexpr (kAdjoint) {
          r_a[j] = t + 1 < L ? to_float(g_lam[off + D]) : 0.f;
          r_b[j] = fixed_point_adjoint_input(x, mix);
        } else {
          r_a[j] = to_float(g_lam[off]);
          r_b[j] = fixed_point_scan_input(r_a[j], x, mix);
        }
        r_old[j] = it.src[off];
      }
    }
    block_chunk_scan<Traits>(r_a, r_b, carry, s_agg);
#pragma unroll
    for (int j = 0; j < Traits::kItems; ++j) {
      const int64_t s = c0 + warp * Traits::kItems + j;  // uniform over the warp
      if (s >= L) continue;
      const int64_t tok = bi * L + (kAdjoint ? L - 1 - s : s);
      if (active) it.dst[tok * D + d] = r_b[j];
      if (it.track) {
        const float diff = warp_nan_max(active ? fabsf(r_b[j] - r_old[j]) : 0.f);
        const float norm = warp_nan_max(active ? fabsf(r_b[j]) : 0.f);
        if (lane == 0) {  // non-negative floats order like their bit patterns (NaN above +inf)
          atomicMax(w.tok_diff + tok, __float_as_uint(diff));
          atomicMax(w.tok_norm + tok, __float_as_uint(norm));
        }
      }
    }
  }
  if (!it.track) return;
  // The last block of this batch element to finish reduces the per-token ratios over T.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(w.counter + bi, 1) == static_cast<int>(gridDim.y) - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  float r = 0.f;
  for (int64_t t = threadIdx.x; t < L; t += Traits::kThreads) {
    // read-and-reset, so the next iteration starts from zeros (atomics read the coherent L2 copy)
    const float diff = __uint_as_float(atomicExch(w.tok_diff + bi * L + t, 0u));
    const float norm = __uint_as_float(atomicExch(w.tok_norm + bi * L + t, 0u));
    r = nan_max(r, fixed_point_token_ratio(diff, norm));
  }
  r = warp_nan_max(r);
  if (lane == 0) s_red[warp] = r;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < Traits::kNWarps; ++i) r = nan_max(r, s_red[i]);
    w.residual[bi] = r;
    w.n_iter[bi] = it.iter;
    w.done[bi] = r < static_cast<float>(p.tol) ? 1 : 0;
    w.counter[bi] = 0;
  }
}

template <typename Traits, typename T>
__global__ void __launch_bounds__(Traits::kThreads)
    linmix_fixed_point_fwd_scan_kernel(FixedPointParams p, FixedPointWork w, FixedPointIter it) {
  fixed_point_scan<Traits, T, false>(p, w, it);
}
template <typename Traits, typename T>
__global__ void __launch_bounds__(Traits::kThreads)
    linmix_fixed_point_bwd_scan_kernel(FixedPointParams p, FixedPointWork w, FixedPointIter it) {
  fixed_point_scan<Traits, T, true>(p, w, it);
}

// h = buf[n & 1] in the activation dtype; h_prev = buf[(n - 1) & 1], where buf[0] is h_prev itself.
// Grid-stride over B T D.
template <typename T>
__global__ void linmix_fixed_point_fwd_select_kernel(FixedPointParams p, const float* buf1) {
  const int64_t TD = p.seqlen * p.dim, n = p.batch * TD;
  float* buf0 = static_cast<float*>(p.h_prev);
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const bool last_in_buf1 = p.n_iter[idx / TD] & 1;
    const float h1 = buf1[idx];
    static_cast<T*>(p.h)[idx] = from_float<T>(last_in_buf1 ? h1 : buf0[idx]);
    if (!last_in_buf1) buf0[idx] = h1;
  }
}

// One step's VJP per token (fixed_point_common.h's householder_vjp_channel), with s the converged
// adjoint (buffer chosen by the element's adjoint iteration count). grid: ceil(B T / 8); block: 256.
template <typename T>
__global__ void __launch_bounds__(32 * kFpWarpsPerBlock)
    linmix_fixed_point_bwd_grads_kernel(FixedPointParams p, FixedPointWork w, const float* s_buf0,
                                        const float* s_buf1, const float* h_new) {
  const int64_t tok = warp_token(p);
  if (tok < 0) return;
  const int lane = threadIdx.x % 32, R = static_cast<int>(p.rank);
  const int64_t bi = tok / p.seqlen, t = tok % p.seqlen, D = p.dim;
  const float* g_s = ((w.n_iter[bi] & 1) ? s_buf1 : s_buf0) + tok * D;  // (D,)
  const float* g_hp = static_cast<const float*>(p.h_prev) + tok * D;    // (D,)
  const T* g_uvec = static_cast<const T*>(p.u) + tok * D;               // (D,)
  const T* g_lam = static_cast<const T*>(p.lam) + tok * D;              // (D,)
  const T* g_u = static_cast<const T*>(p.hh_u) + tok * R * D;           // (R, D)
  float a[kFpMaxR], ae[kFpMaxR];
#pragma unroll
  for (int i = 0; i < kFpMaxR; ++i) a[i] = ae[i] = 0.f;
  for (int64_t d = lane; d < D; d += 32) {
    const float v0 = to_float(g_uvec[d]) - g_hp[d];
    const float e = fixed_point_adjoint_pre(to_float(g_lam[d]), g_s[d]);
#pragma unroll
    for (int i = 0; i < kFpMaxR; ++i) {
      if (i < R) {
        const float ui = to_float(g_u[i * D + d]);
        a[i] += ui * v0;
        ae[i] += ui * e;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kFpMaxR; ++i) {
    if (i < R) a[i] = warp_sum(a[i]), ae[i] = warp_sum(ae[i]);
  }
  float beta[kFpMaxR], c[kFpMaxR], k[kFpMaxR], dd[kFpMaxR], kk[kFpMaxR];
  load_betas<T>(p, tok, beta);
  householder_chain_fwd(R, beta, a, w.gram + tok * R * R, c, k);
  householder_chain_bwd(R, beta, ae, w.gram + tok * R * R, dd, kk);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < kFpMaxR; ++i) {
      if (i < R) static_cast<T*>(p.dhh_beta)[tok * R + i] = from_float<T>(householder_grad_beta(c[i], dd[i]));
    }
  }
  T* g_du = static_cast<T*>(p.du) + tok * D;
  T* g_dlam = static_cast<T*>(p.dlam) + tok * D;
  T* g_dhh_u = static_cast<T*>(p.dhh_u) + tok * R * D;
  for (int64_t d = lane; d < D; d += 32) {
    float ud[kFpMaxR], dud[kFpMaxR];
#pragma unroll
    for (int i = 0; i < kFpMaxR; ++i) ud[i] = i < R ? to_float(g_u[i * D + d]) : 0.f;
    const float uvec = to_float(g_uvec[d]), lam = to_float(g_lam[d]), s = g_s[d];
    const float x_tilde = uvec - householder_mix(R, k, ud);
    const float h_before = t > 0 ? h_new[(tok - 1) * D + d] : 0.f;
    g_dlam[d] = from_float<T>(fixed_point_grad_lam(s, h_before, x_tilde));
    const float e = fixed_point_adjoint_pre(lam, s);
    g_du[d] = from_float<T>(householder_vjp_channel(R, ud, beta, c, k, dd, kk, uvec - g_hp[d], e, dud));
#pragma unroll
    for (int i = 0; i < kFpMaxR; ++i) {
      if (i < R) g_dhh_u[i * D + d] = from_float<T>(dud[i]);
    }
  }
}

inline FixedPointWork fixed_point_work(const FixedPointParams& p, const FixedPointWorkspace& ws) {
  float* f = static_cast<float*>(p.work);
  int* flags = static_cast<int*>(p.flags);
  FixedPointWork w;
  w.gram = f + ws.gram, w.coef = f + ws.coef;
  w.tok_diff = reinterpret_cast<unsigned int*>(f + ws.tok_diff);
  w.tok_norm = reinterpret_cast<unsigned int*>(f + ws.tok_norm);
  w.done = flags + ws.done, w.counter = flags + ws.counter, w.n_iter = flags + ws.n_iter;
  w.residual = f + ws.residual;
  return w;
}

// Zeroed per call: the per-token maxima, the flags and counters (and the given state buffer).
inline void fixed_point_reset(const FixedPointParams& p, const FixedPointWorkspace& ws, cudaStream_t stream) {
  const int64_t BT = p.batch * p.seqlen;
  float* f = static_cast<float*>(p.work);
  LINMIX_CUDA_CHECK(cudaMemsetAsync(f + ws.tok_diff, 0, 2 * BT * sizeof(float), stream));  // tok_diff, tok_norm
  LINMIX_CUDA_CHECK(cudaMemsetAsync(p.flags, 0, ws.flag_ints * sizeof(int), stream));
}

// Launches one iteration (mix then scan) of direction kAdjoint.
template <typename T, bool kAdjoint>
void fixed_point_launch_iter(const FixedPointParams& p, const FixedPointWork& w, const FixedPointIter& it,
                             cudaStream_t stream) {
  using Traits = FixedPointScanTraits;
  const dim3 tok_blocks = checked_grid("fixed_point_rnn", "(ceil(B T / 8))", ceil_div(p.batch * p.seqlen, kFpWarpsPerBlock));
  const dim3 scan_grid = checked_grid("fixed_point_rnn", "(B, ceil(D / 32))", p.batch, ceil_div(p.dim, 32));
  if constexpr (kAdjoint) {
    linmix_fixed_point_bwd_mix_kernel<T><<<tok_blocks, 32 * kFpWarpsPerBlock, 0, stream>>>(p, w, it);
    LINMIX_CHECK_LAUNCH();
    linmix_fixed_point_bwd_scan_kernel<Traits, T><<<scan_grid, Traits::kThreads, 0, stream>>>(p, w, it);
    LINMIX_CHECK_LAUNCH();
  } else {
    linmix_fixed_point_fwd_mix_kernel<T><<<tok_blocks, 32 * kFpWarpsPerBlock, 0, stream>>>(p, w, it);
    LINMIX_CHECK_LAUNCH();
    linmix_fixed_point_fwd_scan_kernel<Traits, T><<<scan_grid, Traits::kThreads, 0, stream>>>(p, w, it);
    LINMIX_CHECK_LAUNCH();
  }
}

template <typename T>
void fixed_point_launch_gram(const FixedPointParams& p, const FixedPointWork& w, cudaStream_t stream) {
  const dim3 tok_blocks = checked_grid("fixed_point_rnn", "(ceil(B T / 8))", ceil_div(p.batch * p.seqlen, kFpWarpsPerBlock));
  linmix_fixed_point_fwd_gram_kernel<T><<<tok_blocks, 32 * kFpWarpsPerBlock, 0, stream>>>(p, w.gram);
  LINMIX_CHECK_LAUNCH();
}

template <DType dt>
void fixed_point_fwd_cuda(const FixedPointParams& p, cudaStream_t stream) {
  using T = cuda_t<dt>;
  const int64_t BTD = p.batch * p.seqlen * p.dim;
  if (BTD == 0) return;
  const FixedPointWorkspace ws = fixed_point_workspace(p, /*backward=*/false);
  FixedPointWork w = fixed_point_work(p, ws);
  w.n_iter = p.n_iter, w.residual = p.residual;
  float* buf[2] = {static_cast<float*>(p.h_prev), static_cast<float*>(p.work) + ws.state};
  fixed_point_reset(p, ws, stream);
  LINMIX_CUDA_CHECK(cudaMemsetAsync(buf[0], 0, BTD * sizeof(float), stream));  // h^0 = 0
  fixed_point_launch_gram<T>(p, w, stream);
  for (int l = 1; l <= p.max_iter; ++l) {
    fixed_point_launch_iter<T, false>(p, w, FixedPointIter{buf[(l - 1) & 1], buf[l & 1], l, true}, stream);
  }
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(BTD, 256), 65536));
  linmix_fixed_point_fwd_select_kernel<T><<<blocks, 256, 0, stream>>>(p, buf[1]);
  LINMIX_CHECK_LAUNCH();
}

template <DType dt>
void fixed_point_bwd_cuda(const FixedPointParams& p, cudaStream_t stream) {
  using T = cuda_t<dt>;
  const int64_t BTD = p.batch * p.seqlen * p.dim;
  if (BTD == 0) return;
  const FixedPointWorkspace ws = fixed_point_workspace(p, /*backward=*/true);
  const FixedPointWork w = fixed_point_work(p, ws);
  float* f = static_cast<float*>(p.work);
  float* s_buf[2] = {f + ws.state, f + ws.state + BTD};
  float* h_new = f + ws.h_new;
  fixed_point_reset(p, ws, stream);
  LINMIX_CUDA_CHECK(cudaMemsetAsync(s_buf[0], 0, BTD * sizeof(float), stream));  // s^0 = 0
  fixed_point_launch_gram<T>(p, w, stream);
  // h = f(h_prev) for every element (h_{t-1} enters dlam).
  fixed_point_launch_iter<T, false>(p, w, FixedPointIter{static_cast<const float*>(p.h_prev), h_new, 0, false},
                                    stream);
  for (int l = 1; l <= p.max_iter; ++l) {
    fixed_point_launch_iter<T, true>(p, w, FixedPointIter{s_buf[(l - 1) & 1], s_buf[l & 1], l, true}, stream);
  }
  const dim3 tok_blocks = checked_grid("fixed_point_rnn", "(ceil(B T / 8))", ceil_div(p.batch * p.seqlen, kFpWarpsPerBlock));
  linmix_fixed_point_bwd_grads_kernel<T><<<tok_blocks, 32 * kFpWarpsPerBlock, 0, stream>>>(p, w, s_buf[0], s_buf[1],
                                                                                           h_new);
  LINMIX_CHECK_LAUNCH();
}

}  // namespace linmix
