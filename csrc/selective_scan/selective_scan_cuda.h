// Declarations of the CUDA launchers (defined in instantiate/*.cu), torch-free.
#pragma once

#include "common/dtype.h"
#include "common/kernels.h"
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
// Packed sequences (p.varlen): the default kernels' varlen instances, one block per (sequence, channel).
template <DType dt> void selective_scan_fwd_varlen_cuda(const SelectiveScanParams& p, cudaStream_t stream);
template <DType dt> void selective_scan_bwd_varlen_cuda(const SelectiveScanParams& p, cudaStream_t stream);

// The launcher table (common/launchers.h); get() is in selective_scan_launchers.cu.
struct SelectiveScanCudaLaunchers {
  static constexpr const char* kName = "selective_scan";
  PerCudaDtype<void(const SelectiveScanParams&, cudaStream_t)> fwd, fwd_warp, bwd, bwd_tiled, fwd_varlen, bwd_varlen;
  static const SelectiveScanCudaLaunchers& get();
};

// Packed sequences (cu_seqlens), which no GPU-verified kernel serves, run the selective_scan_varlen family: by
// default, warning once per process, while it is emulation-verified (common/kernels.h). The opt-in warp forward
// and tiled backward do not take them: a packed call runs the varlen family whatever LINMIX_KERNELS says. Returns
// the warning for the caller to raise, or null.
inline const char* selective_scan_varlen_warning() {
  bool first = false;
  if (!kernel_serves_uncovered_call(KernelFamily::kSelectiveScanVarlen, first) || !first) return nullptr;
  return "linmix.selective_scan: cu_seqlens on CUDA runs the selective_scan_varlen kernels, which pass the test "
         "suite and sanitizers under the CUDA emulator but have not yet run on a GPU (bench/results/README.md)";
}

// The forward the registry picks (common/kernels.h); returns a warning for the caller to raise, or null.
inline const char* selective_scan_fwd_launch(const SelectiveScanCudaLaunchers& cuda, DType dt,
                                             const SelectiveScanParams& p, cudaStream_t stream) {
  if (p.varlen.packed()) {
    cuda.fwd_varlen(dt, p, stream);
    return selective_scan_varlen_warning();
  }
  (kernel_enabled(KernelFamily::kSelectiveScanFwdWarp) ? cuda.fwd_warp : cuda.fwd)(dt, p, stream);
  return nullptr;
}

// The backward the registry picks for `p` and what the caller asks (`det`: 0 nothing, 1 a deterministic backward
// preferred, a non-deterministic one warns, 2 one required), and the fp32 workspace it needs. The atomic-free tiled
// backward (deterministic with per-tile partials) runs when switched on, or for a deterministic backward with
// variable B/C, which no GPU-verified kernel serves, once it is emulation-verified; the default kernel adds
// variable dB/dC with float atomics (fixed B/C: no atomics, deterministic).
struct SelectiveScanBwdPlan {
  bool tiled = false;
  bool varlen = false;  // packed sequences: the selective_scan_varlen backward
  const char* warning = nullptr;  // for the caller to raise as a warning
  const char* error = nullptr;    // for the caller to raise instead of launching
  int64_t sub_states = 0, dB_tiles = 0, dC_tiles = 0;  // fp32 elements of each workspace part (tiled only)
  int64_t workspace_floats() const { return sub_states + dB_tiles + dC_tiles; }
};

inline SelectiveScanBwdPlan selective_scan_bwd_plan(const SelectiveScanParams& p, int64_t det) {
  SelectiveScanBwdPlan plan;
  const bool variable_bc = p.B.variable || p.C.variable;
  if (p.varlen.packed()) {
    plan.varlen = true;
    plan.warning = selective_scan_varlen_warning();
    if (variable_bc && det > 0) {
      const char* why = "linmix.selective_scan: a deterministic backward (deterministic=True or "
                        "torch.use_deterministic_algorithms(True)) with variable B or C and cu_seqlens on CUDA is not "
                        "available: the varlen backward adds dB/dC with float atomics (fixed B/C are deterministic)";
      (det == 1 ? plan.warning : plan.error) = why;
    }
    return plan;
  }
  plan.tiled = kernel_enabled(KernelFamily::kSelectiveScanBwdTiled);
  if (!plan.tiled && variable_bc && det > 0) {
    bool first = false;
    plan.tiled = kernel_serves_uncovered_call(KernelFamily::kSelectiveScanBwdTiled, first);
    if (first)
      plan.warning = "linmix.selective_scan: a deterministic backward with variable B or C on CUDA runs the "
                     "atomic-free backward kernel, which passes the test suite and sanitizers under the CUDA "
                     "emulator but has not yet run on a GPU (bench/results/README.md)";
  }
  if (!plan.tiled) {
    if (variable_bc && det > 0) {
      const char* why = "linmix.selective_scan: a deterministic backward (deterministic=True or "
                        "torch.use_deterministic_algorithms(True)) with variable B or C on CUDA needs the atomic-free "
                        "backward kernel, which has not yet been verified; set LINMIX_KERNELS=selective_scan_bwd_tiled "
                        "to use it (the default backward adds dB/dC with float atomics)";
      (det == 1 ? plan.warning : plan.error) = why;
    }
    return plan;
  }
  const int64_t tile_partials = p.batch * selective_scan_tiling(p).n_tiles * p.dstate * p.seqlen;
  plan.sub_states = p.batch * p.dim * (kSelectiveScanChunk / kSelectiveScanSubChunk) * p.dstate;
  plan.dB_tiles = det > 0 && p.B.variable ? tile_partials : 0;
  plan.dC_tiles = det > 0 && p.C.variable ? tile_partials : 0;
  return plan;
}

// Runs the planned backward; `workspace` holds plan.workspace_floats() fp32 elements (its parts in the order
// above), allocated by the caller and kept alive until the kernels have run (stream-ordered).
inline void selective_scan_bwd_launch(const SelectiveScanCudaLaunchers& cuda, const SelectiveScanBwdPlan& plan,
                                      DType dt, SelectiveScanParams& p, float* workspace, cudaStream_t stream) {
  if (plan.varlen) {
    cuda.bwd_varlen(dt, p, stream);
    return;
  }
  if (!plan.tiled) {
    cuda.bwd(dt, p, stream);
    return;
  }
  p.sub_states = workspace;
  p.dB_tiles = plan.dB_tiles ? workspace + plan.sub_states : nullptr;
  p.dC_tiles = plan.dC_tiles ? workspace + plan.sub_states + plan.dB_tiles : nullptr;
  cuda.bwd_tiled(dt, p, stream);
}
}  // namespace linmix
