"""Reference fixed-point RNN (Movahedi et al., NeurIPS 2025), in float64 and differentiable.

Q_t = H_{t,R} ⋯ H_{t,1}, H_{t,i} = I - beta_{t,i} u_{t,i} u_{t,i}ᵀ. One iteration from h_prev:
x~_t = h_prev_t + Q_t (u_t - h_prev_t), then h_t = lam_t h_{t-1} + (1 - lam_t) x~_t.
"""

from __future__ import annotations

import torch

from .linear_scan import linear_scan_ref


def householder_apply_ref(hh_u: torch.Tensor, hh_beta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Q_t v_t for every (b, t): H_{t,1} first. hh_u (B, T, R, D), hh_beta (B, T, R), v (B, T, D)."""
    for i in range(hh_u.shape[2]):
        w = hh_u[:, :, i]
        v = v - hh_beta[:, :, i, None] * (w * v).sum(-1, keepdim=True) * w
    return v


def householder_dense_ref(hh_u: torch.Tensor, hh_beta: torch.Tensor) -> torch.Tensor:
    """Q_t = H_{t,R} ⋯ H_{t,1} as dense (B, T, D, D) matrices."""
    D = hh_u.shape[-1]
    eye = torch.eye(D, dtype=hh_u.dtype, device=hh_u.device)
    q = eye.expand(*hh_u.shape[:2], D, D)
    for i in range(hh_u.shape[2]):
        w = hh_u[:, :, i]
        q = (eye - hh_beta[:, :, i, None, None] * w[..., :, None] * w[..., None, :]) @ q
    return q


def fixed_point_step_ref(u, lam, hh_u, hh_beta, h_prev):
    """One iteration f(h_prev) in float64."""
    u, lam, hh_u, hh_beta, h_prev = (x.double() for x in (u, lam, hh_u, hh_beta, h_prev))
    x_tilde = h_prev + householder_apply_ref(hh_u, hh_beta, u - h_prev)
    return linear_scan_ref(lam, (1 - lam) * x_tilde)


def fixed_point_iter_ref(u, lam, hh_u, hh_beta, n_iter: int) -> torch.Tensor:
    """Exactly n_iter iterations from h^0 = 0, in float64."""
    h = torch.zeros_like(u, dtype=torch.float64)
    for _ in range(n_iter):
        h = fixed_point_step_ref(u, lam, hh_u, hh_beta, h)
    return h


def fixed_point_dense_ref(u, lam, hh_u, hh_beta) -> torch.Tensor:
    """The dense linear RNN the iteration converges to, token by token in float64:
    (diag(lam_t) + (I - diag(lam_t)) Q_t) h_t = lam_t * h_{t-1} + (1 - lam_t) * Q_t u_t, Q_t formed densely."""
    u, lam, hh_u, hh_beta = (x.double() for x in (u, lam, hh_u, hh_beta))
    B, T, D = u.shape
    q = householder_dense_ref(hh_u, hh_beta)
    h = u.new_zeros(B, D)
    out = []
    for t in range(T):
        lt = lam[:, t]
        m = torch.diag_embed(lt) + (1 - lt)[..., None] * q[:, t]
        rhs = lt * h + (1 - lt) * (q[:, t] @ u[:, t, :, None])[..., 0]
        h = torch.linalg.solve(m, rhs)
        out.append(h)
    return torch.stack(out, 1) if out else torch.empty_like(u)
