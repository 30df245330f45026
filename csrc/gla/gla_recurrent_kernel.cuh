// CUDA fused_recurrent_gla: the recurrence one step at a time, state in registers (fp32).
//
// Two thread layouts over the (K, V) state of one (batch, head), chosen so every reduction a pass needs
// stays cheap:
//  - column layout (forward, and the dv pass of the backward): a block owns 32 value columns, lane = column,
//    warp w owns key rows w, w + kNWarps, ...; o_t = sum over k needs a cross-warp reduction, done once per
//    group of kSteps steps through shared memory (warp s reduces step s).
//  - row layout (the dq / dk / dg pass of the backward): warp w owns one key row, lanes own value columns
//    lane, lane + 32, ...; dq_t[k] = S_t[k, :] do_t and dk_t[k] = dS_t[k, :] v_t are warp shuffles.
// A group of kSteps time steps of the shared inputs is staged in shared memory per __syncthreads pair.
// The register arrays and staged rows are sized for K, V <= kMaxDim: 256 for the fused_recurrent_gla family,
// 512 for gla_head512 (64 state rows per thread in the column layout, 16 columns per lane in the row layout).
// kVarlen: a block row is (packed sequence, head) instead of (batch, head) and walks the sequence's span, read from
// the offsets on the device (the gla_varlen family, whose kernels take the Varlen as a second argument, so
// GlaParams and the dense instances, the ones the GPU verified, stay as they were).
#pragma once

#include <cuda_runtime.h>

#include "common/cuda_check.h"
#include "common/cuda_utils.cuh"
#include "common/dtype.h"
#include "common/varlen.h"
#include "gla/gla_common.h"
#include "gla/params.h"

namespace linmix {

// K, V <= kMaxDim: kGlaCudaMaxHeadDim (the fused_recurrent_gla family) or kGlaMaxHeadDim (gla_head512).
template <int kMaxDim_>
struct GlaRecurrentTraits {
  static constexpr int kNWarps = 8;
  static constexpr int kThreads = 32 * kNWarps;
  static constexpr int kSteps = kNWarps;           // steps per staged group; warp s reduces step s
  static constexpr int kMaxDim = kMaxDim_;
  static constexpr int kRowsPerThread = kMaxDim / kNWarps;  // column layout: key rows per thread
  static constexpr int kColsPerLane = kMaxDim / 32;         // row layout: value columns per lane
  static_assert(kSteps == kNWarps, "one warp reduces one step of a group");
  static_assert(kMaxDim % kNWarps == 0 && kMaxDim % 32 == 0, "register arrays cover kMaxDim exactly");
};

// The rows that block row n walks: batch row n whole (dense), or packed sequence n of row 0 (kVarlen). The dense
// accessors read the params where the dense kernels always did, so those compile to the same code.
template <bool kVarlen>
struct GlaSeq {
  const GlaParams& p;
  int64_t n;
  __device__ GlaSeq(const GlaParams& p_, const Varlen&, int64_t n_) : p(p_), n(n_) {}
  __device__ int64_t row() const { return n; }
  __device__ int64_t begin() const { return 0; }
  __device__ int64_t len() const { return p.seqlen; }
};
template <>
struct GlaSeq<true> {
  SeqSpan s;
  __device__ GlaSeq(const GlaParams& p, const Varlen& varlen, int64_t n) : s(varlen.span(n, p.seqlen)) {}
  __device__ int64_t row() const { return s.batch; }
  __device__ int64_t begin() const { return s.begin; }
  __device__ int64_t len() const { return s.len; }
};

// Shared memory of the column-layout kernels: a group of steps of q, k, decay (all K channels) and one
// 32-wide column slice of a (B, T, H, V) input, plus the per-warp partial sums. Static shared memory for
// kMaxDim = 256 (33 KiB); dynamic for 512 (57 KiB, past the 48 KiB a block gets without opt-in).
template <int kMaxDim>
struct GlaColumnSmem {
  using Tr = GlaRecurrentTraits<kMaxDim>;
  float q[Tr::kSteps][Tr::kMaxDim];
  float k[Tr::kSteps][Tr::kMaxDim];
  float decay[Tr::kSteps][Tr::kMaxDim];
  float col[Tr::kSteps][32];
  float part[Tr::kSteps][Tr::kNWarps][32];
};

// Stages steps [t0, t0 + n) of q (times q_scale), k, exp(g) and the column slice of `cols` (v or do).
template <typename T, int kMaxDim>
__device__ __forceinline__ void stage_column_group(GlaColumnSmem<kMaxDim>& s, const GlaParams& p,
                                                   const StridedView<3>& cols, int64_t b, int64_t h, int64_t t0, int n,
                                                   int64_t v0, float q_scale) {
  using Tr = GlaRecurrentTraits<kMaxDim>;
  const int K = static_cast<int>(p.dim_k);
  for (int idx = threadIdx.x; idx < Tr::kSteps * K; idx += Tr::kThreads) {
    const int st = idx / K, c = idx % K;
    if (st >= n) continue;
    s.q[st][c] = q_scale * to_float(p.q.at<const T>(b, t0 + st, h)[c]);
    s.k[st][c] = to_float(p.k.at<const T>(b, t0 + st, h)[c]);
    s.decay[st][c] = gla_exp2(gla_log2_gate(to_float(p.g.at<const T>(b, t0 + st, h)[c])));
  }
  for (int idx = threadIdx.x; idx < Tr::kSteps * 32; idx += Tr::kThreads) {
    const int st = idx / 32, l = idx % 32;
    const int64_t v = v0 + l;
    s.col[st][l] = (st < n && v < p.dim_v) ? to_float(cols.at<const T>(b, t0 + st, h)[v]) : 0.f;
  }
}

// Warp s sums the kNWarps partials of step s and writes scale * sum to out[t0 + s, v].
template <typename T, int kMaxDim>
__device__ __forceinline__ void reduce_column_group(const GlaColumnSmem<kMaxDim>& s, const StridedView<3>& out,
                                                    int64_t b, int64_t h, int64_t t0, int n, int64_t v, bool active,
                                                    float scale) {
  using Tr = GlaRecurrentTraits<kMaxDim>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (warp < n && active) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < Tr::kNWarps; ++w) sum += s.part[warp][w][lane];
    out.at<T>(b, t0 + warp, h)[v] = from_float<T>(scale * sum);
  }
}

// The forward of one block, K <= kMaxDim (any V). grid: (B * H, ceil(V / 32)); block: kThreads.
template <typename T, bool kVarlen, int kMaxDim>
__device__ __forceinline__ void gla_recurrent_fwd(const GlaParams& p, const Varlen& varlen, GlaColumnSmem<kMaxDim>& s) {
  using Tr = GlaRecurrentTraits<kMaxDim>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const GlaSeq<kVarlen> seq(p, varlen, b);
  const int64_t v0 = int64_t(blockIdx.y) * 32, v = v0 + lane;
  const bool active = v < p.dim_v;
  const int K = static_cast<int>(p.dim_k);
  const int64_t state0 = bh * p.dim_k * p.dim_v;  // (B, H, K, V) offset of this head
  float S[Tr::kRowsPerThread];
#pragma unroll
  for (int r = 0; r < Tr::kRowsPerThread; ++r) {
    const int c = warp + r * Tr::kNWarps;
    S[r] = (p.h0 && active && c < K) ? static_cast<const float*>(p.h0)[state0 + c * p.dim_v + v] : 0.f;
  }
  for (int64_t t0 = 0; t0 < seq.len(); t0 += Tr::kSteps) {
    const int n = static_cast<int>(seq.len() - t0 < Tr::kSteps ? seq.len() - t0 : Tr::kSteps);
    stage_column_group<T>(s, p, p.v, seq.row(), h, seq.begin() + t0, n, v0, 1.f);
    __syncthreads();
    for (int st = 0; st < n; ++st) {
      float acc = 0.f;
#pragma unroll
      for (int r = 0; r < Tr::kRowsPerThread; ++r) {
        const int c = warp + r * Tr::kNWarps;
        if (c < K) {
          S[r] = gla_state_step(S[r], s.decay[st][c], s.k[st][c], s.col[st][lane]);
          acc += s.q[st][c] * S[r];
        }
      }
      s.part[st][warp][lane] = acc;
    }
    __syncthreads();
    reduce_column_group<T>(s, p.o, seq.row(), h, seq.begin() + t0, n, v, active, static_cast<float>(p.scale));
    __syncthreads();  // the next group restages s
  }
#pragma unroll
  for (int r = 0; r < Tr::kRowsPerThread; ++r) {
    const int c = warp + r * Tr::kNWarps;
    if (active && c < K) static_cast<float*>(p.ht)[state0 + c * p.dim_v + v] = S[r];
  }
}

// Backward, column layout, reverse in time: dS_t = exp(g_{t+1}) dS_{t+1} + scale q_t^T do_t,
// dv_t = k_t dS_t (a sum over k: cross-warp), and dh0 = exp(g_0) dS_0. K <= kMaxDim (any V).
// grid: (B * H, ceil(V / 32)); block: kThreads.
template <typename T, bool kVarlen, int kMaxDim>
__device__ __forceinline__ void gla_recurrent_bwd_dv(const GlaParams& p, const Varlen& varlen,
                                                     GlaColumnSmem<kMaxDim>& s) {
  using Tr = GlaRecurrentTraits<kMaxDim>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const GlaSeq<kVarlen> seq(p, varlen, b);
  const int64_t v0 = int64_t(blockIdx.y) * 32, v = v0 + lane;
  const bool active = v < p.dim_v;
  const int K = static_cast<int>(p.dim_k);
  const int64_t state0 = bh * p.dim_k * p.dim_v;
  float dS[Tr::kRowsPerThread];
#pragma unroll
  for (int r = 0; r < Tr::kRowsPerThread; ++r) {
    const int c = warp + r * Tr::kNWarps;
    dS[r] = (p.dht && active && c < K) ? static_cast<const float*>(p.dht)[state0 + c * p.dim_v + v] : 0.f;
  }
  for (int64_t t1 = seq.len(); t1 > 0; t1 -= Tr::kSteps) {
    const int64_t t0 = t1 > Tr::kSteps ? t1 - Tr::kSteps : 0;
    const int n = static_cast<int>(t1 - t0);
    stage_column_group<T>(s, p, p.dout, seq.row(), h, seq.begin() + t0, n, v0, static_cast<float>(p.scale));
    __syncthreads();
    for (int st = n - 1; st >= 0; --st) {
      float acc = 0.f;
#pragma unroll
      for (int r = 0; r < Tr::kRowsPerThread; ++r) {
        const int c = warp + r * Tr::kNWarps;
        if (c < K) {
          dS[r] = gla_state_step(dS[r], 1.f, s.q[st][c], s.col[st][lane]);
          acc += s.k[st][c] * dS[r];
          dS[r] *= s.decay[st][c];
        }
      }
      s.part[st][warp][lane] = acc;
    }
    __syncthreads();
    reduce_column_group<T>(s, p.dv, seq.row(), h, seq.begin() + t0, n, v, active, 1.f);
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < Tr::kRowsPerThread; ++r) {
    const int c = warp + r * Tr::kNWarps;
    if (active && c < K) static_cast<float*>(p.dh0)[state0 + c * p.dim_v + v] = dS[r];
  }
}

// Backward, row layout: a forward pass recomputes S_t for dq_t = scale S_t do_t; a reverse pass carries dS for
// dk_t = dS_t v_t and the closed-form dg (reverse cumsum of q dq - k dk, starting from sum_v S_T dS_T; gla_gate_grad).
// V <= kMaxDim (any K); s_v and s_do hold (kSteps, V) of v and do. grid: (B * H, ceil(K / kNWarps));
// block: kThreads.
template <typename T, bool kExactGateGrad, bool kVarlen, int kMaxDim>
__device__ __forceinline__ void gla_recurrent_bwd_dqk(const GlaParams& p, const Varlen& varlen,
                                                      float (&s_v)[GlaRecurrentTraits<kMaxDim>::kSteps][kMaxDim],
                                                      float (&s_do)[GlaRecurrentTraits<kMaxDim>::kSteps][kMaxDim]) {
  using Tr = GlaRecurrentTraits<kMaxDim>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const GlaSeq<kVarlen> seq(p, varlen, b);  // t below: within the sequence; seq.row(), seq.begin() + t in the tensors
  const int64_t c = int64_t(blockIdx.y) * Tr::kNWarps + warp;  // this warp's key row
  const bool row_ok = c < p.dim_k;
  const int V = static_cast<int>(p.dim_v);
  const int64_t state0 = bh * p.dim_k * p.dim_v;
  const float scale = static_cast<float>(p.scale);
  float* ws = p.workspace;  // (B, T, H, K) fp32 dq
  auto ws_at = [&](int64_t t) { return ((seq.row() * p.seqlen + seq.begin() + t) * p.heads + h) * p.dim_k + c; };
  auto stage = [&](int64_t t0, int n) {
    for (int idx = threadIdx.x; idx < Tr::kSteps * V; idx += Tr::kThreads) {
      const int st = idx / V, e = idx % V;
      if (st >= n) continue;
      s_v[st][e] = to_float(p.v.at<const T>(seq.row(), seq.begin() + t0 + st, h)[e]);
      s_do[st][e] = to_float(p.dout.at<const T>(seq.row(), seq.begin() + t0 + st, h)[e]);
    }
  };
  float S[Tr::kColsPerLane], dS[Tr::kColsPerLane];
#pragma unroll
  for (int j = 0; j < Tr::kColsPerLane; ++j) {
    const int e = lane + 32 * j;
    S[j] = (p.h0 && row_ok && e < V) ? static_cast<const float*>(p.h0)[state0 + c * p.dim_v + e] : 0.f;
    dS[j] = (p.dht && row_ok && e < V) ? static_cast<const float*>(p.dht)[state0 + c * p.dim_v + e] : 0.f;
  }
  for (int64_t t0 = 0; t0 < seq.len(); t0 += Tr::kSteps) {
    const int n = static_cast<int>(seq.len() - t0 < Tr::kSteps ? seq.len() - t0 : Tr::kSteps);
    stage(t0, n);
    __syncthreads();
    if (row_ok) {
      for (int st = 0; st < n; ++st) {
        const int64_t t = t0 + st;
        const float decay = gla_exp2(gla_log2_gate(to_float(p.g.at<const T>(seq.row(), seq.begin() + t, h)[c])));
        const float kc = to_float(p.k.at<const T>(seq.row(), seq.begin() + t, h)[c]);
        float part = 0.f;
#pragma unroll
        for (int j = 0; j < Tr::kColsPerLane; ++j) {
          const int e = lane + 32 * j;
          if (e < V) {
            S[j] = gla_state_step(S[j], decay, kc, s_v[st][e]);
            part += S[j] * s_do[st][e];
          }
        }
        const float dq = scale * warp_sum(part);
        if (lane == 0) {
          ws[ws_at(t)] = dq;
          p.dq.at<T>(seq.row(), seq.begin() + t, h)[c] = from_float<T>(dq);
        }
      }
    }
    __syncthreads();
  }
  float part = 0.f;
#pragma unroll
  for (int j = 0; j < Tr::kColsPerLane; ++j) part += S[j] * dS[j];  // out-of-range columns hold zeros
  float run = warp_sum(part);
  for (int64_t t1 = seq.len(); t1 > 0; t1 -= Tr::kSteps) {
    const int64_t t0 = t1 > Tr::kSteps ? t1 - Tr::kSteps : 0;
    const int n = static_cast<int>(t1 - t0);
    stage(t0, n);
    __syncthreads();
    if (row_ok) {
      for (int st = n - 1; st >= 0; --st) {
        const int64_t t = t0 + st;
        const float qc = to_float(p.q.at<const T>(seq.row(), seq.begin() + t, h)[c]);
        const float kc = to_float(p.k.at<const T>(seq.row(), seq.begin() + t, h)[c]);
        const float log2g = gla_log2_gate(to_float(p.g.at<const T>(seq.row(), seq.begin() + t, h)[c]));
        const float decay = gla_exp2(log2g);
        float dpart = 0.f;
#pragma unroll
        for (int j = 0; j < Tr::kColsPerLane; ++j) {
          const int e = lane + 32 * j;
          if (e < V) {
            dS[j] = gla_state_step(dS[j], 1.f, scale * qc, s_do[st][e]);
            dpart += dS[j] * s_v[st][e];
            dS[j] *= decay;
          }
        }
        const float dk = warp_sum(dpart);
        run += gla_dgate_term(qc, ws[ws_at(t)], kc, dk);  // written by lane 0 in the first pass
        if (lane == 0) {
          p.dk.at<T>(seq.row(), seq.begin() + t, h)[c] = from_float<T>(dk);
          p.dg.at<T>(seq.row(), seq.begin() + t, h)[c] = from_float<T>(kExactGateGrad ? gla_gate_grad(run, log2g) : run);
        }
      }
    }
    __syncthreads();
  }
}

// The kernels: fused_recurrent_gla's (kMaxDim = kGlaCudaMaxHeadDim, static shared memory) and gla_head512's
// (kMaxDim = kGlaMaxHeadDim, the column-layout ones with dynamic shared memory). gla_head512's declare a minimum of
// one block per SM: without it ptxas stops at 128 registers and spills the 64 state rows per thread; with it the
// forward takes 236 (sm_80) without spills (bench/NOTES.md).
template <typename T>
__global__ void __launch_bounds__(GlaRecurrentTraits<kGlaCudaMaxHeadDim>::kThreads)
    linmix_gla_recurrent_fwd_kernel(GlaParams p) {
  LINMIX_SHARED(GlaColumnSmem<kGlaCudaMaxHeadDim>, s);
  gla_recurrent_fwd<T, false>(p, Varlen{}, s);
}
template <typename T>
__global__ void __launch_bounds__(GlaRecurrentTraits<kGlaCudaMaxHeadDim>::kThreads)
    linmix_gla_recurrent_bwd_dv_kernel(GlaParams p) {
  LINMIX_SHARED(GlaColumnSmem<kGlaCudaMaxHeadDim>, s);
  gla_recurrent_bwd_dv<T, false>(p, Varlen{}, s);
}
template <typename T, bool kExactGateGrad>
__global__ void __launch_bounds__(GlaRecurrentTraits<kGlaCudaMaxHeadDim>::kThreads)
    linmix_gla_recurrent_bwd_dqk_kernel(GlaParams p) {
  using Tr = GlaRecurrentTraits<kGlaCudaMaxHeadDim>;
  LINMIX_SHARED(float, s_v, [Tr::kSteps][Tr::kMaxDim]);   // (kSteps, V)
  LINMIX_SHARED(float, s_do, [Tr::kSteps][Tr::kMaxDim]);  // (kSteps, V)
  gla_recurrent_bwd_dqk<T, kExactGateGrad, false>(p, Varlen{}, s_v, s_do);
}
template <typename T>
__global__ void __launch_bounds__(GlaRecurrentTraits<kGlaMaxHeadDim>::kThreads, 1)
    linmix_gla_head512_recurrent_fwd_kernel(GlaParams p) {
  LINMIX_DYNAMIC_SHARED_ALIGNED(16, unsigned char, smem_raw);
  gla_recurrent_fwd<T, false>(p, Varlen{}, *reinterpret_cast<GlaColumnSmem<kGlaMaxHeadDim>*>(smem_raw));
}
template <typename T>
__global__ void __launch_bounds__(GlaRecurrentTraits<kGlaMaxHeadDim>::kThreads, 1)
    linmix_gla_head512_recurrent_bwd_dv_kernel(GlaParams p) {
  LINMIX_DYNAMIC_SHARED_ALIGNED(16, unsigned char, smem_raw);
  gla_recurrent_bwd_dv<T, false>(p, Varlen{}, *reinterpret_cast<GlaColumnSmem<kGlaMaxHeadDim>*>(smem_raw));
}
template <typename T, bool kExactGateGrad>
__global__ void __launch_bounds__(GlaRecurrentTraits<kGlaMaxHeadDim>::kThreads, 1)
    linmix_gla_head512_recurrent_bwd_dqk_kernel(GlaParams p) {
  using Tr = GlaRecurrentTraits<kGlaMaxHeadDim>;
  LINMIX_SHARED(float, s_v, [Tr::kSteps][Tr::kMaxDim]);   // (kSteps, V): 16 KiB
  LINMIX_SHARED(float, s_do, [Tr::kSteps][Tr::kMaxDim]);  // (kSteps, V)
  gla_recurrent_bwd_dqk<T, kExactGateGrad, false>(p, Varlen{}, s_v, s_do);
}

// gla_varlen's: fused_recurrent_gla's kernels over packed sequences, serving chunk_gla's packed calls too (the same
// recurrence), with the exact dg (gla_gate_grad) of the CPU kernels; the head512 ones are gla_head512's kernels
// over packed sequences, for head dims above kGlaCudaMaxHeadDim.
template <typename T>
__global__ void __launch_bounds__(GlaRecurrentTraits<kGlaCudaMaxHeadDim>::kThreads)
    linmix_gla_varlen_fwd_kernel(GlaParams p, Varlen varlen) {
  LINMIX_SHARED(GlaColumnSmem<kGlaCudaMaxHeadDim>, s);
  gla_recurrent_fwd<T, true>(p, varlen, s);
}
template <typename T>
__global__ void __launch_bounds__(GlaRecurrentTraits<kGlaCudaMaxHeadDim>::kThreads)
    linmix_gla_varlen_bwd_dv_kernel(GlaParams p, Varlen varlen) {
  LINMIX_SHARED(GlaColumnSmem<kGlaCudaMaxHeadDim>, s);
  gla_recurrent_bwd_dv<T, true>(p, varlen, s);
}
template <typename T>
__global__ void __launch_bounds__(GlaRecurrentTraits<kGlaCudaMaxHeadDim>::kThreads)
    linmix_gla_varlen_bwd_dqk_kernel(GlaParams p, Varlen varlen) {
  using Tr = GlaRecurrentTraits<kGlaCudaMaxHeadDim>;
  LINMIX_SHARED(float, s_v, [Tr::kSteps][Tr::kMaxDim]);   // (kSteps, V)
  LINMIX_SHARED(float, s_do, [Tr::kSteps][Tr::kMaxDim]);  // (kSteps, V)
  gla_recurrent_bwd_dqk<T, /*kExactGateGrad=*/true, true>(p, varlen, s_v, s_do);
}
template <typename T>
__global__ void __launch_bounds__(GlaRecurrentTraits<kGlaMaxHeadDim>::kThreads, 1)
    linmix_gla_varlen_head512_fwd_kernel(GlaParams p, Varlen varlen) {
  LINMIX_DYNAMIC_SHARED_ALIGNED(16, unsigned char, smem_raw);
  gla_recurrent_fwd<T, true>(p, varlen, *reinterpret_cast<GlaColumnSmem<kGlaMaxHeadDim>*>(smem_raw));
}
template <typename T>
__global__ void __launch_bounds__(GlaRecurrentTraits<kGlaMaxHeadDim>::kThreads, 1)
    linmix_gla_varlen_head512_bwd_dv_kernel(GlaParams p, Varlen varlen) {
  LINMIX_DYNAMIC_SHARED_ALIGNED(16, unsigned char, smem_raw);
  gla_recurrent_bwd_dv<T, true>(p, varlen, *reinterpret_cast<GlaColumnSmem<kGlaMaxHeadDim>*>(smem_raw));
}
template <typename T>
__global__ void __launch_bounds__(GlaRecurrentTraits<kGlaMaxHeadDim>::kThreads, 1)
    linmix_gla_varlen_head512_bwd_dqk_kernel(GlaParams p, Varlen varlen) {
  using Tr = GlaRecurrentTraits<kGlaMaxHeadDim>;
  LINMIX_SHARED(float, s_v, [Tr::kSteps][Tr::kMaxDim]);   // (kSteps, V): 16 KiB
  LINMIX_SHARED(float, s_do, [Tr::kSteps][Tr::kMaxDim]);  // (kSteps, V)
  gla_recurrent_bwd_dqk<T, /*kExactGateGrad=*/true, true>(p, varlen, s_v, s_do);
}

// Launches for K, V <= kMaxDim: the column-layout kernels get `column_smem` bytes of dynamic shared memory; `extra`
// is the varlen kernels' Varlen.
template <int kMaxDim, typename... Extra>
void launch_gla_recurrent_fwd(void (*fwd)(GlaParams, Extra...), size_t column_smem, const GlaParams& p,
                              cudaStream_t stream, const Extra&... extra) {
  const dim3 grid = checked_grid("fused_recurrent_gla", "(B H, ceil(V / 32))", p.batch * p.heads, ceil_div(p.dim_v, 32));
  opt_in_smem(fwd, column_smem);
  launch_kernel(fwd, grid, GlaRecurrentTraits<kMaxDim>::kThreads, column_smem, stream, p, extra...);
}

template <int kMaxDim, typename... Extra>
void launch_gla_recurrent_bwd(void (*dqk)(GlaParams, Extra...), void (*dv)(GlaParams, Extra...), size_t column_smem,
                              const GlaParams& p, cudaStream_t stream, const Extra&... extra) {
  using Tr = GlaRecurrentTraits<kMaxDim>;
  const int64_t bh = p.batch * p.heads;
  const dim3 dqk_grid = checked_grid("fused_recurrent_gla", "(B H, ceil(K / 8))", bh, ceil_div(p.dim_k, Tr::kNWarps));
  launch_kernel(dqk, dqk_grid, Tr::kThreads, 0, stream, p, extra...);
  opt_in_smem(dv, column_smem);
  launch_kernel(dv, checked_grid("fused_recurrent_gla", "(B H, ceil(V / 32))", bh, ceil_div(p.dim_v, 32)), Tr::kThreads,
                column_smem, stream, p, extra...);
}

template <DType dt>
void fused_recurrent_gla_fwd_cuda(const GlaParams& p, cudaStream_t stream) {
  launch_gla_recurrent_fwd<kGlaCudaMaxHeadDim>(linmix_gla_recurrent_fwd_kernel<cuda_t<dt>>, 0, p, stream);
}

template <DType dt>
void fused_recurrent_gla_bwd_cuda(const GlaParams& p, cudaStream_t stream) {
  launch_gla_recurrent_bwd<kGlaCudaMaxHeadDim>(p.exact_gate_grad ? linmix_gla_recurrent_bwd_dqk_kernel<cuda_t<dt>, true>
                                                                  : linmix_gla_recurrent_bwd_dqk_kernel<cuda_t<dt>, false>,
                                               linmix_gla_recurrent_bwd_dv_kernel<cuda_t<dt>>, 0, p, stream);
}

template <DType dt>
void gla_head512_recurrent_fwd_cuda(const GlaParams& p, cudaStream_t stream) {
  launch_gla_recurrent_fwd<kGlaMaxHeadDim>(linmix_gla_head512_recurrent_fwd_kernel<cuda_t<dt>>,
                                           sizeof(GlaColumnSmem<kGlaMaxHeadDim>), p, stream);
}

template <DType dt>
void gla_head512_recurrent_bwd_cuda(const GlaParams& p, cudaStream_t stream) {
  launch_gla_recurrent_bwd<kGlaMaxHeadDim>(
      p.exact_gate_grad ? linmix_gla_head512_recurrent_bwd_dqk_kernel<cuda_t<dt>, true>
                        : linmix_gla_head512_recurrent_bwd_dqk_kernel<cuda_t<dt>, false>,
      linmix_gla_head512_recurrent_bwd_dv_kernel<cuda_t<dt>>, sizeof(GlaColumnSmem<kGlaMaxHeadDim>), p, stream);
}

// Packed sequences: the kernels sized for kGlaCudaMaxHeadDim, or above it gla_head512's sizes.
inline bool gla_wide_heads(const GlaParams& p) {
  return p.dim_k > kGlaCudaMaxHeadDim || p.dim_v > kGlaCudaMaxHeadDim;
}

template <DType dt>
void gla_varlen_fwd_cuda(const GlaParams& p, const Varlen& varlen, cudaStream_t stream) {
  if (gla_wide_heads(p)) {
    launch_gla_recurrent_fwd<kGlaMaxHeadDim>(linmix_gla_varlen_head512_fwd_kernel<cuda_t<dt>>,
                                             sizeof(GlaColumnSmem<kGlaMaxHeadDim>), p, stream, varlen);
    return;
  }
  launch_gla_recurrent_fwd<kGlaCudaMaxHeadDim>(linmix_gla_varlen_fwd_kernel<cuda_t<dt>>, 0, p, stream, varlen);
}

template <DType dt>
void gla_varlen_bwd_cuda(const GlaParams& p, const Varlen& varlen, cudaStream_t stream) {
  if (gla_wide_heads(p)) {
    launch_gla_recurrent_bwd<kGlaMaxHeadDim>(linmix_gla_varlen_head512_bwd_dqk_kernel<cuda_t<dt>>,
                                             linmix_gla_varlen_head512_bwd_dv_kernel<cuda_t<dt>>,
                                             sizeof(GlaColumnSmem<kGlaMaxHeadDim>), p, stream, varlen);
    return;
  }
  launch_gla_recurrent_bwd<kGlaCudaMaxHeadDim>(linmix_gla_varlen_bwd_dqk_kernel<cuda_t<dt>>,
                                               linmix_gla_varlen_bwd_dv_kernel<cuda_t<dt>>, 0, p, stream, varlen);
}

}  // namespace linmix
