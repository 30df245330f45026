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

// `workspace`: the one GLA workspace (gla_cuda.h's gla_plan sizes it; the forward needs none: may be null).
template <DType dt> void fused_gla_fwd_cuda(const GlaParams& p, void* workspace, cudaStream_t stream);

}  // namespace linmix
