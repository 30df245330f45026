// Gated linear attention (chunk_gla / fused_recurrent_gla): S_t = diag(exp g_t) S_{t-1} + k_t^T v_t,
// o_t = scale q_t S_t, per (batch, head).
#pragma once

#include <cstdint>

#include "common/strided.h"

namespace linmix {

// Largest head dim K and V, on every device (flash-linear-attention's own tests run 512).
constexpr int64_t kGlaMaxHeadDim = 512;
// Largest head dim of the GPU-verified CUDA kernels (and of gla_fused), which size their shared memory and register
// tiles for it; above it the gla_head512 family's instances, sized for kGlaMaxHeadDim (gla_cuda.h, gla_plan).
constexpr int64_t kGlaCudaMaxHeadDim = 256;

struct GlaParams {
  // batch: the sequences the kernels iterate over: the batch rows (B), or with packed sequences their number N, all
  // in the tensors' one row (a Varlen, common/varlen.h, passed beside these params so their layout stays as the GPU
  // verified it); h0, ht, dht, dh0 are then (N, H, K, V).
  int64_t batch = 0, seqlen = 0, heads = 0;
  int64_t dim_k = 0, dim_v = 0;  // head dims K (q, k, g) and V (v, o)
  double scale = 1.0;
  // forward
  // (B, T, H, X) tensors with unit stride along X: strides of B, T, H
  StridedView<3> q, k, g;  // (B, T, H, K); g is the log forget gate
  StridedView<3> v;        // (B, T, H, V)
  StridedView<3> o;        // (B, T, H, V) output
  const void* h0 = nullptr;  // (B, H, K, V) contiguous, accumulation type, or null for zeros
  void* ht = nullptr;        // (B, H, K, V) contiguous, accumulation type: the final state (always written)
  // backward
  StridedView<3> dout;        // (B, T, H, V) incoming gradient of o
  const void* dht = nullptr;  // (B, H, K, V) contiguous, accumulation type, or null for zeros
  StridedView<3> dq, dk, dg;  // (B, T, H, K) outputs
  StridedView<3> dv;          // (B, T, H, V) output
  void* dh0 = nullptr;        // (B, H, K, V) contiguous, accumulation type
  // Set by gla_launch (gla_cuda.h) from its plan, never by the glue; they stay in this struct because the kernels
  // take it by value and the GPU-verified ones keep the parameter layout they were verified with.
  // fused_recurrent CUDA backward: dg exactly 0 where the decay underflows (gla_gate_grad), the opt-in
  // fused_recurrent_gla_exact_dg family.
  bool exact_gate_grad = false;
  // CUDA backward workspaces (fp32, contiguous, parts of the one workspace gla_plan sizes)
  float* workspace = nullptr;      // fused_recurrent: (B, T, H, K) copy of dq, for the dg sum
  float* chunk_states = nullptr;   // chunk: (B * H, n_chunks + 1, K, V) state entering each chunk, then the final one
  float* chunk_dstates = nullptr;  // chunk: (B * H, n_chunks, K, V) gradient of the state leaving each chunk
};

}  // namespace linmix
