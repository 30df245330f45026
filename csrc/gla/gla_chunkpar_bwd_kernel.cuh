// Chunk-parallel CUDA chunk_gla backward, five launches after recomputing the forward's phases 1 and 2
// (chunk states are not saved by the forward):
//  1. dstate: one block per (batch * head, 64 x 64 K x V tile, chunk): the chunk's own contribution to the gradient
//             of the state entering it, scale (q exp2(P(.; 0)))^T do, into ws.dstates[n] (tensor cores).
//  2. scan:   reverse sequential fp32 pass: ws.dstates[n] <- dH_n, the gradient of the state leaving chunk n,
//             dH_{n-1} = exp2(gate_sum_n) dH_n + local_n, starting from dht; dh0 at the end.
//  3. dqk:    one block per (batch * head, 32-channel K slice, chunk), walking V in 64-column slices:
//               dA = scale tril(do v^T)
//               dq = scale exp2(P(.; 0)) (do h_n^T) + intra(dA, k)
//               dk = exp2(S(.; C)) (v dH_n^T) + intra^T(dA, q)
//               dg = reverse cumsum within the chunk of (q dq - k dk) + sum_v h_{n+1} dH_n, exactly 0 where the
//                    decay underflows (gla_gate_grad)
//             intra: off-diagonal sub-blocks dq[I] += exp2(P(.; r)) (dA[I, :r] (k exp2(S(.; r)))) and
//             dk[:r] += exp2(S(.; r)) (dA[I, :r]^T (q exp2(P(.; r)))) on tensor cores; diagonal sub-blocks
//             elementwise with pairwise segment sums.
//  4. dv:     one block per (batch * head, 64-column V tile, chunk), walking K in 32-channel slices:
//               dv = (scale tril(A))^T do + (k exp2(S(.; C))) dH_n
// The dg closed form: adding delta to g at the first row of chunk n + 1 scales h_{n+1} by exp(delta), so the
// derivative of the loss by every gate after chunk n is sum_v h_{n+1} dH_n; inside the chunk d loss / d b_t is
// q_t dq_t - k_t dk_t (b the running log gate), hence the reverse cumulative sum (GLA paper, section 4.2).
#pragma once

#include "gla/gla_chunkpar_fwd_kernel.cuh"

namespace linmix {

template <typename T>
__global__ void __launch_bounds__(GlaParTraits::kThreads)
    linmix_gla_chunkpar_bwd_dstate_kernel(GlaParams p, GlaChunkparWorkspace ws) {
  const int64_t N = gla_chunkpar_n_chunks(p.seqlen);
  chunkpar_local_state<T, true>(p, ws.dstates + int64_t(blockIdx.x) * N * p.dim_k * p.dim_v, nullptr,
                                static_cast<float>(p.scale));
}

template <typename Op>
struct GlaParDqkSmem {
  using Tr = GlaParTraits;
  static constexpr int C = Tr::kChunk, SUB = Tr::kSub, BK = Tr::kDqkBK, BV = Tr::kDqkBV;
  alignas(128) float dA[C * C];
  alignas(128) float dq[C * BK];
  alignas(128) float dk[C * BK];
  alignas(128) float q[C * BK];
  alignas(128) float k[C * BK];
  alignas(128) float gl[C * BK];
  alignas(128) float tq[SUB * BK];  // off-diagonal products before their decay
  alignas(128) float tk[C * BK];
  alignas(128) float bound[BK];     // sum_v h_{n+1} dH_n of each channel
  alignas(128) Op dout[C * BV];
  alignas(128) Op v[C * BV];
  alignas(128) Op h[BK * BV];       // slice of h_n
  alignas(128) Op dh[BK * BV];      // slice of dH_n
  alignas(128) Op x[SUB * BK];
  alignas(128) Op y[C * BK];
  alignas(128) Op dAm[C * C];
};

// grid: (B * H, ceil(K / kDqkBK), N); block: kThreads; dynamic shared memory GlaParDqkSmem<T>.
template <typename T>
__global__ void __launch_bounds__(GlaParTraits::kThreads)
    linmix_gla_chunkpar_bwd_dqk_kernel(GlaParams p, GlaChunkparWorkspace ws) {
  using Tr = GlaParTraits;
  constexpr int C = Tr::kChunk, SUB = Tr::kSub, BK = Tr::kDqkBK, BV = Tr::kDqkBV;
  LINMIX_DYNAMIC_SHARED_ALIGNED(128, unsigned char, smem_raw);
  auto& s = *reinterpret_cast<GlaParDqkSmem<T>*>(smem_raw);
  const int K = static_cast<int>(p.dim_k), V = static_cast<int>(p.dim_v);
  const int64_t bh = blockIdx.x, bi = bh / p.heads, hi = bh % p.heads, n = blockIdx.z, t0 = n * C;
  const int c0 = blockIdx.y * BK;
  const int L = static_cast<int>(p.seqlen - t0 < C ? p.seqlen - t0 : C);
  const int64_t N = gla_chunkpar_n_chunks(p.seqlen), KV = p.dim_k * p.dim_v;
  const float* h_in = ws.states + (bh * (N + 1) + n) * KV;  // h_n; h_{n+1} follows it
  const float* dh_out = ws.dstates + (bh * N + n) * KV;     // dH_n
  const float scale = static_cast<float>(p.scale);

  for (int idx = threadIdx.x; idx < C * C; idx += blockDim.x) s.dA[idx] = 0.f;
  for (int idx = threadIdx.x; idx < C * BK; idx += blockDim.x) s.dq[idx] = s.dk[idx] = 0.f;
  for (int cc = threadIdx.x; cc < BK; cc += blockDim.x) s.bound[cc] = 0.f;
  gla_stage_tile<false, T>(s.q, p.q, bi, hi, t0, L, c0, K, BK);
  gla_stage_tile<false, T>(s.k, p.k, bi, hi, t0, L, c0, K, BK);
  gla_stage_tile<true, T>(s.gl, p.g, bi, hi, t0, L, c0, K, BK);
  for (int e0 = 0; e0 < V; e0 += BV) {
    gla_stage_tile<false, T>(s.dout, p.dout, bi, hi, t0, L, e0, V, BV);
    gla_stage_tile<false, T>(s.v, p.v, bi, hi, t0, L, e0, V, BV);
    chunkpar_stage_state(s.h, h_in, K, V, c0, e0, BK, BV);
    chunkpar_stage_state(s.dh, dh_out, K, V, c0, e0, BK, BV);
    for (int cc = threadIdx.x; cc < BK && c0 + cc < K; cc += blockDim.x) {
      const float* h_next = h_in + KV + int64_t(c0 + cc) * V;
      const float* dh_row = dh_out + int64_t(c0 + cc) * V;
      float acc = 0.f;
      for (int e = e0; e < V && e < e0 + BV; ++e) acc += h_next[e] * dh_row[e];
      s.bound[cc] += acc;
    }
    __syncthreads();
    smem_gemm_acc<T, true, false>(s.dA, C, s.dout, BV, s.v, BV, C, C, BV);
    smem_gemm_acc<T, true, false>(s.dq, BK, s.dout, BV, s.h, BV, C, BK, BV);
    smem_gemm_acc<T, true, false>(s.dk, BK, s.v, BV, s.dh, BV, C, BK, BV);
    __syncthreads();
  }
  each_prefix_decay(s.gl, BK, 0, C, [&](int i, int cc, float d) { s.dq[i * BK + cc] *= scale * d; });
  each_suffix_decay(s.gl, BK, C, [&](int j, int cc, float d) { s.dk[j * BK + cc] *= d; });
  for (int idx = threadIdx.x; idx < C * C; idx += blockDim.x) {
    const float a = idx % C <= idx / C ? scale * s.dA[idx] : 0.f;
    s.dA[idx] = a;
    s.dAm[idx] = from_float<T>(a);
  }
  __syncthreads();
  for (int r = SUB; r < C; r += SUB) {  // off-diagonal sub-blocks: query rows [r, r + 16), key rows [0, r)
    each_prefix_decay(s.gl, BK, r, r + SUB, [&](int i, int cc, float d) { s.x[(i - r) * BK + cc] = from_float<T>(s.q[i * BK + cc] * d); });
    each_suffix_decay(s.gl, BK, r, [&](int j, int cc, float d) { s.y[j * BK + cc] = from_float<T>(s.k[j * BK + cc] * d); });
    for (int idx = threadIdx.x; idx < SUB * BK; idx += blockDim.x) s.tq[idx] = 0.f;
    for (int idx = threadIdx.x; idx < r * BK; idx += blockDim.x) s.tk[idx] = 0.f;
    __syncthreads();
    smem_gemm_acc<T, true, true>(s.tq, BK, s.dAm + r * C, C, s.y, BK, SUB, BK, r);
    smem_gemm_acc<T, false, true>(s.tk, BK, s.dAm + r * C, C, s.x, BK, r, BK, SUB);
    __syncthreads();
    each_prefix_decay(s.gl, BK, r, r + SUB, [&](int i, int cc, float d) { s.dq[i * BK + cc] += d * s.tq[(i - r) * BK + cc]; });
    each_suffix_decay(s.gl, BK, r, [&](int j, int cc, float d) { s.dk[j * BK + cc] += d * s.tk[j * BK + cc]; });
    __syncthreads();
  }
  for (int idx = threadIdx.x; idx < C * BK; idx += blockDim.x) {  // diagonal sub-blocks, one (row, channel) each
    const int i = idx / BK, cc = idx % BK, base = i - i % SUB;
    float seg = 0.f, acc_q = 0.f;
    for (int j = i; j >= base; --j) {  // seg = sum_{s=j+1}^{i} g_s
      acc_q += s.dA[i * C + j] * s.k[j * BK + cc] * gla_exp2(seg);
      seg += s.gl[j * BK + cc];
    }
    seg = 0.f;
    float acc_k = 0.f;
    for (int r = i; r < base + SUB; ++r) {  // seg = sum_{s=i+1}^{r} g_s
      if (r > i) seg += s.gl[r * BK + cc];
      acc_k += s.dA[r * C + i] * s.q[r * BK + cc] * gla_exp2(seg);
    }
    s.dq[idx] += acc_q;
    s.dk[idx] += acc_k;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < L * BK; idx += blockDim.x) {
    const int i = idx / BK, cc = idx % BK;
    if (c0 + cc < K) {
      p.dq.at<T>(bi, t0 + i, hi)[c0 + cc] = from_float<T>(s.dq[idx]);
      p.dk.at<T>(bi, t0 + i, hi)[c0 + cc] = from_float<T>(s.dk[idx]);
    }
  }
  for (int cc = threadIdx.x; cc < BK && c0 + cc < K; cc += blockDim.x) {
    float run = s.bound[cc];
    for (int t = C - 1; t >= 0; --t) {
      run += s.q[t * BK + cc] * s.dq[t * BK + cc] - s.k[t * BK + cc] * s.dk[t * BK + cc];
      if (t < L) p.dg.at<T>(bi, t0 + t, hi)[c0 + cc] = from_float<T>(gla_gate_grad(run, s.gl[t * BK + cc]));
    }
  }
}

// grid: (B * H, ceil(V / kOutBV), N); block: kThreads; dynamic shared memory GlaParOutSmem<T>.
template <typename T>
__global__ void __launch_bounds__(GlaParTraits::kThreads)
    linmix_gla_chunkpar_bwd_dv_kernel(GlaParams p, GlaChunkparWorkspace ws) {
  chunkpar_value_tile<T, true>(p, ws);
}

template <DType dt>
void chunkpar_gla_bwd_cuda(const GlaParams& p, const GlaChunkparWorkspace& ws, cudaStream_t stream) {
  using T = cuda_t<dt>;
  chunkpar_gla_states_cuda<T>(p, ws, stream);  // p.ht is null: the states only
  chunkpar_launch(linmix_gla_chunkpar_bwd_dstate_kernel<T>, "(B H, state tiles, ceil(T / 64))",
                  chunkpar_state_tiles(p), sizeof(GlaParStateSmem<T>), p, ws, stream);
  chunkpar_gla_scan_cuda(p, ws, /*reverse=*/true, stream);
  static_assert(sizeof(GlaParDqkSmem<T>) <= kMaxBlockSharedBytes);
  chunkpar_launch(linmix_gla_chunkpar_bwd_dqk_kernel<T>, "(B H, K slices, ceil(T / 64))",
                  ceil_div(p.dim_k, GlaParTraits::kDqkBK), sizeof(GlaParDqkSmem<T>), p, ws, stream);
  chunkpar_launch(linmix_gla_chunkpar_bwd_dv_kernel<T>, "(B H, ceil(V / 64), ceil(T / 64))",
                  ceil_div(p.dim_v, GlaParTraits::kOutBV), sizeof(GlaParOutSmem<T>), p, ws, stream);
}

}  // namespace linmix
