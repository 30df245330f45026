// Arithmetic of the selective scan shared by the CPU and CUDA kernels (__host__ __device__, torch-free).
//
// Per (batch b, channel d, state n), with δ_t = softplus(delta_t + bias_d) (or delta_t + bias_d):
//   h_t = a_t h_{t-1} + x_t,  a_t = exp(δ_t A_dn),  x_t = δ_t B_t[n] u_t
//   y_t = Σ_n C_t[n] h_t[n] + D_d u_t,  out_t = y_t silu(z_t)
// Backward, with dy_t = dout_t silu(z_t) and s_t the gradient reaching h_{t-1} (s_L = dfinal):
//   g_t = C_t[n] dy_t + s_{t+1}  (the total gradient of h_t),  s_t = a_t g_t,  dinitial = s_0.
#pragma once

#include <cstdint>

#include "common/math.h"
#include "selective_scan/params.h"

namespace linmix {

// δ from the raw delta.
template <typename T>
LINMIX_HD T ss_delta(T raw, T bias, bool use_softplus) {
  const T x = raw + bias;
  return use_softplus ? softplus(x) : x;
}

// dδ / d(raw delta); matches torch's softplus backward (gradient 1 above the threshold 20).
template <typename T>
LINMIX_HD T ss_delta_grad(T raw, T bias, bool use_softplus) {
  const T x = raw + bias;
  return (use_softplus && !(x > T(20))) ? sigmoid(x) : T(1);
}

// a = exp(δ A) computed as exp2(δ · coef) with coef = A log2(e) hoisted out of the time loop (fp32);
// fp64 (CPU test path) uses exp directly.
LINMIX_HD float ss_decay_coef(float A) { return A * kLog2e; }
LINMIX_HD double ss_decay_coef(double A) { return A; }
LINMIX_HD float ss_decay(float delta, float coef) {
#if defined(__CUDA_ARCH__)
  return exp2f(delta * coef);
#else
  return std::exp2(delta * coef);
#endif
}
LINMIX_HD double ss_decay(double delta, double coef) { return std::exp(delta * coef); }

// The forward step as a scan pair: h = a h_prev + B δu.
template <typename T>
LINMIX_HD ScanPair<T> ss_forward_pair(T delta, T coef, T b_val, T delta_u) {
  return {ss_decay(delta, coef), b_val * delta_u};
}

// The adjoint step as a scan pair running backwards in time: s_t = a_t s_{t+1} + a_t C_t dy_t.
template <typename T>
LINMIX_HD ScanPair<T> ss_adjoint_pair(T a, T c_dy) {
  return {a, a * c_dy};
}

// Gradient contributions of one step (one state n at one time t), given g = dL/dh_t and h_prev = h_{t-1}:
// dL/du_t, dL/dδ_t, dL/dA_n, dL/dB_t[n] (dL/dC_t[n] = dy_t h_t is formed by the caller).
template <typename T>
struct SSStepGrad {
  T du, ddelta, dA, dB;
};

template <typename T>
LINMIX_HD SSStepGrad<T> ss_step_grad(T g, T h_prev, T a, T delta, T A, T b_val, T u) {
  const T g_ha = g * h_prev * a;  // dL/da_t, times a_t (d a / d(δA) = a)
  return {g * delta * b_val, g * b_val * u + g_ha * A, g_ha * delta, g * delta * u};
}

// Output gate out = y silu(z): dL/dy = dout silu(z), dL/dz = dout y silu'(z).
template <typename T>
LINMIX_HD T ss_gate_dy(T dout, T z) {
  return dout * silu(z);
}
template <typename T>
LINMIX_HD T ss_gate_dz(T dout, T y, T z) {
  return dout * y * silu_grad(z);
}

// Sequence `seq` of channel di, as the kernels walk it: batch row seq whole (dense), or span seq of row 0
// (packed). bd indexes the per-(sequence, channel) tensors; ckpt is the element offset of its first checkpoint.
struct SsSeq {
  int64_t bd, bi, begin, len, n_chunks, ckpt;
};
LINMIX_HD SsSeq ss_seq(const SelectiveScanParams& p, int64_t seq, int64_t di) {
  const SeqSpan s = p.varlen.span(seq, p.seqlen);
  const int64_t slot = p.varlen.packed() ? packed_chunk_slot(seq, s.begin, kSelectiveScanChunk, 0) : 0;
  return {seq * p.dim + di, s.batch, s.begin, s.len, ceil_div(s.len, kSelectiveScanChunk),
          ((s.batch * p.dim + di) * p.n_chunks + slot) * p.dstate};
}

// Element offset of B/C at (batch b, channel d, state n, time 0); variable layouts add t (unit stride).
LINMIX_HD int64_t ss_bc_offset(const BCView& v, int64_t b, int64_t d, int64_t n, int64_t dim) {
  return v.variable ? b * v.batch_stride + (d / (dim / v.n_groups)) * v.group_stride + n * v.n_stride
                    : d * v.dim_stride + n * v.n_stride;
}

}  // namespace linmix
