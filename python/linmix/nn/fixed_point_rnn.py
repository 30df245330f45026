"""FixedPointRNN: the vector-state fixed-point RNN layer (Movahedi et al., "Fixed-Point RNNs", NeurIPS 2025,
arXiv 2503.10799, Sec. 3, Eq. 8), on linmix.fixed_point_rnn."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._fixed_point_loop import LOOP_GRAD_MODES, implicit_grad, shift, solve, step_adjoint
from ..ops.fixed_point_rnn import GRAD_MODES, STOPPING, check_converged, fixed_point_rnn
from ..ops.linear_scan import linear_scan

MIXERS = ("householder", "none")


class FixedPointRNN(nn.Module):
    """A dense linear RNN layer whose transition is found as a fixed point (the paper's vector FP-RNN).

    For input x (B, T, d_model), with v = in_proj(x) (d_inner channels) and per token t:
        u_t   = silu(b_proj(v_t)) * v_t                       # the gated input, B_t x_t in the paper
        lam_t = sigmoid(lam_proj(v_t))                         # diagonal decay in (0, 1) (the paper's Lambda)
        w_ti  = normalize(silu(mixer_proj(v_t))_i),  beta_ti = 2 sigmoid(beta_proj(v_t))_i,  i = 1..rank
        Q_t   = (I - beta_tr w_tr w_trᵀ) ⋯ (I - beta_t1 w_t1 w_t1ᵀ)    # the Householder channel mixer
        h     = fixed point of h_t = lam_t h_{t-1} + (1 - lam_t)(h_t + Q_t (u_t - h_t))
        y     = out_proj(h)
    i.e. the dense RNN (diag(lam_t) + (I - diag(lam_t)) Q_t) h_t = lam_t h_{t-1} + (1 - lam_t) Q_t u_t, solved
    by linmix.fixed_point_rnn (see its docstring for the iteration, stopping rules, causality and the
    convergence condition). mixer="none" is the diagonal baseline: Q = I, so h is the diagonal RNN
    h_t = lam_t h_{t-1} + (1 - lam_t) u_t (computed by one linmix.linear_scan). Unlike the authors' code the
    mixer, lam and the input gate read only x_t, not y_{t-1}: the fixed point is the linear one above.

    Convergence: beta in (0, 2) with lam = sigmoid(.) is NOT always contractive (rank 1: the iteration
    diverges where beta_t sum_d (1 - lam_td) w_td^2 > 1). contractive=True uses lam = (1 + sigmoid(.)) / 2
    in (1/2, 1), which guarantees convergence for every beta in (0, 2) and any rank; on_nonconvergence
    ("warn" by default here) reports forwards that end at max_iter without meeting the stopping rule.

    Args:
        d_model: input/output features. d_inner: state channels (default d_model). rank: Householder factors
            (1..16). mixer: "householder" | "none". max_iter, tol, grad_mode, damping, stopping, quantile,
            on_nonconvergence: passed to linmix.fixed_point_rnn. contractive: see above.
            state_dependent: see above (mixer="householder" only; grad_mode may also be "unroll").
            bias: Linear biases. device, dtype: of the parameters.

    Parameters: in_proj (d_model -> d_inner), b_proj, lam_proj (d_inner -> d_inner), mixer_proj
    (d_inner -> rank d_inner; 2 d_inner inputs [v; h_{t-1}] with state_dependent), beta_proj
    (d_inner -> rank; likewise), out_proj (d_inner -> d_model).

    forward(x, state=None, return_state=False):
        x: (B, T, d_model). state: (B, d_inner) from a previous call (streaming / decoding), u's dtype.
        Returns y (B, T, d_model), and the final state (B, d_inner) if return_state. Decoding token by token
        (or chunk by chunk) with the returned state matches one forward up to the stopping tolerance; with
        stopping="causal" or tol=0 the outputs are causal (see fixed_point_rnn).
    Attribute last_info: (n_iter (B,) int32, residual (B,) float32) of the last forward (None for "none").
    """

    def __init__(self, d_model: int, d_inner: int | None = None, rank: int = 1, mixer: str = "householder",
                 max_iter: int = 32, tol: float = 1e-4, grad_mode: str = "onestep", damping: float = 1.0,
                 stopping: str = "element", quantile: float = 0.9, on_nonconvergence: str = "warn",
                 contractive: bool = False, state_dependent: bool = False, bias: bool = True, device=None,
                 dtype=None):
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"linmix.nn.FixedPointRNN: mixer must be one of {MIXERS}, got {mixer!r}")
        if state_dependent and mixer != "householder":
            raise ValueError("linmix.nn.FixedPointRNN: state_dependent=True needs mixer='householder'")
        modes = LOOP_GRAD_MODES if state_dependent else GRAD_MODES
        if grad_mode not in modes:
            raise ValueError(f"linmix.nn.FixedPointRNN: grad_mode must be one of {modes}, got {grad_mode!r}")
        if stopping not in STOPPING:
            raise ValueError(f"linmix.nn.FixedPointRNN: stopping must be one of {STOPPING}, got {stopping!r}")
        if mixer == "householder" and not 1 <= rank <= 16:
            raise ValueError(f"linmix.nn.FixedPointRNN: rank must be in [1, 16], got {rank}")
        kw = dict(device=device, dtype=dtype)
        self.d_model, self.d_inner, self.rank, self.mixer = d_model, d_inner or d_model, rank, mixer
        self.max_iter, self.tol, self.grad_mode, self.damping = max_iter, tol, grad_mode, damping
        self.stopping, self.quantile, self.on_nonconvergence = stopping, quantile, on_nonconvergence
        self.contractive, self.state_dependent = contractive, state_dependent
        di = self.d_inner
        p = 2 * di if state_dependent else di
        self.in_proj = nn.Linear(d_model, di, bias=bias, **kw)
        self.b_proj = nn.Linear(di, di, bias=bias, **kw)
        self.lam_proj = nn.Linear(di, di, bias=bias, **kw)
        if mixer == "householder":
            self.mixer_proj = nn.Linear(p, rank * di, bias=bias, **kw)
            self.beta_proj = nn.Linear(p, rank, bias=bias, **kw)
        self.out_proj = nn.Linear(di, d_model, bias=bias, **kw)
        self.last_info = None

    def inputs(self, x: torch.Tensor):
        """The op's inputs (u, lam, hh_u, hh_beta) for x (B, T, d_model); hh_u/hh_beta None for mixer="none".
        With state_dependent, hh_u / hh_beta are instead the x halves of their pre-activations (the logits'
        [v; 0] part, biases included), the same in every iteration."""
        v = self.in_proj(x)
        u = F.silu(self.b_proj(v)) * v
        s = torch.sigmoid(self.lam_proj(v))
        lam = (1 + s) / 2 if self.contractive else s
        if self.mixer == "none":
            return u, lam, None, None
        if self.state_dependent:
            di = self.d_inner
            return (u, lam, F.linear(v, self.mixer_proj.weight[:, :di], self.mixer_proj.bias),
                    F.linear(v, self.beta_proj.weight[:, :di], self.beta_proj.bias))
        B, T, _ = x.shape
        hh_u = F.normalize(F.silu(self.mixer_proj(v)).view(B, T, self.rank, self.d_inner), dim=-1)
        hh_beta = 2 * torch.sigmoid(self.beta_proj(v))
        return u, lam, hh_u, hh_beta

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None, return_state: bool = False):
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"linmix.nn.FixedPointRNN: x must have shape (B, T, {self.d_model}), got {tuple(x.shape)}")
        u, lam, hh_u, hh_beta = self.inputs(x)
        if self.state_dependent:
            h, n_iter, residual = self._state_dependent(u, lam, hh_u, hh_beta, state)
            self.last_info = (n_iter, residual)
            final = h[:, -1] if h.shape[1] else (state if state is not None else u.new_zeros(u.shape[0], u.shape[2]))
        elif self.mixer == "none":
            h = linear_scan(lam, (1 - lam) * u, h0=state)
            self.last_info = None
            final = h[:, -1] if h.shape[1] else (state if state is not None else u.new_zeros(u.shape[0], u.shape[2]))
        else:
            h, final, n_iter, residual = fixed_point_rnn(
                u, lam, hh_u, hh_beta, self.max_iter, self.tol, self.grad_mode, return_info=True,
                initial_state=state, output_final_state=True, damping=self.damping, stopping=self.stopping,
                quantile=self.quantile, on_nonconvergence=self.on_nonconvergence,
            )
            self.last_info = (n_iter, residual)
        y = self.out_proj(h)
        return (y, final) if return_state else y

    def _iteration(self, consts, z: torch.Tensor) -> torch.Tensor:
        """One iteration of the state-dependent layer: z (B, T, d_inner) -> f(z), the mixer reading z_{t-1}."""
        u, lam, mix_x, beta_x, h0 = consts
        di, r = self.d_inner, self.rank
        z_prev = shift(z, h0)
        w = F.normalize(F.silu(mix_x + F.linear(z_prev, self.mixer_proj.weight[:, di:])).unflatten(-1, (r, di)), dim=-1)
        beta = 2 * torch.sigmoid(beta_x + F.linear(z_prev, self.beta_proj.weight[:, di:]))
        v = u - z
        for i in range(r):  # Q v = H_r ⋯ H_1 v
            v = v - beta[..., i : i + 1] * w[..., i, :] * (w[..., i, :] * v).sum(-1, keepdim=True)
        return linear_scan(lam, (1 - lam) * (z + v), h0=h0)

    def _state_dependent(self, u, lam, mix_x, beta_x, state):
        consts = (u, lam, mix_x, beta_x, state)
        # the op's loop reads its residual on the host each iteration; so does this one (it ends early)
        loop = (self.max_iter, self.tol, self.damping, self.stopping, self.quantile, True)
        z0 = torch.zeros_like(u)
        if self.grad_mode == "unroll":
            h, _, n_iter, residual = solve(lambda z: self._iteration(consts, z), z0, *loop)
        else:
            with torch.no_grad():
                z, _, n_iter, residual = solve(lambda z: self._iteration(consts, z), z0, *loop)
            h = self._iteration(consts, z)
            if self.grad_mode == "implicit" and h.requires_grad:
                fixed = tuple(None if c is None else c.detach() for c in consts)
                h = implicit_grad(h, step_adjoint(lambda z: self._iteration(fixed, z), z, self.max_iter))
        check_converged(h, residual, self.tol, self.max_iter, self.stopping, self.quantile, self.on_nonconvergence)
        return h, n_iter, residual.detach()

    def step(self, x: torch.Tensor, state: torch.Tensor | None = None):
        """One decoding step: x (B, d_model) or (B, 1, d_model) -> (y (B, d_model), new state (B, d_inner))."""
        y, state = self.forward(x.reshape(x.shape[0], 1, self.d_model), state, return_state=True)
        return y[:, 0], state
