// Pieces shared by the chunk-parallel chunk_gla kernels (gla_chunkpar_{fwd,bwd}_kernel.cuh): tiles, staging of a
// state slice, the launch.
// The decays and scores are gla_fused_common.cuh's. tests/replays/gla_chunkpar.py mirrors every block.
#pragma once

#include "gla/gla_chunkpar.h"
#include "gla/gla_fused_common.cuh"

namespace linmix {

struct GlaParTraits {
  static constexpr int kChunk = kGlaChunk;
  static constexpr int kSub = kGlaSubChunk;
  static constexpr int kStateBK = 64, kStateBV = 64;  // fwd local states, bwd local state gradients
  static constexpr int kOutBK = 32, kOutBV = 64;      // fwd outputs, bwd dv: walk K in kOutBK slices
  static constexpr int kDqkBK = 32, kDqkBV = 64;      // bwd dq, dk, dg: walk V in kDqkBV slices
  static constexpr int kThreads = 128;
  static constexpr int kScanThreads = 256;
  static_assert(kSub == 16 && kChunk % kSub == 0, "sub-chunks are single 16-row WMMA tiles");
};

// dst[cc][e] (row stride BV) = state[c0 + cc][e0 + e] of a (K, V) fp32 matrix, zero outside; no sync.
template <typename Dst>
__device__ __forceinline__ void chunkpar_stage_state(Dst* dst, const float* state, int K, int V, int c0, int e0, int BK,
                                                     int BV) {
  for (int idx = threadIdx.x; idx < BK * BV; idx += blockDim.x) {
    const int cc = idx / BV, e = idx % BV;
    const bool ok = c0 + cc < K && e0 + e < V;
    dst[idx] = from_float<Dst>(ok ? state[int64_t(c0 + cc) * V + e0 + e] : 0.f);
  }
}

// Launches one chunk-parallel phase on the grid (B H, tiles, N chunks), checked, with `smem` bytes of dynamic
// shared memory (opted into when above 48 KiB). The state kernels tile (K, V) by kStateBK x kStateBV; the value
// kernels (fwd out, bwd dv) walk V in kOutBV columns; bwd dqk walks K in kDqkBK slices.
template <typename Kernel>
void chunkpar_launch(Kernel kernel, const char* grid_what, int64_t tiles, size_t smem, const GlaParams& p,
                     const GlaChunkparWorkspace& ws, cudaStream_t stream) {
  opt_in_smem(kernel, smem);
  const dim3 grid = checked_grid("chunk_gla", grid_what, p.batch * p.heads, tiles, gla_chunkpar_n_chunks(p.seqlen));
  launch_kernel(kernel, grid, GlaParTraits::kThreads, smem, stream, p, ws);
}

inline int64_t chunkpar_state_tiles(const GlaParams& p) {
  return ceil_div(p.dim_k, GlaParTraits::kStateBK) * ceil_div(p.dim_v, GlaParTraits::kStateBV);
}

}  // namespace linmix
