"""The fixed-point loop in Python, shared by the layers whose iteration is not the fused op's (FPMamba,
FixedPointRNN(state_dependent=True)): damping, the stopping rules, and the implicit gradient. The fused op
(linmix.fixed_point_rnn) runs the same rules on the device."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ._native import acc_dtype
from .ops.fixed_point_rnn import GRAD_MODES

Step = Callable[[torch.Tensor], torch.Tensor]
LOOP_GRAD_MODES = GRAD_MODES + ("unroll",)  # the op's, and backpropagation through every iteration


def token_ratio(f: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """|f_t - y_t|_inf / (|f_t|_inf + eps) per token, (B, L, d) -> (B, L): 0 where the token did not change,
    NaN where either is NaN. eps = 1e-8 is the authors' layers' rule; eps = 0 the fused op's."""
    diff = (f - y).abs().amax(-1)
    unchanged_or_nan = torch.where(diff.isnan(), diff, torch.zeros_like(diff))
    return torch.where(diff > 0, diff / (f.abs().amax(-1) + eps), unchanged_or_nan)


class Solution(NamedTuple):
    y: torch.Tensor  # (B, L, d) the last iterate
    y_prev: torch.Tensor  # (B, L, d) the iterate it was computed from (y = f(y_prev) without damping)
    n_iter: torch.Tensor  # (B,) int32: iterations in which any token of the element changed
    residual: torch.Tensor  # (B,): the max over tokens of each token's last ratio before it stopped


def solve(step: Step, y: torch.Tensor, max_iter: int, tol: float = 0.0, damping: float = 1.0,
          stopping: str = "element", quantile: float = 1.0, host_exit: bool = False) -> Solution:
    """Up to max_iter damped iterations y <- s f(y) + (1 - s) y from y (B, L, d), f = step, frozen where
    converged. With the per-token ratio r_t (token_ratio, before damping, as the authors), stopping "element"
    stops an element once its residual max_t r_t < tol, "batch" stops all once the ``quantile`` of the
    elements' residuals is < tol, "causal" stops token t once max_{s<=t} r_s < tol. tol = 0 runs max_iter
    iterations. The ratio's denominator is |f_t|_inf + 1e-8, as in the authors' layers.

    The loop always runs max_iter iterations and reads nothing back (no host synchronisation; it traces
    under torch.compile), unless host_exit: then it reads ``done`` after each iteration and ends once
    everything has stopped (same result: what has stopped no longer changes; skipped under torch.compile).
    Differentiable through every iteration when autograd is on."""
    done = torch.zeros(y.shape[:2], dtype=torch.bool, device=y.device)  # (B, L)
    n_iter = torch.zeros(y.shape[0], dtype=torch.int32, device=y.device)
    ratio = torch.full(y.shape[:2], float("inf"), dtype=acc_dtype(y), device=y.device)  # (B, L)
    residual = ratio.new_full(y.shape[:1], float("inf"))  # (B,)
    y_prev = y
    host_exit = host_exit and not torch.compiler.is_compiling()
    for _ in range(max_iter):
        f = step(y)
        r = token_ratio(f, y, 1e-8).to(ratio.dtype)  # (B, L)
        active = ~done
        new = f if damping == 1.0 else damping * f + (1 - damping) * y
        y_prev = torch.where(active[..., None], y, y_prev)
        y = torch.where(active[..., None], new, y)
        n_iter = n_iter + active.any(-1).to(torch.int32)
        ratio = torch.where(active, r, ratio)
        residual = ratio.amax(-1)
        if tol > 0:
            if stopping == "causal":
                done = done | (ratio.cummax(-1).values < tol)
            elif stopping == "element":
                done = done | (residual < tol)[:, None]
            else:
                done = done | (torch.quantile(residual, quantile) < tol)
            if host_exit and bool(done.all()):
                break
    return Solution(y, y_prev, n_iter, residual)


class _ImplicitGrad(torch.autograd.Function):
    """Identity forward; the backward replaces the incoming gradient g by adjoint(g)."""

    @staticmethod
    def forward(ctx, y, adjoint):
        ctx.adjoint = adjoint
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return ctx.adjoint(g), None


def implicit_grad(y: torch.Tensor, adjoint: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """y = f(y*) with an implicit backward: the gradient g reaching y becomes adjoint(g), the solution w of
    w = g + J_yᵀ w at the fixed point, before it flows on through f's graph."""
    return _ImplicitGrad.apply(y, adjoint)


def step_adjoint(step: Step, y_star: torch.Tensor, max_iter: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """g -> w = g + J_yᵀ w by max_iter iterations from w = g, J_y the Jacobian of ``step`` (built on detached
    constants) at y*, its vector-Jacobian products taken through one step built here."""
    y0 = y_star.detach().requires_grad_()
    with torch.enable_grad():
        f0 = step(y0)

    def adjoint(g):
        return solve(lambda w: torch.autograd.grad(f0, y0, w, retain_graph=True)[0] + g, g, max_iter).y

    return adjoint


def shift(y: torch.Tensor, y_first: torch.Tensor | None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L, d) -> y_{t-1}, with y_first (B, d) (or zeros) at t = 0. cu_seqlens: packed sequences (B = 1,
    (N + 1,) offsets): zeros at every sequence's first step too, so that no step reads the previous sequence (a
    mask built on the device, no host synchronisation)."""
    prev = y.new_zeros(y[:, :1].shape) if y_first is None else y_first[:, None].to(y.dtype)
    out = torch.cat([prev, y[:, :-1]], dim=1)
    if cu_seqlens is None:
        return out
    L = y.shape[1]
    starts = cu_seqlens[:-1].long().clamp(0, L)  # an empty sequence at the end starts at L: the extra slot
    keep = y.new_ones(L + 1).index_fill_(0, starts, 0)[:L]
    return out * keep[None, :, None]
