// One dtype x direction per file so ninja compiles them in parallel.
#include "gla/gla_chunk_bwd_kernel.cuh"

namespace linmix {
template void gla_head512_chunk_bwd_cuda<DType::kBFloat16>(const GlaParams&, cudaStream_t);
}  // namespace linmix
