// One dtype x direction per file so ninja compiles them in parallel.
#include "gla/gla_chunkpar_bwd_kernel.cuh"

namespace linmix {
template void chunkpar_gla_bwd_cuda<DType::kBFloat16>(const GlaParams&, const GlaChunkparWorkspace&, cudaStream_t);
}  // namespace linmix
