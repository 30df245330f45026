// CUDA fixed-point RNN, forward and backward, with the iteration loop on the device. This header holds what
// both directions share (workspace views, the mix and scan bodies); the kernels are in
// fixed_point_rnn_fwd_kernel.cuh and fixed_point_rnn_bwd_kernel.cuh, each with its launcher.
//
// One iteration is two kernels:
//   mix  (linmix_fixed_point_rnn_{fwd,bwd}_mix_kernel): one warp per token. The Householder chain needs the
//        R dot products u_i · v over all D channels of the token before any channel can be updated, so a
//        warp owns a token's full row: one pass over D (R accumulators per lane, shuffle all-reduce), then
//        the scalar chain (fixed_point_rnn_common.h, with the token's Gram matrix computed once per call)
//        gives R coefficients k_i. It writes only those (B, T, R) scalars, not a mixed (B, T, D) row.
//   scan (linmix_fixed_point_rnn_{fwd,bwd}_scan_kernel): the linear_scan layout, grid (B, D / 32), lanes on
//        channels and warps on time (block_chunk_scan, common/channel_scan.cuh). The scan input is rebuilt per
//        channel from the coefficients, b = (1 - lam)(u - sum_i k_i u_i[d]) (adjoint: g + sum_i k_i u_i[d]), so
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
// coefficient lam_{t+1}), then linmix_fixed_point_rnn_bwd_grads_kernel: one warp per token, one step's VJP.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>

#include "common/channel_scan.cuh"
#include "common/cuda_check.h"
#include "common/cuda_utils.cuh"
#include "common/dtype.h"
#include "common/math.h"
#include "fixed_point_rnn/fixed_point_rnn_common.h"
#include "fixed_point_rnn/fixed_point_rnn_cuda.h"
#include "fixed_point_rnn/params.h"

namespace linmix {

constexpr int kFpWarpsPerBlock = 8;  // token-per-warp kernels: 8 tokens per 256-thread block
constexpr int kFpMaxR = kFixedPointRnnMaxRank;
using FixedPointRnnScanTraits = ChannelScanDefaultTraits;

// Device-side views of the workspace (see FixedPointRnnWorkspace).
struct FixedPointRnnWork {
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
struct FixedPointRnnIter {
  const float* src;  // (B, T, D) previous iterate: h^{l-1} (forward) or s^{l-1} (adjoint)
  float* dst;        // (B, T, D) this iterate
  int iter;          // l, 1-based
  bool track;        // residual + convergence flag (false: plain f(src) for every element)
};

// What the variant kernels (the fixed_point_rnn_variants family: initial state, damping, stopping="batch" and
// "causal", packed sequences) read beyond the default kernels' arguments; the default kernels take none of it.
struct FixedPointRnnVariantWork {
  // Packed sequences: p.batch is their number N, the tensors hold them along row 0's T tokens (null: dense).
  Varlen varlen;
  float* record = nullptr;  // causal: (B, T, D) each token's input iterate of the iteration it stopped at
  int* frozen = nullptr;    // causal: (B,) tokens stopped so far (a prefix)
  // Set: an untracked iteration from each element's last input, by its iteration count n:
  // src = by_count[(n - 1) & 1], dst = by_count[n & 1] (it.src and it.dst are not read).
  float* by_count[2] = {nullptr, nullptr};
};

// The source and destination of element bi's iterate in this launch.
template <bool kVariant>
__device__ __forceinline__ const float* iter_src(const FixedPointRnnWork& w, const FixedPointRnnIter& it,
                                                 const FixedPointRnnVariantWork& v, int64_t bi) {
  if constexpr (kVariant) {
    if (v.by_count[0] != nullptr) return v.by_count[(w.n_iter[bi] - 1) & 1];
  }
  return it.src;
}
template <bool kVariant>
__device__ __forceinline__ float* iter_dst(const FixedPointRnnWork& w, const FixedPointRnnIter& it,
                                           const FixedPointRnnVariantWork& v, int64_t bi) {
  if constexpr (kVariant) {
    if (v.by_count[0] != nullptr) return v.by_count[w.n_iter[bi] & 1];
  }
  return it.dst;
}

__device__ __forceinline__ float warp_nan_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = nan_max(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// (B, T) token index of this warp in a token-per-warp kernel, or -1 past the end.
__device__ __forceinline__ int64_t warp_token(const FixedPointRnnParams& p) {
  const int64_t tok = int64_t(blockIdx.x) * kFpWarpsPerBlock + threadIdx.x / 32;
  return tok < p.batch * p.seqlen ? tok : -1;
}

// The same for the variant kernels, whose tensors may hold packed sequences.
__device__ __forceinline__ int64_t variant_warp_token(const FixedPointRnnParams& p, const Varlen& varlen) {
  const int64_t tok = int64_t(blockIdx.x) * kFpWarpsPerBlock + threadIdx.x / 32;
  return tok < fixed_point_rnn_tokens(p, varlen.packed()) ? tok : -1;
}

// The element (batch row, or packed sequence) that holds token tok.
__device__ __forceinline__ int64_t variant_element(const FixedPointRnnParams& p, const Varlen& varlen, int64_t tok) {
  return varlen.packed() ? varlen.sequence_of(tok, p.batch, p.seqlen) : tok / p.seqlen;
}

template <typename T>
__device__ __forceinline__ void load_betas(const FixedPointRnnParams& p, int64_t tok, float (&beta)[kFpMaxR]) {
  const T* g_beta = static_cast<const T*>(p.hh_beta) + tok * p.rank;  // (R,)
#pragma unroll
  for (int i = 0; i < kFpMaxR; ++i) beta[i] = i < p.rank ? to_float(g_beta[i]) : 0.f;
}

// Chain coefficients of one iteration. Forward: a_i = u_i · (u - h_prev), forward chain.
// Adjoint: a_i = u_i · ((1 - lam) s_prev), transposed chain. grid: ceil(B T / 8); block: 256.
template <typename T, bool kAdjoint, bool kVariant = false>
__device__ __forceinline__ void fixed_point_rnn_mix(const FixedPointRnnParams& p, const FixedPointRnnWork& w,
                                                const FixedPointRnnIter& it, const FixedPointRnnVariantWork& v = {}) {
  const int64_t tok = kVariant ? variant_warp_token(p, v.varlen) : warp_token(p);
  if (tok < 0) return;
  const int64_t bi = kVariant ? variant_element(p, v.varlen, tok) : tok / p.seqlen, D = p.dim;
  if (it.track && w.done[bi]) return;
  const int lane = threadIdx.x % 32, R = static_cast<int>(p.rank);
  const T* g_u = static_cast<const T*>(p.hh_u) + tok * R * D;  // (R, D)
  const T* g_x = static_cast<const T*>(kAdjoint ? p.lam : p.u) + tok * D;  // (D,)
  const float* g_src = iter_src<kVariant>(w, it, v, bi) + tok * D;          // (D,)
  float a[kFpMaxR];
#pragma unroll
  for (int i = 0; i < kFpMaxR; ++i) a[i] = 0.f;
  for (int64_t d = lane; d < D; d += 32) {
    const float x = to_float(g_x[d]);
    const float v = kAdjoint ? fixed_point_rnn_adjoint_pre(x, g_src[d]) : x - g_src[d];
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

// Causal stopping, in the last block of element bi: token t stops at the first iteration with
// max_{s<=t} ratio_s < tol, i.e. the tokens before the first one whose ratio is not below tol (`first_open`,
// this thread's first; block-reduced here). The tokens stopping now keep this iteration's input `src`. The
// element's tokens start at token `first` of the (B, T) rows.
template <typename Traits>
__device__ void fixed_point_rnn_causal_record(const FixedPointRnnVariantWork& v, const float* src, int64_t first_open,
                                              int64_t first, int64_t D) {
  LINMIX_SHARED(int64_t, s_open, [Traits::kNWarps]);
  LINMIX_SHARED(int64_t, s_from);
  LINMIX_SHARED(int64_t, s_to);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t bi = blockIdx.x;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const int64_t other = __shfl_xor_sync(0xffffffffu, first_open, o);
    first_open = other < first_open ? other : first_open;
  }
  if (lane == 0) s_open[warp] = first_open;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < Traits::kNWarps; ++i) first_open = s_open[i] < first_open ? s_open[i] : first_open;
    s_from = v.frozen[bi];
    s_to = first_open > s_from ? first_open : s_from;
    v.frozen[bi] = static_cast<int>(s_to);
  }
  __syncthreads();
  for (int64_t k = s_from * D + threadIdx.x; k < s_to * D; k += Traits::kThreads) {
    v.record[first * D + k] = src[first * D + k];
  }
}

// The scan of one iteration and its convergence bookkeeping. grid: (B, ceil(D / 32)); block: Traits::kThreads.
// Forward: h_t = lam_t h_{t-1} + (1 - lam_t)(u_t - sum_i k_i u_i). Adjoint (reverse in time):
// s_t = lam_{t+1} s_{t+1} + g_t + sum_i k_i u_i.
// Variants: the forward scan starts from p.h0; a tracked iteration stores the damped iterate (the residual is
// f's); the last block applies the stopping rule of p (batch: left to the quantile kernel; causal: records the
// tokens that stop now).
template <typename Traits, typename T, bool kAdjoint, bool kVariant = false>
__device__ __forceinline__ void fixed_point_rnn_scan(const FixedPointRnnParams& p, const FixedPointRnnWork& w,
                                                 const FixedPointRnnIter& it, const FixedPointRnnVariantWork& v = {}) {
  LINMIX_SHARED(ScanPair<float>, s_agg, [Traits::kNWarps * 32]);
  LINMIX_SHARED(float, s_red, [Traits::kNWarps]);
  LINMIX_SHARED(bool, s_last);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t bi = blockIdx.x, D = p.dim;
  // this element's tokens: row bi, or a variant's packed sequence, its span [first, first + L) of row 0 (the
  // default kernels keep their verified index arithmetic, bi * L + t)
  const SeqSpan seq = kVariant ? v.varlen.span(bi, p.seqlen) : SeqSpan{};
  const int64_t L = kVariant ? seq.len : p.seqlen, first = kVariant ? seq.first(p.seqlen) : 0;
  if (it.track && w.done[bi]) return;  // uniform over the block, before any barrier
  const int R = static_cast<int>(p.rank);
  const int64_t d = int64_t(blockIdx.y) * 32 + lane;
  const bool active = d < D;
  const T* g_lam = static_cast<const T*>(p.lam);
  const T* g_x = static_cast<const T*>(kAdjoint ? p.dh : p.u);
  const T* g_u = static_cast<const T*>(p.hh_u);
  const float* src = iter_src<kVariant>(w, it, v, bi);
  float* dst = iter_dst<kVariant>(w, it, v, bi);
  float carry = 0.f;
  if constexpr (kVariant && !kAdjoint) {
    if (p.h0 != nullptr && active) carry = to_float(static_cast<const T*>(p.h0)[bi * D + d]);
  }
  for (int64_t c0 = 0; c0 < L; c0 += Traits::kChunk) {
    float r_a[Traits::kItems], r_b[Traits::kItems], r_old[Traits::kItems];
#pragma unroll
    for (int j = 0; j < Traits::kItems; ++j) {
      const int64_t s = c0 + warp * Traits::kItems + j;
      const int64_t t = kAdjoint ? L - 1 - s : s;
      r_a[j] = 1.f, r_b[j] = 0.f, r_old[j] = 0.f;  // identity step past the end / inactive lanes
      if (active && s < L) {
        const int64_t tok = kVariant ? first + t : bi * L + t, off = tok * D + d;
        const float* g_coef = w.coef + tok * R;  // (R,)
        float mix = 0.f;
        for (int i = 0; i < R; ++i) mix += g_coef[i] * to_float(g_u[(tok * R + i) * D + d]);
        const float x = to_float(g_x[off]);
        if constexpr (kAdjoint) {
          r_a[j] = t + 1 < L ? to_float(g_lam[off + D]) : 0.f;
          r_b[j] = fixed_point_rnn_adjoint_input(x, mix);
        } else {
          r_a[j] = to_float(g_lam[off]);
          r_b[j] = fixed_point_rnn_scan_input(r_a[j], x, mix);
        }
        r_old[j] = src[off];
      }
    }
    block_chunk_scan<Traits>(r_a, r_b, carry, s_agg);
#pragma unroll
    for (int j = 0; j < Traits::kItems; ++j) {
      const int64_t s = c0 + warp * Traits::kItems + j;  // uniform over the warp
      if (s >= L) continue;
      const int64_t tok = (kVariant ? first : bi * L) + (kAdjoint ? L - 1 - s : s);
      if constexpr (kVariant) {
        if (active) dst[tok * D + d] = it.track && p.damping != 1.0
                                           ? fixed_point_rnn_damp(static_cast<float>(p.damping), r_old[j], r_b[j])
                                           : r_b[j];
      } else {
        if (active) dst[tok * D + d] = r_b[j];
      }
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
  int64_t first_open = L;  // causal: the first token whose ratio is not below tol
  for (int64_t t = threadIdx.x; t < L; t += Traits::kThreads) {
    // read-and-reset, so the next iteration starts from zeros (atomics read the coherent L2 copy)
    const int64_t tok = kVariant ? first + t : bi * L + t;
    const float diff = __uint_as_float(atomicExch(w.tok_diff + tok, 0u));
    const float norm = __uint_as_float(atomicExch(w.tok_norm + tok, 0u));
    const float ratio = fixed_point_rnn_token_ratio(diff, norm);
    r = nan_max(r, ratio);
    if constexpr (kVariant) {
      if (!(ratio < static_cast<float>(p.tol)) && first_open == L) first_open = t;
    }
  }
  r = warp_nan_max(r);
  if (lane == 0) s_red[warp] = r;
  if constexpr (kVariant) {
    if (p.causal) fixed_point_rnn_causal_record<Traits>(v, src, first_open, first, D);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < Traits::kNWarps; ++i) r = nan_max(r, s_red[i]);
    w.residual[bi] = r;
    w.n_iter[bi] = it.iter;
    if constexpr (kVariant) {
      if (p.causal) {
        w.done[bi] = v.frozen[bi] == L ? 1 : 0;
      } else if (p.batch_quantile < 0) {  // batch: the quantile kernel decides for all elements
        w.done[bi] = r < static_cast<float>(p.tol) ? 1 : 0;
      }
    } else {
      w.done[bi] = r < static_cast<float>(p.tol) ? 1 : 0;
    }
    w.counter[bi] = 0;
  }
}

// Host side, shared by the launchers.
inline FixedPointRnnWork fixed_point_rnn_work(const FixedPointRnnParams& p, const FixedPointRnnWorkspace& ws) {
  float* f = static_cast<float*>(p.work);
  int* flags = static_cast<int*>(p.flags);
  FixedPointRnnWork w;
  w.gram = f + ws.gram, w.coef = f + ws.coef;
  w.tok_diff = reinterpret_cast<unsigned int*>(f + ws.tok_diff);
  w.tok_norm = reinterpret_cast<unsigned int*>(f + ws.tok_norm);
  w.done = flags + ws.done, w.counter = flags + ws.counter, w.n_iter = flags + ws.n_iter;
  w.residual = f + ws.residual;
  return w;
}

// Zeroed per call: the per-token maxima, the flags and counters (and the given state buffer).
inline void fixed_point_rnn_reset(const FixedPointRnnParams& p, const FixedPointRnnWorkspace& ws,
                                  cudaStream_t stream, bool packed = false) {
  const int64_t BT = fixed_point_rnn_tokens(p, packed);
  float* f = static_cast<float*>(p.work);
  LINMIX_CUDA_CHECK(cudaMemsetAsync(f + ws.tok_diff, 0, 2 * BT * sizeof(float), stream));  // tok_diff, tok_norm
  LINMIX_CUDA_CHECK(cudaMemsetAsync(p.flags, 0, ws.flag_ints * sizeof(int), stream));
}

// Grid of the token-per-warp kernels (gram, mix, grads).
inline dim3 fixed_point_rnn_token_grid(const FixedPointRnnParams& p, bool packed = false) {
  return checked_grid("fixed_point_rnn", "(ceil(B T / 8))",
                      ceil_div(fixed_point_rnn_tokens(p, packed), kFpWarpsPerBlock));
}

// Blocks of 256 threads for a grid-stride loop over n elements.
inline unsigned fixed_point_rnn_flat_blocks(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>(ceil_div(n, 256), 65536));
}

// Grid of the scan kernels.
inline dim3 fixed_point_rnn_scan_grid(const FixedPointRnnParams& p) {
  return checked_grid("fixed_point_rnn", "(B, ceil(D / 32))", p.batch, ceil_div(p.dim, 32));
}

// One iteration's two launches: the token-per-warp mix kernel, then the scan kernel (either direction's).
using FixedPointRnnIterKernel = void (*)(FixedPointRnnParams, FixedPointRnnWork, FixedPointRnnIter);
inline void fixed_point_rnn_launch_pair(FixedPointRnnIterKernel mix, FixedPointRnnIterKernel scan,
                                        const FixedPointRnnParams& p, const FixedPointRnnWork& w,
                                        const FixedPointRnnIter& it, cudaStream_t stream) {
  const dim3 tok_blocks = fixed_point_rnn_token_grid(p), scan_grid = fixed_point_rnn_scan_grid(p);
  launch_kernel(mix, tok_blocks, 32 * kFpWarpsPerBlock, 0, stream, p, w, it);
  launch_kernel(scan, scan_grid, FixedPointRnnScanTraits::kThreads, 0, stream, p, w, it);
}

// The same for the variant kernels.
using FixedPointRnnVariantIterKernel = void (*)(FixedPointRnnParams, FixedPointRnnWork, FixedPointRnnIter,
                                                FixedPointRnnVariantWork);
inline void fixed_point_rnn_launch_variant_pair(FixedPointRnnVariantIterKernel mix, FixedPointRnnVariantIterKernel scan,
                                                const FixedPointRnnParams& p, const FixedPointRnnWork& w,
                                                const FixedPointRnnIter& it, const FixedPointRnnVariantWork& v,
                                                cudaStream_t stream) {
  const dim3 tok_blocks = fixed_point_rnn_token_grid(p, v.varlen.packed()), scan_grid = fixed_point_rnn_scan_grid(p);
  launch_kernel(mix, tok_blocks, 32 * kFpWarpsPerBlock, 0, stream, p, w, it, v);
  launch_kernel(scan, scan_grid, FixedPointRnnScanTraits::kThreads, 0, stream, p, w, it, v);
}

}  // namespace linmix
