// Pieces of the fused CUDA chunk_gla kernels (gla_fused_*_kernel.cuh), whose decays are segment sums: staging of
// one (chunk, channel slice), the decays, the intra-chunk scores.
//
// Decays are exp2 of log2-scaled gate sums taken directly over the segment they span, never as a difference of
// running sums (which loses everything after a huge gate and gives NaN for -inf):
//   query side  P(i; r) = sum_{s=r}^{i} g_s     prefix from a (sub-)chunk's first row r, inclusive
//   key side    S(j; e) = sum_{s=j+1}^{e-1} g_s  suffix to the end e of the span, exclusive of j
//   diagonal    seg(i, j) = sum_{s=j+1}^{i} g_s  pairwise inside a 16-row sub-chunk
// A decay from key row j to query row i, j < r <= i, factors exactly as exp2(P(i; r)) exp2(S(j; r)), so the
// off-diagonal sub-blocks are tensor-core products of rescaled q and k with both factors in (0, 1] for g <= 0,
// and a -inf gate makes exactly the decays that cross it 0.
#pragma once

#include "gla/gla_chunk_common.cuh"

namespace linmix {

// dst[i][cc] (row stride W) = x[t0 + i, c0 + cc] (times log2 e when kGate), zero past row L or column D.
// The block stages a (kChunk, W) tile; no sync.
template <bool kGate, typename T, typename Dst>
__device__ __forceinline__ void gla_stage_tile(Dst* dst, const StridedView<3>& x, int64_t bi, int64_t hi, int64_t t0,
                                               int L, int c0, int D, int W) {
  for (int idx = threadIdx.x; idx < kGlaChunk * W; idx += blockDim.x) {
    const int i = idx / W, cc = idx % W;
    float val = 0.f;
    if (i < L && c0 + cc < D) val = to_float(x.at<const T>(bi, t0 + i, hi)[c0 + cc]);
    if (kGate) val = gla_log2_gate(val);
    dst[idx] = from_float<Dst>(val);
  }
}

// f(i, cc, exp2(P(i; r0))) for rows i in [r0, r1) and channels cc < W of log2g (kChunk, W); one thread per channel.
template <typename F>
__device__ __forceinline__ void each_prefix_decay(const float* log2g, int W, int r0, int r1, F f) {
  for (int cc = threadIdx.x; cc < W; cc += blockDim.x) {
    float run = 0.f;
    for (int i = r0; i < r1; ++i) {
      run += log2g[i * W + cc];
      f(i, cc, gla_exp2(run));
    }
  }
}

// f(j, cc, exp2(S(j; end))) for rows j in [0, end); one thread per channel.
template <typename F>
__device__ __forceinline__ void each_suffix_decay(const float* log2g, int W, int end, F f) {
  for (int cc = threadIdx.x; cc < W; cc += blockDim.x) {
    float run = 0.f;
    for (int j = end - 1; j >= 0; --j) {
      f(j, cc, gla_exp2(run));
      run += log2g[j * W + cc];
    }
  }
}

// A (kChunk, kChunk) fp32 += the contribution of one W-channel slice to the scores
// A_ij = sum_c q_ic k_jc exp2(seg(i, j)_c), j <= i, from fp32 tiles q, k, log2g (kChunk, W). Off-diagonal
// sub-blocks A[r:r+16, :r] = (q exp2(P(.; r))) (k exp2(S(.; r)))^T through the Op-typed buffers x (16, W) and
// y (kChunk, W); diagonal sub-blocks elementwise with pairwise segment sums. Starts and ends synced.
template <typename Op, int W>
__device__ __forceinline__ void gla_accumulate_scores(float* A, const float* q, const float* k, const float* log2g, Op* x,
                                                      Op* y) {
  constexpr int C = kGlaChunk, SUB = kGlaSubChunk;
  for (int r = SUB; r < C; r += SUB) {
    each_prefix_decay(log2g, W, r, r + SUB, [&](int i, int cc, float d) { x[(i - r) * W + cc] = from_float<Op>(q[i * W + cc] * d); });
    each_suffix_decay(log2g, W, r, [&](int j, int cc, float d) { y[j * W + cc] = from_float<Op>(k[j * W + cc] * d); });
    __syncthreads();
    smem_gemm_acc<Op, true, false>(A + r * C, C, x, W, y, W, SUB, r, W);
    __syncthreads();
  }
  for (int idx = threadIdx.x; idx < (C / SUB) * SUB * SUB; idx += blockDim.x) {
    const int base = SUB * (idx / (SUB * SUB)), ii = (idx / SUB) % SUB, jj = idx % SUB;
    if (jj > ii) continue;
    const int i = base + ii, j = base + jj;
    float acc = 0.f;
    for (int cc = 0; cc < W; ++cc) {
      float seg = 0.f;
      for (int s = j + 1; s <= i; ++s) seg += log2g[s * W + cc];
      acc += q[i * W + cc] * k[j * W + cc] * gla_exp2(seg);
    }
    A[i * C + j] += acc;
  }
  __syncthreads();
}

}  // namespace linmix
