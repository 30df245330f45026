// One dtype x direction per file so ninja compiles them in parallel.
#include "fixed_point_rnn/fixed_point_rnn_bwd_kernel.cuh"

namespace linmix {
template void fixed_point_rnn_bwd_cuda<DType::kBFloat16>(const FixedPointRnnParams&, cudaStream_t);
template void fixed_point_rnn_variants_bwd_cuda<DType::kBFloat16>(const FixedPointRnnVarlenParams&, cudaStream_t);
}  // namespace linmix
