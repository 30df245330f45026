// CUDA selective scan, forward.
//
// One block per (batch, channel); the block walks L in chunks of kThreads x kItems steps, thread j
// owning kItems consecutive steps. Per chunk: δ, δu and D u stay in registers; then for each state n
// the thread composes its items' (exp(δA), B δu) pairs, a block scan gives the state entering its first
// item (seeded with the state carried from the previous chunk, kept per state in shared memory), and a
// sequential pass produces h_t and accumulates C_t h_t into y. The last thread holds the chunk's final
// state: it updates the carry and writes the fp32 checkpoint (b, d, n_chunks, n) that backward restarts from.
//
// Packed sequences (cu_seqlens): the varlen kernel, the same body with one block per (sequence, channel) walking
// its span of row 0 (ss_block_seq), from its own initial state to its own final state and checkpoint slots.
#pragma once

#include "selective_scan/selective_scan_block_scan.cuh"

namespace linmix {

template <typename Traits, typename T, bool kVarlen>
__device__ __forceinline__ void selective_scan_fwd_block(const SelectiveScanParams& p) {
  constexpr int kItems = Traits::kItems, kNWarps = Traits::kNWarps;
  LINMIX_DYNAMIC_SHARED(float, s_h);  // (n): state after the previous chunk
  LINMIX_SHARED(ScanPair<float>, s_warp, [2 * kNWarps]);
  const int tid = threadIdx.x;
  const SsSeq sq = ss_block_seq<kVarlen>(p);
  const int64_t bd = sq.bd, bi = sq.bi, di = bd % p.dim;
  const int64_t N = p.dstate, L = sq.len, bdn = bd * N;
  const float* A = static_cast<const float*>(p.A) + di * N;  // (n)
  const float bias = p.delta_bias ? static_cast<const float*>(p.delta_bias)[di] : 0.f;
  const float Dv = p.D ? static_cast<const float*>(p.D)[di] : 0.f;
  const T* u = p.u.at<const T>(bi, di) + sq.begin;          // (L)
  const T* delta = p.delta.at<const T>(bi, di) + sq.begin;  // (L)
  const T* z = p.z.ptr ? p.z.at<const T>(bi, di) + sq.begin : nullptr;
  T* out = p.out.at<T>(bi, di) + sq.begin;
  float* ckpt = static_cast<float*>(p.checkpoints) + sq.ckpt;  // (n_chunks, n)

  for (int64_t n = tid; n < N; n += Traits::kThreads)
    s_h[n] = p.initial_state ? static_cast<const float*>(p.initial_state)[bdn + n] : 0.f;
  __syncthreads();
  int buf = 0;
  for (int64_t c = 0; c < sq.n_chunks; ++c) {
    const int64_t t0 = c * Traits::kChunk + int64_t(tid) * kItems;  // this thread's first step
    const int64_t n_valid = L - t0;  // items of this thread inside the sequence (may be <= 0)
    float r_dl[kItems], r_dlu[kItems], r_y[kItems], r_u[kItems];
    load_items<kItems>(u + t0, n_valid, r_u, 0.f);
    load_items<kItems>(delta + t0, n_valid, r_dl, 0.f);
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      r_dl[k] = k < n_valid ? ss_delta(r_dl[k], bias, p.delta_softplus) : 0.f;
      r_dlu[k] = r_dl[k] * r_u[k];
      r_y[k] = Dv * r_u[k];
    }
    for (int64_t n = 0; n < N; ++n) {
      const float coef = ss_decay_coef(A[n]);
      const float carry = s_h[n];
      float r_b[kItems], r_c[kItems];
      load_bc_items<kItems>(bc_row<T>(p.B, bi, di, n, p.dim, sq.begin), t0, L, r_b);
      load_bc_items<kItems>(bc_row<T>(p.C, bi, di, n, p.dim, sq.begin), t0, L, r_c);
      ScanPair<float> r_p[kItems], agg{1.f, 0.f};
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        // steps past L are the identity, so the last thread's state is exactly the state after step L-1
        r_p[k] = k < n_valid ? ss_forward_pair(r_dl[k], coef, r_b[k], r_dlu[k]) : ScanPair<float>{1.f, 0.f};
        agg = scan_combine(agg, r_p[k]);
      }
      float h = block_scan_carry_in<kNWarps, false>(agg, carry, s_warp + buf * kNWarps);
      buf ^= 1;
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        h = scan_step(r_p[k].a, h, r_p[k].b);
        r_y[k] += r_c[k] * h;  // r_c is 0 past the end
      }
      if (tid == Traits::kThreads - 1) {  // every thread read s_h[n] before the scan's barrier
        s_h[n] = h;
        ckpt[c * N + n] = h;
      }
    }
    ss_store_out<kItems>(out, z, t0, n_valid, r_y);
    __syncthreads();  // s_h written above is read by the next chunk (no scan barrier in between when n = 1)
  }
  for (int64_t n = tid; n < N; n += Traits::kThreads) static_cast<float*>(p.final_state)[bdn + n] = s_h[n];
}

// grid: (b * d); block: Traits::kThreads; dynamic smem: n floats.
template <typename Traits, typename T>
__global__ void __launch_bounds__(Traits::kThreads) linmix_selective_scan_fwd_kernel(SelectiveScanParams p) {
  selective_scan_fwd_block<Traits, T, false>(p);
}

// grid: (N * d), N packed sequences; block and smem as above.
template <typename Traits, typename T>
__global__ void __launch_bounds__(Traits::kThreads) linmix_selective_scan_fwd_varlen_kernel(SelectiveScanParams p) {
  selective_scan_fwd_block<Traits, T, true>(p);
}

template <DType dt>
void selective_scan_fwd_cuda(const SelectiveScanParams& p, cudaStream_t stream) {
  using Traits = SelectiveScanDefaultTraits;
  selective_scan_launch<Traits>(linmix_selective_scan_fwd_kernel<Traits, cuda_t<dt>>, p.dstate, p, stream);
}

template <DType dt>
void selective_scan_fwd_varlen_cuda(const SelectiveScanParams& p, cudaStream_t stream) {
  using Traits = SelectiveScanDefaultTraits;
  selective_scan_launch<Traits>(linmix_selective_scan_fwd_varlen_kernel<Traits, cuda_t<dt>>, p.dstate, p, stream);
}

}  // namespace linmix
