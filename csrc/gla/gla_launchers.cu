// GLA's launcher table (gla_cuda.h), for the nvcc build and the CUDA emulator's.
#include "gla/gla_cuda.h"

namespace linmix {
const GlaCudaLaunchers& GlaCudaLaunchers::get() {
  static constexpr GlaCudaLaunchers table{
      LINMIX_PER_CUDA_DTYPE(chunk_gla_fwd_cuda),           LINMIX_PER_CUDA_DTYPE(chunk_gla_bwd_cuda),
      LINMIX_PER_CUDA_DTYPE(fused_recurrent_gla_fwd_cuda), LINMIX_PER_CUDA_DTYPE(fused_recurrent_gla_bwd_cuda),
      LINMIX_PER_CUDA_DTYPE(fused_gla_fwd_cuda),             LINMIX_PER_CUDA_DTYPE(fused_gla_bwd_cuda),
      LINMIX_PER_CUDA_DTYPE(gla_head512_chunk_fwd_cuda),     LINMIX_PER_CUDA_DTYPE(gla_head512_chunk_bwd_cuda),
      LINMIX_PER_CUDA_DTYPE(gla_head512_recurrent_fwd_cuda), LINMIX_PER_CUDA_DTYPE(gla_head512_recurrent_bwd_cuda),
      LINMIX_PER_CUDA_DTYPE(gla_varlen_fwd_cuda),            LINMIX_PER_CUDA_DTYPE(gla_varlen_bwd_cuda)};
  return table;
}
}  // namespace linmix
