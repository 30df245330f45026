"""Context parallelism: one sequence split contiguously over the ranks of a torch.distributed group.

Every linmix op is a linear recurrence, so rank r's outputs depend on the ranks before it only through the
state entering its slice. Each op is affine in its initial state: over a slice, final = Tr ⊙ h0 + Fr, with
Tr the slice's total transition (a decay product) and Fr the final state from a zero start. So:

1. each rank runs its slice from a zero state and forms (Tr, Fr), both O(state) tensors;
2. one all-gather shares the pairs, and every rank scans them in rank order
   (S_0 = initial_state, S_{r+1} = Tr ⊙ S_r + Fr) to get its entering state S_r and the global final
   state S_W;
3. each rank corrects its outputs with S_r (chunk_gla: one batched matmul; linear_scan and
   selective_scan: the op is rerun from S_r, see each function for why and what it costs).

Backward is the mirror image and comes from autograd: the all-gather's backward is a reduce-scatter of the
state gradients (every rank's dS_r flows back, through the transposed transitions of the rank scan, to the
pairs of the ranks before it), and the ops' own backward does the rest. Nothing T-sized ever crosses ranks:
per rank and per call, the forward moves (W - 1) * P bytes and the backward as many again, with
P = |Tr| + |Fr| (the state plus its transition, float32 or float64) and W the group size. A pipeline of
point-to-point sends would move P bytes per rank but serialise W - 1 latency-bound hops with nothing to
overlap them with; for the group sizes context parallelism uses (2 to 16 ranks) the one collective is the
cheaper choice, so it is the only one implemented.

Conventions (the usual ones for context parallelism; the tests check each against a single-process run):
- The time axis is split contiguously: rank 0 holds the first tokens (the last ones with ``reverse``).
  Slices may have different lengths, each at least 1 token.
- ``initial_state`` is read on the rank holding the first token and ignored elsewhere (pass None there);
  its gradient appears on that rank.
- The returned final state is the global one, identical on every rank; its gradient is the sum of every
  rank's (as if the loss were the sum of the ranks' losses).
- Replicated parameters (selective_scan's A, D, delta_bias, fixed B/C) get this rank's share of the
  gradient; summing over the group (DDP, FSDP or an all_reduce over the context-parallel group) gives the
  full gradient.
- Every rank of the group must call the op with the same shapes apart from the time length, and the same
  arguments otherwise; the collectives run on ``group`` (default: the world), so use a group of its own
  when another collective (DDP's gradient all-reduce, say) runs over the same ranks.

Reference: the chunk-state passing of flash-linear-attention's context-parallel chunked ops, and the
associative scan of linear recurrences (Blelloch 1990), applied across ranks instead of across chunks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import ops
from ._fixed_point_loop import implicit_grad, solve
from ._native import acc_dtype
from .ops.fixed_point_rnn import GRAD_MODES

_comm = {"bytes": 0}


def comm_bytes() -> int:
    """Bytes this process has received over context-parallel collectives since the last reset, counted
    as a ring algorithm moves them: (W - 1) * P per all-gather of P bytes per rank, as much per
    reduce-scatter, and 2 (W - 1) / W * n per all-reduce of n bytes."""
    return _comm["bytes"]


def reset_comm_bytes() -> None:
    _comm["bytes"] = 0


def _group_info(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _AllGather(torch.autograd.Function):
    """(P,) per rank -> (W, P); backward: the sum over ranks of each rank's gradient for my row."""

    @staticmethod
    def forward(ctx, x, group, world):
        ctx.group, ctx.world = group, world
        out = x.new_empty(world * x.numel())
        dist.all_gather_single(out, x.contiguous(), group=group)
        _comm["bytes"] += (world - 1) * x.numel() * x.element_size()
        return out.view(world, x.numel())

    @staticmethod
    def backward(ctx, dout):
        dx = dout.new_empty(dout.shape[1:])
        dist.reduce_scatter_single(dx, dout.contiguous().view(-1), group=ctx.group)
        _comm["bytes"] += (ctx.world - 1) * dx.numel() * dx.element_size()
        return dx, None, None


class _Tie(torch.autograd.Function):
    """Identity on `out` whose backward also reaches `anchor` (with a zero gradient). Every rank must enter
    the all-gather's backward (a collective), also a rank whose outputs do not depend on the gathered pairs
    (the first one, without an initial state); tying its outputs to the pairs puts the collective in its graph."""

    @staticmethod
    def forward(ctx, out, anchor):
        ctx.anchor = (anchor.shape, anchor.dtype, anchor.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, dout):
        shape, dtype, device = ctx.anchor
        return dout, torch.zeros(shape, dtype=dtype, device=device)


def _apply(trans: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """trans ⊙ state, trans broadcast over state's trailing dims (GLA's transition is diagonal over K only)."""
    return trans.reshape(*trans.shape, *([1] * (state.dim() - trans.dim()))) * state


def _boundary(trans, final0, initial_state, group, reverse=False):
    """The state entering this rank's slice and the global final state, from every rank's (Tr, Fr).

    trans: this slice's transition; final0: its final state from a zero start; initial_state: the state
    before the first token (read on the first rank only), or None. Returns (entering state or None when
    it is zero, global final state, the gathered pairs to tie this rank's outputs to), all differentiable.
    """
    rank, world = _group_info(group)
    order = list(range(world))[::-1] if reverse else list(range(world))
    pos = order.index(rank)
    if pos == 0 and initial_state is not None:  # the first rank folds the initial state into its pair
        final0 = _apply(trans, initial_state) + final0
    pairs = _AllGather.apply(torch.cat([trans.reshape(-1), final0.reshape(-1)]), group, world)  # (W, P)
    ts = pairs[:, : trans.numel()].reshape(world, *trans.shape)
    fs = pairs[:, trans.numel() :].reshape(world, *final0.shape)
    entering = initial_state if pos == 0 else None
    state = fs[order[0]]
    for i, r in enumerate(order[1:], start=1):
        if i == pos:
            entering = state
        state = _apply(ts[r], state) + fs[r]
    return entering, state, pairs


def _check_slice(name: str, length: int) -> None:
    if length < 1:
        raise ValueError(f"linmix.distributed.{name}: every rank must hold at least one token, got a slice of "
                         f"length {length}")


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, reverse: bool = False,
                group=None, return_final_state: bool = False):
    """Context-parallel :func:`linmix.linear_scan`: ``h_t = a_t * h_{t-1} + b_t`` over a sequence split on time.

    Args:
        a, b: this rank's (B, T_r, D) slice, T_r >= 1; dtypes as :func:`linmix.linear_scan`.
        h0: optional (B, D) state before the first token, read on the rank holding it (rank 0, or the last
            rank with ``reverse``).
        reverse: the recurrence runs from the last token of the last rank down to the first of rank 0.
        group: the process group the sequence is split over (default: the world).
        return_final_state: also return the (B, D) state after the last token (float32, float64 for
            float64 inputs), identical on every rank.

    Returns:
        h: (B, T_r, D) in a's dtype, this rank's slice of the single-process result; or (h, final_state).

    Cost: the op runs twice per rank, once from a zero state to get the slice's final state and once from
    the true entering state (a correction h += cumprod(a) ⊙ S would cost as much memory traffic and round
    16-bit outputs twice); communication is one all-gather of 2 * B * D accumulation-dtype values forward
    and one reduce-scatter backward. For 16-bit inputs the slice's zero-start final state is read from
    the output, so it is rounded to the input dtype once per rank boundary.
    """
    _check_slice("linear_scan", a.shape[1])
    _, world = _group_info(group)
    acc = acc_dtype(a)
    if world == 1:
        h = ops.linear_scan.linear_scan(a, b, h0=h0, reverse=reverse)
        last = h[:, 0 if reverse else -1].to(acc)
        return (h, last) if return_final_state else h
    h_zero = ops.linear_scan.linear_scan(a, b, reverse=reverse)
    trans = a.to(acc).prod(1)  # (B, D)
    entering, final, pairs = _boundary(trans, h_zero[:, 0 if reverse else -1].to(acc),
                                       None if h0 is None else h0.to(acc), group, reverse)
    h = ops.linear_scan.linear_scan(a, b, h0=entering, reverse=reverse) if entering is not None else h_zero
    h = _Tie.apply(h, pairs)
    return (h, final) if return_final_state else h


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
                   return_final_state=False, group=None):
    """Context-parallel :func:`linmix.selective_scan` over a sequence split on L.

    Args: as :func:`linmix.selective_scan`, with u, delta, z and variable B/C this rank's slices
    (b, d, L_r), (b, n, L_r) or (b, g, n, L_r), L_r >= 1; A, D, delta_bias and fixed B/C replicated on
    every rank (their gradients are this rank's share; sum them over the group). ``initial_state``
    (b, d, n) is read on rank 0; ``group`` as :func:`linear_scan`. No ``cu_seqlens``.

    Returns:
        out (b, d, L_r) in u's dtype, or (out, final_state) with the global final state (b, d, n) float32
        (float64 for float64 inputs), identical on every rank.

    The slice's transition is exp(A ⊙ Σ_t δ_t) per (b, d, n). The correction from the entering state,
    y_t += Σ_n C_t[n] exp(A[n] Σ_{s<=t} δ_s) S[n], sits before the z gate and needs the (b, d, n, L_r)
    decays, which the fused op never materialises; so the op is rerun from the entering state instead.
    The first run (no D, no gate) only provides the zero-start final state. Cost per rank: two forward
    and two backward runs of the op on L/W tokens; communication: 2 * b * d * n values each way.
    """
    _check_slice("selective_scan", u.shape[-1])
    _, world = _group_info(group)
    if world == 1:
        return ops.selective_scan.selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                                 delta_softplus=delta_softplus, initial_state=initial_state,
                                                 return_final_state=return_final_state)
    acc = acc_dtype(u)
    _, final0 = ops.selective_scan.selective_scan(u, delta, A, B, C, delta_bias=delta_bias,
                                                  delta_softplus=delta_softplus, return_final_state=True)
    dt = delta.to(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    trans = torch.exp(A.to(acc) * dt.sum(-1)[..., None])  # (b, d, n)
    entering, final, pairs = _boundary(trans, final0, None if initial_state is None else initial_state.to(acc), group)
    out, _ = ops.selective_scan.selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                               delta_softplus=delta_softplus, initial_state=entering,
                                               return_final_state=True)
    out = _Tie.apply(out, pairs)
    return (out, final) if return_final_state else out


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, group=None):
    """Context-parallel :func:`linmix.chunk_gla` over a sequence split on T.

    Args: as :func:`linmix.chunk_gla`, with q, k, g (B, T_r, H, K) and v (B, T_r, H, V) this rank's slices,
    T_r >= 1; ``initial_state`` (B, H, K, V) is read on rank 0; ``group`` as :func:`linear_scan`. No
    ``state_v_first`` or ``cu_seqlens``.

    Returns:
        (o (B, T_r, H, V) in q's dtype, global final state (B, H, K, V) float32 (float64 for float64
        inputs), identical on every rank, or None).

    The op runs once from a zero state; the slice's transition is exp(Σ_t g_t) per (B, H, K) and the
    entering state S adds o_t += scale * (q_t ⊙ exp(Σ_{s<=t} g_s)) S, one (T_r, K) x (K, V) matmul per
    head, far cheaper than a second chunked run. Communication: (K + K * V) * B * H values each way.
    """
    _check_slice("chunk_gla", q.shape[1])
    _, world = _group_info(group)
    if world == 1:
        return ops.gla.chunk_gla(q, k, v, g, scale=scale, initial_state=initial_state,
                                 output_final_state=output_final_state)
    acc = acc_dtype(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, final0 = ops.gla.chunk_gla(q, k, v, g, scale=scale, output_final_state=True)
    decay = g.to(acc).cumsum(1)  # (B, T_r, H, K)
    entering, final, pairs = _boundary(decay[:, -1].exp(), final0,
                                       None if initial_state is None else initial_state.to(acc), group)
    if entering is not None:
        o = (o.to(acc) + scale * torch.einsum("bthk,bhkv->bthv", q.to(acc) * decay.exp(), entering)).to(q.dtype)
    o = _Tie.apply(o, pairs)
    return o, (final if output_final_state else None)


def _householder(hh_u: torch.Tensor, hh_beta: torch.Tensor, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Q_t x_t (Q_tᵀ x_t with transpose) with Q_t = H_{t,R} ⋯ H_{t,1}, H_{t,i} = I - beta u uᵀ; (B, T, D)."""
    factors = range(hh_u.shape[2] - 1, -1, -1) if transpose else range(hh_u.shape[2])
    for i in factors:
        w = hh_u[:, :, i]
        x = x - hh_beta[:, :, i, None] * (w * x).sum(-1, keepdim=True) * w
    return x


def _all_ranks_max(group):
    """The per-element residuals (B,) over every rank's tokens: the max across the group, NaN reported as inf
    so it never counts as converged (the fused op's rule, with the same per-token ratio)."""
    def reduce(res: torch.Tensor) -> torch.Tensor:
        res = res.nan_to_num(nan=float("inf"))
        rank, world = _group_info(group)
        if world > 1:
            dist.all_reduce(res, op=dist.ReduceOp.MAX, group=group)
            _comm["bytes"] += 2 * (world - 1) * res.numel() * res.element_size() // world
        return res
    return reduce


def _solve(step, y0, max_iter, tol, group):
    """The shared fixed-point loop as the fused op runs it: each batch element stops on its own once its
    residual over all ranks' tokens < tol; a host sync per iteration ends it early (every rank sees the same
    reduced residual, so all stop together)."""
    return solve(step, y0, max_iter, tol, host_exit=True, eps=0.0, reduce=_all_ranks_max(group))


def fixed_point_rnn(u, lam, hh_u, hh_beta, max_iter=32, tol=1e-4, grad_mode="onestep", return_info=False,
                    group=None):
    """Context-parallel :func:`linmix.fixed_point_rnn` over a sequence split on T.

    Each iteration's diagonal scan is a context-parallel :func:`linear_scan` carrying the state across ranks,
    the Householder channel mix is per token (local), and the convergence test is the per-batch residual
    all-reduced (max) over the group, so every rank stops at the same iteration as a single-process run.
    Implemented in PyTorch over ``linmix.linear_scan`` (the fused op has no initial state to start a slice
    from); same arguments, math, stopping rule and gradients as the fused op, plus ``group``.

    Args: u, lam (B, T_r, D), hh_u (B, T_r, R, D), hh_beta (B, T_r, R): this rank's slices, T_r >= 1.
    grad_mode: "onestep" (the VJP of the last iteration with the one before it detached) or "implicit"
    (the adjoint w = g + J_hᵀ w is iterated with the same max_iter / tol and convergence all-reduce,
    then the last iteration's VJP is taken with w).

    Returns:
        h (B, T_r, D) in u's dtype; with return_info also n_iter (B,) int32 and residual (B,) float32
        (identical on every rank; a NaN residual is reported as inf).

    Cost per iteration and rank: one Householder mix and two linear scans on T/W tokens (the context-
    parallel scan's zero-start pass and correction), one all-gather of 2 * B * D values and one
    all-reduce of B values. The state is computed in float32 (float64 for float64 inputs).
    """
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"linmix.distributed.fixed_point_rnn: grad_mode must be one of {GRAD_MODES}, got "
                         f"{grad_mode!r}")
    _check_slice("fixed_point_rnn", u.shape[1])
    if _group_info(group)[1] == 1:
        return ops.fixed_point_rnn.fixed_point_rnn(u, lam, hh_u, hh_beta, max_iter=max_iter, tol=tol,
                                                   grad_mode=grad_mode, return_info=return_info)
    acc = acc_dtype(u)
    u_, lam_, hh_u_, hh_beta_ = (x.to(acc) for x in (u, lam, hh_u, hh_beta))

    def step(h):  # one iteration: x~ = h + Q (u - h), then the scan h_t = lam_t h_{t-1} + (1 - lam_t) x~_t
        return linear_scan(lam_, (1 - lam_) * (h + _householder(hh_u_, hh_beta_, u_ - h)), group=group)

    with torch.no_grad():
        _, h_prev, n_iter, residual = _solve(step, torch.zeros_like(u_), int(max_iter), float(tol), group)
    h = step(h_prev)
    if grad_mode == "implicit" and torch.is_grad_enabled():
        h = implicit_grad(h, _adjoint(h_prev, lam_, hh_u_, hh_beta_, int(max_iter), float(tol), group))
    h = h.to(u.dtype)
    return (h, n_iter, residual.float()) if return_info else h


def _adjoint(h_prev, lam, hh_u, hh_beta, max_iter, tol, group):
    """g -> w = g + J_hᵀ w, iterated as the fused op does: on s = Sᵀ w (S the scan), s^0 = 0,
    s^{k+1} = Sᵀ (g + (I - Q)ᵀ ((1 - lam) s^k)), residual on s; returns w with Sᵀ w = the last s."""
    def adjoint(g):
        # Sᵀ y is the gradient of the (context-parallel) scan with respect to its input, taken on a graph
        # of its own so the collectives of its backward run in the same order on every rank.
        with torch.enable_grad():
            b = torch.zeros_like(h_prev).requires_grad_()
            hs = linear_scan(lam.detach(), b, group=group)

        def scan_t(y):
            return torch.autograd.grad(hs, b, y, retain_graph=True)[0]

        def mix_t(s):
            y = (1 - lam) * s
            return y - _householder(hh_u, hh_beta, y, transpose=True)

        g = g.to(h_prev.dtype)
        s_prev = _solve(lambda s: scan_t(g + mix_t(s)), torch.zeros_like(g), max_iter, tol, group).y_prev
        return g + mix_t(s_prev)

    return adjoint
