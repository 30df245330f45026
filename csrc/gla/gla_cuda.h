// Declarations of the CUDA launchers (defined in instantiate/*.cu), torch-free.
#pragma once

#include "common/dtype.h"
#include "common/stream.h"
#include "gla/params.h"

namespace linmix {
template <DType dt> void chunk_gla_fwd_cuda(const GlaParams& p, cudaStream_t stream);
template <DType dt> void chunk_gla_bwd_cuda(const GlaParams& p, cudaStream_t stream);
template <DType dt> void fused_recurrent_gla_fwd_cuda(const GlaParams& p, cudaStream_t stream);
template <DType dt> void fused_recurrent_gla_bwd_cuda(const GlaParams& p, cudaStream_t stream);
}  // namespace linmix
