// CUDA fixed-point RNN backward: the adjoint iteration (mix, scan) and per-token gradient kernels, and the
// launcher fixed_point_rnn_bwd_cuda, which also runs the forward Gram and iteration (fixed_point_rnn_fwd_kernel.cuh).
#pragma once

#include "fixed_point_rnn/fixed_point_rnn_fwd_kernel.cuh"
#include "fixed_point_rnn/fixed_point_rnn_kernel_common.cuh"

namespace linmix {

template <typename T>
__global__ void __launch_bounds__(32 * kFpWarpsPerBlock)
    linmix_fixed_point_rnn_bwd_mix_kernel(FixedPointRnnParams p, FixedPointRnnWork w, FixedPointRnnIter it) {
  fixed_point_rnn_mix<T, true>(p, w, it);
}

template <typename Traits, typename T>
__global__ void __launch_bounds__(Traits::kThreads)
    linmix_fixed_point_rnn_bwd_scan_kernel(FixedPointRnnParams p, FixedPointRnnWork w, FixedPointRnnIter it) {
  fixed_point_rnn_scan<Traits, T, true>(p, w, it);
}

template <typename T>
__global__ void __launch_bounds__(32 * kFpWarpsPerBlock)
    linmix_fixed_point_rnn_variants_bwd_mix_kernel(FixedPointRnnParams p, FixedPointRnnWork w, FixedPointRnnIter it,
                                                   FixedPointRnnVariantWork v) {
  fixed_point_rnn_mix<T, true, true>(p, w, it, v);
}

template <typename Traits, typename T>
__global__ void __launch_bounds__(Traits::kThreads)
    linmix_fixed_point_rnn_variants_bwd_scan_kernel(FixedPointRnnParams p, FixedPointRnnWork w, FixedPointRnnIter it,
                                                    FixedPointRnnVariantWork v) {
  fixed_point_rnn_scan<Traits, T, true, true>(p, w, it, v);
}

// One step's VJP per token (fixed_point_rnn_common.h's householder_vjp_channel), with s the converged
// adjoint (buffer chosen by the element's adjoint iteration count). grid: ceil(B T / 8); block: 256.
// Variants: h_{-1} = p.h0 enters dlam at t = 0, and dh0 = lam_0 s_0; t counts from each packed sequence's start.
template <typename T, bool kVariant>
__device__ __forceinline__ void fixed_point_rnn_grads(const FixedPointRnnParams& p, const FixedPointRnnWork& w,
                                                      const float* s_buf0, const float* s_buf1, const float* h_new,
                                                      const Varlen& varlen) {
  const int64_t tok = kVariant ? variant_warp_token(p, varlen) : warp_token(p);
  if (tok < 0) return;
  const int lane = threadIdx.x % 32, R = static_cast<int>(p.rank);
  const int64_t bi = kVariant ? variant_element(p, varlen, tok) : tok / p.seqlen, D = p.dim;
  const int64_t t = kVariant ? tok - varlen.span(bi, p.seqlen).first(p.seqlen) : tok % p.seqlen;
  const float* g_s = ((w.n_iter[bi] & 1) ? s_buf1 : s_buf0) + tok * D;  // (D,)
  const float* g_hp = static_cast<const float*>(p.h_prev) + tok * D;    // (D,)
  const T* g_uvec = static_cast<const T*>(p.u) + tok * D;               // (D,)
  const T* g_lam = static_cast<const T*>(p.lam) + tok * D;              // (D,)
  const T* g_u = static_cast<const T*>(p.hh_u) + tok * R * D;           // (R, D)
  float a[kFpMaxR], ae[kFpMaxR];
#pragma unroll
  for (int i = 0; i < kFpMaxR; ++i) a[i] = ae[i] = 0.f;
  for (int64_t d = lane; d < D; d += 32) {
    const float v0 = to_float(g_uvec[d]) - g_hp[d];
    const float e = fixed_point_rnn_adjoint_pre(to_float(g_lam[d]), g_s[d]);
#pragma unroll
    for (int i = 0; i < kFpMaxR; ++i) {
      if (i < R) {
        const float ui = to_float(g_u[i * D + d]);
        a[i] += ui * v0;
        ae[i] += ui * e;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kFpMaxR; ++i) {
    if (i < R) a[i] = warp_sum(a[i]), ae[i] = warp_sum(ae[i]);
  }
  float beta[kFpMaxR], c[kFpMaxR], k[kFpMaxR], dd[kFpMaxR], kk[kFpMaxR];
  load_betas<T>(p, tok, beta);
  householder_chain_fwd(R, beta, a, w.gram + tok * R * R, c, k);
  householder_chain_bwd(R, beta, ae, w.gram + tok * R * R, dd, kk);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < kFpMaxR; ++i) {
      if (i < R) static_cast<T*>(p.dhh_beta)[tok * R + i] = from_float<T>(householder_grad_beta(c[i], dd[i]));
    }
  }
  T* g_du = static_cast<T*>(p.du) + tok * D;
  T* g_dlam = static_cast<T*>(p.dlam) + tok * D;
  T* g_dhh_u = static_cast<T*>(p.dhh_u) + tok * R * D;
  for (int64_t d = lane; d < D; d += 32) {
    float ud[kFpMaxR], dud[kFpMaxR];
#pragma unroll
    for (int i = 0; i < kFpMaxR; ++i) ud[i] = i < R ? to_float(g_u[i * D + d]) : 0.f;
    const float uvec = to_float(g_uvec[d]), lam = to_float(g_lam[d]), s = g_s[d];
    const float x_tilde = uvec - householder_mix(R, k, ud);
    float h_before = t > 0 ? h_new[(tok - 1) * D + d] : 0.f;
    if constexpr (kVariant) {
      if (t == 0 && p.h0 != nullptr) {
        h_before = to_float(static_cast<const T*>(p.h0)[bi * D + d]);
        static_cast<T*>(p.dh0)[bi * D + d] = from_float<T>(lam * s);
      }
    }
    g_dlam[d] = from_float<T>(fixed_point_rnn_grad_lam(s, h_before, x_tilde));
    const float e = fixed_point_rnn_adjoint_pre(lam, s);
    g_du[d] = from_float<T>(householder_vjp_channel(R, ud, beta, c, k, dd, kk, uvec - g_hp[d], e, dud));
#pragma unroll
    for (int i = 0; i < kFpMaxR; ++i) {
      if (i < R) g_dhh_u[i * D + d] = from_float<T>(dud[i]);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(32 * kFpWarpsPerBlock)
    linmix_fixed_point_rnn_bwd_grads_kernel(FixedPointRnnParams p, FixedPointRnnWork w, const float* s_buf0,
                                        const float* s_buf1, const float* h_new) {
  fixed_point_rnn_grads<T, false>(p, w, s_buf0, s_buf1, h_new, {});
}

template <typename T>
__global__ void __launch_bounds__(32 * kFpWarpsPerBlock)
    linmix_fixed_point_rnn_variants_bwd_grads_kernel(FixedPointRnnParams p, FixedPointRnnWork w, const float* s_buf0,
                                                     const float* s_buf1, const float* h_new, Varlen varlen) {
  fixed_point_rnn_grads<T, true>(p, w, s_buf0, s_buf1, h_new, varlen);
}

// Launches one adjoint iteration (transposed mix then reverse scan) on s.
template <typename T>
void fixed_point_rnn_launch_adjoint_iter(const FixedPointRnnParams& p, const FixedPointRnnWork& w,
                                         const FixedPointRnnIter& it, cudaStream_t stream) {
  fixed_point_rnn_launch_pair(linmix_fixed_point_rnn_bwd_mix_kernel<T>,
                              linmix_fixed_point_rnn_bwd_scan_kernel<FixedPointRnnScanTraits, T>, p, w, it, stream);
}

template <DType dt>
void fixed_point_rnn_bwd_cuda(const FixedPointRnnParams& p, cudaStream_t stream) {
  using T = cuda_t<dt>;
  const int64_t BTD = p.batch * p.seqlen * p.dim;
  if (BTD == 0) return;
  const FixedPointRnnWorkspace ws = fixed_point_rnn_workspace(p, /*backward=*/true);
  const FixedPointRnnWork w = fixed_point_rnn_work(p, ws);
  float* f = static_cast<float*>(p.work);
  float* s_buf[2] = {f + ws.state, f + ws.state + BTD};
  float* h_new = f + ws.h_new;
  fixed_point_rnn_reset(p, ws, stream);
  LINMIX_CUDA_CHECK(cudaMemsetAsync(s_buf[0], 0, BTD * sizeof(float), stream));  // s^0 = 0
  fixed_point_rnn_launch_gram<T>(p, w, stream);
  // h = f(h_prev) for every element (h_{t-1} enters dlam).
  fixed_point_rnn_launch_iter<T>(
      p, w, FixedPointRnnIter{static_cast<const float*>(p.h_prev), h_new, 0, false}, stream);
  for (int l = 1; l <= p.max_iter; ++l) {
    fixed_point_rnn_launch_adjoint_iter<T>(p, w, FixedPointRnnIter{s_buf[(l - 1) & 1], s_buf[l & 1], l, true}, stream);
  }
  const dim3 tok_blocks = fixed_point_rnn_token_grid(p);
  launch_kernel(linmix_fixed_point_rnn_bwd_grads_kernel<T>, tok_blocks, 32 * kFpWarpsPerBlock, 0, stream, p, w,
                s_buf[0], s_buf[1], h_new);
}

// The variants (initial state, damping, packed sequences): h0 in the recomputed forward and in dlam, dh0, the damped
// adjoint iteration, and with damping one more untracked adjoint iteration from each element's last input, so that
// s is the undamped adjoint map of it as on the CPU.
template <DType dt>
void fixed_point_rnn_variants_bwd_cuda(const FixedPointRnnVarlenParams& p, cudaStream_t stream) {
  using T = cuda_t<dt>;
  const bool packed = p.varlen.packed();
  const int64_t BTD = fixed_point_rnn_tokens(p, packed) * p.dim;
  if (BTD == 0 || p.batch == 0) return;  // no sequence: malformed offsets (raised by an async assert)
  const FixedPointRnnWorkspace ws = fixed_point_rnn_workspace(p, /*backward=*/true, packed);
  const FixedPointRnnWork w = fixed_point_rnn_work(p, ws);
  float* f = static_cast<float*>(p.work);
  float* s_buf[2] = {f + ws.state, f + ws.state + BTD};
  float* h_new = f + ws.h_new;
  fixed_point_rnn_reset(p, ws, stream, packed);
  LINMIX_CUDA_CHECK(cudaMemsetAsync(s_buf[0], 0, BTD * sizeof(float), stream));  // s^0 = 0
  fixed_point_rnn_launch_gram<T>(p, w, stream, packed);
  FixedPointRnnVariantWork v;
  v.varlen = p.varlen;
  fixed_point_rnn_launch_variant_pair(linmix_fixed_point_rnn_variants_fwd_mix_kernel<T>,
                                      linmix_fixed_point_rnn_variants_fwd_scan_kernel<FixedPointRnnScanTraits, T>, p,
                                      w, FixedPointRnnIter{static_cast<const float*>(p.h_prev), h_new, 0, false}, v,
                                      stream);
  const auto mix = linmix_fixed_point_rnn_variants_bwd_mix_kernel<T>;
  const auto scan = linmix_fixed_point_rnn_variants_bwd_scan_kernel<FixedPointRnnScanTraits, T>;
  for (int l = 1; l <= p.max_iter; ++l) {
    fixed_point_rnn_launch_variant_pair(mix, scan, p, w, FixedPointRnnIter{s_buf[(l - 1) & 1], s_buf[l & 1], l, true},
                                        v, stream);
  }
  if (p.damping != 1.0) {
    FixedPointRnnVariantWork by_count = v;
    by_count.by_count[0] = s_buf[0], by_count.by_count[1] = s_buf[1];
    fixed_point_rnn_launch_variant_pair(mix, scan, p, w, FixedPointRnnIter{nullptr, nullptr, 0, false}, by_count,
                                        stream);
  }
  const dim3 tok_blocks = fixed_point_rnn_token_grid(p, packed);
  launch_kernel(linmix_fixed_point_rnn_variants_bwd_grads_kernel<T>, tok_blocks, 32 * kFpWarpsPerBlock, 0, stream, p,
                w, s_buf[0], s_buf[1], h_new, p.varlen);
}

}  // namespace linmix
