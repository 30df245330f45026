"""fixed_point_rnn: a dense linear RNN as the fixed point of a Householder channel mix and a diagonal scan."""

from __future__ import annotations

import torch

from .._native import acc_dtype, check_backend, nvtx_range

_GRAD_MODES = ("onestep", "implicit")


@torch.library.register_fake("linmix::fixed_point_rnn_fwd")
def _fwd_fake(u, lam, hh_u, hh_beta, max_iter, tol):
    h = torch.empty_like(u, memory_format=torch.contiguous_format)
    h_prev = torch.empty_like(u, dtype=acc_dtype(u), memory_format=torch.contiguous_format)
    n_iter = u.new_empty((u.shape[0],), dtype=torch.int32)
    residual = u.new_empty((u.shape[0],), dtype=torch.float32)
    return h, h_prev, n_iter, residual


@torch.library.register_fake("linmix::fixed_point_rnn_bwd")
def _bwd_fake(dh, u, lam, hh_u, hh_beta, h_prev, max_iter, tol):
    def like(x):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    return like(u), like(lam), like(hh_u), like(hh_beta)


class FixedPointRNNFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, lam, hh_u, hh_beta, max_iter, tol, grad_mode):
        with nvtx_range("linmix/fixed_point_rnn/fwd", u):
            h, h_prev, n_iter, residual = torch.ops.linmix.fixed_point_rnn_fwd(u, lam, hh_u, hh_beta, max_iter, tol)
        ctx.save_for_backward(u, lam, hh_u, hh_beta, h_prev)
        # onestep: w = g, i.e. exactly one adjoint iteration; implicit: iterate w = g + J_hᵀ w like the forward.
        ctx.adjoint = (1, 0.0) if grad_mode == "onestep" else (max_iter, tol)
        ctx.mark_non_differentiable(n_iter, residual)
        return h, n_iter, residual

    @staticmethod
    def backward(ctx, dh, _dn, _dres):
        u, lam, hh_u, hh_beta, h_prev = ctx.saved_tensors
        with nvtx_range("linmix/fixed_point_rnn/bwd", u):
            grads = torch.ops.linmix.fixed_point_rnn_bwd(dh.to(u.dtype), u, lam, hh_u, hh_beta, h_prev, *ctx.adjoint)
        return (*grads, None, None, None)


def fixed_point_rnn(
    u: torch.Tensor,
    lam: torch.Tensor,
    hh_u: torch.Tensor,
    hh_beta: torch.Tensor,
    max_iter: int = 32,
    tol: float = 1e-4,
    grad_mode: str = "onestep",
    return_info: bool = False,
):
    """Fixed-point RNN: the dense linear RNN reached by iterating (Householder channel mix, diagonal scan).

    From h^0 = 0, iteration l computes x~_t = h_t + Q_t (u_t - h_t) with h = h^{l-1} and
    Q_t = H_{t,R} ⋯ H_{t,1}, H_{t,i} = I - hh_beta[t,i] hh_u[t,i] hh_u[t,i]ᵀ (H_{t,1} applied first),
    then h^l_t = lam_t h^l_{t-1} + (1 - lam_t) x~_t. Each batch element stops once
    max_t |h^l_t - h^{l-1}_t|_inf / |h^l_t|_inf < tol (tol=0: exactly max_iter iterations), or at max_iter;
    the loop runs on the device without host synchronisation. The fixed point solves
    (diag(lam_t) + (I - diag(lam_t)) Q_t) h_t = lam_t h_{t-1} + (1 - lam_t) Q_t u_t.

    Args:
        u, lam: (B, T, D); lam in (0, 1). float32 / float16 / bfloat16 (float64 on CPU), one dtype for all inputs.
        hh_u: (B, T, R, D) unit vectors, used as given (the caller normalises), 1 <= R <= 16.
        hh_beta: (B, T, R), in [0, 2).
        max_iter: iteration cap (>= 1). tol: relative residual to stop at (>= 0).
        grad_mode: "onestep": the output is h^n = f(h^{n-1}) with h^{n-1} detached, and gradients are one
            iteration's VJP (the authors' training gradient). "implicit": the exact gradient of the fixed
            point, solving w = g + J_hᵀ w by adjoint iterations (same max_iter / tol), then one VJP with w.
        return_info: also return the per-batch iteration count and residual.

    Returns:
        h: (B, T, D) in u's dtype (state and accumulation in float32, float64 for float64 inputs),
        differentiable w.r.t. u, lam, hh_u, hh_beta; with return_info, also n_iter (B,) int32 and
        residual (B,) float32.
    """
    check_backend("fixed_point_rnn", u, lam, hh_u, hh_beta)
    if grad_mode not in _GRAD_MODES:
        raise ValueError(f"linmix.fixed_point_rnn: grad_mode must be one of {_GRAD_MODES}, got {grad_mode!r}")
    h, n_iter, residual = FixedPointRNNFn.apply(u, lam, hh_u, hh_beta, int(max_iter), float(tol), grad_mode)
    return (h, n_iter, residual) if return_info else h
