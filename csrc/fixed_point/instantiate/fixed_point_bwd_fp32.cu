// One dtype x direction per file so ninja compiles them in parallel.
#include "fixed_point/fixed_point_kernel.cuh"

namespace linmix {
template void fixed_point_bwd_cuda<DType::kFloat32>(const FixedPointParams&, cudaStream_t);
}  // namespace linmix
