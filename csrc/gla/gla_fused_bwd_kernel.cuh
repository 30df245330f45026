// Fused CUDA chunk_gla backward, two launches:
//  1. states: the forward's walk without o (gla_fused_walk), one block per (batch * head, 64-column V tile),
//     storing the state h_n entering each chunk n in the input dtype, and the fp32 final state when dht is given.
//  2. reverse: one block per batch * head walks the chunks from the last with dH, the fp32 gradient of the whole
//     (K, V) state leaving the chunk, in shared memory (starting from dht). Per chunk, with sdo = scale do and the
//     segment-sum decays of gla_fused_common.cuh (P(.; 0) the prefix, S(.; C) the suffix to the chunk's end):
//       dv = tril(A)^T sdo + (k exp2(S(.; C))) dH                    A: the forward's scores (all of K)
//       dA = tril(sdo v^T)
//       dq = exp2(P(.; 0)) (sdo h_n^T) + intra(dA, k)
//       dk = exp2(S(.; C)) (v dH^T) + intra^T(dA, q)
//       dg = the reverse cumulative sum of (q dq - k dk) within the chunk, plus sum_v h_{n+1} dH, exactly 0
//            where the decay underflows (gla_gate_grad); h_{n+1} the stored state entering the next chunk (the
//            fp32 final state for the last chunk)
//       dH <- exp2(chunk's gate sum) dH + (q exp2(P(.; 0)))^T sdo
//     and dh0 = dH at the end. intra: off-diagonal sub-blocks on tensor cores through rescaled q and k (both
//     factors in (0, 1] for g <= 0), diagonal sub-blocks elementwise with pairwise segment sums.
// dg's closed form: adding delta to g_t scales every later q-term of the chunk's output by exp(delta), every later
// k-term by exp(-delta), and the state leaving the chunk by exp(delta). (Carrying the cumulative sum across chunks
// instead of the boundary term keeps the stored states out of dg, but its rounding grows with T: 2.4x the bf16 dg
// error at T = 200 already, bench/NOTES.md.)
// Everything walks K in kBK-channel slices and V in kBV-column tiles, restaged from global memory (L2) rather
// than held: the block's shared memory is dH plus one chunk's slices (bench/NOTES.md).
#pragma once

#include <stdexcept>

#include "gla/gla_fused_fwd_kernel.cuh"

namespace linmix {

template <typename Tr, typename Op>
struct GlaFusedBwdSmem {
  static constexpr int C = Tr::kChunk, SUB = kGlaSubChunk, BK = Tr::kBK, BV = Tr::kBV, D = Tr::kMaxD;
  struct Grads {  // the K slice's dq, dk and their off-diagonal products before the decay
    alignas(128) float dq[C * BK];
    alignas(128) float dk[C * BK];
    alignas(128) float tq[SUB * BK];
    alignas(128) float tk[C * BK];
  };
  alignas(128) float dH[D * D];     // (kMaxD, kMaxD), gradient of the state leaving the chunk
  alignas(128) float A[C * C];      // the scores, then dA
  alignas(128) Op Am[C * C];        // tril(A), then dA, as operands
  alignas(128) float q[C * BK];     // the K slice's inputs, fp32
  alignas(128) float k[C * BK];
  alignas(128) float log2g[C * BK]; // log2 gates
  union {
    alignas(128) float dv[C * BV];  // the V tile's dv
    Grads gr;
  };
  alignas(128) Op x[C * BK];
  alignas(128) Op y[C * BK];
  alignas(128) Op sdo[C * BV];      // scale do, V tile
  alignas(128) Op v[C * BV];
  alignas(128) Op h[BK * BV];       // (K slice, V tile) of h_n, then of dH
  alignas(128) float dg_bound[D];   // sum_v h_{n+1} dH, per key channel
  alignas(128) float etot[BK];      // exp2 of the chunk's gate sum, per channel of the slice
};

// grid: (B * H, ceil(V / 64)); block: kThreads; dynamic shared memory GlaFusedFwdSmem<Tr, T>.
template <typename Tr, typename T>
__global__ void __launch_bounds__(Tr::kThreads) linmix_gla_fused_bwd_states_kernel(GlaParams p, T* states,
                                                                                   float* final_state) {
  gla_fused_walk<Tr, T, false>(p, states, final_state);
}

// grid: B * H; block: kThreads; dynamic shared memory GlaFusedBwdSmem<Tr, T>.
template <typename Tr, typename T>
__global__ void __launch_bounds__(Tr::kThreads) linmix_gla_fused_bwd_kernel(GlaParams p, const T* states,
                                                                            const float* final_state) {
  constexpr int C = Tr::kChunk, SUB = kGlaSubChunk, BK = Tr::kBK, BV = Tr::kBV, D = Tr::kMaxD;
  LINMIX_DYNAMIC_SHARED_ALIGNED(128, unsigned char, smem_raw);
  auto& s = *reinterpret_cast<GlaFusedBwdSmem<Tr, T>*>(smem_raw);
  const int K = static_cast<int>(p.dim_k), V = static_cast<int>(p.dim_v);
  const int64_t bh = blockIdx.x, bi = bh / p.heads, hi = bh % p.heads, KV = p.dim_k * p.dim_v, state0 = bh * KV;
  const int64_t n_chunks = (p.seqlen + C - 1) / C;
  const float scale = static_cast<float>(p.scale);
  const float* dht = static_cast<const float*>(p.dht);

  for (int idx = threadIdx.x; idx < D * D; idx += blockDim.x) {
    const int c = idx / D, e = idx % D;
    s.dH[idx] = dht && c < K && e < V ? dht[state0 + int64_t(c) * V + e] : 0.f;
  }
  auto stage_cols = [&](int64_t t0, int L, int e0, bool want_v) {  // the V tile of scale do (and of v)
    for (int idx = threadIdx.x; idx < C * BV; idx += blockDim.x) {
      const int i = idx / BV, e = idx % BV;
      const bool ok = i < L && e0 + e < V;
      s.sdo[idx] = from_float<T>(ok ? scale * to_float(p.dout.at<const T>(bi, t0 + i, hi)[e0 + e]) : 0.f);
    }
    if (want_v) gla_stage_tile<false, T>(s.v, p.v, bi, hi, t0, L, e0, V, BV);
  };
  auto stage_dH = [&](int c0, int e0) {  // the (K slice, V tile) of dH as an operand
    for (int idx = threadIdx.x; idx < BK * BV; idx += blockDim.x)
      s.h[idx] = from_float<T>(s.dH[(c0 + idx / BV) * D + e0 + idx % BV]);
  };

  for (int64_t n = n_chunks - 1; n >= 0; --n) {
    const int64_t t0 = n * C;
    const int L = static_cast<int>(p.seqlen - t0 < C ? p.seqlen - t0 : C);
    const T* h_in = states + (bh * n_chunks + n) * KV;  // h_n, (K, V)

    // dv = tril(A)^T sdo + (k exp2(S(.; C))) dH, per V tile.
    __syncthreads();  // dH as the previous chunk (or dht) left it; its last reads of A, Am and the slices
    for (int c = threadIdx.x; c < K; c += blockDim.x) {  // dg's boundary term sum_v h_{n+1} dH (dH = 0 without dht)
      float acc = 0.f;
      for (int e = 0; e < V && (n + 1 < n_chunks || final_state); ++e) {
        const float h_next = n + 1 < n_chunks ? to_float(h_in[KV + int64_t(c) * V + e]) : final_state[state0 + int64_t(c) * V + e];
        acc += h_next * s.dH[c * D + e];
      }
      s.dg_bound[c] = acc;
    }
    for (int idx = threadIdx.x; idx < C * C; idx += blockDim.x) s.A[idx] = 0.f;
    for (int c0 = 0; c0 < K; c0 += BK) {
      gla_stage_tile<false, T>(s.q, p.q, bi, hi, t0, L, c0, K, BK);
      gla_stage_tile<false, T>(s.k, p.k, bi, hi, t0, L, c0, K, BK);
      gla_stage_tile<true, T>(s.log2g, p.g, bi, hi, t0, L, c0, K, BK);
      __syncthreads();
      gla_accumulate_scores<T, BK>(s.A, s.q, s.k, s.log2g, s.x, s.y);
    }
    for (int idx = threadIdx.x; idx < C * C; idx += blockDim.x)
      s.Am[idx] = from_float<T>(idx % C <= idx / C ? s.A[idx] : 0.f);
    for (int e0 = 0; e0 < V; e0 += BV) {
      for (int idx = threadIdx.x; idx < C * BV; idx += blockDim.x) s.dv[idx] = 0.f;
      stage_cols(t0, L, e0, false);
      __syncthreads();
      smem_gemm_acc<T, false, true>(s.dv, BV, s.Am, C, s.sdo, BV, C, BV, C);  // tril(A)^T sdo
      for (int c0 = 0; c0 < K; c0 += BK) {
        gla_stage_tile<false, T>(s.k, p.k, bi, hi, t0, L, c0, K, BK);
        gla_stage_tile<true, T>(s.log2g, p.g, bi, hi, t0, L, c0, K, BK);
        stage_dH(c0, e0);
        __syncthreads();
        each_suffix_decay(s.log2g, BK, C, [&](int j, int cc, float d) { s.y[j * BK + cc] = from_float<T>(s.k[j * BK + cc] * d); });
        __syncthreads();
        smem_gemm_acc<T, true, true>(s.dv, BV, s.y, BK, s.h, BV, C, BV, BK);  // (C, BK) (BK, BV)
        __syncthreads();
      }
      for (int idx = threadIdx.x; idx < L * BV; idx += blockDim.x) {
        const int i = idx / BV, e = idx % BV;
        if (e0 + e < V) p.dv.at<T>(bi, t0 + i, hi)[e0 + e] = from_float<T>(s.dv[idx]);
      }
    }

    // dA = tril(sdo v^T), over V tiles.
    for (int idx = threadIdx.x; idx < C * C; idx += blockDim.x) s.A[idx] = 0.f;
    for (int e0 = 0; e0 < V; e0 += BV) {
      stage_cols(t0, L, e0, true);
      __syncthreads();
      smem_gemm_acc<T, true, false>(s.A, C, s.sdo, BV, s.v, BV, C, C, BV);
      __syncthreads();
    }
    for (int idx = threadIdx.x; idx < C * C; idx += blockDim.x) {
      const float a = idx % C <= idx / C ? s.A[idx] : 0.f;
      s.A[idx] = a;
      s.Am[idx] = from_float<T>(a);
    }

    // dq, dk, dg and the update of dH, per K slice.
    for (int c0 = 0; c0 < K; c0 += BK) {
      gla_stage_tile<false, T>(s.q, p.q, bi, hi, t0, L, c0, K, BK);
      gla_stage_tile<false, T>(s.k, p.k, bi, hi, t0, L, c0, K, BK);
      gla_stage_tile<true, T>(s.log2g, p.g, bi, hi, t0, L, c0, K, BK);
      for (int idx = threadIdx.x; idx < C * BK; idx += blockDim.x) s.gr.dq[idx] = s.gr.dk[idx] = 0.f;
      for (int e0 = 0; e0 < V; e0 += BV) {
        stage_cols(t0, L, e0, true);
        for (int idx = threadIdx.x; idx < BK * BV; idx += blockDim.x) {
          const int cc = idx / BV, e = idx % BV;
          s.h[idx] = c0 + cc < K && e0 + e < V ? h_in[int64_t(c0 + cc) * V + e0 + e] : from_float<T>(0.f);
        }
        __syncthreads();
        smem_gemm_acc<T, true, false>(s.gr.dq, BK, s.sdo, BV, s.h, BV, C, BK, BV);  // sdo h_n^T
        __syncthreads();
        stage_dH(c0, e0);
        __syncthreads();
        smem_gemm_acc<T, true, false>(s.gr.dk, BK, s.v, BV, s.h, BV, C, BK, BV);  // v dH^T
        __syncthreads();
      }
      each_prefix_decay(s.log2g, BK, 0, C, [&](int i, int cc, float d) { s.gr.dq[i * BK + cc] *= d; });
      each_suffix_decay(s.log2g, BK, C, [&](int j, int cc, float d) { s.gr.dk[j * BK + cc] *= d; });
      for (int r = SUB; r < C; r += SUB) {  // off-diagonal sub-blocks: query rows [r, r + 16), key rows [0, r)
        each_prefix_decay(s.log2g, BK, r, r + SUB, [&](int i, int cc, float d) { s.x[(i - r) * BK + cc] = from_float<T>(s.q[i * BK + cc] * d); });
        each_suffix_decay(s.log2g, BK, r, [&](int j, int cc, float d) { s.y[j * BK + cc] = from_float<T>(s.k[j * BK + cc] * d); });
        for (int idx = threadIdx.x; idx < SUB * BK; idx += blockDim.x) s.gr.tq[idx] = 0.f;
        for (int idx = threadIdx.x; idx < r * BK; idx += blockDim.x) s.gr.tk[idx] = 0.f;
        __syncthreads();
        smem_gemm_acc<T, true, true>(s.gr.tq, BK, s.Am + r * C, C, s.y, BK, SUB, BK, r);
        smem_gemm_acc<T, false, true>(s.gr.tk, BK, s.Am + r * C, C, s.x, BK, r, BK, SUB);
        __syncthreads();
        each_prefix_decay(s.log2g, BK, r, r + SUB, [&](int i, int cc, float d) { s.gr.dq[i * BK + cc] += d * s.gr.tq[(i - r) * BK + cc]; });
        each_suffix_decay(s.log2g, BK, r, [&](int j, int cc, float d) { s.gr.dk[j * BK + cc] += d * s.gr.tk[j * BK + cc]; });
        __syncthreads();
      }
      for (int idx = threadIdx.x; idx < C * BK; idx += blockDim.x) {  // diagonal sub-blocks, one (row, channel) each
        const int i = idx / BK, cc = idx % BK, base = i - i % SUB;
        float seg = 0.f, acc_q = 0.f;
        for (int j = i; j >= base; --j) {  // seg = sum_{s=j+1}^{i} g_s
          acc_q += s.A[i * C + j] * s.k[j * BK + cc] * gla_exp2(seg);
          seg += s.log2g[j * BK + cc];
        }
        seg = 0.f;
        float acc_k = 0.f;
        for (int r = i; r < base + SUB; ++r) {  // seg = sum_{s=i+1}^{r} g_s
          if (r > i) seg += s.log2g[r * BK + cc];
          acc_k += s.A[r * C + i] * s.q[r * BK + cc] * gla_exp2(seg);
        }
        s.gr.dq[idx] += acc_q;
        s.gr.dk[idx] += acc_k;
      }
      __syncthreads();
      for (int idx = threadIdx.x; idx < L * BK; idx += blockDim.x) {
        const int i = idx / BK, cc = idx % BK;
        if (c0 + cc < K) {
          p.dq.at<T>(bi, t0 + i, hi)[c0 + cc] = from_float<T>(s.gr.dq[idx]);
          p.dk.at<T>(bi, t0 + i, hi)[c0 + cc] = from_float<T>(s.gr.dk[idx]);
        }
      }
      for (int cc = threadIdx.x; cc < BK; cc += blockDim.x) {
        float run = s.dg_bound[c0 + cc], sum = 0.f;
        for (int t = C - 1; t >= 0; --t) {
          run += gla_dgate_term(s.q[t * BK + cc], s.gr.dq[t * BK + cc], s.k[t * BK + cc], s.gr.dk[t * BK + cc]);
          if (t < L && c0 + cc < K)
            p.dg.at<T>(bi, t0 + t, hi)[c0 + cc] = from_float<T>(gla_gate_grad(run, s.log2g[t * BK + cc]));
          sum += s.log2g[t * BK + cc];
        }
        s.etot[cc] = gla_exp2(sum);
      }
      each_prefix_decay(s.log2g, BK, 0, C, [&](int i, int cc, float d) { s.x[i * BK + cc] = from_float<T>(s.q[i * BK + cc] * d); });
      __syncthreads();
      for (int e0 = 0; e0 < V; e0 += BV) {  // dH[slice] <- exp2(total) dH[slice] + (q exp2(P(.; 0)))^T sdo
        stage_cols(t0, L, e0, false);
        for (int idx = threadIdx.x; idx < BK * BV; idx += blockDim.x) s.dH[(c0 + idx / BV) * D + e0 + idx % BV] *= s.etot[idx / BV];
        __syncthreads();
        smem_gemm_acc<T, false, true>(s.dH + c0 * D + e0, D, s.x, BK, s.sdo, BV, BK, BV, C);  // (C, BK)^T (C, BV)
        __syncthreads();
      }
    }
  }
  __syncthreads();  // T = 0: dH was written by other threads
  float* dh0 = static_cast<float*>(p.dh0);
  if (dh0 == nullptr) return;
  for (int idx = threadIdx.x; idx < K * V; idx += blockDim.x) dh0[state0 + idx] = s.dH[(idx / V) * D + idx % V];
}

template <typename Tr, typename T>
void gla_fused_bwd_launch(const GlaParams& p, const T* states, const float* final_state, cudaStream_t stream) {
  constexpr size_t smem = sizeof(GlaFusedBwdSmem<Tr, T>);
  static_assert(smem <= kMaxBlockSharedBytes, "fits an sm_80 block (163 KB opt-in)");
  opt_in_smem(linmix_gla_fused_bwd_kernel<Tr, T>, smem);
  const dim3 grid = checked_grid("chunk_gla", "(B H)", p.batch * p.heads);
  launch_kernel(linmix_gla_fused_bwd_kernel<Tr, T>, grid, Tr::kThreads, smem, stream, p, states, final_state);
}

template <DType dt>
void fused_gla_bwd_cuda(const GlaParams& p, void* workspace, cudaStream_t stream) {
  using T = cuda_t<dt>;
  if (p.dim_k > kGlaFusedBwdMaxHeadDim || p.dim_v > kGlaFusedBwdMaxHeadDim)
    throw std::invalid_argument("linmix.chunk_gla: the fused backward serves head dims up to 128 (gla_plan)");
  float* final_state = p.dht ? static_cast<float*>(workspace) : nullptr;
  T* states = reinterpret_cast<T*>(static_cast<float*>(workspace) + p.batch * p.heads * p.dim_k * p.dim_v);
  gla_fused_head_dim_switch(p.dim_k, [&](auto traits) {
    using Tr = decltype(traits);
    constexpr size_t smem = sizeof(GlaFusedFwdSmem<Tr, T>);
    opt_in_smem(linmix_gla_fused_bwd_states_kernel<Tr, T>, smem);
    const dim3 grid = checked_grid("chunk_gla", "(B H, ceil(V / 64))", p.batch * p.heads, ceil_div(p.dim_v, Tr::kBV));
    launch_kernel(linmix_gla_fused_bwd_states_kernel<Tr, T>, grid, Tr::kThreads, smem, stream, p, states, final_state);
  });
  if (p.dim_k <= 64 && p.dim_v <= 64)
    gla_fused_bwd_launch<GlaFusedBwdTraits<64, T>, T>(p, states, final_state, stream);
  else
    gla_fused_bwd_launch<GlaFusedBwdTraits<128, T>, T>(p, states, final_state, stream);
}

}  // namespace linmix
