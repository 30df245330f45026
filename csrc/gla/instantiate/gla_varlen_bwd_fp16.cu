// One dtype x direction per file so ninja compiles them in parallel.
#include "gla/gla_recurrent_kernel.cuh"

namespace linmix {
template void gla_varlen_bwd_cuda<DType::kFloat16>(const GlaParams&, const Varlen&, cudaStream_t);
}  // namespace linmix
