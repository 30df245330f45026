// CUDA fixed-point RNN forward: the Gram, forward iteration (mix, scan) and final select kernels, and the
// launcher fixed_point_rnn_fwd_cuda (the host loop over iterations). The scheme: fixed_point_rnn_kernel_common.cuh.
#pragma once

#include <cfloat>

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

// The variants' iteration kernels (fixed_point_rnn_variants family).
template <typename T>
__global__ void __launch_bounds__(32 * kFpWarpsPerBlock)
    linmix_fixed_point_rnn_variants_fwd_mix_kernel(FixedPointRnnParams p, FixedPointRnnWork w, FixedPointRnnIter it,
                                                   FixedPointRnnVariantWork v) {
  fixed_point_rnn_mix<T, false, true>(p, w, it, v);
}

template <typename Traits, typename T>
__global__ void __launch_bounds__(Traits::kThreads)
    linmix_fixed_point_rnn_variants_fwd_scan_kernel(FixedPointRnnParams p, FixedPointRnnWork w, FixedPointRnnIter it,
                                                    FixedPointRnnVariantWork v) {
  fixed_point_rnn_scan<Traits, T, false, true>(p, w, it, v);
}

// stopping="batch", after each iteration: every element is done once the p.batch_quantile quantile of the
// residuals is below tol (fixed_point_rnn_common.h's rule). The k-th smallest key is the one with k keys before
// it in (key, index) order. grid: 1; block: 256.
template <typename T>
__global__ void __launch_bounds__(256) linmix_fixed_point_rnn_variants_fwd_quantile_kernel(FixedPointRnnParams p,
                                                                                        FixedPointRnnWork w) {
  LINMIX_SHARED(float, s_ends, [2]);
  const int64_t B = p.batch;
  if (w.done[0]) return;  // the batch stopped together earlier (uniform)
  const double pos = fixed_point_rnn_quantile_pos(p.batch_quantile, B);
  const int64_t lo = static_cast<int64_t>(pos), hi = lo + 1 < B ? lo + 1 : lo;
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) {
    const float key = fixed_point_rnn_quantile_key(w.residual[i], FLT_MAX);
    int64_t rank = 0;
    for (int64_t j = 0; j < B; ++j) {
      const float other = fixed_point_rnn_quantile_key(w.residual[j], FLT_MAX);
      rank += other < key || (other == key && j < i);
    }
    if (rank == lo) s_ends[0] = key;
    if (rank == hi) s_ends[1] = key;
  }
  __syncthreads();
  const bool met = fixed_point_rnn_quantile_lerp(s_ends[0], s_ends[1], pos) < static_cast<float>(p.tol);
  if (!met) return;
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) w.done[i] = 1;
}

// stopping="causal", after the loop: each element's last input iterate buf[(n - 1) & 1] takes the records of its
// stopped tokens, so that it is h_prev. Grid-stride over B T D.
template <typename T>
__global__ void linmix_fixed_point_rnn_variants_fwd_restore_kernel(FixedPointRnnParams p, FixedPointRnnWork w,
                                                                  FixedPointRnnVariantWork v, float* buf0,
                                                                  float* buf1) {
  const int64_t n = fixed_point_rnn_tokens(p, v.varlen.packed()) * p.dim;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t tok = idx / p.dim, bi = variant_element(p, v.varlen, tok);
    if (tok - v.varlen.span(bi, p.seqlen).first(p.seqlen) < v.frozen[bi]) ((w.n_iter[bi] - 1) & 1 ? buf1 : buf0)[idx] = v.record[idx];
  }
}

// h = buf[n & 1] in the activation dtype; h_prev = buf[(n - 1) & 1], where buf[0] is h_prev itself.
// Grid-stride over B T D.
template <typename T, bool kVariant>
__device__ __forceinline__ void fixed_point_rnn_select(const FixedPointRnnParams& p, const float* buf1,
                                                       const Varlen& varlen) {
  const int64_t TD = p.seqlen * p.dim, n = kVariant ? fixed_point_rnn_tokens(p, varlen.packed()) * p.dim : p.batch * TD;
  float* buf0 = static_cast<float*>(p.h_prev);
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const bool last_in_buf1 = p.n_iter[kVariant ? variant_element(p, varlen, idx / p.dim) : idx / TD] & 1;
    const float h1 = buf1[idx];
    static_cast<T*>(p.h)[idx] = from_float<T>(last_in_buf1 ? h1 : buf0[idx]);
    if (!last_in_buf1) buf0[idx] = h1;
  }
}

template <typename T>
__global__ void linmix_fixed_point_rnn_fwd_select_kernel(FixedPointRnnParams p, const float* buf1) {
  fixed_point_rnn_select<T, false>(p, buf1, {});
}

template <typename T>
__global__ void linmix_fixed_point_rnn_variants_fwd_select_kernel(FixedPointRnnParams p, const float* buf1,
                                                                 Varlen varlen) {
  fixed_point_rnn_select<T, true>(p, buf1, varlen);
}

// The Gram kernel walks the B T tokens of p's rows: a packed call's are one row of T (batch 1 here).
template <typename T>
void fixed_point_rnn_launch_gram(const FixedPointRnnParams& p, const FixedPointRnnWork& w, cudaStream_t stream,
                                 bool packed = false) {
  FixedPointRnnParams rows = p;
  rows.batch = packed ? 1 : p.batch;
  const dim3 tok_blocks = fixed_point_rnn_token_grid(rows);
  launch_kernel(linmix_fixed_point_rnn_fwd_gram_kernel<T>, tok_blocks, 32 * kFpWarpsPerBlock, 0, stream, rows, w.gram);
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
  launch_kernel(linmix_fixed_point_rnn_fwd_select_kernel<T>, fixed_point_rnn_flat_blocks(BTD), 256, 0, stream, p,
                buf[1]);
}

// The variants (initial state, damping, stopping "batch" and "causal", packed sequences): the same loop with the
// variant kernels, a quantile launch per iteration for "batch", and, where the last iterate is not f(h_prev)
// (damping, causal records), one more untracked iteration from each element's h_prev before the select.
template <DType dt>
void fixed_point_rnn_variants_fwd_cuda(const FixedPointRnnVarlenParams& p, cudaStream_t stream) {
  using T = cuda_t<dt>;
  const bool packed = p.varlen.packed();
  const int64_t BTD = fixed_point_rnn_tokens(p, packed) * p.dim;
  if (BTD == 0 || p.batch == 0) return;  // no sequence: malformed offsets (raised by an async assert)
  const FixedPointRnnWorkspace ws = fixed_point_rnn_workspace(p, /*backward=*/false, packed);
  FixedPointRnnWork w = fixed_point_rnn_work(p, ws);
  w.n_iter = p.n_iter, w.residual = p.residual;
  float* buf[2] = {static_cast<float*>(p.h_prev), static_cast<float*>(p.work) + ws.state};
  FixedPointRnnVariantWork v;
  v.varlen = p.varlen;
  v.record = static_cast<float*>(p.work) + ws.record;
  v.frozen = static_cast<int*>(p.flags) + ws.frozen;
  fixed_point_rnn_reset(p, ws, stream, packed);
  LINMIX_CUDA_CHECK(cudaMemsetAsync(buf[0], 0, BTD * sizeof(float), stream));  // h^0 = 0
  fixed_point_rnn_launch_gram<T>(p, w, stream, packed);
  const auto mix = linmix_fixed_point_rnn_variants_fwd_mix_kernel<T>;
  const auto scan = linmix_fixed_point_rnn_variants_fwd_scan_kernel<FixedPointRnnScanTraits, T>;
  for (int l = 1; l <= p.max_iter; ++l) {
    fixed_point_rnn_launch_variant_pair(mix, scan, p, w, FixedPointRnnIter{buf[(l - 1) & 1], buf[l & 1], l, true}, v,
                                        stream);
    if (p.batch_quantile >= 0 && l < p.max_iter) {
      launch_kernel(linmix_fixed_point_rnn_variants_fwd_quantile_kernel<T>, 1, 256, 0, stream, p, w);
    }
  }
  if (p.causal) {
    launch_kernel(linmix_fixed_point_rnn_variants_fwd_restore_kernel<T>, fixed_point_rnn_flat_blocks(BTD), 256, 0,
                  stream, p, w, v, buf[0], buf[1]);
  }
  if (p.causal || p.damping != 1.0) {
    FixedPointRnnVariantWork by_count = v;
    by_count.by_count[0] = buf[0], by_count.by_count[1] = buf[1];
    fixed_point_rnn_launch_variant_pair(mix, scan, p, w, FixedPointRnnIter{nullptr, nullptr, 0, false}, by_count,
                                        stream);
  }
  launch_kernel(linmix_fixed_point_rnn_variants_fwd_select_kernel<T>, fixed_point_rnn_flat_blocks(BTD), 256, 0,
                stream, p, buf[1], p.varlen);
}

}  // namespace linmix
