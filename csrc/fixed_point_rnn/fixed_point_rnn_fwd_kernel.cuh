// CUDA fixed-point RNN forward kernels: Gram matrices, the forward iteration (mix, scan) and the final
// select. The iteration scheme is described in fixed_point_rnn_kernel_common.cuh.
#pragma once

#include "fixed_point_rnn/fixed_point_rnn_kernel_common.cuh"

namespace linmix {

// G_ij = u_i · u_j per token. grid: ceil(B T / 8); block: 256 (a warp per token).
template <typename T>
__global__ void __launch_bounds__(32 * kFpWarpsPerBlock) linmix_fixed_point_rnn_fwd_gram_kernel(FixedPointRnnParams p,
                                                                                            float* gram) {
  const int64_t tok = warp_token(p);
  if (tok < 0) return;
  const int lane = threadIdx.x % 32, R = static_cast<int>(p.rank);
  const int64_t D = p.dim;
  const T* g_u = static_cast<const T*>(p.hh_u) + tok * R * D;  // (R, D)
  float* g_gram = gram + tok * R * R;                          // (R, R)
  for (int i = 0; i < R; ++i) {
    float acc[kFpMaxR];
#pragma unroll
    for (int j = 0; j < kFpMaxR; ++j) acc[j] = 0.f;
    for (int64_t d = lane; d < D; d += 32) {
      const float ui = to_float(g_u[i * D + d]);
#pragma unroll
      for (int j = 0; j < kFpMaxR; ++j) {
        if (j <= i) acc[j] += ui * to_float(g_u[j * D + d]);
      }
    }
#pragma unroll
    for (int j = 0; j < kFpMaxR; ++j) {
      if (j <= i) {
        const float v = warp_sum(acc[j]);
        if (lane == 0) g_gram[i * R + j] = g_gram[j * R + i] = v;
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(32 * kFpWarpsPerBlock)
    linmix_fixed_point_rnn_fwd_mix_kernel(FixedPointRnnParams p, FixedPointRnnWork w, FixedPointRnnIter it) {
  fixed_point_rnn_mix<T, false>(p, w, it);
}

template <typename Traits, typename T>
__global__ void __launch_bounds__(Traits::kThreads)
    linmix_fixed_point_rnn_fwd_scan_kernel(FixedPointRnnParams p, FixedPointRnnWork w, FixedPointRnnIter it) {
  fixed_point_rnn_scan<Traits, T, false>(p, w, it);
}

// h = buf[n & 1] in the activation dtype; h_prev = buf[(n - 1) & 1], where buf[0] is h_prev itself.
// Grid-stride over B T D.
template <typename T>
__global__ void linmix_fixed_point_rnn_fwd_select_kernel(FixedPointRnnParams p, const float* buf1) {
  const int64_t TD = p.seqlen * p.dim, n = p.batch * TD;
  float* buf0 = static_cast<float*>(p.h_prev);
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const bool last_in_buf1 = p.n_iter[idx / TD] & 1;
    const float h1 = buf1[idx];
    static_cast<T*>(p.h)[idx] = from_float<T>(last_in_buf1 ? h1 : buf0[idx]);
    if (!last_in_buf1) buf0[idx] = h1;
  }
}

}  // namespace linmix
