// One dtype x direction per file so ninja compiles them in parallel.
#include "gla/gla_recurrent_kernel.cuh"

namespace linmix {
template void gla_varlen_fwd_cuda<DType::kBFloat16>(const GlaParams&, const Varlen&, cudaStream_t);
}  // namespace linmix
