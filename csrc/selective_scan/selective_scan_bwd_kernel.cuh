// CUDA selective scan, backward.
//
// Same layout as forward (one block per (batch, channel), thread j owns kItems consecutive steps of a
// chunk), chunks walked in reverse. Per chunk and state n: recompute the chunk's states from the fp32
// checkpoint of the previous chunk (forward block scan), then run the adjoint s_t = a_t (C_t dy_t + s_{t+1})
// backwards in time with a reverse block scan seeded by the adjoint carried from the later chunk (or
// dfinal_state), and form every per-step gradient in registers. Nothing of size (b, d, L, n) exists.
//
// Reductions: dA and fixed dB/dC are reduced per warp with shuffles and accumulated by lane 0 into the
// warp's own shared-memory slot (no atomics), then summed over warps in a fixed order and written as a
// per-(b, d) partial; the glue sums partials over the batch. Deterministic. Variable dB/dC are shared by
// the channels of a group (other blocks), so they go to an fp32 buffer with atomicAdd (not bitwise
// deterministic across runs).
//
// Packed sequences (cu_seqlens): the varlen kernel, the same body with one block per (sequence, channel)
// (ss_block_seq); its partials are per (sequence, channel), and the sequences' variable dB/dC lie in disjoint
// time ranges, so the only atomics that meet are those of the channels of a group, as in the dense kernel.
#pragma once

#include "selective_scan/selective_scan_block_scan.cuh"

namespace linmix {

template <typename Traits, typename T, bool kVarlen>
__device__ __forceinline__ void selective_scan_bwd_block(const SelectiveScanParams& p) {
  constexpr int kItems = Traits::kItems, kNWarps = Traits::kNWarps;
  LINMIX_DYNAMIC_SHARED(float, s_dyn);
  const int64_t N = p.dstate;
  float* s_s = s_dyn;         // (n): adjoint entering the current chunk from the later one
  float* s_part = s_dyn + N;  // (kNWarps, 3, n): per-warp sums of dA, fixed dB, fixed dC
  LINMIX_SHARED(ScanPair<float>, s_warp, [2 * kNWarps]);
  LINMIX_SHARED(float, s_red, [2][kNWarps]);  // per-warp sums of dD, ddelta_bias
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const SsSeq sq = ss_block_seq<kVarlen>(p);
  const int64_t bd = sq.bd, bi = sq.bi, di = bd % p.dim, bdn = bd * N, L = sq.len, b0 = sq.begin;
  const SsBwdChannel<T> ch = ss_bwd_channel<T>(p, bi, di);
  const float* A = ch.A;
  const float bias = ch.bias, Dv = ch.Dv;
  const T *u = ch.u + b0, *delta = ch.delta + b0, *dout = ch.dout + b0;  // (L) rows of this sequence
  const T* z = ch.z ? ch.z + b0 : nullptr;
  T* du_out = p.du.at<T>(bi, di) + b0;
  T* ddelta_out = p.ddelta.at<T>(bi, di) + b0;
  T* dz_out = z ? p.dz.at<T>(bi, di) + b0 : nullptr;
  // (n_chunks, n); the dense kernel's own expression (its SASS is GPU-verified, see ss_block_seq)
  const float* ckpt = static_cast<const float*>(p.checkpoints) + (kVarlen ? sq.ckpt : bd * p.n_chunks * N);
  const float* h_init = p.initial_state ? static_cast<const float*>(p.initial_state) + bdn : nullptr;

  for (int64_t n = tid; n < N; n += Traits::kThreads)
    s_s[n] = p.dfinal ? static_cast<const float*>(p.dfinal)[bdn + n] : 0.f;
  for (int64_t i = tid; i < 3 * kNWarps * N; i += Traits::kThreads) s_part[i] = 0.f;
  __syncthreads();
  float r_dD = 0.f, r_dbias = 0.f;
  int buf = 0;
  for (int64_t c = (kVarlen ? sq.n_chunks : p.n_chunks) - 1; c >= 0; --c) {
    const int64_t t0 = c * Traits::kChunk + int64_t(tid) * kItems;
    const int64_t n_valid = L - t0;  // items of this thread inside the sequence (may be <= 0)
    float r_u[kItems], r_raw[kItems], r_dl[kItems], r_dout[kItems], r_dy[kItems], r_y[kItems], r_du[kItems],
        r_ddl[kItems];
    bwd_load_steps<kItems>(u, delta, dout, z, t0, n_valid, bias, Dv, p.delta_softplus,
                           r_u, r_raw, r_dout, r_dl, r_dy, r_y, r_du, r_ddl, r_dD);
    for (int64_t n = 0; n < N; ++n) {
      const float An = A[n], coef = ss_decay_coef(An);
      const BCRow<T> Brow = bc_row<T>(p.B, bi, di, n, p.dim, b0), Crow = bc_row<T>(p.C, bi, di, n, p.dim, b0);
      const float h_start = c > 0 ? ckpt[(c - 1) * N + n] : (h_init ? h_init[n] : 0.f);
      const float s_end = s_s[n];
      // Recompute the states: r_hp[k] = h before step k, r_a[k] = exp(δA), r_b / r_c = B, C at step k.
      float r_a[kItems], r_hp[kItems], r_b[kItems], r_c[kItems];
      load_bc_items<kItems>(Brow, t0, L, r_b);
      load_bc_items<kItems>(Crow, t0, L, r_c);
      const ScanPair<float> agg = ss_thread_pairs<kItems>(r_dl, coef, r_b, r_u, n_valid, r_a);
      const float h = block_scan_carry_in<kNWarps, false>(agg, h_start, s_warp + buf * kNWarps);
      buf ^= 1;
      ss_thread_states<kItems>(h, r_a, r_b, r_dl, r_u, r_c, r_hp, r_y);
      // Adjoint, backwards in time.
      const ScanPair<float> adj = bwd_adjoint_pairs<kItems>(r_a, r_c, r_dy);
      float s = block_scan_carry_in<kNWarps, true>(adj, s_end, s_warp + buf * kNWarps);
      buf ^= 1;
      float dA = 0.f, dB = 0.f, dC = 0.f;
#pragma unroll
      for (int k = kItems - 1; k >= 0; --k) {  // bwd_step_grads, with the atomics inside the loop (fewer registers)
        const float g = r_c[k] * r_dy[k] + s;  // dL/dh_t
        s = r_a[k] * g;
        if (k >= n_valid) continue;
        const SSStepGrad<float> gr = ss_step_grad(g, r_hp[k], r_a[k], r_dl[k], An, r_b[k], r_u[k]);
        const float dc = r_dy[k] * scan_step(r_a[k], r_hp[k], r_b[k] * r_dl[k] * r_u[k]);
        r_du[k] += gr.du;
        r_ddl[k] += gr.ddelta;
        dA += gr.dA;
        if (Brow.row) {
          atomicAdd(static_cast<float*>(p.dB) + ss_bc_offset(p.B, bi, di, n, p.dim) + b0 + t0 + k, gr.dB);
        } else {
          dB += gr.dB;
        }
        if (Crow.row) {
          atomicAdd(static_cast<float*>(p.dC) + ss_bc_offset(p.C, bi, di, n, p.dim) + b0 + t0 + k, dc);
        } else {
          dC += dc;
        }
      }
      if (tid == 0) s_s[n] = s;  // the adjoint at the chunk's first step; all threads read s_s[n] before the barrier
      dA = warp_sum(dA), dB = warp_sum(dB), dC = warp_sum(dC);
      if (lane == 0) {  // only this lane writes the warp's slots: no race, fixed order
        s_part[(warp * 3 + 0) * N + n] += dA;
        s_part[(warp * 3 + 1) * N + n] += dB;
        s_part[(warp * 3 + 2) * N + n] += dC;
      }
    }
    if (z) {
      float r_z[kItems], r_dz[kItems];
      load_items<kItems>(z + t0, n_valid, r_z, 0.f);
#pragma unroll
      for (int k = 0; k < kItems; ++k) r_dz[k] = ss_gate_dz(r_dout[k], r_y[k], r_z[k]);
      store_items<kItems>(dz_out + t0, n_valid, r_dz);
    }
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      r_ddl[k] = k < n_valid ? r_ddl[k] * ss_delta_grad(r_raw[k], bias, p.delta_softplus) : 0.f;
      r_dbias += r_ddl[k];
    }
    store_items<kItems>(ddelta_out + t0, n_valid, r_ddl);
    store_items<kItems>(du_out + t0, n_valid, r_du);
    __syncthreads();  // s_s written above is read by the next chunk
  }
  r_dD = warp_sum(r_dD), r_dbias = warp_sum(r_dbias);
  if (lane == 0) s_red[0][warp] = r_dD, s_red[1][warp] = r_dbias;
  __syncthreads();
  if (tid == 0) {
    float sD = 0.f, sb = 0.f;
    for (int w = 0; w < kNWarps; ++w) sD += s_red[0][w], sb += s_red[1][w];
    static_cast<float*>(p.dD_part)[bd] = sD;
    static_cast<float*>(p.ddelta_bias_part)[bd] = sb;
  }
  for (int64_t n = tid; n < N; n += Traits::kThreads) {
    float sums[3] = {0.f, 0.f, 0.f};
    for (int w = 0; w < kNWarps; ++w)
      for (int j = 0; j < 3; ++j) sums[j] += s_part[(w * 3 + j) * N + n];
    static_cast<float*>(p.dA_part)[bdn + n] = sums[0];
    if (!p.B.variable) static_cast<float*>(p.dB)[bdn + n] = sums[1];
    if (!p.C.variable) static_cast<float*>(p.dC)[bdn + n] = sums[2];
    static_cast<float*>(p.dinitial_state)[bdn + n] = s_s[n];
  }
}

// grid: (b * d); block: Traits::kThreads; dynamic smem: (1 + 3 kNWarps) n floats.
template <typename Traits, typename T>
__global__ void __launch_bounds__(Traits::kThreads) linmix_selective_scan_bwd_kernel(SelectiveScanParams p) {
  selective_scan_bwd_block<Traits, T, false>(p);
}

// grid: (N * d), N packed sequences; block and smem as above.
template <typename Traits, typename T>
__global__ void __launch_bounds__(Traits::kThreads) linmix_selective_scan_bwd_varlen_kernel(SelectiveScanParams p) {
  selective_scan_bwd_block<Traits, T, true>(p);
}

template <DType dt>
void selective_scan_bwd_cuda(const SelectiveScanParams& p, cudaStream_t stream) {
  using Traits = SelectiveScanDefaultTraits;
  selective_scan_launch<Traits>(linmix_selective_scan_bwd_kernel<Traits, cuda_t<dt>>,
                                (1 + 3 * Traits::kNWarps) * p.dstate, p, stream);
}

template <DType dt>
void selective_scan_bwd_varlen_cuda(const SelectiveScanParams& p, cudaStream_t stream) {
  using Traits = SelectiveScanDefaultTraits;
  selective_scan_launch<Traits>(linmix_selective_scan_bwd_varlen_kernel<Traits, cuda_t<dt>>,
                                (1 + 3 * Traits::kNWarps) * p.dstate, p, stream);
}

}  // namespace linmix
