// Fused CUDA chunk_gla forward, one launch: a block per (batch * head, kBV-column V tile) walks the chunks in order
// with its (K, kBV) slice of the state in shared memory, fp32. Per chunk of 64 steps, walking K in kBK-channel
// slices (everything but the score matrix A decomposes over key channels):
//   o  += (q exp2(P(.; 0))) S[slice]                     tensor cores, S rounded to the operand type
//   A  += the slice's scores (gla_accumulate_scores: segment sums, diagonal sub-blocks elementwise in fp32)
//   S[slice] = exp2(total) S[slice] + (k exp2(S(.; C)))^T v   tensor cores, fp32 accumulation in place
// then o += tril(A) v and o is written scaled. Inputs are read once per V tile (V / kBV times) and o written once;
// the chunk's decays, scores and the state never leave the chip. fp16/bf16 operands on WMMA with fp32
// accumulation; fp32 inputs take the same structure with fp32 CUDA-core products. Rows past T and channels past
// K or V are zero (g = 0 there). Decays are gla_fused_common.cuh's segment sums: exact for every g <= 0.
#pragma once

#include "gla/gla_fused.h"
#include "gla/gla_fused_common.cuh"

namespace linmix {

template <typename Tr, typename Op>
struct GlaFusedFwdSmem {
  static constexpr int C = Tr::kChunk, BK = Tr::kBK, BV = Tr::kBV;
  struct Slice {  // the (chunk, K slice) inputs, fp32
    alignas(128) float q[C * BK];
    alignas(128) float k[C * BK];
    alignas(128) float log2g[C * BK];  // log2 gates
  };
  alignas(128) float S[Tr::kMaxK * BV];  // (kMaxK, BV) state slice; rows past K stay 0
  alignas(128) float A[C * C];           // scores of the chunk, lower triangle
  alignas(128) float o[C * BV];          // output accumulator
  alignas(128) float etot[BK];           // exp2 of the chunk's gate sum, per channel of the slice
  union {
    Slice in;                  // while walking K
    alignas(128) Op Am[C * C];  // then tril(A) as an operand
  };
  alignas(128) Op x[C * BK];  // q exp2(P(.; 0)), and the scores' query operand
  union {
    alignas(128) Op St[BK * BV];  // S[slice] as an operand, for q S
    alignas(128) Op y[C * BK];    // then k exp2(S(.; C)), and the scores' key operand
  };
  alignas(128) Op v[C * BV];
};

// The forward walk of one (batch * head, kBV-column V tile) block. kOut: the forward (o, and the final state into
// p.ht). Otherwise the backward's states pass (gla_fused_bwd_kernel.cuh): the state entering chunk n, rounded to T,
// into states (B * H, ceil(T / kChunk), K, V), and the final fp32 state into final_state if it is not null.
template <typename Tr, typename T, bool kOut>
__device__ __forceinline__ void gla_fused_walk(const GlaParams& p, T* states, float* final_state) {
  constexpr int C = Tr::kChunk, BK = Tr::kBK, BV = Tr::kBV;
  LINMIX_DYNAMIC_SHARED_ALIGNED(128, unsigned char, smem_raw);
  auto& s = *reinterpret_cast<GlaFusedFwdSmem<Tr, T>*>(smem_raw);
  const int K = static_cast<int>(p.dim_k), V = static_cast<int>(p.dim_v);
  const int64_t bh = blockIdx.x, bi = bh / p.heads, hi = bh % p.heads, state0 = bh * p.dim_k * p.dim_v;
  const int e0 = blockIdx.y * BV;
  const float scale = static_cast<float>(p.scale);

  for (int idx = threadIdx.x; idx < Tr::kMaxK * BV; idx += blockDim.x) {
    const int c = idx / BV, e = idx % BV;
    const bool ok = p.h0 && c < K && e0 + e < V;
    s.S[idx] = ok ? static_cast<const float*>(p.h0)[state0 + int64_t(c) * V + e0 + e] : 0.f;
  }
  for (int64_t t0 = 0; t0 < p.seqlen; t0 += C) {
    const int L = static_cast<int>(p.seqlen - t0 < C ? p.seqlen - t0 : C);
    if constexpr (kOut) {
      for (int idx = threadIdx.x; idx < C * C; idx += blockDim.x) s.A[idx] = 0.f;
      for (int idx = threadIdx.x; idx < C * BV; idx += blockDim.x) s.o[idx] = 0.f;
    } else {
      __syncthreads();  // S as the previous chunk left it
      T* entering = states + (bh * ((p.seqlen + C - 1) / C) + t0 / C) * p.dim_k * p.dim_v;
      for (int idx = threadIdx.x; idx < K * BV; idx += blockDim.x) {
        const int c = idx / BV, e = idx % BV;
        if (e0 + e < V) entering[int64_t(c) * V + e0 + e] = from_float<T>(s.S[idx]);
      }
    }
    gla_stage_tile<false, T>(s.v, p.v, bi, hi, t0, L, e0, V, BV);
    for (int c0 = 0; c0 < K; c0 += BK) {
      if constexpr (kOut) gla_stage_tile<false, T>(s.in.q, p.q, bi, hi, t0, L, c0, K, BK);
      gla_stage_tile<false, T>(s.in.k, p.k, bi, hi, t0, L, c0, K, BK);
      gla_stage_tile<true, T>(s.in.log2g, p.g, bi, hi, t0, L, c0, K, BK);
      if constexpr (kOut) {
        for (int idx = threadIdx.x; idx < BK * BV; idx += blockDim.x) s.St[idx] = from_float<T>(s.S[c0 * BV + idx]);
        __syncthreads();
        each_prefix_decay(s.in.log2g, BK, 0, C, [&](int i, int cc, float d) { s.x[i * BK + cc] = from_float<T>(s.in.q[i * BK + cc] * d); });
        __syncthreads();
        smem_gemm_acc<T, true, true>(s.o, BV, s.x, BK, s.St, BV, C, BV, BK);  // (C, BK) (BK, BV)
        __syncthreads();
        gla_accumulate_scores<T, BK>(s.A, s.in.q, s.in.k, s.in.log2g, s.x, s.y);
      } else {
        __syncthreads();
      }
      each_suffix_decay(s.in.log2g, BK, C, [&](int j, int cc, float d) { s.y[j * BK + cc] = from_float<T>(s.in.k[j * BK + cc] * d); });
      for (int cc = threadIdx.x; cc < BK; cc += blockDim.x) {
        float sum = 0.f;
        for (int i = 0; i < C; ++i) sum += s.in.log2g[i * BK + cc];
        s.etot[cc] = gla_exp2(sum);
      }
      __syncthreads();
      for (int idx = threadIdx.x; idx < BK * BV; idx += blockDim.x) s.S[c0 * BV + idx] *= s.etot[idx / BV];
      __syncthreads();
      smem_gemm_acc<T, false, true>(s.S + c0 * BV, BV, s.y, BK, s.v, BV, BK, BV, C);  // (C, BK)^T (C, BV)
      __syncthreads();
    }
    if constexpr (kOut) {
      for (int idx = threadIdx.x; idx < C * C; idx += blockDim.x)
        s.Am[idx] = from_float<T>(idx % C <= idx / C ? s.A[idx] : 0.f);
      __syncthreads();
      smem_gemm_acc<T, true, true>(s.o, BV, s.Am, C, s.v, BV, C, BV, C);  // tril(A) v
      __syncthreads();
      for (int idx = threadIdx.x; idx < L * BV; idx += blockDim.x) {
        const int i = idx / BV, e = idx % BV;
        if (e0 + e < V) p.o.at<T>(bi, t0 + i, hi)[e0 + e] = from_float<T>(scale * s.o[idx]);
      }
      __syncthreads();  // the next chunk clears A and o and restages v
    }
  }
  __syncthreads();  // T = 0: S was written by other threads
  float* last = kOut ? static_cast<float*>(p.ht) : final_state;
  if (last == nullptr) return;
  for (int idx = threadIdx.x; idx < K * BV; idx += blockDim.x) {
    const int c = idx / BV, e = idx % BV;
    if (e0 + e < V) last[state0 + int64_t(c) * V + e0 + e] = s.S[idx];
  }
}

// grid: (B * H, ceil(V / kBV)); block: kThreads; dynamic shared memory GlaFusedFwdSmem<Tr, T>.
template <typename Tr, typename T>
__global__ void __launch_bounds__(Tr::kThreads) linmix_gla_fused_fwd_kernel(GlaParams p) {
  gla_fused_walk<Tr, T, true>(p, nullptr, nullptr);
}

template <typename Tr, typename T>
void gla_fused_fwd_launch(const GlaParams& p, cudaStream_t stream) {
  constexpr size_t smem = sizeof(GlaFusedFwdSmem<Tr, T>);
  static_assert(smem <= 160 * 1024, "fits an sm_80 block (163 KB opt-in)");
  opt_in_smem(linmix_gla_fused_fwd_kernel<Tr, T>, smem);
  const dim3 grid = checked_grid("chunk_gla", "(B H, ceil(V / 64))", p.batch * p.heads, ceil_div(p.dim_v, Tr::kBV));
  launch_kernel(linmix_gla_fused_fwd_kernel<Tr, T>, grid, Tr::kThreads, smem, stream, p);
}

template <DType dt>
void fused_gla_fwd_cuda(const GlaParams& p, void* /*workspace*/, cudaStream_t stream) {
  gla_fused_head_dim_switch(p.dim_k, [&](auto traits) { gla_fused_fwd_launch<decltype(traits), cuda_t<dt>>(p, stream); });
}

}  // namespace linmix
