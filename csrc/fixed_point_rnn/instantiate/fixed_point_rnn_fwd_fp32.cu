// One dtype x direction per file so ninja compiles them in parallel.
#include "fixed_point_rnn/fixed_point_rnn_fwd_kernel.cuh"

namespace linmix {
template void fixed_point_rnn_fwd_cuda<DType::kFloat32>(const FixedPointRnnParams&, cudaStream_t);
template void fixed_point_rnn_variants_fwd_cuda<DType::kFloat32>(const FixedPointRnnVarlenParams&, cudaStream_t);
}  // namespace linmix
