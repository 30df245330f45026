// CUDA chunk_gla backward, in fp32 on CUDA cores (smem_gemm_acc<float>), three launches:
//  1. states kernel, forward mode: recomputes the fp32 state entering every chunk (and the final one) into
//     chunk_states, one block per (batch * head, 32 V columns), as the forward kernel does (never saved by it).
//  2. states kernel, reverse mode: carries dS = d loss / d(state leaving chunk c) backwards,
//     dS <- exp2(log2g_cum_last) dS + (q exp2(log2g_cum))^T (scale do), storing each into chunk_dstates; writes dh0.
//  3. grads kernel, one block per (batch * head, chunk), all chunks in parallel:
//       A  = intra-chunk scores (accumulate_scores, as in the forward)      dA = tril((scale do) v^T)
//       dv = A^T (scale do) + (k exp2(log2g_cum_last - log2g_cum)) dS_out
//       dq = exp2(log2g_cum) ((scale do) S_in^T) + sum_{j<=i} dA_ij k_j exp2(log2g_cum_i - log2g_cum_j)
//       dk = exp2(log2g_cum_last - log2g_cum) (v dS_out^T) + sum_{i>=j} dA_ij q_i exp2(log2g_cum_i - log2g_cum_j)
//       dg = reverse cumsum within the chunk of (q dq - k dk) + sum_v S_out dS_out   (closed form)
//     The intra-chunk sums use the forward's split: off-diagonal sub-blocks through q~ = q exp2(log2g_cum - r),
//     k~ = k exp2(r - log2g_cum) with r = log2g_cum at the query sub-chunk's first row; diagonal sub-blocks
//     elementwise.
#pragma once

#include "gla/gla_chunk_common.cuh"

namespace linmix {

struct GlaChunkStatesSmem {
  using Tr = GlaChunkTraits;
  alignas(128) float S[Tr::kMaxK][Tr::kBV];     // state (or its gradient) slice (K, BV)
  GlaChunkSlice in;
  // k exp2(log2g_cum_last - log2g_cum) (forward mode) or q exp2(log2g_cum) (reverse mode)
  alignas(128) float x[Tr::kChunk][Tr::kBK];
  alignas(128) float col[Tr::kChunk][Tr::kBV];  // v (forward mode) or scale * do (reverse mode)
};

// grid: (B * H, ceil(V / kBV)); block: kThreads; dynamic shared memory: sizeof(GlaChunkStatesSmem).
template <typename T>
__global__ void __launch_bounds__(GlaChunkTraits::kThreads) linmix_gla_chunk_bwd_states_kernel(GlaParams p, bool reverse) {
  using Tr = GlaChunkTraits;
  constexpr int C = Tr::kChunk, BK = Tr::kBK, BV = Tr::kBV, NT = Tr::kThreads;
  LINMIX_DYNAMIC_SHARED_ALIGNED(128, unsigned char, smem_raw);
  auto& s = *reinterpret_cast<GlaChunkStatesSmem*>(smem_raw);
  const int tid = threadIdx.x;
  const int64_t bh = blockIdx.x, bi = bh / p.heads, hi = bh % p.heads;
  const int64_t v0 = int64_t(blockIdx.y) * BV;
  const int K = static_cast<int>(p.dim_k), V = static_cast<int>(p.dim_v);
  const int64_t KV = p.dim_k * p.dim_v, n_chunks = ceil_div(p.seqlen, C);
  const int n_kslices = static_cast<int>(ceil_div(K, BK));
  const float* init = static_cast<const float*>(reverse ? p.dht : p.h0);  // (B, H, K, V) or null
  float* store = reverse ? p.chunk_dstates + bh * n_chunks * KV : p.chunk_states + bh * (n_chunks + 1) * KV;
  const StridedView<3>& cols = reverse ? p.dout : p.v;
  const float col_scale = reverse ? static_cast<float>(p.scale) : 1.f;

  for (int idx = tid; idx < Tr::kMaxK * BV; idx += NT) {
    const int c = idx / BV, e = idx % BV;
    s.S[c][e] = (init && c < K && v0 + e < V) ? init[bh * KV + c * p.dim_v + v0 + e] : 0.f;
  }
  __syncthreads();
  for (int64_t step = 0; step < n_chunks; ++step) {
    const int64_t ci = reverse ? n_chunks - 1 - step : step;
    const int64_t t0 = ci * C;
    const int L = static_cast<int>(p.seqlen - t0 < C ? p.seqlen - t0 : C);
    for (int idx = tid; idx < K * BV; idx += NT) {
      const int c = idx / BV, e = idx % BV;
      if (v0 + e < V) store[ci * KV + c * p.dim_v + v0 + e] = s.S[c][e];
    }
    for (int idx = tid; idx < C * BV; idx += NT) {
      const int i = idx / BV, e = idx % BV;
      s.col[i][e] = (i < L && v0 + e < V) ? col_scale * to_float(cols.at<const T>(bi, t0 + i, hi)[v0 + e]) : 0.f;
    }
    for (int ks = 0; ks < n_kslices; ++ks) {
      const int c0 = ks * BK;
      stage_chunk_slice<T>(s.in, p, bi, hi, t0, L, c0, reverse, !reverse);
      for (int idx = tid; idx < C * BK; idx += NT) {
        const int i = idx / BK, cc = idx % BK;
        s.x[i][cc] = reverse ? s.in.q[i][cc] * gla_exp2(s.in.log2g_cum[i][cc])
                             : s.in.k[i][cc] * gla_exp2(s.in.log2g_cum[C - 1][cc] - s.in.log2g_cum[i][cc]);
      }
      for (int idx = tid; idx < BK * BV; idx += NT) {
        const int cc = idx / BV, e = idx % BV;
        s.S[c0 + cc][e] *= gla_exp2(s.in.log2g_cum[C - 1][cc]);
      }
      __syncthreads();
      smem_gemm_acc<float, false, true>(&s.S[c0][0], BV, &s.x[0][0], BK, &s.col[0][0], BV, BK, BV, C);
      __syncthreads();
    }
  }
  // forward mode: the final state; reverse mode: dS is now d loss / d initial_state.
  float* last = reverse ? static_cast<float*>(p.dh0) + bh * KV : store + n_chunks * KV;
  for (int idx = tid; idx < K * BV; idx += NT) {
    const int c = idx / BV, e = idx % BV;
    if (v0 + e < V) last[c * p.dim_v + v0 + e] = s.S[c][e];
  }
}

struct GlaChunkGradsSmem {
  using Tr = GlaChunkTraits;
  static constexpr int C = Tr::kChunk, BK = Tr::kBK, BV = Tr::kBV;
  alignas(128) float A[C][C];
  alignas(128) float dA[C][C];
  GlaChunkSlice in;
  alignas(128) float x[C][BK];
  alignas(128) float y[C][BK];
  alignas(128) float dq[C][BK];
  alignas(128) float dk[C][BK];
  alignas(128) float tq[Tr::kSub][BK];  // off-diagonal partial sums for dq (query sub-chunk) and dk (earlier keys)
  alignas(128) float tk[C][BK];
  alignas(128) float dout[C][BV];  // scale * do
  alignas(128) float v[C][BV];
  alignas(128) float dv[C][BV];
  alignas(128) float s_in[BK][BV];   // tiles of the state entering the chunk, the state leaving it, and its gradient
  alignas(128) float s_out[BK][BV];
  alignas(128) float ds_out[BK][BV];
  float bnd[BK];  // sum_v S_out dS_out per key channel
};

// Loads rows c0.. of a (K, V) fp32 state into a (kBK, kBV) tile, zero-padded.
__device__ __forceinline__ void load_state_tile(float (*dst)[GlaChunkTraits::kBV], const float* src, int64_t dim_k,
                                                int64_t dim_v, int c0, int64_t v0) {
  using Tr = GlaChunkTraits;
  for (int idx = threadIdx.x; idx < Tr::kBK * Tr::kBV; idx += blockDim.x) {
    const int cc = idx / Tr::kBV, e = idx % Tr::kBV;
    dst[cc][e] = (c0 + cc < dim_k && v0 + e < dim_v) ? src[(c0 + cc) * dim_v + v0 + e] : 0.f;
  }
}

// grid: (B * H, n_chunks); block: kThreads; dynamic shared memory: sizeof(GlaChunkGradsSmem).
template <typename T>
__global__ void __launch_bounds__(GlaChunkTraits::kThreads) linmix_gla_chunk_bwd_grads_kernel(GlaParams p) {
  using Tr = GlaChunkTraits;
  constexpr int C = Tr::kChunk, BK = Tr::kBK, BV = Tr::kBV, NT = Tr::kThreads;
  LINMIX_DYNAMIC_SHARED_ALIGNED(128, unsigned char, smem_raw);
  auto& s = *reinterpret_cast<GlaChunkGradsSmem*>(smem_raw);
  const int tid = threadIdx.x;
  const int64_t bh = blockIdx.x, ci = blockIdx.y, bi = bh / p.heads, hi = bh % p.heads;
  const int K = static_cast<int>(p.dim_k), V = static_cast<int>(p.dim_v);
  const int64_t KV = p.dim_k * p.dim_v, n_chunks = ceil_div(p.seqlen, C);
  const int n_kslices = static_cast<int>(ceil_div(K, BK)), n_vslices = static_cast<int>(ceil_div(V, BV));
  const int64_t t0 = ci * C;
  const int L = static_cast<int>(p.seqlen - t0 < C ? p.seqlen - t0 : C);
  const float* S_in = p.chunk_states + (bh * (n_chunks + 1) + ci) * KV;  // (K, V)
  const float* S_out = S_in + KV;
  const float* dS_out = p.chunk_dstates + (bh * n_chunks + ci) * KV;
  const float scale = static_cast<float>(p.scale);
  auto stage_cols = [&](int64_t v0, bool want_v) {  // (C, BV) slices of scale * do and v
    for (int idx = tid; idx < C * BV; idx += NT) {
      const int i = idx / BV, e = idx % BV;
      const bool ok = i < L && v0 + e < V;
      s.dout[i][e] = ok ? scale * to_float(p.dout.at<const T>(bi, t0 + i, hi)[v0 + e]) : 0.f;
      if (want_v) s.v[i][e] = ok ? to_float(p.v.at<const T>(bi, t0 + i, hi)[v0 + e]) : 0.f;
    }
  };

  for (int idx = tid; idx < C * C; idx += NT) (&s.A[0][0])[idx] = (&s.dA[0][0])[idx] = 0.f;
  // A (strict upper triangle stays zero).
  for (int ks = 0; ks < n_kslices; ++ks) {
    stage_chunk_slice<T>(s.in, p, bi, hi, t0, L, ks * BK, true, true);
    accumulate_scores<float>(s.A, s.in, s.x, s.y);
  }
  // dA = tril((scale do) v^T)
  for (int vs = 0; vs < n_vslices; ++vs) {
    stage_cols(int64_t(vs) * BV, true);
    __syncthreads();
    smem_gemm_acc<float, true, false>(&s.dA[0][0], C, &s.dout[0][0], BV, &s.v[0][0], BV, C, C, BV);
    __syncthreads();
  }
  for (int idx = tid; idx < C * C; idx += NT)
    if (idx % C > idx / C) (&s.dA[0][0])[idx] = 0.f;
  __syncthreads();
  // dv = A^T (scale do) + (k exp2(log2g_cum_last - log2g_cum)) dS_out, per V slice
  for (int vs = 0; vs < n_vslices; ++vs) {
    const int64_t v0 = int64_t(vs) * BV;
    stage_cols(v0, false);
    for (int idx = tid; idx < C * BV; idx += NT) (&s.dv[0][0])[idx] = 0.f;
    __syncthreads();
    smem_gemm_acc<float, false, true>(&s.dv[0][0], BV, &s.A[0][0], C, &s.dout[0][0], BV, C, BV, C);
    for (int ks = 0; ks < n_kslices; ++ks) {
      const int c0 = ks * BK;
      stage_chunk_slice<T>(s.in, p, bi, hi, t0, L, c0, false, true);  // its syncs also order the GEMM above
      for (int idx = tid; idx < C * BK; idx += NT) {
        const int i = idx / BK, cc = idx % BK;
        s.x[i][cc] = s.in.k[i][cc] * gla_exp2(s.in.log2g_cum[C - 1][cc] - s.in.log2g_cum[i][cc]);
      }
      load_state_tile(s.ds_out, dS_out, p.dim_k, p.dim_v, c0, v0);
      __syncthreads();
      smem_gemm_acc<float, true, true>(&s.dv[0][0], BV, &s.x[0][0], BK, &s.ds_out[0][0], BV, C, BV, BK);
      __syncthreads();
    }
    for (int idx = tid; idx < L * BV; idx += NT) {
      const int i = idx / BV, e = idx % BV;
      if (v0 + e < V) p.dv.at<T>(bi, t0 + i, hi)[v0 + e] = from_float<T>(s.dv[i][e]);
    }
    __syncthreads();
  }
  // dq, dk, dg per K slice
  for (int ks = 0; ks < n_kslices; ++ks) {
    const int c0 = ks * BK;
    stage_chunk_slice<T>(s.in, p, bi, hi, t0, L, c0, true, true);
    for (int idx = tid; idx < C * BK; idx += NT) (&s.dq[0][0])[idx] = (&s.dk[0][0])[idx] = 0.f;
    if (tid < BK) s.bnd[tid] = 0.f;
    for (int vs = 0; vs < n_vslices; ++vs) {
      const int64_t v0 = int64_t(vs) * BV;
      stage_cols(v0, true);
      load_state_tile(s.s_in, S_in, p.dim_k, p.dim_v, c0, v0);
      load_state_tile(s.s_out, S_out, p.dim_k, p.dim_v, c0, v0);
      load_state_tile(s.ds_out, dS_out, p.dim_k, p.dim_v, c0, v0);
      __syncthreads();
      smem_gemm_acc<float, true, false>(&s.dq[0][0], BK, &s.dout[0][0], BV, &s.s_in[0][0], BV, C, BK, BV);
      smem_gemm_acc<float, true, false>(&s.dk[0][0], BK, &s.v[0][0], BV, &s.ds_out[0][0], BV, C, BK, BV);
      if (tid < BK) {
        float acc = 0.f;
        for (int e = 0; e < BV; ++e) acc += s.s_out[tid][e] * s.ds_out[tid][e];
        s.bnd[tid] += acc;
      }
      __syncthreads();
    }
    for (int idx = tid; idx < C * BK; idx += NT) {
      const int i = idx / BK, cc = idx % BK;
      s.dq[i][cc] *= gla_exp2(s.in.log2g_cum[i][cc]);
      s.dk[i][cc] *= gla_exp2(s.in.log2g_cum[C - 1][cc] - s.in.log2g_cum[i][cc]);
    }
    __syncthreads();
    // Off-diagonal sub-blocks: with r = log2g_cum at row 16 I, dq_I += exp2(log2g_cum - r) (dA[I, :16I] k~) and
    // dk_{:16I} += exp2(r - log2g_cum) (dA[I, :16I]^T q~_I).
    for (int I = 1; I < C / 16; ++I) {
      const int r_row = 16 * I;
      for (int idx = tid; idx < 16 * BK; idx += NT) {
        const int ii = idx / BK, cc = idx % BK, i = r_row + ii;
        s.x[ii][cc] = s.in.q[i][cc] * gla_exp2(s.in.log2g_cum[i][cc] - s.in.log2g_cum[r_row][cc]);
        s.tq[ii][cc] = 0.f;
      }
      for (int idx = tid; idx < r_row * BK; idx += NT) {
        const int j = idx / BK, cc = idx % BK;
        s.y[j][cc] = s.in.k[j][cc] * gla_exp2(s.in.log2g_cum[r_row][cc] - s.in.log2g_cum[j][cc]);
        s.tk[j][cc] = 0.f;
      }
      __syncthreads();
      smem_gemm_acc<float, true, true>(&s.tq[0][0], BK, &s.dA[r_row][0], C, &s.y[0][0], BK, 16, BK, r_row);
      smem_gemm_acc<float, false, true>(&s.tk[0][0], BK, &s.dA[r_row][0], C, &s.x[0][0], BK, r_row, BK, 16);
      __syncthreads();
      for (int idx = tid; idx < 16 * BK; idx += NT) {
        const int ii = idx / BK, cc = idx % BK, i = r_row + ii;
        s.dq[i][cc] += s.tq[ii][cc] * gla_exp2(s.in.log2g_cum[i][cc] - s.in.log2g_cum[r_row][cc]);
      }
      for (int idx = tid; idx < r_row * BK; idx += NT) {
        const int j = idx / BK, cc = idx % BK;
        s.dk[j][cc] += s.tk[j][cc] * gla_exp2(s.in.log2g_cum[r_row][cc] - s.in.log2g_cum[j][cc]);
      }
      __syncthreads();
    }
    // Diagonal sub-blocks, elementwise: one thread per (row, channel) owns dq and dk there.
    for (int idx = tid; idx < C * BK; idx += NT) {
      const int i = idx / BK, cc = idx % BK, sub0 = (i / 16) * 16;
      const float log2g_cum_i = s.in.log2g_cum[i][cc];
      float aq = 0.f, ak = 0.f;
      for (int j = sub0; j <= i; ++j) aq += s.dA[i][j] * s.in.k[j][cc] * gla_exp2(log2g_cum_i - s.in.log2g_cum[j][cc]);
      for (int j = i; j < sub0 + 16; ++j) {
        ak += s.dA[j][i] * s.in.q[j][cc] * gla_exp2(s.in.log2g_cum[j][cc] - log2g_cum_i);
      }
      s.dq[i][cc] += aq;
      s.dk[i][cc] += ak;
    }
    __syncthreads();
    if (tid < BK && c0 + tid < K) {
      float run = s.bnd[tid];
      for (int i = C - 1; i >= 0; --i) {
        run += gla_dgate_term(s.in.q[i][tid], s.dq[i][tid], s.in.k[i][tid], s.dk[i][tid]);
        if (i < L) p.dg.at<T>(bi, t0 + i, hi)[c0 + tid] = from_float<T>(run);
      }
    }
    for (int idx = tid; idx < L * BK; idx += NT) {
      const int i = idx / BK, cc = idx % BK;
      if (c0 + cc < K) {
        p.dq.at<T>(bi, t0 + i, hi)[c0 + cc] = from_float<T>(s.dq[i][cc]);
        p.dk.at<T>(bi, t0 + i, hi)[c0 + cc] = from_float<T>(s.dk[i][cc]);
      }
    }
    __syncthreads();
  }
}

template <DType dt>
void chunk_gla_bwd_cuda(const GlaParams& p, cudaStream_t stream) {
  using Tr = GlaChunkTraits;
  using T = cuda_t<dt>;
  constexpr size_t states_smem = sizeof(GlaChunkStatesSmem), grads_smem = sizeof(GlaChunkGradsSmem);
  static_assert(states_smem <= kMaxBlockSharedBytes && grads_smem <= kMaxBlockSharedBytes);
  opt_in_smem(linmix_gla_chunk_bwd_states_kernel<T>, states_smem);
  opt_in_smem(linmix_gla_chunk_bwd_grads_kernel<T>, grads_smem);
  const dim3 states_grid = checked_grid("chunk_gla", "(B H, ceil(V / 32))", p.batch * p.heads, ceil_div(p.dim_v, Tr::kBV));
  for (bool reverse : {false, true}) {
    launch_kernel(linmix_gla_chunk_bwd_states_kernel<T>, states_grid, Tr::kThreads, states_smem, stream, p, reverse);
  }
  const int64_t n_chunks = ceil_div(p.seqlen, Tr::kChunk);
  if (n_chunks == 0) return;
  launch_kernel(linmix_gla_chunk_bwd_grads_kernel<T>,
                checked_grid("chunk_gla", "(B H, ceil(T / 64))", p.batch * p.heads, n_chunks), Tr::kThreads,
                grads_smem, stream, p);
}

}  // namespace linmix
