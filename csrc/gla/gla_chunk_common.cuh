// Pieces shared by the CUDA chunk_gla forward and backward kernels: tile sizes, a shared-memory GEMM
// (WMMA tensor cores for fp16/bf16 operands, fp32 CUDA cores for fp32), staging of one (chunk, K slice)
// of q, k and the cumulative gate, and the intra-chunk score matrix.
#pragma once

#include <cuda_runtime.h>
#include <mma.h>

#include <type_traits>

#include "common/cuda_check.h"
#include "common/cuda_utils.cuh"
#include "common/dtype.h"
#include "gla/gla_common.h"
#include "gla/params.h"

namespace linmix {

struct GlaChunkTraits {
  static constexpr int kChunk = kGlaChunk;
  static constexpr int kSub = kGlaSubChunk;
  static constexpr int kBK = 32;  // key channels per slice
  static constexpr int kBV = 32;  // value columns per slice
  static constexpr int kMaxK = kGlaCudaMaxHeadDim;
  static constexpr int kNWarps = 4;
  static constexpr int kThreads = 32 * kNWarps;
  static_assert(kSub == 16, "sub-blocks are single 16x16 WMMA tiles");
  static_assert(kChunk % 16 == 0 && kBK % 16 == 0 && kBV % 16 == 0 && kMaxK % kBK == 0, "WMMA tile multiples");
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

// The (chunk, K slice) inputs every chunk kernel needs, fp32 in shared memory.
struct GlaChunkSlice {
  using Tr = GlaChunkTraits;
  alignas(128) float q[Tr::kChunk][Tr::kBK];
  alignas(128) float k[Tr::kChunk][Tr::kBK];
  alignas(128) float log2g_cum[Tr::kChunk][Tr::kBK];  // log2-scaled inclusive cumsum of g within the chunk
};

// Stages rows [t0, t0 + L) and channels [c0, c0 + kBK) of q, k (if wanted) and g, zero-padded (g = 0 past the end,
// so log2g_cum stays flat and log2g_cum[kChunk - 1] is the gate at the chunk's last real row), then the cumsum.
// Ends synced.
template <typename T>
__device__ __forceinline__ void stage_chunk_slice(GlaChunkSlice& s, const GlaParams& p, int64_t bi, int64_t hi,
                                                  int64_t t0, int L, int c0, bool want_q, bool want_k) {
  using Tr = GlaChunkTraits;
  constexpr int C = Tr::kChunk, BK = Tr::kBK;
  const int K = static_cast<int>(p.dim_k);
  for (int idx = threadIdx.x; idx < C * BK; idx += blockDim.x) {
    const int i = idx / BK, cc = idx % BK;
    const bool ok = i < L && c0 + cc < K;
    if (want_q) s.q[i][cc] = ok ? to_float(p.q.at<const T>(bi, t0 + i, hi)[c0 + cc]) : 0.f;
    if (want_k) s.k[i][cc] = ok ? to_float(p.k.at<const T>(bi, t0 + i, hi)[c0 + cc]) : 0.f;
    s.log2g_cum[i][cc] = ok ? gla_log2_gate(to_float(p.g.at<const T>(bi, t0 + i, hi)[c0 + cc])) : 0.f;
  }
  __syncthreads();
  if (threadIdx.x < BK) {
    float run = 0.f;
    for (int i = 0; i < C; ++i) {
      run += s.log2g_cum[i][threadIdx.x];
      s.log2g_cum[i][threadIdx.x] = run;
    }
  }
  __syncthreads();
}

// A (kChunk, kChunk) += this K slice's contribution to A_ij = sum_c q_ic k_jc exp2(b_ic - b_jc), j <= i.
// Off-diagonal sub-blocks A[I, J<I] = q~_I k~^T with reference r = log2g_cum at row 16 I, q~ = q exp2(log2g_cum - r),
// k~ = k exp2(r - log2g_cum) (both exponents <= 0), through the Op-typed operand buffers x, y (kChunk, kBK);
// diagonal sub-blocks elementwise in fp32. Ends synced; x, y are free afterwards.
template <typename Op>
__device__ __forceinline__ void accumulate_scores(float (*A)[GlaChunkTraits::kChunk], const GlaChunkSlice& s,
                                                  Op (*x)[GlaChunkTraits::kBK], Op (*y)[GlaChunkTraits::kBK]) {
  using Tr = GlaChunkTraits;
  constexpr int C = Tr::kChunk, BK = Tr::kBK;
  const int tid = threadIdx.x, nt = blockDim.x;
  for (int I = 1; I < C / 16; ++I) {
    const int r_row = 16 * I;
    for (int idx = tid; idx < 16 * BK; idx += nt) {
      const int ii = idx / BK, cc = idx % BK, i = r_row + ii;
      x[ii][cc] = from_float<Op>(s.q[i][cc] * gla_exp2(s.log2g_cum[i][cc] - s.log2g_cum[r_row][cc]));
    }
    for (int idx = tid; idx < r_row * BK; idx += nt) {
      const int j = idx / BK, cc = idx % BK;
      y[j][cc] = from_float<Op>(s.k[j][cc] * gla_exp2(s.log2g_cum[r_row][cc] - s.log2g_cum[j][cc]));
    }
    __syncthreads();
    smem_gemm_acc<Op, true, false>(&A[r_row][0], C, &x[0][0], BK, &y[0][0], BK, 16, r_row, BK);
    __syncthreads();
  }
  for (int idx = tid; idx < (C / 16) * 256; idx += nt) {
    const int sub = idx / 256, ii = (idx % 256) / 16, jj = idx % 16;
    if (jj > ii) continue;
    const int i = 16 * sub + ii, j = 16 * sub + jj;
    A[i][j] += gla_diag_score(&s.q[i][0], &s.k[j][0], &s.log2g_cum[i][0], &s.log2g_cum[j][0], BK);
  }
  __syncthreads();
}

}  // namespace linmix
