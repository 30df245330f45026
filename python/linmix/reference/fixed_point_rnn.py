"""Reference fixed-point RNN (Movahedi et al., NeurIPS 2025), in float64 and differentiable.

Q_t = H_{t,R} ⋯ H_{t,1}, H_{t,i} = I - beta_{t,i} u_{t,i} u_{t,i}ᵀ. One iteration from h_prev:
x~_t = h_prev_t + Q_t (u_t - h_prev_t), then h_t = lam_t h_{t-1} + (1 - lam_t) x~_t (h_{-1} = h0, zeros by default).
"""

from __future__ import annotations

import torch

from .linear_scan import linear_scan_ref

_BIG = torch.finfo(torch.float64).max  # NaN / inf residuals in a batch quantile: the largest finite value


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


def fixed_point_step_ref(u, lam, hh_u, hh_beta, h_prev, h0=None):
    """One iteration f(h_prev) in float64; h0 (B, D): the state before token 0 (None: zeros)."""
    u, lam, hh_u, hh_beta, h_prev = (x.double() for x in (u, lam, hh_u, hh_beta, h_prev))
    x_tilde = h_prev + householder_apply_ref(hh_u, hh_beta, u - h_prev)
    return linear_scan_ref(lam, (1 - lam) * x_tilde, h0)


def fixed_point_iter_ref(u, lam, hh_u, hh_beta, n_iter: int, h0=None, damping: float = 1.0) -> torch.Tensor:
    """Exactly n_iter iterations from z^0 = 0, in float64: returns f(z^{n-1}), where
    z^l = (1 - damping) z^{l-1} + damping f(z^{l-1}) (damping = 1: the plain iterate h^n; n_iter = 0: zeros)."""
    if n_iter == 0:
        return torch.zeros_like(u, dtype=torch.float64)
    return fixed_point_step_ref(u, lam, hh_u, hh_beta, fixed_point_iterate_ref(u, lam, hh_u, hh_beta, n_iter - 1,
                                                                                h0, damping), h0)


def fixed_point_iterate_ref(u, lam, hh_u, hh_beta, n: int, h0=None, damping: float = 1.0) -> torch.Tensor:
    """The damped iterate z^n (z^0 = 0) in float64."""
    z = torch.zeros_like(u, dtype=torch.float64)
    for _ in range(n):
        z = (1 - damping) * z + damping * fixed_point_step_ref(u, lam, hh_u, hh_beta, z, h0)
    return z


def fixed_point_solve_ref(u, lam, hh_u, hh_beta, max_iter: int, tol: float, h0=None, damping: float = 1.0,
                          stopping: str = "element", quantile: float = 0.9):
    """linmix.fixed_point_rnn's forward with its stopping rules, one float64 iteration at a time.

    Returns (h, h_prev, n_iter, residual) with h = f(h_prev): residual per element is
    max_t |f_t - z_t|_inf / |f_t|_inf (an unchanged token counts 0) before damping; "element" stops each
    element once its residual < tol, "batch" all elements once the quantile of the residuals < tol,
    "causal" keeps token t's z_t from the first iteration whose max_{s<=t} ratio_s < tol.
    """
    u, lam, hh_u, hh_beta = (x.double() for x in (u, lam, hh_u, hh_beta))
    B, T, D = u.shape
    z = torch.zeros_like(u)
    done = torch.zeros(B, dtype=torch.bool)
    h_prev, n_iter, residual = z.clone(), torch.zeros(B, dtype=torch.int32), torch.zeros(B, dtype=torch.float64)
    frozen = torch.zeros(B, T, dtype=torch.bool)
    for n in range(1, max_iter + 1):
        f = fixed_point_step_ref(u, lam, hh_u, hh_beta, z, h0)
        diff, norm = (f - z).abs().amax(-1), f.abs().amax(-1)
        ratio = torch.where(diff > 0, diff / norm, torch.where(diff.isnan(), diff, torch.zeros_like(diff)))
        res = ratio.amax(-1) if T else torch.zeros(B, dtype=torch.float64)
        live = ~done
        n_iter[live], residual[live] = n, res[live]
        if stopping == "causal":
            new = (ratio.nan_to_num(nan=float("inf")).cummax(-1).values < tol) & ~frozen & live[:, None]
            h_prev[new] = z[new]
            frozen |= new
            met = frozen.all(-1)
        elif stopping == "batch":
            quant = torch.quantile(res.nan_to_num(nan=_BIG, posinf=_BIG), quantile) if B else None
            met = torch.full((B,), B > 0 and bool(quant < tol))
        else:
            met = res < tol
        stop = live & (met | (n == max_iter))
        if stopping == "causal":
            rest = stop[:, None] & ~frozen
            h_prev[rest] = z[rest]
        else:
            h_prev[stop] = z[stop]
        done |= stop
        if done.all():
            break
        z = torch.where(done[:, None, None], z, (1 - damping) * z + damping * f)
    return fixed_point_step_ref(u, lam, hh_u, hh_beta, h_prev, h0), h_prev, n_iter, residual.float()


def fixed_point_dense_ref(u, lam, hh_u, hh_beta, h0=None) -> torch.Tensor:
    """The dense linear RNN the iteration converges to, token by token in float64:
    (diag(lam_t) + (I - diag(lam_t)) Q_t) h_t = lam_t * h_{t-1} + (1 - lam_t) * Q_t u_t, Q_t formed densely,
    from h_{-1} = h0 (None: zeros)."""
    u, lam, hh_u, hh_beta = (x.double() for x in (u, lam, hh_u, hh_beta))
    B, T, D = u.shape
    q = householder_dense_ref(hh_u, hh_beta)
    h = u.new_zeros(B, D) if h0 is None else h0.double()
    out = []
    for t in range(T):
        lt = lam[:, t]
        m = torch.diag_embed(lt) + (1 - lt)[..., None] * q[:, t]
        rhs = lt * h + (1 - lt) * (q[:, t] @ u[:, t, :, None])[..., 0]
        h = torch.linalg.solve(m, rhs)
        out.append(h)
    return torch.stack(out, 1) if out else torch.empty_like(u)
