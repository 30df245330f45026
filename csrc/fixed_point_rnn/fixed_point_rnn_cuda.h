// CUDA launchers (defined in instantiate/*.cu) and their workspace layout, torch-free.
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/kernels.h"
#include "common/launchers.h"
#include "common/stream.h"
#include "fixed_point_rnn/params.h"

namespace linmix {

// p.work holds fp32 words and p.flags int32 words; offsets in words; "B T" counts tokens (packed: T) and "B"
// elements (packed: the sequences). The torch glue allocates
// work_floats / flag_ints; the launchers carve them up with the same function.
struct FixedPointRnnWorkspace {
  int64_t gram = 0;      // (B, T, R, R) Householder Gram matrices
  int64_t coef = 0;      // (B, T, R) chain coefficients of the current iteration
  int64_t tok_diff = 0;  // (B, T) per-token max |new - old| (float bits, atomicMax)
  int64_t tok_norm = 0;  // (B, T) per-token max |new|
  int64_t state = 0;     // forward: (B, T, D) the second ping-pong buffer; backward: 2 x (B, T, D) adjoint s
  int64_t h_new = 0;     // backward: (B, T, D) f(h_prev) recomputed
  int64_t residual = 0;  // backward: (B,) adjoint residual
  int64_t record = 0;    // forward, stopping="causal": (B, T, D) the stopped tokens' iterates
  int64_t work_floats = 0;
  int64_t done = 0, counter = 0, n_iter = 0;  // (B,) each: converged flag, finished-block count, adjoint iterations
  int64_t frozen = 0;                         // forward, stopping="causal": (B,) tokens stopped
  int64_t flag_ints = 0;
};

// The tokens the (B, T, ...) tensors hold: B T, or T when they hold packed sequences (one row, batch = N).
LINMIX_HD int64_t fixed_point_rnn_tokens(const FixedPointRnnParams& p, bool packed) {
  return packed ? p.seqlen : p.batch * p.seqlen;
}

inline FixedPointRnnWorkspace fixed_point_rnn_workspace(const FixedPointRnnParams& p, bool backward,
                                                        bool packed = false) {
  const int64_t BT = fixed_point_rnn_tokens(p, packed), BTD = BT * p.dim;
  FixedPointRnnWorkspace ws;
  int64_t off = 0;
  ws.gram = off, off += BT * p.rank * p.rank;
  ws.coef = off, off += BT * p.rank;
  ws.tok_diff = off, off += BT;
  ws.tok_norm = off, off += BT;
  ws.state = off, off += (backward ? 2 : 1) * BTD;
  ws.h_new = off, off += backward ? BTD : 0;
  ws.residual = off, off += p.batch;
  const bool causal = p.causal && !backward;
  ws.record = off, off += causal ? BTD : 0;
  ws.work_floats = off;
  ws.done = 0, ws.counter = p.batch, ws.n_iter = 2 * p.batch, ws.frozen = 3 * p.batch;
  ws.flag_ints = (causal ? 4 : 3) * p.batch;
  return ws;
}

template <DType dt> void fixed_point_rnn_fwd_cuda(const FixedPointRnnParams& p, cudaStream_t stream);
template <DType dt> void fixed_point_rnn_bwd_cuda(const FixedPointRnnParams& p, cudaStream_t stream);
// The fixed_point_rnn_variants family: every call, including p.h0, p.damping != 1, p.batch_quantile >= 0,
// p.causal and packed sequences (p.varlen), which the default kernels do not take.
template <DType dt> void fixed_point_rnn_variants_fwd_cuda(const FixedPointRnnVarlenParams& p, cudaStream_t stream);
template <DType dt> void fixed_point_rnn_variants_bwd_cuda(const FixedPointRnnVarlenParams& p, cudaStream_t stream);

// The launcher table (common/launchers.h); get() is in fixed_point_rnn_launchers.cu.
struct FixedPointRnnCudaLaunchers {
  static constexpr const char* kName = "fixed_point_rnn";
  PerCudaDtype<void(const FixedPointRnnParams&, cudaStream_t)> fwd, bwd;
  PerCudaDtype<void(const FixedPointRnnVarlenParams&, cudaStream_t)> variants_fwd, variants_bwd;
  static const FixedPointRnnCudaLaunchers& get();
};

// Whether a call runs the variant kernels (common/kernels.h): when switched on, or for a call the default kernels
// do not take, which no GPU-verified family serves (then `warning` is set on the first such call in the process,
// and `error` if the family may not run).
struct FixedPointRnnPlan {
  bool variants = false;
  const char* warning = nullptr;
  const char* error = nullptr;
};

inline FixedPointRnnPlan fixed_point_rnn_plan(const FixedPointRnnVarlenParams& p) {
  FixedPointRnnPlan plan;
  plan.variants = kernel_enabled(KernelFamily::kFixedPointRnnVariants);
  if (plan.variants ||
      (p.h0 == nullptr && p.damping == 1.0 && p.batch_quantile < 0 && !p.causal && !p.varlen.packed()))
    return plan;
  bool first = false;
  plan.variants = kernel_serves_uncovered_call(KernelFamily::kFixedPointRnnVariants, first);
  if (first)
    plan.warning = "linmix.fixed_point_rnn: initial_state, damping != 1, stopping='batch' / 'causal' and cu_seqlens "
                   "on CUDA run the fixed_point_rnn_variants kernels, which pass the test suite and sanitizers under "
                   "the CUDA emulator but have not yet run on a GPU (bench/results/README.md)";
  if (!plan.variants)
    plan.error = "linmix.fixed_point_rnn: initial_state, damping != 1, stopping='batch' / 'causal' and cu_seqlens on "
                 "CUDA need the fixed_point_rnn_variants kernels, which are not verified in this build";
  return plan;
}

}  // namespace linmix
