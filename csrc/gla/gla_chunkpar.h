// The chunk-parallel CUDA chunk_gla (flash-linear-attention's structure): launchers and their fp32 workspaces,
// torch-free. Kernels in gla_chunkpar_{fwd,bwd}_kernel.cuh; opt-in (LINMIX_KERNELS=gla_chunkpar, common/kernels.h)
// until a GPU session verifies them (bench/results/README.md).
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/stream.h"
#include "gla/gla_common.h"
#include "gla/params.h"

namespace linmix {

// fp32, contiguous, allocated by the caller; N = ceil(T / kGlaChunk) chunks (at least 1).
struct GlaChunkparWorkspace {
  float* states = nullptr;     // (B * H, N + 1, K, V): the state entering each chunk, then the final state
  float* dstates = nullptr;    // (B * H, N, K, V), backward only: gradient of the state leaving each chunk
  float* gate_sums = nullptr;  // (B * H, N, K): log2-scaled sum of each chunk's gates, per key channel
};

LINMIX_HD int64_t gla_chunkpar_n_chunks(int64_t seqlen) { return seqlen > 0 ? (seqlen + kGlaChunk - 1) / kGlaChunk : 1; }

// Phase 2: the sequential fp32 pass over the chunk states (instantiate/gla_chunkpar_scan.cu). Forward: local chunk
// states in ws.states[n] become the state entering chunk n, the final state goes to ws.states[N] and p.ht (if
// set). Reverse: local state gradients in ws.dstates[n] become the gradient of the state leaving chunk n, and the
// gradient of the initial state goes to p.dh0. p.h0 / p.dht (null for zeros) start the pass.
void chunkpar_gla_scan_cuda(const GlaParams& p, const GlaChunkparWorkspace& ws, bool reverse, cudaStream_t stream);
template <DType dt> void chunkpar_gla_fwd_cuda(const GlaParams& p, const GlaChunkparWorkspace& ws, cudaStream_t stream);
template <DType dt> void chunkpar_gla_bwd_cuda(const GlaParams& p, const GlaChunkparWorkspace& ws, cudaStream_t stream);

}  // namespace linmix
