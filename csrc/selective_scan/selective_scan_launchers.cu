// The launcher tables of selective_scan and selective_state_update (selective_scan_cuda.h,
// selective_state_update_cuda.h), for the nvcc build and the CUDA emulator's.
#include "selective_scan/selective_scan_cuda.h"
#include "selective_scan/selective_state_update_cuda.h"

namespace linmix {

const SelectiveScanCudaLaunchers& SelectiveScanCudaLaunchers::get() {
  static constexpr SelectiveScanCudaLaunchers table{
      LINMIX_PER_CUDA_DTYPE(selective_scan_fwd_cuda), LINMIX_PER_CUDA_DTYPE(selective_scan_fwd_warp_cuda),
      LINMIX_PER_CUDA_DTYPE(selective_scan_bwd_cuda), LINMIX_PER_CUDA_DTYPE(selective_scan_bwd_tiled_cuda),
      LINMIX_PER_CUDA_DTYPE(selective_scan_fwd_varlen_cuda), LINMIX_PER_CUDA_DTYPE(selective_scan_bwd_varlen_cuda)};
  return table;
}

namespace {
// selective_state_update for activations of type xdt, the state's type picked at run time.
template <DType xdt>
void state_update(DType sdt, const SelectiveStateUpdateParams& p, cudaStream_t stream) {
  static constexpr PerCudaDtype<void(const SelectiveStateUpdateParams&, cudaStream_t)> by_state{
      {&selective_state_update_cuda<xdt, DType::kFloat32>, &selective_state_update_cuda<xdt, DType::kFloat16>,
       &selective_state_update_cuda<xdt, DType::kBFloat16>}};
  by_state(sdt, p, stream);
}
}  // namespace

const SelectiveStateUpdateCudaLaunchers& SelectiveStateUpdateCudaLaunchers::get() {
  static constexpr SelectiveStateUpdateCudaLaunchers table{LINMIX_PER_CUDA_DTYPE(state_update)};
  return table;
}

}  // namespace linmix
