"""FPMamba: the fixed-point Mamba layer (Movahedi et al., "Fixed-Point RNNs", NeurIPS 2025, sec. 4 / app. C)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .._fixed_point_loop import LOOP_GRAD_MODES, implicit_grad, shift, solve, step_adjoint
from .._native import acc_dtype
from ..ops.fixed_point_rnn import STOPPING
from ..ops.selective_scan import selective_scan
from .conv import causal_conv
from .mamba import init_dt_proj


class FPMambaState(NamedTuple):
    """What FPMamba carries from one call to the next (streaming / decoding)."""

    conv: torch.Tensor | None  # (B, d_inner, d_conv): the last d_conv conv inputs; None when d_conv = 0
    ssm: torch.Tensor  # (B, d_inner, d_state): the scan state after the last token, float32 (float64)
    y: torch.Tensor  # (B, d_inner): the last token's fixed point y, read by the next token's mixer, B/C, gate


class FPMamba(nn.Module):
    """A matrix-state fixed-point RNN: a fixed point around Mamba-1's selective scan (FP-Mamba).

    The block is Mamba's (in_proj to x and z, causal conv, softplus dt, A = -exp(A_log), D, out_proj), but
    the scan's input is first mixed across channels by an input- and state-dependent Householder product
    Q_t, and the scan's B and C read the previous output y_{t-1}. The layer output is the fixed point y of
    one iteration ℓ (y⁰ = 0), per token t::

        p_t = [x_t; y^{ℓ-1}_{t-1}]
        Q_t = H_r ⋯ H_1,  H_i = I - 2 α_i u_i u_iᵀ,  u_i = l2norm(silu(W_u,i p_t)),  α_i = σ(w_α,i · p_t + b_i)
        x̃_t = y^{ℓ-1}_t + Q_t (x_t - y^{ℓ-1}_t)
        b_t = l2norm(W_b x_t + W_b^y y^{ℓ-1}_{t-1}),  c_t likewise (over d_state)
        H_t = exp(Δ_t A) H_{t-1} + Δ_t b_t x̃_t        (linmix.selective_scan, Δ and A fixed across ℓ)
        y^ℓ_t = LayerNorm(c_tᵀ H_t + D ⊙ x̃_t)
        out_t = out_proj(silu(z_t + W_zy y_{t-1}) ⊙ y_t)

    The update is damped, y ← s f(y) + (1 - s) y with s = ``damping``. The loop always runs ``max_iter``
    iterations on the device (no host synchronisation: nothing is read back, and it traces under
    torch.compile); what has converged stops changing. With the per-token ratio
    r_t = ‖f_t - y_t‖∞ / (‖f_t‖∞ + 1e-8) (before damping, as the authors), ``stopping`` is
      - "element": a batch element stops once max_t r_t < ``tol``;
      - "batch": the authors' rule: all stop once the ``quantile`` of the elements' residuals is below
        tol (0.75 in their FP-Mamba training, 1 at evaluation);
      - "causal": token t stops once max_{s<=t} r_s < tol, so y_t depends on tokens <= t only.
    tol = 0 runs exactly max_iter iterations. With tol > 0 and "element" or "batch", an output depends on
    later tokens (and for "batch", on other elements) through the shared iteration count; tol = 0 and
    "causal" are causal (a streamed decode then matches the full forward up to the tolerance).

    Gradients (``grad_mode``):
        "onestep": the authors' training gradient: the loop runs without autograd and the output is one
            differentiable iteration from the detached fixed point (one layer's memory).
        "implicit": the implicit-function gradient at the fixed point: the backward solves
            w = g + J_yᵀ w by max_iter fixed-point steps (vector-Jacobian products through one
            iteration), then takes the one-step VJP with w. Exact at a converged fixed point.
        "unroll": backpropagation through every iteration (exact for the truncated loop; max_iter
            iterations of activation memory).

    Parameters: ``in_proj``, ``conv1d`` (absent with d_conv = 0), ``x_proj`` (d_inner -> dt_rank),
    ``dt_proj`` (Mamba's init), ``A_log``, ``D``, ``bc_proj`` (d_inner -> 2 d_state, on x), ``bc_y_proj``
    (d_inner -> 2 d_state, on y_{t-1}), ``mixer_proj`` (2 d_inner -> r d_inner, the directions),
    ``mixer_gate`` (2 d_inner -> r, the α logits), ``norm`` (LayerNorm(d_inner)), ``z_y_proj``
    (d_inner -> d_inner), ``out_proj``. The authors' weight normalisation of the mixer and the
    ``glu_in_loop`` variant are not implemented.

    Args:
        d_model, d_state (16), d_conv (4; 0 for none), expand (2), dt_rank ("auto"), dt_min, dt_max,
            dt_init, dt_scale, dt_init_floor, conv_bias, bias: as :class:`linmix.nn.Mamba`.
        mixer_rank (1): r, the number of Householder factors.
        max_iter (16), tol (1e-3), damping (1.0, in (0, 1]), stopping ("element" | "batch" | "causal"),
            quantile (0.75, in (0, 1], for stopping="batch"): see above.
        grad_mode ("onestep" | "implicit" | "unroll").
        norm_eps (1e-5): the LayerNorm's eps.
        mixer_gate_bias_init (-4.0): the α logits' initial bias. linmix's choice (the paper does not give
            one): α ≈ 0.02 makes Q ≈ I at initialisation, so the iteration starts contractive (it then
            converges in at most L steps, the y_{t-1} dependence being causal); with a zero bias (α ≈ 0.5)
            a freshly initialised layer typically does not converge (relative residual 0.3-0.5 after 40
            iterations at d_model = 32, with or without damping).

    Raises:
        ValueError: unknown grad_mode or stopping, damping or quantile outside (0, 1], max_iter < 1.
    """

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                 dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False, mixer_rank=1,
                 max_iter=16, tol=1e-3, damping=1.0, stopping="element", quantile=0.75, grad_mode="onestep", norm_eps=1e-5,
                 mixer_gate_bias_init=-4.0, device=None, dtype=None):
        super().__init__()
        if grad_mode not in LOOP_GRAD_MODES:
            raise ValueError(f"linmix.nn.FPMamba: grad_mode must be one of {LOOP_GRAD_MODES}, got {grad_mode!r}")
        if not 0.0 < damping <= 1.0:
            raise ValueError(f"linmix.nn.FPMamba: damping must be in (0, 1], got {damping}")
        if stopping not in STOPPING:
            raise ValueError(f"linmix.nn.FPMamba: stopping must be one of {STOPPING}, got {stopping!r}")
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"linmix.nn.FPMamba: quantile must be in (0, 1], got {quantile}")
        if max_iter < 1:
            raise ValueError(f"linmix.nn.FPMamba: max_iter must be >= 1, got {max_iter}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = d = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.mixer_rank = mixer_rank
        self.max_iter, self.tol, self.damping, self.stopping, self.quantile = max_iter, tol, damping, stopping, quantile
        self.grad_mode = grad_mode

        self.in_proj = nn.Linear(d_model, 2 * d, bias=bias, **factory)
        self.conv1d = (nn.Conv1d(d, d, d_conv, groups=d, padding=d_conv - 1, bias=conv_bias, **factory)
                       if d_conv > 0 else None)
        self.x_proj = nn.Linear(d, self.dt_rank, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, d, bias=True, **factory)
        init_dt_proj("FPMamba", self.dt_proj, dt_init, dt_scale, dt_min, dt_max, dt_init_floor)
        a = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).expand(d, d_state)
        self.A_log = nn.Parameter(torch.log(a).contiguous())
        self.D = nn.Parameter(torch.ones(d, device=device))
        self.bc_proj = nn.Linear(d, 2 * d_state, bias=False, **factory)
        self.bc_y_proj = nn.Linear(d, 2 * d_state, bias=False, **factory)
        self.mixer_proj = nn.Linear(2 * d, mixer_rank * d, bias=False, **factory)
        self.mixer_gate = nn.Linear(2 * d, mixer_rank, bias=True, **factory)
        nn.init.constant_(self.mixer_gate.bias, mixer_gate_bias_init)
        self.norm = nn.LayerNorm(d, eps=norm_eps, **factory)
        self.z_y_proj = nn.Linear(d, d, bias=False, **factory)
        self.out_proj = nn.Linear(d, d_model, bias=bias, **factory)

    def _iteration(self, consts, y: torch.Tensor, final_state: bool = False):
        """One fixed-point iteration f(y): y (B, L, d_inner) -> (B, L, d_inner) (and the scan's final state)."""
        x, delta, A, u_x, a_x, bc_x, y_first, ssm0, cu_seqlens = consts
        d, r = self.d_inner, self.mixer_rank
        y_prev = shift(y, y_first, cu_seqlens)
        u = F.silu(u_x + F.linear(y_prev, self.mixer_proj.weight[:, d:])).unflatten(-1, (r, d))  # (B, L, r, d)
        u = F.normalize(u, dim=-1)
        alpha = torch.sigmoid(a_x + F.linear(y_prev, self.mixer_gate.weight[:, d:]))  # (B, L, r)
        v = x - y
        for i in range(r):  # Q v = H_r ⋯ H_1 v
            ui = u[..., i, :]
            v = v - (2 * alpha[..., i : i + 1]) * ui * (ui * v).sum(-1, keepdim=True)
        x_mix = y + v
        b, c = (bc_x + self.bc_y_proj(y_prev)).chunk(2, dim=-1)  # (B, L, n) each
        b, c = F.normalize(b, dim=-1), F.normalize(c, dim=-1)
        out, h = selective_scan(x_mix.transpose(1, 2), delta, A, b.transpose(1, 2), c.transpose(1, 2), self.D,
                                initial_state=ssm0, return_final_state=True, cu_seqlens=cu_seqlens)
        y_new = self.norm(out.transpose(1, 2))
        return (y_new, h) if final_state else y_new

    def forward(self, hidden_states: torch.Tensor, state: FPMambaState | None = None, return_state: bool = False,
                return_info: bool = False, cu_seqlens: torch.Tensor | None = None):
        """hidden_states (B, L, d_model) -> out (B, L, d_model); with flags, (out, state) / (out, info) /
        (out, state, info).

        state: an :class:`FPMambaState` returned by an earlier call on the preceding tokens, to continue
            from (streaming, and decoding one token at a time); None starts from zeros.
        return_state: also return the state after the last token (differentiable). Its SSM state is the
            scan state of the iteration that produced the output (for "unroll", of one more iteration
            from the returned iterate); at a fixed point all agree, and continuing from it reproduces
            the full forward (with tol = 0, to the fixed point's accuracy).
        return_info: also return ``n_iter`` (B,) int32, the iterations each batch element took (max_iter
            where it did not converge), and ``residual`` (B,), its last relative residual.
        cu_seqlens: packed sequences (FlashAttention's convention): hidden_states (1, L, d_model) holds N
            sequences back to back, cu_seqlens (N + 1,) int32 / int64 offsets [0, ..., L] on its device. The
            conv, the scan and the iteration's y_{t-1} restart at every boundary, so each sequence is mixed as if
            alone; no host synchronisation. The stopping rule sees the packed row as one batch element (one
            n_iter; with tol = 0 every sequence gets exactly its own output). Not with ``state`` or
            ``return_state`` (NotImplementedError).
        """
        if cu_seqlens is not None and (state is not None or return_state):
            raise NotImplementedError("linmix.nn.FPMamba: cu_seqlens (packed sequences) with state or return_state "
                                      "is not supported; stream each sequence in a batch row of its own")
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # (B, L, d_inner) each
        conv = None
        if self.conv1d is not None:
            x, conv = causal_conv(x.transpose(1, 2), self.conv1d.weight, self.conv1d.bias,
                                  None if state is None else state.conv, cu_seqlens=cu_seqlens)
            x = x.transpose(1, 2)
        else:
            x = F.silu(x)
        d = self.d_inner
        # (B, d, L), fixed across iterations. Made contiguous before the softplus so that its backward sees one
        # layout: with a (B, d, L) gradient and a (B, L, d) input, torch 2.14's fake-tensor strides for
        # softplus_backward differ from eager's and a compiled backward fails at a view.
        delta = F.softplus(self.dt_proj(self.x_proj(x)).transpose(1, 2).contiguous())
        A = -torch.exp(self.A_log.to(acc_dtype(x)))
        # The x halves of the mixer's and B/C's projections are the same every iteration: computed once.
        consts = (x, delta, A, F.linear(x, self.mixer_proj.weight[:, :d]),
                  F.linear(x, self.mixer_gate.weight[:, :d], self.mixer_gate.bias), self.bc_proj(x),
                  None if state is None else state.y, None if state is None else state.ssm, cu_seqlens)
        y0 = torch.zeros_like(x)
        loop = (self.max_iter, self.tol, self.damping, self.stopping, self.quantile)
        if self.grad_mode == "unroll":
            y, _, n_iter, residual = solve(lambda y: self._iteration(consts, y), y0, *loop)
            h = self._iteration(consts, y, final_state=True)[1] if return_state else None
        else:
            with torch.no_grad():
                y_star, _, n_iter, residual = solve(lambda y: self._iteration(consts, y), y0, *loop)
            y, h = self._iteration(consts, y_star, final_state=True)
            if self.grad_mode == "implicit" and y.requires_grad:
                fixed = tuple(None if c is None else c.detach() for c in consts)
                y = implicit_grad(y, step_adjoint(lambda y: self._iteration(fixed, y), y_star, self.max_iter))
        gate = F.silu(z + self.z_y_proj(shift(y, consts[6], cu_seqlens)))
        out = self.out_proj(gate * y)
        extras = ((FPMambaState(conv, h, y[:, -1]),) if return_state else ()) + (
            ({"n_iter": n_iter, "residual": residual.detach()},) if return_info else ())
        return (out, *extras) if extras else out

