// Declarations of the CUDA launchers (defined in instantiate/*.cu), torch-free.
#pragma once

#include "common/dtype.h"
#include "common/kernels.h"
#include "common/launchers.h"
#include "common/stream.h"
#include "gla/gla_fused.h"
#include "gla/params.h"

namespace linmix {
template <DType dt> void chunk_gla_fwd_cuda(const GlaParams& p, cudaStream_t stream);
template <DType dt> void chunk_gla_bwd_cuda(const GlaParams& p, cudaStream_t stream);
template <DType dt> void fused_recurrent_gla_fwd_cuda(const GlaParams& p, cudaStream_t stream);
template <DType dt> void fused_recurrent_gla_bwd_cuda(const GlaParams& p, cudaStream_t stream);

// The launcher table (common/launchers.h); get() is in gla_launchers.cu.
struct GlaCudaLaunchers {
  static constexpr const char* kName = "gla";
  PerCudaDtype<void(const GlaParams&, cudaStream_t)> chunk_fwd, chunk_bwd, recurrent_fwd, recurrent_bwd;
  PerCudaDtype<void(const GlaParams&, void*, cudaStream_t)> fused_fwd, fused_bwd;
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
};

inline GlaPlan gla_plan(const GlaParams& p, GlaAlgo algo, bool backward) {
  const int64_t BH = p.batch * p.heads, KV = p.dim_k * p.dim_v;
  if (algo == GlaAlgo::kRecurrent) {
    const bool exact_dg = backward && kernel_enabled(KernelFamily::kFusedRecurrentGlaExactDg);
    return {exact_dg ? KernelFamily::kFusedRecurrentGlaExactDg : KernelFamily::kFusedRecurrentGla,
            backward ? p.batch * p.seqlen * p.heads * p.dim_k : 0};  // a (B, T, H, K) copy of dq, for the dg sum
  }
  // The fused backward keeps the whole state's gradient on chip: head dims up to 128; wider ones take the serial
  // backward behind the fused forward.
  const bool fused_serves = !backward || (p.dim_k <= kGlaFusedBwdMaxHeadDim && p.dim_v <= kGlaFusedBwdMaxHeadDim);
  if (fused_serves && kernel_enabled(KernelFamily::kGlaFused))
    return {KernelFamily::kGlaFused, backward ? gla_fused_bwd_workspace_floats(p) : 0};
  const int64_t n_chunks = ceil_div(p.seqlen, kGlaChunk);  // backward: states entering each chunk, then gradients
  return {KernelFamily::kChunkGla, backward ? BH * (n_chunks + 1) * KV + BH * n_chunks * KV : 0};
}

inline void gla_launch(const GlaCudaLaunchers& cuda, const GlaPlan& plan, DType dt, bool backward, GlaParams p,
                       float* workspace, cudaStream_t stream) {
  const int64_t BH = p.batch * p.heads, KV = p.dim_k * p.dim_v;
  switch (plan.family) {
    case KernelFamily::kGlaFused:
      (backward ? cuda.fused_bwd : cuda.fused_fwd)(dt, p, workspace, stream);
      return;
    case KernelFamily::kChunkGla:
      if (backward) {
        p.chunk_states = workspace;
        p.chunk_dstates = workspace + BH * (ceil_div(p.seqlen, kGlaChunk) + 1) * KV;
      }
      (backward ? cuda.chunk_bwd : cuda.chunk_fwd)(dt, p, stream);
      return;
    default:  // fused_recurrent_gla, either backward
      p.workspace = workspace;
      p.exact_gate_grad = plan.family == KernelFamily::kFusedRecurrentGlaExactDg;
      (backward ? cuda.recurrent_bwd : cuda.recurrent_fwd)(dt, p, stream);
  }
}
}  // namespace linmix
