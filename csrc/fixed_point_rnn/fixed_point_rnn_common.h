// Per-token arithmetic of the fixed-point RNN, shared by the CPU and CUDA backends (torch-free).
//
// Householder chains without forming Q or its intermediate vectors. With G_ij = u_i · u_j (the token's
// Gram matrix, constant across iterations) and a_i = u_i · v, the chain v_i = H_i v_{i-1}, v_0 = v
// (Q v = v_R, H_i = I - beta_i u_i u_iᵀ) has c_i = u_i · v_{i-1} = a_i - sum_{j<i} k_j G_ij with
// k_i = beta_i c_i, and Q v = v - sum_i k_i u_i. The transposed chain Qᵀ y (factors in reverse order)
// is the same with sum_{j>i}. So one pass over D gives the R dot products, a few scalar ops the
// coefficients, and a second pass applies them channel by channel.
//
// One forward iteration from h_prev (token t, channel d):
//   x~ = h_prev + Q (u - h_prev) = u - sum_i k_i u_i[d]   (k from a_i = u_i · (u - h_prev))
//   h_t = lam_t h_{t-1} + (1 - lam_t) x~                  (a diagonal scan)
// One adjoint iteration on s = Sᵀ w (S: the forward scan as a linear map, w: the fixed-point adjoint):
//   y = (1 - lam_t) s_prev_t;  g_t + y - Qᵀ y = g_t + sum_i k_i u_i[d]   (reverse chain, a_i = u_i · y)
//   s_t = lam_{t+1} s_{t+1} + that                          (a reverse diagonal scan)
#pragma once

#include <cstdint>

#include "common/math.h"

namespace linmix {

// Largest number of Householder factors per token (sizes the per-thread coefficient arrays).
constexpr int kFixedPointRnnMaxRank = 16;

// Max that propagates NaN (a diverged element must never look converged).
template <typename T>
LINMIX_HD T nan_max(T a, T b) {
  return (b > a || b != b) ? b : a;
}

// Forward chain: c_i = a_i - sum_{j<i} k_j G_ij, k_i = beta_i c_i. gram: (R, R) row-major.
template <typename T, typename G>
LINMIX_HD void householder_chain_fwd(int R, const T* beta, const T* a, const G* gram, T* c, T* k) {
LINMIX_UNROLL
  for (int i = 0; i < kFixedPointRnnMaxRank; ++i) {
    if (i >= R) break;
    T ci = a[i];
LINMIX_UNROLL
    for (int j = 0; j < i; ++j) ci -= k[j] * static_cast<T>(gram[i * R + j]);
    c[i] = ci;
    k[i] = beta[i] * ci;
  }
}

// Transposed chain (H_R applied first): d_i = a_i - sum_{j>i} k_j G_ij, k_i = beta_i d_i.
template <typename T, typename G>
LINMIX_HD void householder_chain_bwd(int R, const T* beta, const T* a, const G* gram, T* d, T* k) {
LINMIX_UNROLL
  for (int i = kFixedPointRnnMaxRank - 1; i >= 0; --i) {
    if (i < R) {
      T di = a[i];
LINMIX_UNROLL
      for (int j = i + 1; j < kFixedPointRnnMaxRank; ++j) {
        if (j >= R) break;
        di -= k[j] * static_cast<T>(gram[i * R + j]);
      }
      d[i] = di;
      k[i] = beta[i] * di;
    }
  }
}

// sum_i k_i u_i[d] for one channel; ud[i] = u_i[d].
template <typename T>
LINMIX_HD T householder_mix(int R, const T* k, const T* ud) {
  T m = T(0);
LINMIX_UNROLL
  for (int i = 0; i < kFixedPointRnnMaxRank; ++i) {
    if (i >= R) break;
    m += k[i] * ud[i];
  }
  return m;
}

// Forward scan input (1 - lam) x~ with x~ = u - mix.
template <typename T>
LINMIX_HD T fixed_point_rnn_scan_input(T lam, T u, T mix) {
  return (T(1) - lam) * (u - mix);
}

// Adjoint: the vector the transposed chain is applied to, and the reverse scan's input.
template <typename T>
LINMIX_HD T fixed_point_rnn_adjoint_pre(T lam, T s) {
  return (T(1) - lam) * s;
}
template <typename T>
LINMIX_HD T fixed_point_rnn_adjoint_input(T g, T mix) {
  return g + mix;
}

// One step's VJP at h_prev for one channel of token t, given s (the scanned upstream gradient):
//   dlam = s (h_{t-1} - x~), e = dx~ = (1 - lam) s, du = Qᵀ e, and for factor i with input v_{i-1}
//   and output gradient e_i: dL/du_i = -beta_i (c_i e_i + d_i v_{i-1}), dL/dbeta_i = -c_i d_i,
// where c, k come from the forward chain on a_i = u_i · (u - h_prev) and d, kk from the transposed
// chain on u_i · e. Walking i upwards: v_i = v_{i-1} - k_i u_i, e_i = e_{i-1} + kk_i u_i, e_0 = Qᵀ e.
// Writes dud[i] = dL/du_i[d] and returns du[d].
template <typename T>
LINMIX_HD T householder_vjp_channel(int R, const T* ud, const T* beta, const T* c, const T* k, const T* dd,
                                    const T* kk, T v0, T e, T* dud) {
  const T e0 = e - householder_mix(R, kk, ud);
  T v = v0, ei = e0;
LINMIX_UNROLL
  for (int i = 0; i < kFixedPointRnnMaxRank; ++i) {
    if (i >= R) break;
    ei += kk[i] * ud[i];
    dud[i] = -beta[i] * (c[i] * ei + dd[i] * v);
    v -= k[i] * ud[i];
  }
  return e0;
}

template <typename T>
LINMIX_HD T fixed_point_rnn_grad_lam(T s, T h_before, T x_tilde) {
  return s * (h_before - x_tilde);
}
template <typename T>
LINMIX_HD T householder_grad_beta(T c, T d) {
  return -c * d;
}

// The damped update (1 - damping) z_old + damping f, f = f(z_old).
template <typename T>
LINMIX_HD T fixed_point_rnn_damp(T damping, T z_old, T f) {
  return (T(1) - damping) * z_old + damping * f;
}

// The batch quantile of stopping="batch" (torch.quantile's linear interpolation): NaN and +inf residuals count
// as `big`, the largest finite value (so they interpolate instead of giving NaN, and never pass a test < tol);
// the q-quantile of n sorted keys r is r[lo] + frac (r[lo + 1] - r[lo]) at position q (n - 1) = lo + frac.
template <typename T>
LINMIX_HD T fixed_point_rnn_quantile_key(T residual, T big) {
  return (residual != residual || residual > big) ? big : residual;
}
LINMIX_HD double fixed_point_rnn_quantile_pos(double q, int64_t n) { return q * static_cast<double>(n - 1); }
template <typename T>
LINMIX_HD T fixed_point_rnn_quantile_lerp(T r_lo, T r_hi, double pos) {
  const T frac = static_cast<T>(pos - static_cast<double>(static_cast<int64_t>(pos)));
  return frac == T(0) ? r_lo : r_lo + frac * (r_hi - r_lo);
}

// Per-token convergence ratio |h^l - h^{l-1}|_inf / |h^l|_inf; an unchanged token counts as 0 (also
// when |h^l| = 0), a changed token with |h^l| = 0 as +inf. The residual is the max over tokens.
template <typename T>
LINMIX_HD T fixed_point_rnn_token_ratio(T diff_max, T norm_max) {
  return diff_max > T(0) ? diff_max / norm_max : (diff_max != diff_max ? diff_max : T(0));
}

}  // namespace linmix
