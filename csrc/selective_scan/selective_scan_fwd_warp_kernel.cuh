// CUDA selective scan, forward with one warp per channel (opt-in: LINMIX_KERNELS=selective_scan_fwd_warp, see
// common/kernels.h).
//
// The default forward (selective_scan_fwd_kernel.cuh) scans a 1024-step chunk with a whole block per channel,
// one __syncthreads per state. Here a warp owns a channel and walks it in sub-chunks of kSelectiveScanSubChunk
// steps (lane j: kItems consecutive steps); per state, a warp scan of the (exp(δA), δBu) pairs seeded with the
// state carried from the previous sub-chunk gives every step's state, and C h accumulates into y. No block
// barrier at all; the block's kWarps consecutive channels usually share a B/C group, so their B/C rows meet in
// L1. The carried state lives in the final_state row (lane 31 writes it after a __syncwarp), and after the last
// sub-chunk of every checkpoint chunk it is also written to the checkpoint the backward restarts from, in the
// default forward's layout (b, d, n_chunks, n).
#pragma once

#include "selective_scan/selective_scan_block_scan.cuh"

namespace linmix {

struct SelectiveScanWarpFwdTraits {
  static constexpr int kWarps = 4;  // channels per block
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kSub = int(kSelectiveScanSubChunk);
  static constexpr int kItems = kSub / 32;
  static constexpr int kNSub = int(kSelectiveScanChunk / kSelectiveScanSubChunk);
  static_assert(kSub % 32 == 0 && kSelectiveScanChunk % kSelectiveScanSubChunk == 0, "whole sub-chunks");
};

// grid: ceil(b * d / kWarps); block: kThreads. Warp w handles (batch, channel) row blockIdx.x * kWarps + w.
template <typename T>
__global__ void __launch_bounds__(SelectiveScanWarpFwdTraits::kThreads)
    linmix_selective_scan_fwd_warp_kernel(SelectiveScanParams p) {
  using Tr = SelectiveScanWarpFwdTraits;
  constexpr int kItems = Tr::kItems, kSub = Tr::kSub;
  const int lane = threadIdx.x % 32;
  const int64_t bd = int64_t(blockIdx.x) * Tr::kWarps + threadIdx.x / 32;
  if (bd >= p.batch * p.dim) return;  // whole warps: no block barrier follows
  const int64_t N = p.dstate, L = p.seqlen, bi = bd / p.dim, di = bd % p.dim, bdn = bd * N;
  const float* A = static_cast<const float*>(p.A) + di * N;  // (n)
  const float bias = p.delta_bias ? static_cast<const float*>(p.delta_bias)[di] : 0.f;
  const float Dv = p.D ? static_cast<const float*>(p.D)[di] : 0.f;
  const T* u = p.u.at<const T>(bi, di);
  const T* delta = p.delta.at<const T>(bi, di);
  const T* z = p.z.ptr ? p.z.at<const T>(bi, di) : nullptr;
  T* out = p.out.at<T>(bi, di);
  float* ckpt = static_cast<float*>(p.checkpoints) + bd * p.n_chunks * N;  // (n_chunks, n)
  float* h_row = static_cast<float*>(p.final_state) + bdn;                 // (n): the carried state
  const int64_t b_base = ss_bc_offset(p.B, bi, di, 0, p.dim), c_base = ss_bc_offset(p.C, bi, di, 0, p.dim);

  if (lane == 0) {
    for (int64_t n = 0; n < N; ++n)
      h_row[n] = p.initial_state ? static_cast<const float*>(p.initial_state)[bdn + n] : 0.f;
  }
  __syncwarp();
  const int64_t n_sub = ceil_div(L, kSub);
  for (int64_t s = 0; s < n_sub; ++s) {
    const int64_t t0 = s * kSub + lane * kItems, n_valid = L - t0;
    // the last sub-chunk of a checkpoint chunk (or of the sequence) writes the checkpoint
    const bool chunk_end = (s + 1) % Tr::kNSub == 0 || s + 1 == n_sub;
    const int64_t c = s / Tr::kNSub;
    float r_u[kItems], r_dl[kItems], r_y[kItems];
    load_items<kItems>(u + t0, n_valid, r_u, 0.f);
    load_items<kItems>(delta + t0, n_valid, r_dl, 0.f);
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      r_dl[k] = k < n_valid ? ss_delta(r_dl[k], bias, p.delta_softplus) : 0.f;
      r_y[k] = Dv * r_u[k];
    }
    for (int64_t n = 0; n < N; ++n) {
      const float coef = ss_decay_coef(A[n]);
      float r_a[kItems], r_b[kItems], r_c[kItems], r_hp[kItems];  // r_hp unused here
      load_bc_items<kItems>(bc_row_at<T>(p.B, b_base, n), t0, L, r_b);
      load_bc_items<kItems>(bc_row_at<T>(p.C, c_base, n), t0, L, r_c);
      ScanPair<float> excl;
      const ScanPair<float> incl =
          warp_scan_pairs<false>(ss_thread_pairs<kItems>(r_dl, coef, r_b, r_u, n_valid, r_a), excl);
      const float h_in = h_row[n];
      ss_thread_states<kItems>(scan_step(excl.a, h_in, excl.b), r_a, r_b, r_dl, r_u, r_c, r_hp, r_y);
      __syncwarp();  // every lane has read h_row[n]
      if (lane == 31) {  // padded steps are the identity: lane 31's inclusive prefix ends the sub-chunk
        const float h_out = scan_step(incl.a, h_in, incl.b);
        h_row[n] = h_out;
        if (chunk_end) ckpt[c * N + n] = h_out;
      }
    }
    ss_store_out<kItems>(out, z, t0, n_valid, r_y);
    __syncwarp();  // lane 31's h_row writes precede the next sub-chunk's reads
  }
}

template <DType dt>
void selective_scan_fwd_warp_cuda(const SelectiveScanParams& p, cudaStream_t stream) {
  using Tr = SelectiveScanWarpFwdTraits;
  if (p.batch * p.dim == 0) return;
  const dim3 grid = checked_grid("selective_scan", "(ceil(b d / warps))", ceil_div(p.batch * p.dim, Tr::kWarps));
  launch_kernel(linmix_selective_scan_fwd_warp_kernel<cuda_t<dt>>, grid, Tr::kThreads, 0, stream, p);
}

}  // namespace linmix
