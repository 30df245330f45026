"""The fixed-point loop shared by the layers whose iteration reads the previous iterate's y_{t-1}
(FPMamba, FixedPointRNN(state_dependent=True)): damping, the stopping rules, and the implicit gradient."""

from __future__ import annotations

from typing import Callable

import torch

from .._native import acc_dtype

Step = Callable[[torch.Tensor], torch.Tensor]


def solve(step: Step, y: torch.Tensor, max_iter: int, tol: float, damping: float, stopping: str, quantile: float,
          host_exit: bool = False):
    """Up to max_iter damped iterations y <- s f(y) + (1 - s) y from y (B, L, d), f = step, frozen where
    converged. With the per-token ratio r_t = |f_t - y_t|_inf / (|f_t|_inf + 1e-8) (before damping, as the
    authors), stopping "element" stops an element once max_t r_t < tol, "batch" stops all once the
    ``quantile`` of the elements' residuals is < tol, "causal" stops token t once max_{s<=t} r_s < tol.

    The loop always runs max_iter iterations and reads nothing back (no host synchronisation; it traces
    under torch.compile), unless host_exit: then it reads ``done`` after each iteration and ends once
    everything has stopped (same result: what has stopped no longer changes; skipped under torch.compile). Differentiable through every iteration when autograd is on. Returns y,
    n_iter (B,) int32 (iterations in which any token of the element changed) and residual (B,) (max over
    tokens of each token's last ratio before it stopped)."""
    done = torch.zeros(y.shape[:2], dtype=torch.bool, device=y.device)  # (B, L)
    n_iter = torch.zeros(y.shape[0], dtype=torch.int32, device=y.device)
    ratio = torch.full(y.shape[:2], float("inf"), dtype=acc_dtype(y), device=y.device)  # (B, L)
    host_exit = host_exit and not torch.compiler.is_compiling()
    for _ in range(max_iter):
        f = step(y)
        r = ((f - y).abs().amax(-1) / (f.abs().amax(-1) + 1e-8)).to(ratio.dtype)  # (B, L)
        active = ~done
        new = f if damping == 1.0 else damping * f + (1 - damping) * y
        y = torch.where(active[..., None], new, y)
        n_iter = n_iter + active.any(-1).to(torch.int32)
        ratio = torch.where(active, r, ratio)
        if tol > 0:
            if stopping == "causal":
                done = done | (ratio.cummax(-1).values < tol)
            elif stopping == "element":
                done = done | (ratio.amax(-1, keepdim=True) < tol)
            else:
                done = done | (torch.quantile(ratio.amax(-1), quantile) < tol)
            if host_exit and bool(done.all()):
                break
    return y, n_iter, ratio.amax(-1)


def attach_implicit_grad(step: Step, y_star: torch.Tensor, y: torch.Tensor, max_iter: int) -> torch.Tensor:
    """Make y = f(y*)'s backward implicit: the incoming g becomes w = g + J_yᵀ w (max_iter steps from w = g),
    J_y the Jacobian of ``step`` (built on detached constants) at y*."""
    y0 = y_star.detach().requires_grad_()
    with torch.enable_grad():
        f0 = step(y0)

    def hook(g):
        w = g
        for _ in range(max_iter):
            w = torch.autograd.grad(f0, y0, w, retain_graph=True)[0] + g
        return w

    y.register_hook(hook)
    return y


def shift(y: torch.Tensor, y_first: torch.Tensor | None) -> torch.Tensor:
    """(B, L, d) -> y_{t-1}, with y_first (B, d) (or zeros) at t = 0."""
    prev = y.new_zeros(y[:, :1].shape) if y_first is None else y_first[:, None].to(y.dtype)
    return torch.cat([prev, y[:, :-1]], dim=1)
