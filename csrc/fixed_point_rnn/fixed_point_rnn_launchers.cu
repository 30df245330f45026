// fixed_point_rnn's launcher table (fixed_point_rnn_cuda.h), for the nvcc build and the CUDA emulator's.
#include "fixed_point_rnn/fixed_point_rnn_cuda.h"

namespace linmix {
const FixedPointRnnCudaLaunchers& FixedPointRnnCudaLaunchers::get() {
  static constexpr FixedPointRnnCudaLaunchers table{LINMIX_PER_CUDA_DTYPE(fixed_point_rnn_fwd_cuda),
                                                    LINMIX_PER_CUDA_DTYPE(fixed_point_rnn_bwd_cuda),
                                                    LINMIX_PER_CUDA_DTYPE(fixed_point_rnn_variants_fwd_cuda),
                                                    LINMIX_PER_CUDA_DTYPE(fixed_point_rnn_variants_bwd_cuda)};
  return table;
}
}  // namespace linmix
