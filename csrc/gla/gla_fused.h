// The fused CUDA chunk_gla (gla_fused_{fwd,bwd}_kernel.cuh): traits per head dim and the launchers, torch-free.
// Opt-in (LINMIX_KERNELS=gla_fused, common/kernels.h) until a GPU session verifies it (bench/results/README.md).
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/dtype.h"
#include "common/stream.h"
#include "gla/gla_common.h"
#include "gla/params.h"

namespace linmix {

// Compile-time choices of the fused kernels for key head dims K <= kMaxK (the state slice lives in shared memory).
template <int kMaxK_>
struct GlaFusedTraits {
  static constexpr int kMaxK = kMaxK_;
  static constexpr int kChunk = kGlaChunk;
  static constexpr int kBK = 32;  // key channels staged at a time
  static constexpr int kBV = 64;  // value columns per forward block: ceil(V / kBV) blocks per (batch, head)
  static constexpr int kThreads = 128;
  static_assert(kMaxK % kBK == 0 && kBK % 16 == 0 && kBV % 16 == 0, "whole WMMA tiles and K slices");
  static_assert(kMaxK <= kGlaCudaMaxHeadDim, "the CUDA kernels' head-dim limit");
};

// The backward's reverse kernel keeps the fp32 gradient of the whole (K, V) state on chip (one block per batch *
// head), so it serves max(K, V) <= kMaxD; wider heads take the serial backward (gla_cuda.h's gla_plan).
template <int kMaxD_, typename Op>
struct GlaFusedBwdTraits {
  static constexpr int kMaxD = kMaxD_;
  static constexpr int kChunk = kGlaChunk;
  static constexpr int kBK = 16;                         // key channels staged at a time
  static constexpr int kBV = sizeof(Op) == 4 ? 32 : 64;  // value columns staged at a time (fp32: 32)
  static constexpr int kThreads = 128;
  static_assert(kMaxD % kBV == 0 && kMaxD % kBK == 0, "whole slices and tiles");
};
constexpr int64_t kGlaFusedBwdMaxHeadDim = 128;

// Calls f(traits) with the smallest traits whose kMaxK >= K (1 <= K <= 256).
template <typename F>
void gla_fused_head_dim_switch(int64_t K, F&& f) {
  if (K <= 64)
    f(GlaFusedTraits<64>{});
  else if (K <= 128)
    f(GlaFusedTraits<128>{});
  else
    f(GlaFusedTraits<256>{});
}

// The backward's workspace, in floats: the fp32 final state (B * H, K, V), then the state entering each chunk
// (B * H, ceil(T / kGlaChunk), K, V) in the input dtype (at most one float each).
inline int64_t gla_fused_bwd_workspace_floats(const GlaParams& p) {
  return p.batch * p.heads * p.dim_k * p.dim_v * (1 + (p.seqlen + kGlaChunk - 1) / kGlaChunk);
}

// `workspace`: the one GLA workspace (gla_cuda.h's gla_plan sizes it; the forward needs none: may be null).
template <DType dt> void fused_gla_fwd_cuda(const GlaParams& p, void* workspace, cudaStream_t stream);
template <DType dt> void fused_gla_bwd_cuda(const GlaParams& p, void* workspace, cudaStream_t stream);

}  // namespace linmix
