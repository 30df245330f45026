// Chunk-parallel CUDA chunk_gla forward, in flash-linear-attention's structure (chunk C = 64), three launches:
//  1. state:  one block per (batch * head, K x V tile of 64 x 64, chunk), all chunks in parallel: the chunk's
//             local state (k exp2(S(.; C)))^T v on tensor cores (fp32 accumulation) into ws.states[n], and (V tile
//             0) the chunk's log2 gate sum per key channel into ws.gate_sums.
//  2. scan:   one thread per (batch * head, state element), a sequential fp32 pass over the chunks turning each
//             local state into the state entering its chunk, h_{n+1} = exp2(gate_sum_n) h_n + local_n; the final
//             state into ws.states[N] and ht.
//  3. out:    one block per (batch * head, 64-column V tile, chunk): o = scale ((q exp2(P(.; 0))) h_n + tril(A) v),
//             walking K in 32-channel slices; A from gla_accumulate_scores.
// fp16/bf16 operands on WMMA tensor cores, fp32 accumulation; fp32 inputs take the same structure with fp32
// CUDA-core products. Rows past T and channels past K or V are zero (g = 0 there). gla_chunkpar_common.cuh
// states the decays; tests/gla_chunkpar_emulation.py mirrors every block.
#pragma once

#include "gla/gla_chunkpar_common.cuh"

namespace linmix {

// Phase 1 of both directions: the (BK, BV) fp32 tile local = scale * x^T w of one chunk, where the forward takes
// x = k exp2(S(.; C)), w = v and the backward x = q exp2(P(.; 0)), w = do. kQuery picks the backward one.
template <typename Op>
struct GlaParStateSmem {
  using Tr = GlaParTraits;
  alignas(128) float gl[Tr::kChunk * Tr::kStateBK];
  alignas(128) float xf[Tr::kChunk * Tr::kStateBK];  // k or q, fp32
  alignas(128) float local[Tr::kStateBK * Tr::kStateBV];
  alignas(128) Op x[Tr::kChunk * Tr::kStateBK];
  alignas(128) Op w[Tr::kChunk * Tr::kStateBV];
};

// grid: (B * H, ceil(K / 64) * ceil(V / 64), N); block: kThreads; dynamic shared memory GlaParStateSmem<T>.
template <typename T, bool kQuery>
__device__ __forceinline__ void chunkpar_local_state(const GlaParams& p, float* store, float* gate_sums, float scale) {
  using Tr = GlaParTraits;
  constexpr int C = Tr::kChunk, BK = Tr::kStateBK, BV = Tr::kStateBV;
  LINMIX_DYNAMIC_SHARED_ALIGNED(128, unsigned char, smem_raw);
  auto& s = *reinterpret_cast<GlaParStateSmem<T>*>(smem_raw);
  const int K = static_cast<int>(p.dim_k), V = static_cast<int>(p.dim_v);
  const int n_kt = static_cast<int>(ceil_div(K, BK));
  const int64_t bh = blockIdx.x, bi = bh / p.heads, hi = bh % p.heads, n = blockIdx.z, t0 = n * C;
  const int c0 = (blockIdx.y % n_kt) * BK, e0 = (blockIdx.y / n_kt) * BV;
  const int L = static_cast<int>(p.seqlen - t0 < C ? p.seqlen - t0 : C);
  const int64_t N = gla_chunkpar_n_chunks(p.seqlen), KV = p.dim_k * p.dim_v;

  gla_stage_tile<true, T>(s.gl, p.g, bi, hi, t0, L, c0, K, BK);
  gla_stage_tile<false, T>(s.xf, kQuery ? p.q : p.k, bi, hi, t0, L, c0, K, BK);
  gla_stage_tile<false, T>(s.w, kQuery ? p.dout : p.v, bi, hi, t0, L, e0, V, BV);
  for (int idx = threadIdx.x; idx < BK * BV; idx += blockDim.x) s.local[idx] = 0.f;
  __syncthreads();
  const auto put = [&](int i, int cc, float d) { s.x[i * BK + cc] = from_float<T>(s.xf[i * BK + cc] * d); };
  if (kQuery)
    each_prefix_decay(s.gl, BK, 0, C, put);
  else
    each_suffix_decay(s.gl, BK, C, put);
  if (gate_sums && e0 == 0) {
    for (int cc = threadIdx.x; cc < BK && c0 + cc < K; cc += blockDim.x) {
      float sum = 0.f;
      for (int i = 0; i < C; ++i) sum += s.gl[i * BK + cc];
      gate_sums[(bh * N + n) * K + c0 + cc] = sum;
    }
  }
  __syncthreads();
  smem_gemm_acc<T, false, true>(s.local, BV, s.x, BK, s.w, BV, BK, BV, C);
  __syncthreads();
  float* out = store + n * KV;
  for (int idx = threadIdx.x; idx < BK * BV; idx += blockDim.x) {
    const int cc = idx / BV, e = idx % BV;
    if (c0 + cc < K && e0 + e < V) out[int64_t(c0 + cc) * V + e0 + e] = scale * s.local[idx];
  }
}

template <typename T>
__global__ void __launch_bounds__(GlaParTraits::kThreads)
    linmix_gla_chunkpar_fwd_state_kernel(GlaParams p, GlaChunkparWorkspace ws) {
  const int64_t N = gla_chunkpar_n_chunks(p.seqlen);
  chunkpar_local_state<T, false>(p, ws.states + int64_t(blockIdx.x) * (N + 1) * p.dim_k * p.dim_v, ws.gate_sums, 1.f);
}

template <typename Op>
struct GlaParOutSmem {
  using Tr = GlaParTraits;
  static constexpr int C = Tr::kChunk, BK = Tr::kOutBK, BV = Tr::kOutBV;
  alignas(128) float A[C * C];
  alignas(128) float acc[C * BV];  // o (forward) or dv (backward)
  alignas(128) float q[C * BK];
  alignas(128) float k[C * BK];
  alignas(128) float gl[C * BK];
  alignas(128) Op w[C * BV];       // v (forward) or do (backward)
  alignas(128) Op x[C * BK];
  alignas(128) Op y[C * BK];
  alignas(128) Op st[BK * BV];     // slice of h_n (forward) or of the gradient of h_{n+1} (backward)
  alignas(128) Op Am[C * C];
};

// Phase 3 of the forward (kDv false) and the backward's dv (kDv true): one (chunk, V tile) of
//   o  = scale ((q exp2(P(.; 0))) h_n + tril(A) v)          forward
//   dv = (k exp2(S(.; C))) dH_n + (scale tril(A))^T do      backward
// walking K in kOutBK slices, each adding its inter-chunk product and its part of A.
// grid: (B * H, ceil(V / kOutBV), N); block: kThreads; dynamic shared memory GlaParOutSmem<T>.
template <typename T, bool kDv>
__device__ __forceinline__ void chunkpar_value_tile(const GlaParams& p, const GlaChunkparWorkspace& ws) {
  using Tr = GlaParTraits;
  constexpr int C = Tr::kChunk, BK = Tr::kOutBK, BV = Tr::kOutBV;
  LINMIX_DYNAMIC_SHARED_ALIGNED(128, unsigned char, smem_raw);
  auto& s = *reinterpret_cast<GlaParOutSmem<T>*>(smem_raw);
  const int K = static_cast<int>(p.dim_k), V = static_cast<int>(p.dim_v);
  const int64_t bh = blockIdx.x, bi = bh / p.heads, hi = bh % p.heads, n = blockIdx.z, t0 = n * C;
  const int e0 = blockIdx.y * BV;
  const int L = static_cast<int>(p.seqlen - t0 < C ? p.seqlen - t0 : C);
  const int64_t N = gla_chunkpar_n_chunks(p.seqlen), KV = p.dim_k * p.dim_v;
  const float* state = kDv ? ws.dstates + (bh * N + n) * KV : ws.states + (bh * (N + 1) + n) * KV;
  const float scale = static_cast<float>(p.scale);

  for (int idx = threadIdx.x; idx < C * C; idx += blockDim.x) s.A[idx] = 0.f;
  for (int idx = threadIdx.x; idx < C * BV; idx += blockDim.x) s.acc[idx] = 0.f;
  gla_stage_tile<false, T>(s.w, kDv ? p.dout : p.v, bi, hi, t0, L, e0, V, BV);
  for (int c0 = 0; c0 < K; c0 += BK) {
    gla_stage_tile<false, T>(s.q, p.q, bi, hi, t0, L, c0, K, BK);
    gla_stage_tile<false, T>(s.k, p.k, bi, hi, t0, L, c0, K, BK);
    gla_stage_tile<true, T>(s.gl, p.g, bi, hi, t0, L, c0, K, BK);
    chunkpar_stage_state(s.st, state, K, V, c0, e0, BK, BV);
    __syncthreads();
    // inter-chunk: acc += (q exp2(P(.; 0))) h_n or (k exp2(S(.; C))) dH_n, rows c0 : c0 + BK, columns e0 : e0 + BV
    if (kDv)
      each_suffix_decay(s.gl, BK, C, [&](int j, int cc, float d) { s.x[j * BK + cc] = from_float<T>(s.k[j * BK + cc] * d); });
    else
      each_prefix_decay(s.gl, BK, 0, C, [&](int i, int cc, float d) { s.x[i * BK + cc] = from_float<T>(s.q[i * BK + cc] * d); });
    __syncthreads();
    smem_gemm_acc<T, true, true>(s.acc, BV, s.x, BK, s.st, BV, C, BV, BK);
    __syncthreads();
    gla_accumulate_scores<T, BK>(s.A, s.q, s.k, s.gl, s.x, s.y);
  }
  for (int idx = threadIdx.x; idx < C * C; idx += blockDim.x)
    s.Am[idx] = from_float<T>(idx % C <= idx / C ? (kDv ? scale : 1.f) * s.A[idx] : 0.f);
  __syncthreads();
  smem_gemm_acc<T, !kDv, true>(s.acc, BV, s.Am, C, s.w, BV, C, BV, C);  // tril(A) v, or (scale tril(A))^T do
  __syncthreads();
  const StridedView<3>& out = kDv ? p.dv : p.o;
  for (int idx = threadIdx.x; idx < L * BV; idx += blockDim.x) {
    const int i = idx / BV, e = idx % BV;
    if (e0 + e < V) out.at<T>(bi, t0 + i, hi)[e0 + e] = from_float<T>((kDv ? 1.f : scale) * s.acc[idx]);
  }
}

template <typename T>
__global__ void __launch_bounds__(GlaParTraits::kThreads)
    linmix_gla_chunkpar_fwd_out_kernel(GlaParams p, GlaChunkparWorkspace ws) {
  chunkpar_value_tile<T, false>(p, ws);
}

// Phases 1 and 2, shared by the forward and the backward's recomputation (p.ht null there).
template <typename T>
void chunkpar_gla_states_cuda(const GlaParams& p, const GlaChunkparWorkspace& ws, cudaStream_t stream) {
  chunkpar_launch(linmix_gla_chunkpar_fwd_state_kernel<T>, "(B H, state tiles, ceil(T / 64))",
                  chunkpar_state_tiles(p), sizeof(GlaParStateSmem<T>), p, ws, stream);
  chunkpar_gla_scan_cuda(p, ws, /*reverse=*/false, stream);
}

template <DType dt>
void chunkpar_gla_fwd_cuda(const GlaParams& p, const GlaChunkparWorkspace& ws, cudaStream_t stream) {
  using T = cuda_t<dt>;
  chunkpar_gla_states_cuda<T>(p, ws, stream);
  static_assert(sizeof(GlaParOutSmem<T>) <= kMaxBlockSharedBytes);
  chunkpar_launch(linmix_gla_chunkpar_fwd_out_kernel<T>, "(B H, ceil(V / 64), ceil(T / 64))",
                  ceil_div(p.dim_v, GlaParTraits::kOutBV), sizeof(GlaParOutSmem<T>), p, ws, stream);
}

}  // namespace linmix
