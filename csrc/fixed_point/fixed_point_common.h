// Per-element arithmetic of the fixed-point RNN, shared by the CPU and CUDA backends (torch-free).
//
// One forward iteration from h_prev (channels d, token t):
//   v = u_t - h_prev_t;  v <- H_i v for i = 1..R  (H_i = I - beta_i u_i u_iᵀ, so Q_t v = H_R ⋯ H_1 v)
//   b_t = (1 - lam_t) * (h_prev_t + Q_t v);  h_t = lam_t * h_{t-1} + b_t            (a diagonal scan)
// The adjoint iteration on s = Sᵀ w (S the forward scan operator, w the fixed-point adjoint):
//   y = (1 - lam_t) * s_prev_t;  b_t = g_t + y - Q_tᵀ y;  s_t = lam_{t+1} * s_{t+1} + b_t  (a reverse scan)
// with Q_tᵀ y = H_1 ⋯ H_R y (factors in reverse order).
#pragma once

#include "common/math.h"

namespace linmix {

// Largest number of Householder factors per token (register arrays on the GPU are sized by it).
constexpr int kFixedPointMaxRank = 16;

// H v = v - coef * u with coef = beta * (u · v): the factor's scalar, then its per-channel update.
template <typename T>
LINMIX_HD T householder_coef(T beta, T u_dot_v) {
  return beta * u_dot_v;
}
template <typename T>
LINMIX_HD T householder_update(T v, T coef, T u) {
  return v - coef * u;
}

// VJP of v' = v - beta (u · v) u for upstream e = dL/dv', with c = u · v and d = u · e:
//   dL/dv = H e (householder_update with coef beta * d), dL/du = -beta (c e + d v), dL/dbeta = -c d.
template <typename T>
LINMIX_HD T householder_grad_u(T beta, T c, T d, T e, T v) {
  return -beta * (c * e + d * v);
}
template <typename T>
LINMIX_HD T householder_grad_beta(T c, T d) {
  return -c * d;
}

// Scan input of the forward iteration: (1 - lam) * x~ with x~ = h_prev + Q (u - h_prev).
template <typename T>
LINMIX_HD T fixed_point_scan_input(T lam, T h_prev, T q_v) {
  return (T(1) - lam) * (h_prev + q_v);
}

// Adjoint: the vector Q_tᵀ is applied to, and the reverse scan's input g + (I - Q)ᵀ y.
template <typename T>
LINMIX_HD T fixed_point_adjoint_pre(T lam, T s) {
  return (T(1) - lam) * s;
}
template <typename T>
LINMIX_HD T fixed_point_adjoint_input(T g, T y, T qt_y) {
  return g + y - qt_y;
}

// One-step VJP at the linearisation point, per channel, given s (the scanned upstream gradient):
//   dlam_t = s_t (h_{t-1} - x~_t),  dx~_t = (1 - lam_t) s_t.
template <typename T>
LINMIX_HD T fixed_point_grad_lam(T s, T h_before, T x_tilde) {
  return s * (h_before - x_tilde);
}

// Per-token convergence ratio |h^l - h^{l-1}|_inf / |h^l|_inf; an unchanged token counts as 0 (also
// when |h^l| = 0), a changed token with |h^l| = 0 as +inf. The residual is the max over tokens.
template <typename T>
LINMIX_HD T fixed_point_token_ratio(T diff_max, T norm_max) {
  return diff_max > T(0) ? diff_max / norm_max : T(0);
}

}  // namespace linmix
