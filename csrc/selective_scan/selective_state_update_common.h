// selective_state_update (one decoding step of the selective SSM, mamba-ssm's contract): the torch-free
// params shared by the glue and the kernels, and the per-row arithmetic both backends run (__host__ __device__).
//
// Canonical layout: state (S, h, p, n) with unit stride along n, a cache of S rows of which batch row i uses
// row idx[i] (idx = state_batch_indices, or i); x, dt, z, out (b, h, p); A (h, p, n); B, C (b, g, n) with
// head i using group i / (h / g) (g may differ between B and C); D, dt_bias (h, p). The glue maps Mamba-1's
// (S, d, n) state to h = lcm(groups of B, groups of C) heads of p = d / h channels, so B/C groups are groups
// of channels. Every stride is in elements and may be 0 (broadcast).
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/math.h"
#include "common/exp2_cpu.h"
#include "common/strided.h"

namespace linmix {

struct SelectiveStateUpdateParams {
  int64_t batch = 0, nheads = 0, headdim = 0, dstate = 0, B_groups = 1, C_groups = 1;
  int64_t state_rows = 0;  // S, the first dim of state
  bool dt_softplus = false;

  StridedView<3> state;  // (S, h, p, n), unit stride along n, updated in place; DType = template argument
  // (b,) int32 or int64, or null (batch row i uses state row i). Negative: a padding row (out 0, no state
  // touched), as mamba-ssm. An entry >= S is padding too, so the kernels never stray whatever the values; the
  // glue raises on it (and on repeats) on the CPU, the Python layer asserts the range on the device on CUDA.
  const void* state_batch_indices = nullptr;
  bool indices_int64 = false;

  // Read-only, strides of all three dims (any may be 0):
  StridedView<3> x, z;        // (b, h, p), input dtype (template argument); z.ptr null without a gate
  StridedView<3> dt;          // (b, h, p), dtype dt_dtype
  StridedView<3> A;           // (h, p, n), accumulation dtype (the glue casts)
  StridedView<3> B, C;        // (b, g, n), dtypes B_dtype, C_dtype
  StridedView<3> D, dt_bias;  // (h, p) in stride[0], stride[1], accumulation dtype; ptr null when absent
  DType dt_dtype = DType::kFloat32, B_dtype = DType::kFloat32, C_dtype = DType::kFloat32;

  void* out = nullptr;  // (b, h, p) contiguous, input dtype
};

// The state row batch row `b` updates, or -1 for a padding (or out-of-range) entry.
LINMIX_HD int64_t ssu_state_row(const SelectiveStateUpdateParams& p, int64_t b) {
  if (p.state_batch_indices == nullptr) return b;
  const int64_t i = p.indices_int64 ? static_cast<const int64_t*>(p.state_batch_indices)[b]
                                    : static_cast<const int32_t*>(p.state_batch_indices)[b];
  return (i < 0 || i >= p.state_rows) ? -1 : i;
}

// exp(x) for the decay exp(δ A): one MUFU.EX2 on the GPU; on the host the polynomial exp2 (common/exp2_cpu.h), so
// the state loop vectorises (relative error about 2e-7; exponents below -126 ln 2 give 0).
LINMIX_HD float ssu_exp(float x) {
#if defined(__CUDA_ARCH__)
  return exp2f(x * kLog2e);
#else
  return exp2_cpu(x * kLog2e);
#endif
}
LINMIX_HD double ssu_exp(double x) { return exp(x); }

// ln(1 + t) for t in [0, 1] as straight-line arithmetic (vectorisable on the host): 2 atanh(u), u = t / (2 + t)
// <= 1/3, by its odd series to u^13 (truncation below 2e-8 relative).
LINMIX_HD float ssu_log1p_unit(float t) {
  const float u = t / (2.f + t), u2 = u * u;
  float q = 1.f / 13.f;
  q = q * u2 + 1.f / 11.f;
  q = q * u2 + 1.f / 9.f;
  q = q * u2 + 1.f / 7.f;
  q = q * u2 + 1.f / 5.f;
  q = q * u2 + 1.f / 3.f;
  q = q * u2 + 1.f;
  return 2.f * u * q;
}

// softplus(v) = log(1 + e^v), the identity above 20 (torch's and mamba-ssm's threshold). The host evaluates
// it as max(v, 0) + log1p(e^-|v|) with the polynomial exp and log1p, so the row loops vectorise.
LINMIX_HD float ssu_softplus(float v) {
#if defined(__CUDA_ARCH__)
  return softplus(v);
#else
  const float m = v > 0.f ? v : 0.f;
  const float sp = m + ssu_log1p_unit(ssu_exp(v > 0.f ? -v : v));
  return v > 20.f ? v : sp;
#endif
}
LINMIX_HD double ssu_softplus(double v) { return softplus(v); }

// δ = dt + dt_bias, softplus'd when asked.
template <typename acc_t>
LINMIX_HD acc_t ssu_delta(acc_t dt, acc_t dt_bias, bool softplus_dt) {
  const acc_t v = dt + dt_bias;
  return softplus_dt ? ssu_softplus(v) : v;
}

// v as a tensor of dtype S holds it (rounded to nearest even), read back in the accumulation type.
template <typename S, typename acc_t>
LINMIX_HD acc_t ssu_round(acc_t v) {
#if defined(__CUDACC__)
  return to_float(from_float<S>(v));
#else
  return static_cast<acc_t>(static_cast<S>(v));
#endif
}

// One state element: s' = exp(δ a) s + (δ x) b_n, rounded to the state's dtype S. The caller stores it and
// accumulates y = Σ_n C_n s'_n from this stored value, as mamba-ssm's selective_state_update_ref does
// (state.copy_(...), then einsum over the state read back): the output is C · the state the next step starts
// from. With a 16-bit state this matters: summing the unrounded values instead is off by up to 0.25 in bf16 at
// n = 64, over mamba's tolerance.
template <typename S, typename acc_t>
LINMIX_HD acc_t ssu_state_step(acc_t s, acc_t decay, acc_t dx, acc_t b_n) {
  return ssu_round<S>(decay * s + dx * b_n);
}

// silu(z) = z / (1 + e^-z). The output gate is ssu_round<T>(ssu_silu(z)), rounded to z's dtype T as the
// reference's F.silu on a T tensor is.
template <typename acc_t>
LINMIX_HD acc_t ssu_silu(acc_t z) {
  return z / (acc_t(1) + ssu_exp(-z));
}

// The row's output from y = Σ_n C_n s'_n and the gate (1 without z): (y + D x) · gate.
template <typename acc_t>
LINMIX_HD acc_t ssu_output(acc_t y, acc_t D, acc_t x, acc_t gate) {
  return (y + D * x) * gate;
}

}  // namespace linmix
