// Declarations of the CUDA launchers (defined in instantiate/*.cu), torch-free.
#pragma once

#include <stdexcept>
#include <string>

#include "common/dtype.h"
#include "common/kernels.h"
#include "common/launchers.h"
#include "common/stream.h"
#include "common/varlen.h"
#include "gla/gla_fused.h"
#include "gla/params.h"

namespace linmix {
template <DType dt> void chunk_gla_fwd_cuda(const GlaParams& p, cudaStream_t stream);
template <DType dt> void chunk_gla_bwd_cuda(const GlaParams& p, cudaStream_t stream);
template <DType dt> void fused_recurrent_gla_fwd_cuda(const GlaParams& p, cudaStream_t stream);
template <DType dt> void fused_recurrent_gla_bwd_cuda(const GlaParams& p, cudaStream_t stream);
// The same for head dims above kGlaCudaMaxHeadDim, up to kGlaMaxHeadDim (the gla_head512 family).
template <DType dt> void gla_head512_chunk_fwd_cuda(const GlaParams& p, cudaStream_t stream);
template <DType dt> void gla_head512_chunk_bwd_cuda(const GlaParams& p, cudaStream_t stream);
template <DType dt> void gla_head512_recurrent_fwd_cuda(const GlaParams& p, cudaStream_t stream);
template <DType dt> void gla_head512_recurrent_bwd_cuda(const GlaParams& p, cudaStream_t stream);
// Packed sequences, both ops: fused_recurrent_gla's kernels, above kGlaCudaMaxHeadDim gla_head512's (the gla_varlen
// family).
template <DType dt> void gla_varlen_fwd_cuda(const GlaParams& p, const Varlen& varlen, cudaStream_t stream);
template <DType dt> void gla_varlen_bwd_cuda(const GlaParams& p, const Varlen& varlen, cudaStream_t stream);

// The launcher table (common/launchers.h); get() is in gla_launchers.cu.
struct GlaCudaLaunchers {
  static constexpr const char* kName = "gla";
  PerCudaDtype<void(const GlaParams&, cudaStream_t)> chunk_fwd, chunk_bwd, recurrent_fwd, recurrent_bwd;
  PerCudaDtype<void(const GlaParams&, void*, cudaStream_t)> fused_fwd, fused_bwd;
  PerCudaDtype<void(const GlaParams&, cudaStream_t)> head512_chunk_fwd, head512_chunk_bwd, head512_recurrent_fwd,
      head512_recurrent_bwd;
  PerCudaDtype<void(const GlaParams&, const Varlen&, cudaStream_t)> varlen_fwd, varlen_bwd;
  static const GlaCudaLaunchers& get();
};

enum class GlaAlgo { kChunk, kRecurrent };

// The kernel family the registry picks for a call (common/kernels.h), and the one fp32 workspace it needs, for
// every family alike: the caller allocates plan.workspace_floats and hands it to gla_launch, which lays it out.
// (GlaParams keeps its workspace fields and exact_gate_grad for the kernels, whose parameter layout stays as the
// GPU verified it; only gla_launch fills them.)
struct GlaPlan {
  KernelFamily family = KernelFamily::kChunkGla;
  int64_t workspace_floats = 0;
  GlaAlgo algo = GlaAlgo::kChunk;
  bool exact_gate_grad = false;  // fused_recurrent_gla's backward: the fused_recurrent_gla_exact_dg variant
  std::string warning;           // for the caller to raise as a warning before launching, if not empty
};

// A call that no GPU-verified kernel serves (`what` it has, for the messages) runs `family`, emulation-verified:
// by default, warning once per process (common/kernels.h).
inline GlaPlan gla_uncovered_plan(KernelFamily family, const std::string& what, GlaAlgo algo, int64_t workspace_floats,
                                  bool exact_gate_grad) {
  const std::string name = kernel_record(family).name;
  const std::string call = (algo == GlaAlgo::kChunk ? "linmix.chunk_gla: " : "linmix.fused_recurrent_gla: ") + what +
                           " on CUDA ";
  bool first = false;
  if (!kernel_serves_uncovered_call(family, first))
    throw std::invalid_argument(call + "need the " + name + " kernels, which have not been verified; set "
                                "LINMIX_KERNELS=" + name + " to use them");
  GlaPlan plan{family, workspace_floats, algo, exact_gate_grad};
  if (first)
    plan.warning = call + "run the " + name + " kernels, which pass the test suite and sanitizers under the CUDA "
                   "emulator but have not yet run on a GPU (bench/results/README.md)";
  return plan;
}

// Head dims above kGlaCudaMaxHeadDim run the gla_head512 family. Its chunk kernels take chunk_gla's workspace (and
// its grads kernel, which has no head-dim limit), its recurrent ones fused_recurrent_gla's workspace and either dg
// variant.
inline GlaPlan gla_head512_plan(GlaAlgo algo, int64_t workspace_floats, bool exact_gate_grad) {
  return gla_uncovered_plan(KernelFamily::kGlaHead512, "head dims above " + std::to_string(kGlaCudaMaxHeadDim), algo,
                            workspace_floats, exact_gate_grad);
}

// Packed sequences run the gla_varlen family, for both ops: fused_recurrent_gla's kernels (gla_head512's above
// kGlaCudaMaxHeadDim) walking each sequence's span, one block row per (sequence, head); the backward's workspace is
// the (1, T, H, K) fp32 dq.
inline GlaPlan gla_varlen_plan(const GlaParams& p, GlaAlgo algo, bool backward) {
  return gla_uncovered_plan(KernelFamily::kGlaVarlen, "packed sequences (cu_seqlens)", algo,
                            backward ? p.seqlen * p.heads * p.dim_k : 0, /*exact_gate_grad=*/true);
}

inline GlaPlan gla_plan(const GlaParams& p, const Varlen& varlen, GlaAlgo algo, bool backward) {
  if (varlen.packed()) return gla_varlen_plan(p, algo, backward);
  const int64_t BH = p.batch * p.heads, KV = p.dim_k * p.dim_v;
  const int64_t n_chunks = ceil_div(p.seqlen, kGlaChunk);  // chunk backward: states entering each chunk, gradients
  const int64_t chunk_workspace = backward ? BH * (n_chunks + 1) * KV + BH * n_chunks * KV : 0;
  const int64_t recurrent_workspace = backward ? p.batch * p.seqlen * p.heads * p.dim_k : 0;  // (B, T, H, K) dq
  const bool exact_dg =
      algo == GlaAlgo::kRecurrent && backward && kernel_enabled(KernelFamily::kFusedRecurrentGlaExactDg);
  if (p.dim_k > kGlaCudaMaxHeadDim || p.dim_v > kGlaCudaMaxHeadDim)
    return gla_head512_plan(algo, algo == GlaAlgo::kChunk ? chunk_workspace : recurrent_workspace, exact_dg);
  if (algo == GlaAlgo::kRecurrent) {
    return {exact_dg ? KernelFamily::kFusedRecurrentGlaExactDg : KernelFamily::kFusedRecurrentGla,
            recurrent_workspace, algo, exact_dg};
  }
  // The fused backward keeps the whole state's gradient on chip: head dims up to 128; wider ones take the serial
  // backward behind the fused forward.
  const bool fused_serves = !backward || (p.dim_k <= kGlaFusedBwdMaxHeadDim && p.dim_v <= kGlaFusedBwdMaxHeadDim);
  if (fused_serves && kernel_enabled(KernelFamily::kGlaFused))
    return {KernelFamily::kGlaFused, backward ? gla_fused_bwd_workspace_floats(p) : 0};
  return {KernelFamily::kChunkGla, chunk_workspace};
}

inline void gla_launch(const GlaCudaLaunchers& cuda, const GlaPlan& plan, DType dt, bool backward, GlaParams p,
                       const Varlen& varlen, float* workspace, cudaStream_t stream) {
  const int64_t BH = p.batch * p.heads, KV = p.dim_k * p.dim_v;
  switch (plan.family) {
    case KernelFamily::kGlaVarlen:
      p.workspace = workspace;
      (backward ? cuda.varlen_bwd : cuda.varlen_fwd)(dt, p, varlen, stream);
      return;
    case KernelFamily::kGlaFused:
      (backward ? cuda.fused_bwd : cuda.fused_fwd)(dt, p, workspace, stream);
      return;
    case KernelFamily::kChunkGla:
    case KernelFamily::kGlaHead512:
      if (plan.algo == GlaAlgo::kChunk) {
        if (backward) {
          p.chunk_states = workspace;
          p.chunk_dstates = workspace + BH * (ceil_div(p.seqlen, kGlaChunk) + 1) * KV;
        }
        const bool wide = plan.family == KernelFamily::kGlaHead512;
        (backward ? (wide ? cuda.head512_chunk_bwd : cuda.chunk_bwd)
                  : (wide ? cuda.head512_chunk_fwd : cuda.chunk_fwd))(dt, p, stream);
        return;
      }
      [[fallthrough]];
    default: {  // fused_recurrent_gla, either backward, or gla_head512's recurrent kernels
      p.workspace = workspace;
      p.exact_gate_grad = plan.exact_gate_grad;
      const bool wide = plan.family == KernelFamily::kGlaHead512;
      (backward ? (wide ? cuda.head512_recurrent_bwd : cuda.recurrent_bwd)
                : (wide ? cuda.head512_recurrent_fwd : cuda.recurrent_fwd))(dt, p, stream);
    }
  }
}
}  // namespace linmix
