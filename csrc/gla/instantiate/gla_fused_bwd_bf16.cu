// One dtype x direction per file so ninja compiles them in parallel (the states kernel per key head dim, the reverse
// kernel per max(K, V) <= 64, 128).
#include "gla/gla_fused_bwd_kernel.cuh"

namespace linmix {
template void fused_gla_bwd_cuda<DType::kBFloat16>(const GlaParams&, void*, cudaStream_t);
}  // namespace linmix
