// CUDA linear_scan forward (the backward, linear_scan_bwd_kernel.cuh, shares the layout).
//
// Layout choice: inputs are channel-last (B, T, D), so a warp's 32 lanes take 32 consecutive channels
// and every load/store of a time step is one coalesced row. The time axis is split across the warps
// of the block: warp w owns kItems consecutive steps of the current chunk and scans them in registers;
// the per-warp (prod a, h) aggregates are combined through shared memory, and a running carry per
// channel crosses chunks. Lanes never need to exchange data (they hold different channels), so the
// cross-step combine is the shared-memory pass, not shuffles (block_chunk_scan, common/channel_scan.cuh).
#pragma once

#include <cuda_runtime.h>

#include "common/channel_scan.cuh"
#include "common/cuda_check.h"
#include "common/cuda_utils.cuh"
#include "common/dtype.h"
#include "common/math.h"
#include "linear_scan/params.h"

namespace linmix {

// grid: (B, ceil(D / 32)); block: Traits::kThreads.
template <typename Traits, typename T>
__global__ void __launch_bounds__(Traits::kThreads) linmix_linear_scan_fwd_kernel(LinearScanParams p) {
  LINMIX_SHARED(ScanPair<float>, s_agg, [Traits::kNWarps * 32]);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t bi = blockIdx.x;
  const int64_t d = int64_t(blockIdx.y) * 32 + lane;
  const bool active = d < p.dim;
  float carry = (active && p.h0) ? static_cast<const float*>(p.h0)[bi * p.dim + d] : 0.f;
  for (int64_t c0 = 0; c0 < p.seqlen; c0 += Traits::kChunk) {
    float r_a[Traits::kItems], r_b[Traits::kItems];
#pragma unroll
    for (int k = 0; k < Traits::kItems; ++k) {
      const int64_t s = c0 + warp * Traits::kItems + k;
      const bool ok = active && s < p.seqlen;
      const int64_t t = scan_time(s, p.seqlen, p.reverse);
      r_a[k] = ok ? to_float(p.a.at<const T>(bi, t)[d]) : 1.f;  // identity step past the end
      r_b[k] = ok ? to_float(p.b.at<const T>(bi, t)[d]) : 0.f;
    }
    block_chunk_scan<Traits>(r_a, r_b, carry, s_agg);
#pragma unroll
    for (int k = 0; k < Traits::kItems; ++k) {
      const int64_t s = c0 + warp * Traits::kItems + k;
      if (active && s < p.seqlen) p.h.at<T>(bi, scan_time(s, p.seqlen, p.reverse))[d] = from_float<T>(r_b[k]);
    }
  }
}

// Packed sequences (KernelFamily::kLinearScanVarlen): the dense kernel's scan on the span of sequence blockIdx.x in
// row 0 (common/varlen.h). The dense kernel keeps its own code: its SASS is GPU-verified. grid: (N, ceil(D / 32)).
template <typename Traits, typename T>
__global__ void __launch_bounds__(Traits::kThreads) linmix_linear_scan_varlen_fwd_kernel(LinearScanParams p) {
  LINMIX_SHARED(ScanPair<float>, s_agg, [Traits::kNWarps * 32]);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t n = blockIdx.x;
  const int64_t d = int64_t(blockIdx.y) * 32 + lane;
  const bool active = d < p.dim;
  float carry = (active && p.h0) ? static_cast<const float*>(p.h0)[n * p.dim + d] : 0.f;
  const SeqSpan seq = p.varlen.span(n, p.seqlen);
  const int64_t bi = seq.batch, L = seq.len;
  for (int64_t c0 = 0; c0 < L; c0 += Traits::kChunk) {
    float r_a[Traits::kItems], r_b[Traits::kItems];
#pragma unroll
    for (int k = 0; k < Traits::kItems; ++k) {
      const int64_t s = c0 + warp * Traits::kItems + k;
      const bool ok = active && s < L;
      const int64_t t = seq.begin + scan_time(s, L, p.reverse);
      r_a[k] = ok ? to_float(p.a.at<const T>(bi, t)[d]) : 1.f;  // identity step past the end
      r_b[k] = ok ? to_float(p.b.at<const T>(bi, t)[d]) : 0.f;
    }
    block_chunk_scan<Traits>(r_a, r_b, carry, s_agg);
#pragma unroll
    for (int k = 0; k < Traits::kItems; ++k) {
      const int64_t s = c0 + warp * Traits::kItems + k;
      if (active && s < L) p.h.at<T>(bi, seq.begin + scan_time(s, L, p.reverse))[d] = from_float<T>(r_b[k]);
    }
  }
}

template <DType dt>
void linear_scan_fwd_cuda(const LinearScanParams& p, cudaStream_t stream) {
  using Traits = ChannelScanDefaultTraits;
  if (p.batch == 0 || p.dim == 0) return;
  const dim3 grid = checked_grid("linear_scan", "(B, ceil(D / 32))", p.batch, ceil_div(p.dim, 32));
  if (p.varlen.packed())
    launch_kernel(linmix_linear_scan_varlen_fwd_kernel<Traits, cuda_t<dt>>, grid, Traits::kThreads, 0, stream, p);
  else
    launch_kernel(linmix_linear_scan_fwd_kernel<Traits, cuda_t<dt>>, grid, Traits::kThreads, 0, stream, p);
}

}  // namespace linmix
