// Phase 2 of the chunk-parallel chunk_gla, both directions (dtype-free: the states are fp32).
#include "common/cuda_check.h"
#include "gla/gla_chunkpar_common.cuh"

namespace linmix {
namespace {

// One state element's pass over the chunks of one (batch, head). Forward: store[n] <- state entering chunk n
// and h <- exp2(gate_sum[n]) h + local[n] (local read from store[n]). Reverse: store[n] <- gradient of the state
// leaving chunk n and dh <- exp2(gate_sum[n]) dh + local[n]. Returns the last carried value.
// store: (N [+1], K, V) of this head; gsum: (N, K) of this head; idx = c * V + e.
template <bool kReverse>
__device__ float chunkpar_scan(float* store, const float* gsum, int64_t n_chunks, int64_t KV, int K, int64_t idx, int c,
                               float carry) {
  for (int64_t step = 0; step < n_chunks; ++step) {
    const int64_t n = kReverse ? n_chunks - 1 - step : step;
    const float local = store[n * KV + idx];
    store[n * KV + idx] = carry;
    carry = gla_exp2(gsum[n * K + c]) * carry + local;
  }
  return carry;
}

}  // namespace

// grid: ceil(B * H * K * V / kScanThreads); block: kScanThreads; one thread per (batch * head, state element).
__global__ void __launch_bounds__(GlaParTraits::kScanThreads)
    linmix_gla_chunkpar_fwd_scan_kernel(GlaParams p, GlaChunkparWorkspace ws) {
  const int64_t KV = p.dim_k * p.dim_v, gidx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (gidx >= p.batch * p.heads * KV) return;
  const int64_t bh = gidx / KV, idx = gidx % KV;
  const int64_t N = gla_chunkpar_n_chunks(p.seqlen);
  const int K = static_cast<int>(p.dim_k), c = static_cast<int>(idx / p.dim_v);
  const float h0 = p.h0 ? static_cast<const float*>(p.h0)[bh * KV + idx] : 0.f;
  float* store = ws.states + bh * (N + 1) * KV;
  const float h = chunkpar_scan<false>(store, ws.gate_sums + bh * N * K, N, KV, K, idx, c, h0);
  store[N * KV + idx] = h;
  if (p.ht) static_cast<float*>(p.ht)[bh * KV + idx] = h;
}

// grid and block as the forward scan.
__global__ void __launch_bounds__(GlaParTraits::kScanThreads)
    linmix_gla_chunkpar_bwd_scan_kernel(GlaParams p, GlaChunkparWorkspace ws) {
  const int64_t KV = p.dim_k * p.dim_v, gidx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (gidx >= p.batch * p.heads * KV) return;
  const int64_t bh = gidx / KV, idx = gidx % KV;
  const int64_t N = gla_chunkpar_n_chunks(p.seqlen);
  const int K = static_cast<int>(p.dim_k), c = static_cast<int>(idx / p.dim_v);
  const float dht = p.dht ? static_cast<const float*>(p.dht)[bh * KV + idx] : 0.f;
  static_cast<float*>(p.dh0)[bh * KV + idx] =
      chunkpar_scan<true>(ws.dstates + bh * N * KV, ws.gate_sums + bh * N * K, N, KV, K, idx, c, dht);
}

void chunkpar_gla_scan_cuda(const GlaParams& p, const GlaChunkparWorkspace& ws, bool reverse, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(ceil_div(p.batch * p.heads * p.dim_k * p.dim_v, GlaParTraits::kScanThreads));
  if (reverse)
    linmix_gla_chunkpar_bwd_scan_kernel<<<grid, GlaParTraits::kScanThreads, 0, stream>>>(p, ws);
  else
    linmix_gla_chunkpar_fwd_scan_kernel<<<grid, GlaParTraits::kScanThreads, 0, stream>>>(p, ws);
  LINMIX_CHECK_LAUNCH();
}

}  // namespace linmix
