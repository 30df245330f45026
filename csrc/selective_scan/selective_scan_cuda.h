// Declarations of the CUDA launchers (defined in instantiate/*.cu), torch-free.
#pragma once

#include "common/dtype.h"
#include "common/launchers.h"
#include "common/stream.h"
#include "selective_scan/params.h"

namespace linmix {
template <DType dt> void selective_scan_fwd_cuda(const SelectiveScanParams& p, cudaStream_t stream);
// Forward with one warp per channel (unverified), same outputs and checkpoints.
template <DType dt> void selective_scan_fwd_warp_cuda(const SelectiveScanParams& p, cudaStream_t stream);
template <DType dt> void selective_scan_bwd_cuda(const SelectiveScanParams& p, cudaStream_t stream);
// Atomic-free backward on channel tiles (unverified; needs p.sub_states, and p.dB_tiles / p.dC_tiles for the
// deterministic reduction of variable dB/dC, else zeroed dB/dC for its per-tile atomics).
template <DType dt> void selective_scan_bwd_tiled_cuda(const SelectiveScanParams& p, cudaStream_t stream);

// The launcher table (common/launchers.h); get() is in selective_scan_launchers.cu.
struct SelectiveScanCudaLaunchers {
  static constexpr const char* kName = "selective_scan";
  PerCudaDtype<void(const SelectiveScanParams&, cudaStream_t)> fwd, fwd_warp, bwd, bwd_tiled;
  static const SelectiveScanCudaLaunchers& get();
};
}  // namespace linmix
