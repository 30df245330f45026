// CUDA fixed-point RNN forward: the Gram, forward iteration (mix, scan) and final select kernels, and the
// launcher fixed_point_rnn_fwd_cuda (the host loop over iterations). The scheme: fixed_point_rnn_kernel_common.cuh.
#pragma once

#include <algorithm>

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

template <typename T>
void fixed_point_rnn_launch_gram(const FixedPointRnnParams& p, const FixedPointRnnWork& w, cudaStream_t stream) {
  const dim3 tok_blocks = fixed_point_rnn_token_grid(p);
  launch_kernel(linmix_fixed_point_rnn_fwd_gram_kernel<T>, tok_blocks, 32 * kFpWarpsPerBlock, 0, stream, p, w.gram);
}

// Launches one forward iteration (mix then scan): h = f(src).
template <typename T>
void fixed_point_rnn_launch_iter(const FixedPointRnnParams& p, const FixedPointRnnWork& w,
                                 const FixedPointRnnIter& it, cudaStream_t stream) {
  fixed_point_rnn_launch_pair(linmix_fixed_point_rnn_fwd_mix_kernel<T>,
                              linmix_fixed_point_rnn_fwd_scan_kernel<FixedPointRnnScanTraits, T>, p, w, it, stream);
}

template <DType dt>
void fixed_point_rnn_fwd_cuda(const FixedPointRnnParams& p, cudaStream_t stream) {
  using T = cuda_t<dt>;
  const int64_t BTD = p.batch * p.seqlen * p.dim;
  if (BTD == 0) return;
  const FixedPointRnnWorkspace ws = fixed_point_rnn_workspace(p, /*backward=*/false);
  FixedPointRnnWork w = fixed_point_rnn_work(p, ws);
  w.n_iter = p.n_iter, w.residual = p.residual;
  float* buf[2] = {static_cast<float*>(p.h_prev), static_cast<float*>(p.work) + ws.state};
  fixed_point_rnn_reset(p, ws, stream);
  LINMIX_CUDA_CHECK(cudaMemsetAsync(buf[0], 0, BTD * sizeof(float), stream));  // h^0 = 0
  fixed_point_rnn_launch_gram<T>(p, w, stream);
  for (int l = 1; l <= p.max_iter; ++l) {
    fixed_point_rnn_launch_iter<T>(p, w, FixedPointRnnIter{buf[(l - 1) & 1], buf[l & 1], l, true}, stream);
  }
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(BTD, 256), 65536));
  launch_kernel(linmix_fixed_point_rnn_fwd_select_kernel<T>, blocks, 256, 0, stream, p, buf[1]);
}

}  // namespace linmix
