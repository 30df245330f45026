// CUDA fixed-point RNN launchers (fixed_point_rnn_{fwd,bwd}_cuda, declared in fixed_point_rnn_cuda.h): the
// workspace views, the per-call reset and the host loop over iterations.
#pragma once

#include <algorithm>

#include "fixed_point_rnn/fixed_point_rnn_bwd_kernel.cuh"
#include "fixed_point_rnn/fixed_point_rnn_fwd_kernel.cuh"

namespace linmix {

inline FixedPointRnnWork fixed_point_rnn_work(const FixedPointRnnParams& p, const FixedPointRnnWorkspace& ws) {
  float* f = static_cast<float*>(p.work);
  int* flags = static_cast<int*>(p.flags);
  FixedPointRnnWork w;
  w.gram = f + ws.gram, w.coef = f + ws.coef;
  w.tok_diff = reinterpret_cast<unsigned int*>(f + ws.tok_diff);
  w.tok_norm = reinterpret_cast<unsigned int*>(f + ws.tok_norm);
  w.done = flags + ws.done, w.counter = flags + ws.counter, w.n_iter = flags + ws.n_iter;
  w.residual = f + ws.residual;
  return w;
}

// Zeroed per call: the per-token maxima, the flags and counters (and the given state buffer).
inline void fixed_point_rnn_reset(const FixedPointRnnParams& p, const FixedPointRnnWorkspace& ws,
                                  cudaStream_t stream) {
  const int64_t BT = p.batch * p.seqlen;
  float* f = static_cast<float*>(p.work);
  LINMIX_CUDA_CHECK(cudaMemsetAsync(f + ws.tok_diff, 0, 2 * BT * sizeof(float), stream));  // tok_diff, tok_norm
  LINMIX_CUDA_CHECK(cudaMemsetAsync(p.flags, 0, ws.flag_ints * sizeof(int), stream));
}

// Grid of the token-per-warp kernels (gram, mix, grads).
inline dim3 fixed_point_rnn_token_grid(const FixedPointRnnParams& p) {
  return checked_grid("fixed_point_rnn", "(ceil(B T / 8))", ceil_div(p.batch * p.seqlen, kFpWarpsPerBlock));
}

// Launches one iteration (mix then scan) of direction kAdjoint.
template <typename T, bool kAdjoint>
void fixed_point_rnn_launch_iter(const FixedPointRnnParams& p, const FixedPointRnnWork& w,
                                 const FixedPointRnnIter& it, cudaStream_t stream) {
  using Traits = FixedPointRnnScanTraits;
  const dim3 tok_blocks = fixed_point_rnn_token_grid(p);
  const dim3 scan_grid = checked_grid("fixed_point_rnn", "(B, ceil(D / 32))", p.batch, ceil_div(p.dim, 32));
  if constexpr (kAdjoint) {
    linmix_fixed_point_rnn_bwd_mix_kernel<T><<<tok_blocks, 32 * kFpWarpsPerBlock, 0, stream>>>(p, w, it);
    LINMIX_CHECK_LAUNCH();
    linmix_fixed_point_rnn_bwd_scan_kernel<Traits, T><<<scan_grid, Traits::kThreads, 0, stream>>>(p, w, it);
    LINMIX_CHECK_LAUNCH();
  } else {
    linmix_fixed_point_rnn_fwd_mix_kernel<T><<<tok_blocks, 32 * kFpWarpsPerBlock, 0, stream>>>(p, w, it);
    LINMIX_CHECK_LAUNCH();
    linmix_fixed_point_rnn_fwd_scan_kernel<Traits, T><<<scan_grid, Traits::kThreads, 0, stream>>>(p, w, it);
    LINMIX_CHECK_LAUNCH();
  }
}

template <typename T>
void fixed_point_rnn_launch_gram(const FixedPointRnnParams& p, const FixedPointRnnWork& w, cudaStream_t stream) {
  const dim3 tok_blocks = fixed_point_rnn_token_grid(p);
  linmix_fixed_point_rnn_fwd_gram_kernel<T><<<tok_blocks, 32 * kFpWarpsPerBlock, 0, stream>>>(p, w.gram);
  LINMIX_CHECK_LAUNCH();
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
    fixed_point_rnn_launch_iter<T, false>(p, w, FixedPointRnnIter{buf[(l - 1) & 1], buf[l & 1], l, true}, stream);
  }
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(BTD, 256), 65536));
  linmix_fixed_point_rnn_fwd_select_kernel<T><<<blocks, 256, 0, stream>>>(p, buf[1]);
  LINMIX_CHECK_LAUNCH();
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
  fixed_point_rnn_launch_iter<T, false>(
      p, w, FixedPointRnnIter{static_cast<const float*>(p.h_prev), h_new, 0, false}, stream);
  for (int l = 1; l <= p.max_iter; ++l) {
    fixed_point_rnn_launch_iter<T, true>(p, w, FixedPointRnnIter{s_buf[(l - 1) & 1], s_buf[l & 1], l, true}, stream);
  }
  const dim3 tok_blocks = fixed_point_rnn_token_grid(p);
  linmix_fixed_point_rnn_bwd_grads_kernel<T><<<tok_blocks, 32 * kFpWarpsPerBlock, 0, stream>>>(p, w, s_buf[0],
                                                                                               s_buf[1], h_new);
  LINMIX_CHECK_LAUNCH();
}

}  // namespace linmix
