// CUDA chunk_gla forward: one block per (batch * head, 32-column slice of V) walks the chunks in order,
// carrying its (K, 32) slice of the state in shared memory (fp32). Per chunk of 64 steps and per 32-channel
// slice of K (everything but the score matrix A decomposes over key channels):
//   log2g_cum = log2-scaled cumsum of g over the chunk (fp32)
//   A     += off-diagonal 16x16 sub-blocks on tensor cores, diagonal ones elementwise (accumulate_scores)
//   o     += (q exp2(log2g_cum)) S                  (tensor cores; S rounded to the input dtype as an operand)
//   S      = exp2(log2g_cum_last) S + (k exp2(log2g_cum_last - log2g_cum))^T v
//                                           (tensor cores, fp32 accumulate in place)
// then o += tril(A) v (tensor cores) and o is written scaled. fp16/bf16 inputs use WMMA 16x16x16 with fp32
// accumulation; fp32 inputs take the same path with fp32 CUDA-core products (no tf32: the fp32 tests
// ask for ~1e-5). Rows past T and channels past K or V are zero-padded (g = 0 there, so log2g_cum stays flat).
#pragma once

#include "gla/gla_chunk_common.cuh"

namespace linmix {

// Shared memory of one block; every member is a whole number of 32-byte WMMA-aligned rows.
template <typename Op>
struct GlaChunkFwdSmem {
  using Tr = GlaChunkTraits;
  alignas(128) float S[Tr::kMaxK][Tr::kBV];      // state slice (K, BV), rows >= K stay zero
  alignas(128) float A[Tr::kChunk][Tr::kChunk];  // scores of the chunk, lower triangle
  alignas(128) float o[Tr::kChunk][Tr::kBV];     // output accumulator
  GlaChunkSlice in;                              // q, k, log2g_cum of the current (chunk, K slice)
  // operand buffers (q~ / q exp2(log2g_cum), k~ / k exp2(log2g_cum_last - log2g_cum))
  alignas(128) Op x[Tr::kChunk][Tr::kBK];
  alignas(128) Op y[Tr::kChunk][Tr::kBK];
  alignas(128) Op v[Tr::kChunk][Tr::kBV];
  alignas(128) Op St[Tr::kBK][Tr::kBV];          // operand copy of the current K slice of S
  alignas(128) Op Am[Tr::kChunk][Tr::kChunk];    // tril(A) as an operand
};

// grid: (B * H, ceil(V / kBV)); block: kThreads; dynamic shared memory: sizeof(GlaChunkFwdSmem<T>).
template <typename T>
__global__ void __launch_bounds__(GlaChunkTraits::kThreads) linmix_gla_chunk_fwd_kernel(GlaParams p) {
  using Tr = GlaChunkTraits;
  constexpr int C = Tr::kChunk, BK = Tr::kBK, BV = Tr::kBV, NT = Tr::kThreads;
  LINMIX_DYNAMIC_SHARED_ALIGNED(128, unsigned char, smem_raw);
  auto& s = *reinterpret_cast<GlaChunkFwdSmem<T>*>(smem_raw);
  const int tid = threadIdx.x;
  const int64_t bh = blockIdx.x, bi = bh / p.heads, hi = bh % p.heads;
  const int64_t v0 = int64_t(blockIdx.y) * BV;
  const int K = static_cast<int>(p.dim_k), V = static_cast<int>(p.dim_v);
  const int n_kslices = static_cast<int>(ceil_div(K, BK));
  const int64_t state0 = bh * p.dim_k * p.dim_v;  // (B, H, K, V) offset of this head

  for (int idx = tid; idx < Tr::kMaxK * BV; idx += NT) {
    const int c = idx / BV, e = idx % BV;
    const bool ok = p.h0 && c < K && v0 + e < V;
    s.S[c][e] = ok ? static_cast<const float*>(p.h0)[state0 + c * p.dim_v + v0 + e] : 0.f;
  }
  for (int64_t t0 = 0; t0 < p.seqlen; t0 += C) {
    const int L = static_cast<int>(p.seqlen - t0 < C ? p.seqlen - t0 : C);
    for (int idx = tid; idx < C * C; idx += NT) (&s.A[0][0])[idx] = 0.f;
    for (int idx = tid; idx < C * BV; idx += NT) {
      const int i = idx / BV, e = idx % BV;
      s.o[i][e] = 0.f;
      s.v[i][e] = from_float<T>(i < L && v0 + e < V ? to_float(p.v.at<const T>(bi, t0 + i, hi)[v0 + e]) : 0.f);
    }
    for (int ks = 0; ks < n_kslices; ++ks) {
      const int c0 = ks * BK;
      stage_chunk_slice<T>(s.in, p, bi, hi, t0, L, c0, true, true);
      accumulate_scores<T>(s.A, s.in, s.x, s.y);
      // Inter-chunk output: o += (q exp2(log2g_cum)) S[c0 : c0 + BK].
      for (int idx = tid; idx < C * BK; idx += NT) {
        const int i = idx / BK, cc = idx % BK;
        s.x[i][cc] = from_float<T>(s.in.q[i][cc] * gla_exp2(s.in.log2g_cum[i][cc]));
      }
      for (int idx = tid; idx < BK * BV; idx += NT) {
        const int cc = idx / BV, e = idx % BV;
        s.St[cc][e] = from_float<T>(s.S[c0 + cc][e]);
      }
      __syncthreads();
      smem_gemm_acc<T, true, true>(&s.o[0][0], BV, &s.x[0][0], BK, &s.St[0][0], BV, C, BV, BK);
      __syncthreads();
      // State: S[c0 : c0 + BK] = exp2(log2g_cum_last) S + (k exp2(log2g_cum_last - log2g_cum))^T v.
      for (int idx = tid; idx < C * BK; idx += NT) {
        const int i = idx / BK, cc = idx % BK;
        s.y[i][cc] = from_float<T>(s.in.k[i][cc] * gla_exp2(s.in.log2g_cum[C - 1][cc] - s.in.log2g_cum[i][cc]));
      }
      for (int idx = tid; idx < BK * BV; idx += NT) {
        const int cc = idx / BV, e = idx % BV;
        s.S[c0 + cc][e] *= gla_exp2(s.in.log2g_cum[C - 1][cc]);
      }
      __syncthreads();
      smem_gemm_acc<T, false, true>(&s.S[c0][0], BV, &s.y[0][0], BK, &s.v[0][0], BV, BK, BV, C);
      __syncthreads();
    }
    // Intra-chunk output: o += tril(A) v.
    for (int idx = tid; idx < C * C; idx += NT) {
      const int i = idx / C, j = idx % C;
      s.Am[i][j] = from_float<T>(j <= i ? s.A[i][j] : 0.f);
    }
    __syncthreads();
    smem_gemm_acc<T, true, true>(&s.o[0][0], BV, &s.Am[0][0], C, &s.v[0][0], BV, C, BV, C);
    __syncthreads();
    const float scale = static_cast<float>(p.scale);
    for (int idx = tid; idx < L * BV; idx += NT) {
      const int i = idx / BV, e = idx % BV;
      if (v0 + e < V) p.o.at<T>(bi, t0 + i, hi)[v0 + e] = from_float<T>(scale * s.o[i][e]);
    }
    __syncthreads();  // the next chunk clears A and o
  }
  __syncthreads();  // T = 0: S was written by other threads
  for (int idx = tid; idx < K * BV; idx += NT) {
    const int c = idx / BV, e = idx % BV;
    if (v0 + e < V) static_cast<float*>(p.ht)[state0 + c * p.dim_v + v0 + e] = s.S[c][e];
  }
}

template <DType dt>
void chunk_gla_fwd_cuda(const GlaParams& p, cudaStream_t stream) {
  using Tr = GlaChunkTraits;
  using T = cuda_t<dt>;
  constexpr size_t smem = sizeof(GlaChunkFwdSmem<T>);
  static_assert(smem <= kMaxBlockSharedBytes);
  opt_in_smem(linmix_gla_chunk_fwd_kernel<T>, smem);
  const dim3 grid = checked_grid("chunk_gla", "(B H, ceil(V / 32))", p.batch * p.heads, ceil_div(p.dim_v, Tr::kBV));
  launch_kernel(linmix_gla_chunk_fwd_kernel<T>, grid, Tr::kThreads, smem, stream, p);
}

}  // namespace linmix
