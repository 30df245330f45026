// Pieces shared by the CUDA chunk_gla forward and backward kernels: tile sizes, a shared-memory GEMM
// (WMMA tensor cores for fp16/bf16 operands, fp32 CUDA cores for fp32), staging of one (chunk, K slice)
// of q, k and the gate sums (g_cumsum, or segment sums with GlaParams::segment_decays), the decays built
// from them, and the intra-chunk score matrix.
#pragma once

#include <cuda_runtime.h>
#include <mma.h>

#include <type_traits>

#include "common/cuda_check.h"
#include "common/dtype.h"
#include "gla/gla_common.h"
#include "gla/params.h"

namespace linmix {

struct GlaChunkTraits {
  static constexpr int kChunk = kGlaChunk;
  static constexpr int kSub = kGlaSubChunk;
  static constexpr int kBK = 32;  // key channels per slice
  static constexpr int kBV = 32;  // value columns per slice
  static constexpr int kMaxK = 256;
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

// Gate sums of one (chunk, K slice), fp32 in shared memory, in one of the two forms of gla_common.h.
template <bool kSegments>
struct GlaGateSums;
template <>
struct GlaGateSums<false> {  // g_cumsum: log2-scaled inclusive cumsum of g within the chunk (GPU-verified)
  using Tr = GlaChunkTraits;
  alignas(128) float gc[Tr::kChunk][Tr::kBK];
  __device__ __forceinline__ float* raw() { return &gc[0][0]; }  // holds the log2 gates until the cumsum
};
template <>
struct GlaGateSums<true> {  // segment sums (GlaParams::segment_decays)
  using Tr = GlaChunkTraits;
  alignas(128) float a[Tr::kChunk][Tr::kBK];    // log2 gates
  alignas(128) float pre[Tr::kChunk][Tr::kBK];  // inclusive prefix sums from each sub-chunk's first row
  alignas(128) float suf[Tr::kChunk][Tr::kBK];  // exclusive suffix sums to each sub-chunk's last row
  alignas(128) float tot[kGlaSubChunks][Tr::kBK];  // sub-chunk totals
  __device__ __forceinline__ float* raw() { return &a[0][0]; }
};

// The (chunk, K slice) inputs every chunk kernel needs, fp32 in shared memory, and the log2 decays (all <= 0)
// the kernels take from them. With kSegments every decay is a sum over the segment it spans; without, a
// difference of g_cumsum (the verified arithmetic, kept bit for bit).
template <bool kSegments>
struct GlaChunkSlice {
  using Tr = GlaChunkTraits;
  alignas(128) float q[Tr::kChunk][Tr::kBK];
  alignas(128) float k[Tr::kChunk][Tr::kBK];
  GlaGateSums<kSegments> gs;

  // From the chunk's start through row i (the query side of the inter-chunk terms).
  __device__ __forceinline__ float from_start(int i, int cc) const {
    if constexpr (kSegments)
      return gla_span(&gs.tot[0][cc], Tr::kBK, 0, i / Tr::kSub) + gs.pre[i][cc];
    else
      return gs.gc[i][cc];
  }
  // After row j through the chunk's last row (the key side of the inter-chunk terms).
  __device__ __forceinline__ float to_end(int j, int cc) const {
    if constexpr (kSegments)
      return gs.suf[j][cc] + gla_span(&gs.tot[0][cc], Tr::kBK, j / Tr::kSub + 1, kGlaSubChunks);
    else
      return gs.gc[Tr::kChunk - 1][cc] - gs.gc[j][cc];
  }
  // The whole chunk (the state's decay).
  __device__ __forceinline__ float total(int cc) const {
    if constexpr (kSegments)
      return gla_span(&gs.tot[0][cc], Tr::kBK, 0, kGlaSubChunks);
    else
      return gs.gc[Tr::kChunk - 1][cc];
  }
  // Off-diagonal sub-blocks of the query sub-chunk starting at row r: the decay from key row j < r to query
  // row i >= r is exp2(query_side(i)) exp2(key_side(j)). Segments split it at row r (query side [r, i], key
  // side (j, r - 1]); g_cumsum at gc_r (query side (r, i], key side (j, r]).
  __device__ __forceinline__ float query_side(int i, int cc, int r) const {
    if constexpr (kSegments)
      return gs.pre[i][cc];
    else
      return gs.gc[i][cc] - gs.gc[r][cc];
  }
  __device__ __forceinline__ float key_side(int j, int cc, int r) const {
    if constexpr (kSegments)
      return gs.suf[j][cc] + gla_span(&gs.tot[0][cc], Tr::kBK, j / Tr::kSub + 1, r / Tr::kSub);
    else
      return gs.gc[r][cc] - gs.gc[j][cc];
  }
  // Diagonal sub-block score A_ij (i >= j in one sub-chunk) over this slice's channels.
  __device__ __forceinline__ float diag_score(int i, int j) const {
    if constexpr (kSegments) {
      const int r = i / Tr::kSub * Tr::kSub;
      return gla_diag_score_seg(&q[i][0], &k[j][0], &gs.a[r][0], Tr::kBK, i - r, j - r, Tr::kBK);
    } else {
      return gla_diag_score(&q[i][0], &k[j][0], &gs.gc[i][0], &gs.gc[j][0], Tr::kBK);
    }
  }
};

// Stages rows [t0, t0 + L) and channels [c0, c0 + kBK) of q, k (if wanted) and g, zero-padded (g = 0 past the end,
// so the padded rows decay nothing and the decays "to the chunk's end" end at its last real row), then the gate
// sums. Ends synced.
template <typename T, bool kSegments>
__device__ __forceinline__ void stage_chunk_slice(GlaChunkSlice<kSegments>& s, const GlaParams& p, int64_t bi,
                                                  int64_t hi, int64_t t0, int L, int c0, bool want_q, bool want_k) {
  using Tr = GlaChunkTraits;
  constexpr int C = Tr::kChunk, BK = Tr::kBK;
  const int K = static_cast<int>(p.dim_k);
  float* a = s.gs.raw();  // (C, BK) log2 gates
  for (int idx = threadIdx.x; idx < C * BK; idx += blockDim.x) {
    const int i = idx / BK, cc = idx % BK;
    const bool ok = i < L && c0 + cc < K;
    if (want_q) s.q[i][cc] = ok ? to_float(gla_row<const T>(p.q, bi, t0 + i, hi)[c0 + cc]) : 0.f;
    if (want_k) s.k[i][cc] = ok ? to_float(gla_row<const T>(p.k, bi, t0 + i, hi)[c0 + cc]) : 0.f;
    a[idx] = ok ? gla_log2_gate(to_float(gla_row<const T>(p.g, bi, t0 + i, hi)[c0 + cc])) : 0.f;
  }
  __syncthreads();
  if constexpr (kSegments) {
    for (int idx = threadIdx.x; idx < kGlaSubChunks * BK; idx += blockDim.x) {
      const int J = idx / BK, cc = idx % BK, r = J * Tr::kSub;
      s.gs.tot[J][cc] = gla_subchunk_sums(&s.gs.a[r][cc], BK, Tr::kSub, &s.gs.pre[r][cc], &s.gs.suf[r][cc]);
    }
  } else if (threadIdx.x < BK) {
    float run = 0.f;
    for (int i = 0; i < C; ++i) {
      run += s.gs.gc[i][threadIdx.x];
      s.gs.gc[i][threadIdx.x] = run;
    }
  }
  __syncthreads();
}

// A (kChunk, kChunk) += this K slice's contribution to A_ij = sum_c q_ic k_jc (decay j -> i), j <= i.
// Off-diagonal sub-blocks A[I, J<I] = q~_I k~^T with q~ = q exp2(query_side), k~ = k exp2(key_side) (both
// exponents <= 0), through the Op-typed operand buffers x, y (kChunk, kBK); diagonal sub-blocks elementwise
// in fp32. Ends synced; x, y are free afterwards.
template <typename Op, bool kSegments>
__device__ __forceinline__ void accumulate_scores(float (*A)[GlaChunkTraits::kChunk], const GlaChunkSlice<kSegments>& s,
                                                  Op (*x)[GlaChunkTraits::kBK], Op (*y)[GlaChunkTraits::kBK]) {
  using Tr = GlaChunkTraits;
  constexpr int C = Tr::kChunk, BK = Tr::kBK;
  const int tid = threadIdx.x, nt = blockDim.x;
  for (int I = 1; I < C / 16; ++I) {
    const int r_row = 16 * I;
    for (int idx = tid; idx < 16 * BK; idx += nt) {
      const int ii = idx / BK, cc = idx % BK, i = r_row + ii;
      x[ii][cc] = from_float<Op>(s.q[i][cc] * gla_exp2(s.query_side(i, cc, r_row)));
    }
    for (int idx = tid; idx < r_row * BK; idx += nt) {
      const int j = idx / BK, cc = idx % BK;
      y[j][cc] = from_float<Op>(s.k[j][cc] * gla_exp2(s.key_side(j, cc, r_row)));
    }
    __syncthreads();
    smem_gemm_acc<Op, true, false>(&A[r_row][0], C, &x[0][0], BK, &y[0][0], BK, 16, r_row, BK);
    __syncthreads();
  }
  for (int idx = tid; idx < (C / 16) * 256; idx += nt) {
    const int sub = idx / 256, ii = (idx % 256) / 16, jj = idx % 16;
    if (jj > ii) continue;
    const int i = 16 * sub + ii, j = 16 * sub + jj;
    A[i][j] += s.diag_score(i, j);
  }
  __syncthreads();
}

// Opts a kernel into more than 48 KB of dynamic shared memory.
template <typename Kernel>
inline void gla_set_smem(Kernel kernel, size_t bytes) {
  LINMIX_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

}  // namespace linmix
