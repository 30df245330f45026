// One dtype x direction per file so ninja compiles them in parallel (each holds the three head-dim traits).
#include "gla/gla_fused_fwd_kernel.cuh"

namespace linmix {
template void fused_gla_fwd_cuda<DType::kBFloat16>(const GlaParams&, void*, cudaStream_t);
}  // namespace linmix
