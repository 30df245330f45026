// CUDA linear_scan backward: the reverse scan of the output gradient in the forward's layout
// (linear_scan_fwd_kernel.cuh).
#pragma once

#include <cuda_runtime.h>

#include "common/channel_scan.cuh"
#include "common/cuda_check.h"
#include "common/cuda_utils.cuh"
#include "common/dtype.h"
#include "common/math.h"
#include "linear_scan/params.h"

namespace linmix {

// Backward, scanning r = 0..T-1 over scan positions s = T-1-r:
//   g_s = dh_s + a_{s+1} g_{s+1};  da_s = g_s h_{s-1};  db_s = g_s;  dh0 = a_0 g_0.
// kOneWriter: warp 0 alone writes dh0. The GPU-verified instance (false) has every warp write it, all the same
// value: harmless on a GPU, but a write-write race by the memory model, which the CUDA emulator's ThreadSanitizer
// build reports. It stays the default until a GPU session verifies the true instance (common/kernels.h).
template <typename Traits, typename T, bool kOneWriter>
__global__ void __launch_bounds__(Traits::kThreads) linmix_linear_scan_bwd_kernel(LinearScanParams p) {
  LINMIX_SHARED(ScanPair<float>, s_agg, [Traits::kNWarps * 32]);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t bi = blockIdx.x;
  const int64_t d = int64_t(blockIdx.y) * 32 + lane;
  const bool active = d < p.dim;
  const int64_t L = p.seqlen;
  float carry = 0.f;
  for (int64_t c0 = 0; c0 < L; c0 += Traits::kChunk) {
    float r_a[Traits::kItems], r_g[Traits::kItems];
#pragma unroll
    for (int k = 0; k < Traits::kItems; ++k) {
      const int64_t s = L - 1 - (c0 + warp * Traits::kItems + k);
      const bool ok = active && s >= 0;
      // Past the start (s < 0) the step must be the identity (a = 1, dh = 0) so the carry survives to dh0;
      // at s = L - 1 there is no a_{s+1}, and the zero carry makes its coefficient irrelevant.
      r_a[k] = !ok ? 1.f : (s + 1 < L ? to_float(p.a.at<const T>(bi, scan_time(s + 1, L, p.reverse))[d]) : 0.f);
      r_g[k] = ok ? to_float(p.dh.at<const T>(bi, scan_time(s, L, p.reverse))[d]) : 0.f;
    }
    block_chunk_scan<Traits>(r_a, r_g, carry, s_agg);
#pragma unroll
    for (int k = 0; k < Traits::kItems; ++k) {
      const int64_t s = L - 1 - (c0 + warp * Traits::kItems + k);
      if (!active || s < 0) continue;
      const int64_t t = scan_time(s, L, p.reverse);
      const float h_prev = s > 0 ? to_float(p.h.at<const T>(bi, scan_time(s - 1, L, p.reverse))[d])
                                 : (p.h0 ? static_cast<const float*>(p.h0)[bi * p.dim + d] : 0.f);
      p.da.at<T>(bi, t)[d] = from_float<T>(r_g[k] * h_prev);
      p.db.at<T>(bi, t)[d] = from_float<T>(r_g[k]);
    }
  }
  // After the last chunk, carry = g at s = 0.
  if (active && L > 0 && (!kOneWriter || warp == 0)) {
    const float a0 = to_float(p.a.at<const T>(bi, scan_time(0, L, p.reverse))[d]);
    static_cast<float*>(p.dh0)[bi * p.dim + d] = a0 * carry;
  }
}

// Packed sequences (KernelFamily::kLinearScanVarlen): the dense kernel's reverse scan on the span of sequence
// blockIdx.x in row 0 (common/varlen.h), with one writer of dh0. The dense kernel keeps its own code: its SASS is
// GPU-verified. grid: (N, ceil(D / 32)).
template <typename Traits, typename T>
__global__ void __launch_bounds__(Traits::kThreads) linmix_linear_scan_varlen_bwd_kernel(LinearScanParams p) {
  LINMIX_SHARED(ScanPair<float>, s_agg, [Traits::kNWarps * 32]);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t n = blockIdx.x;
  const SeqSpan seq = p.varlen.span(n, p.seqlen);
  const int64_t bi = seq.batch, L = seq.len;
  const auto time = [&](int64_t s) { return seq.begin + scan_time(s, L, p.reverse); };
  const int64_t d = int64_t(blockIdx.y) * 32 + lane;
  const bool active = d < p.dim;
  float carry = 0.f;
  for (int64_t c0 = 0; c0 < L; c0 += Traits::kChunk) {
    float r_a[Traits::kItems], r_g[Traits::kItems];
#pragma unroll
    for (int k = 0; k < Traits::kItems; ++k) {
      const int64_t s = L - 1 - (c0 + warp * Traits::kItems + k);
      const bool ok = active && s >= 0;
      // Past the start (s < 0) the step must be the identity (a = 1, dh = 0) so the carry survives to dh0;
      // at s = L - 1 there is no a_{s+1}, and the zero carry makes its coefficient irrelevant.
      r_a[k] = !ok ? 1.f : (s + 1 < L ? to_float(p.a.at<const T>(bi, time(s + 1))[d]) : 0.f);
      r_g[k] = ok ? to_float(p.dh.at<const T>(bi, time(s))[d]) : 0.f;
    }
    block_chunk_scan<Traits>(r_a, r_g, carry, s_agg);
#pragma unroll
    for (int k = 0; k < Traits::kItems; ++k) {
      const int64_t s = L - 1 - (c0 + warp * Traits::kItems + k);
      if (!active || s < 0) continue;
      const int64_t t = time(s);
      const float h_prev = s > 0 ? to_float(p.h.at<const T>(bi, time(s - 1))[d])
                                 : (p.h0 ? static_cast<const float*>(p.h0)[n * p.dim + d] : 0.f);
      p.da.at<T>(bi, t)[d] = from_float<T>(r_g[k] * h_prev);
      p.db.at<T>(bi, t)[d] = from_float<T>(r_g[k]);
    }
  }
  // After the last chunk, carry = g at s = 0.
  if (active && L > 0 && warp == 0) {
    const float a0 = to_float(p.a.at<const T>(bi, time(0))[d]);
    static_cast<float*>(p.dh0)[n * p.dim + d] = a0 * carry;
  }
}

template <DType dt, bool kOneWriter>
void linear_scan_bwd_launch(const LinearScanParams& p, cudaStream_t stream) {
  using Traits = ChannelScanDefaultTraits;
  if (p.batch == 0 || p.dim == 0) return;
  const dim3 grid = checked_grid("linear_scan", "(B, ceil(D / 32))", p.batch, ceil_div(p.dim, 32));
  if (p.varlen.packed())
    launch_kernel(linmix_linear_scan_varlen_bwd_kernel<Traits, cuda_t<dt>>, grid, Traits::kThreads, 0, stream, p);
  else
    launch_kernel(linmix_linear_scan_bwd_kernel<Traits, cuda_t<dt>, kOneWriter>, grid, Traits::kThreads, 0, stream,
                  p);
}

template <DType dt>
void linear_scan_bwd_cuda(const LinearScanParams& p, cudaStream_t stream) {
  linear_scan_bwd_launch<dt, false>(p, stream);
}

template <DType dt>
void linear_scan_bwd_one_writer_cuda(const LinearScanParams& p, cudaStream_t stream) {
  linear_scan_bwd_launch<dt, true>(p, stream);
}

}  // namespace linmix
