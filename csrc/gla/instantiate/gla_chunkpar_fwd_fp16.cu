// One dtype x direction per file so ninja compiles them in parallel.
#include "gla/gla_chunkpar_fwd_kernel.cuh"

namespace linmix {
template void chunkpar_gla_fwd_cuda<DType::kFloat16>(const GlaParams&, const GlaChunkparWorkspace&, cudaStream_t);
}  // namespace linmix
