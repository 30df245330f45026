// CUDA chunk_gla forward: one block per (batch * head, 32-column slice of V) walks the chunks in order,
// carrying its (K, 32) slice of the state in shared memory (fp32). Per chunk of 64 steps and per 32-channel
// slice of K (everything but the score matrix A decomposes over key channels):
//   b      = log2-scaled cumsum of g over the chunk (fp32)
//   A     += q~ k~^T on the 6 off-diagonal 16x16 sub-blocks (tensor cores): reference r = b at the first row of
//            the query sub-chunk, q~ = q exp2(b - r), k~ = k exp2(r - b), both exponents <= 0
//   A     += diagonal sub-blocks elementwise in fp32 with exp2(b_i - b_j), i >= j (gla_diag_score)
//   o     += (q exp2(b)) S                  (tensor cores; S rounded to the input dtype as an operand)
//   S      = exp2(b_last) S + (k exp2(b_last - b))^T v   (tensor cores, fp32 accumulate in place)
// then o += tril(A) v (tensor cores) and o is written scaled. fp16/bf16 inputs use WMMA 16x16x16 with fp32
// accumulation; fp32 inputs take the same path with fp32 CUDA-core products (no tf32: the fp32 tests
// ask for ~1e-5). Rows past T and channels past K or V are zero-padded (g = 0 there, so b stays flat).
#pragma once

#include <cuda_runtime.h>
#include <mma.h>

#include <type_traits>

#include "common/cuda_check.h"
#include "common/dtype.h"
#include "gla/gla_common.h"
#include "gla/params.h"

namespace linmix {

struct GlaChunkFwdTraits {
  static constexpr int kChunk = kGlaChunk;
  static constexpr int kSub = kGlaSubChunk;
  static constexpr int kBK = 32;  // key channels per slice
  static constexpr int kBV = 32;  // value columns per block
  static constexpr int kMaxK = 256;
  static constexpr int kNWarps = 4;
  static constexpr int kThreads = 32 * kNWarps;
  static_assert(kSub == 16, "sub-blocks are single 16x16 WMMA tiles");
  static_assert(kChunk % 16 == 0 && kBK % 16 == 0 && kBV % 16 == 0 && kMaxK % kBK == 0, "WMMA tile multiples");
};

// Shared memory of one block; every member is a whole number of 32-byte WMMA-aligned rows.
template <typename Op>
struct GlaChunkFwdSmem {
  using Tr = GlaChunkFwdTraits;
  alignas(128) float S[Tr::kMaxK][Tr::kBV];      // state slice (K, BV), rows >= K stay zero
  alignas(128) float A[Tr::kChunk][Tr::kChunk];  // scores of the chunk, lower triangle
  alignas(128) float o[Tr::kChunk][Tr::kBV];     // output accumulator
  alignas(128) float q[Tr::kChunk][Tr::kBK];     // (C, BK) raw q, k and the cumulative gate b
  alignas(128) float k[Tr::kChunk][Tr::kBK];
  alignas(128) float b[Tr::kChunk][Tr::kBK];
  alignas(128) Op x[Tr::kChunk][Tr::kBK];        // rescaled operands (q~ / q exp2(b), k~ / k exp2(b_last - b))
  alignas(128) Op y[Tr::kChunk][Tr::kBK];
  alignas(128) Op v[Tr::kChunk][Tr::kBV];
  alignas(128) Op St[Tr::kBK][Tr::kBV];          // operand copy of the current K slice of S
  alignas(128) Op Am[Tr::kChunk][Tr::kChunk];    // tril(A) as an operand
};

// c (M, N) fp32 row-major += a (M, Kd) b (Kd, N), all in shared memory; whole block calls, caller syncs.
// a(m, kk) = a[m * lda + kk] if kARow else a[kk * lda + m]; b(kk, n) = b[kk * ldb + n] if kBRow else b[n * ldb + kk].
// M, N, Kd are multiples of 16. Half types: one 16x16 output tile per warp at a time on tensor cores.
template <typename Op, bool kARow, bool kBRow>
__device__ __forceinline__ void smem_gemm_acc(float* c, int ldc, const Op* a, int lda, const Op* b, int ldb, int M, int N,
                                              int Kd) {
  const int warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  if constexpr (std::is_same_v<Op, float>) {
    for (int idx = threadIdx.x; idx < M * N; idx += blockDim.x) {
      const int m = idx / N, n = idx % N;
      float acc = c[m * ldc + n];
      for (int kk = 0; kk < Kd; ++kk)
        acc += (kARow ? a[m * lda + kk] : a[kk * lda + m]) * (kBRow ? b[kk * ldb + n] : b[n * ldb + kk]);
      c[m * ldc + n] = acc;
    }
  } else {
    namespace wmma = nvcuda::wmma;
    using LA = std::conditional_t<kARow, wmma::row_major, wmma::col_major>;
    using LB = std::conditional_t<kBRow, wmma::row_major, wmma::col_major>;
    const int tiles_n = N / 16;
    for (int tile = warp; tile < (M / 16) * tiles_n; tile += n_warps) {
      const int tm = tile / tiles_n, tn = tile % tiles_n;
      float* cp = c + tm * 16 * ldc + tn * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, cp, ldc, wmma::mem_row_major);
      for (int kk = 0; kk < Kd; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, Op, LA> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, Op, LB> fb;
        wmma::load_matrix_sync(fa, kARow ? a + tm * 16 * lda + kk : a + kk * lda + tm * 16, lda);
        wmma::load_matrix_sync(fb, kBRow ? b + kk * ldb + tn * 16 : b + tn * 16 * ldb + kk, ldb);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(cp, acc, ldc, wmma::mem_row_major);
    }
  }
}

// grid: (B * H, ceil(V / kBV)); block: kThreads; dynamic shared memory: sizeof(GlaChunkFwdSmem<T>).
template <typename T>
__global__ void __launch_bounds__(GlaChunkFwdTraits::kThreads) linmix_chunk_gla_fwd_kernel(GlaParams p) {
  using Tr = GlaChunkFwdTraits;
  constexpr int C = Tr::kChunk, BK = Tr::kBK, BV = Tr::kBV, NT = Tr::kThreads;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto& s = *reinterpret_cast<GlaChunkFwdSmem<T>*>(smem_raw);
  const int tid = threadIdx.x;
  const int64_t bh = blockIdx.x, bi = bh / p.heads, hi = bh % p.heads;
  const int64_t v0 = int64_t(blockIdx.y) * BV;
  const int K = static_cast<int>(p.dim_k), V = static_cast<int>(p.dim_v);
  const int n_kslices = static_cast<int>(ceil_div(K, BK));
  const int64_t state0 = bh * p.dim_k * p.dim_v;  // (B, H, K, V) offset of this head
  auto row = [&](const BTHView& x, int64_t t) {
    return static_cast<const T*>(x.ptr) + bi * x.batch_stride + t * x.t_stride + hi * x.head_stride;
  };

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
      s.v[i][e] = from_float<T>(i < L && v0 + e < V ? to_float(row(p.v, t0 + i)[v0 + e]) : 0.f);
    }
    for (int ks = 0; ks < n_kslices; ++ks) {
      const int c0 = ks * BK;
      for (int idx = tid; idx < C * BK; idx += NT) {
        const int i = idx / BK, cc = idx % BK;
        const bool ok = i < L && c0 + cc < K;
        s.q[i][cc] = ok ? to_float(row(p.q, t0 + i)[c0 + cc]) : 0.f;
        s.k[i][cc] = ok ? to_float(row(p.k, t0 + i)[c0 + cc]) : 0.f;
        s.b[i][cc] = ok ? gla_log2_gate(to_float(row(p.g, t0 + i)[c0 + cc])) : 0.f;
      }
      __syncthreads();
      if (tid < BK) {  // inclusive cumsum over the chunk, one channel per thread
        float run = 0.f;
        for (int i = 0; i < C; ++i) {
          run += s.b[i][tid];
          s.b[i][tid] = run;
        }
      }
      __syncthreads();
      // Off-diagonal sub-blocks A[I, J<I] = q~_I k~^T, reference r = b at row 16 I.
      for (int I = 1; I < C / 16; ++I) {
        const int r_row = 16 * I;
        for (int idx = tid; idx < 16 * BK; idx += NT) {
          const int ii = idx / BK, cc = idx % BK, i = r_row + ii;
          s.x[ii][cc] = from_float<T>(s.q[i][cc] * gla_exp2(s.b[i][cc] - s.b[r_row][cc]));
        }
        for (int idx = tid; idx < r_row * BK; idx += NT) {
          const int j = idx / BK, cc = idx % BK;
          s.y[j][cc] = from_float<T>(s.k[j][cc] * gla_exp2(s.b[r_row][cc] - s.b[j][cc]));
        }
        __syncthreads();
        smem_gemm_acc<T, true, false>(&s.A[r_row][0], C, &s.x[0][0], BK, &s.y[0][0], BK, 16, r_row, BK);
        __syncthreads();
      }
      // Diagonal sub-blocks, elementwise (writes only A's diagonal blocks: no overlap with what follows).
      for (int idx = tid; idx < (C / 16) * 256; idx += NT) {
        const int sub = idx / 256, ii = (idx % 256) / 16, jj = idx % 16;
        if (jj > ii) continue;
        const int i = 16 * sub + ii, j = 16 * sub + jj;
        s.A[i][j] += gla_diag_score(&s.q[i][0], &s.k[j][0], &s.b[i][0], &s.b[j][0], BK);
      }
      // Inter-chunk output: o += (q exp2(b)) S[c0 : c0 + BK].
      for (int idx = tid; idx < C * BK; idx += NT) {
        const int i = idx / BK, cc = idx % BK;
        s.x[i][cc] = from_float<T>(s.q[i][cc] * gla_exp2(s.b[i][cc]));
      }
      for (int idx = tid; idx < BK * BV; idx += NT) {
        const int cc = idx / BV, e = idx % BV;
        s.St[cc][e] = from_float<T>(s.S[c0 + cc][e]);
      }
      __syncthreads();
      smem_gemm_acc<T, true, true>(&s.o[0][0], BV, &s.x[0][0], BK, &s.St[0][0], BV, C, BV, BK);
      __syncthreads();
      // State: S[c0 : c0 + BK] = exp2(b_last) S + (k exp2(b_last - b))^T v. Padded rows keep b_last = b[C-1].
      for (int idx = tid; idx < C * BK; idx += NT) {
        const int i = idx / BK, cc = idx % BK;
        s.y[i][cc] = from_float<T>(s.k[i][cc] * gla_exp2(s.b[C - 1][cc] - s.b[i][cc]));
      }
      for (int idx = tid; idx < BK * BV; idx += NT) {
        const int cc = idx / BV, e = idx % BV;
        s.S[c0 + cc][e] *= gla_exp2(s.b[C - 1][cc]);
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
      if (v0 + e < V)
        static_cast<T*>(p.o.ptr)[bi * p.o.batch_stride + (t0 + i) * p.o.t_stride + hi * p.o.head_stride + v0 + e] =
            from_float<T>(scale * s.o[i][e]);
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
  using Tr = GlaChunkFwdTraits;
  using T = cuda_t<dt>;
  constexpr size_t smem = sizeof(GlaChunkFwdSmem<T>);
  static_assert(smem <= 160 * 1024, "fits an sm_80 block (163 KB opt-in)");
  LINMIX_CUDA_CHECK(cudaFuncSetAttribute(linmix_chunk_gla_fwd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(p.batch * p.heads), static_cast<unsigned>(ceil_div(p.dim_v, Tr::kBV)));
  linmix_chunk_gla_fwd_kernel<T><<<grid, Tr::kThreads, smem, stream>>>(p);
  LINMIX_CHECK_LAUNCH();
}

}  // namespace linmix
