// Declarations of the CUDA launchers (defined in instantiate/*.cu), torch-free.
#pragma once

#include "common/dtype.h"
#include "common/launchers.h"
#include "common/stream.h"
#include "gla/gla_chunkpar.h"
#include "gla/params.h"

namespace linmix {
template <DType dt> void chunk_gla_fwd_cuda(const GlaParams& p, cudaStream_t stream);
template <DType dt> void chunk_gla_bwd_cuda(const GlaParams& p, cudaStream_t stream);
template <DType dt> void fused_recurrent_gla_fwd_cuda(const GlaParams& p, cudaStream_t stream);
template <DType dt> void fused_recurrent_gla_bwd_cuda(const GlaParams& p, cudaStream_t stream);

// The launcher table (common/launchers.h); get() is in gla_launchers.cu.
struct GlaCudaLaunchers {
  static constexpr const char* kName = "gla";
  PerCudaDtype<void(const GlaParams&, cudaStream_t)> chunk_fwd, chunk_bwd, recurrent_fwd, recurrent_bwd;
  PerCudaDtype<void(const GlaParams&, const GlaChunkparWorkspace&, cudaStream_t)> chunkpar_fwd, chunkpar_bwd;
  static const GlaCudaLaunchers& get();
};
}  // namespace linmix
