// Phase 2 of the chunk-parallel chunk_gla, both directions (dtype-free: the states are fp32).
#include "common/cuda_check.h"
#include "gla/gla_chunkpar_common.cuh"

namespace linmix {
namespace {

// One state element's pass over the chunks of one (batch, head); one thread per (batch * head, state element).
// Forward: states[n] <- state entering chunk n and h <- exp2(gate_sum[n]) h + local[n] (local read from states[n]),
// starting from h0; the final state into states[N] and ht. Reverse: dstates[n] <- gradient of the state leaving
// chunk n and dh <- exp2(gate_sum[n]) dh + local[n], starting from dht; the last carried value into dh0.
template <bool kReverse>
__device__ __forceinline__ void chunkpar_scan_element(const GlaParams& p, const GlaChunkparWorkspace& ws) {
  const int64_t KV = p.dim_k * p.dim_v, gidx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (gidx >= p.batch * p.heads * KV) return;
  const int64_t bh = gidx / KV, idx = gidx % KV, N = gla_chunkpar_n_chunks(p.seqlen);
  const int K = static_cast<int>(p.dim_k), c = static_cast<int>(idx / p.dim_v);
  const float* init = static_cast<const float*>(kReverse ? p.dht : p.h0);
  float* store = kReverse ? ws.dstates + bh * N * KV : ws.states + bh * (N + 1) * KV;
  const float* gsum = ws.gate_sums + bh * N * K;
  float carry = init ? init[bh * KV + idx] : 0.f;
  for (int64_t step = 0; step < N; ++step) {
    const int64_t n = kReverse ? N - 1 - step : step;
    const float local = store[n * KV + idx];
    store[n * KV + idx] = carry;
    carry = gla_exp2(gsum[n * K + c]) * carry + local;
  }
  if (kReverse) {
    static_cast<float*>(p.dh0)[bh * KV + idx] = carry;
  } else {
    store[N * KV + idx] = carry;
    if (p.ht) static_cast<float*>(p.ht)[bh * KV + idx] = carry;
  }
}

}  // namespace

// grid: ceil(B * H * K * V / kScanThreads); block: kScanThreads.
__global__ void __launch_bounds__(GlaParTraits::kScanThreads)
    linmix_gla_chunkpar_fwd_scan_kernel(GlaParams p, GlaChunkparWorkspace ws) {
  chunkpar_scan_element<false>(p, ws);
}

// grid and block as the forward scan.
__global__ void __launch_bounds__(GlaParTraits::kScanThreads)
    linmix_gla_chunkpar_bwd_scan_kernel(GlaParams p, GlaChunkparWorkspace ws) {
  chunkpar_scan_element<true>(p, ws);
}

void chunkpar_gla_scan_cuda(const GlaParams& p, const GlaChunkparWorkspace& ws, bool reverse, cudaStream_t stream) {
  const dim3 grid =
      checked_grid("chunk_gla", "(ceil(B H K V / threads))", ceil_div(p.batch * p.heads * p.dim_k * p.dim_v, GlaParTraits::kScanThreads));
  launch_kernel(reverse ? linmix_gla_chunkpar_bwd_scan_kernel : linmix_gla_chunkpar_fwd_scan_kernel, grid,
                GlaParTraits::kScanThreads, 0, stream, p, ws);
}

}  // namespace linmix
