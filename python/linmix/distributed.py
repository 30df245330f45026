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

fixed_point_rnn is the exception: its transition over a slice is a dense (D, D) matrix (the fixed point is a
dense linear RNN), too large to share. Each rank solves its slice with the fused op from the state entering it,
and the ranks relay those states in rounds until none moves (at most W rounds, typically two); see its docstring.

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

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import ops
from ._native import acc_dtype, check_backend
from .ops import fixed_point_rnn as fp

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


def _all_gather(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """(P,) per rank -> (W, P) in rank order."""
    out = x.new_empty(world * x.numel())
    dist.all_gather_single(out, x.contiguous(), group=group)
    _comm["bytes"] += (world - 1) * x.numel() * x.element_size()
    return out.view(world, x.numel())


class _AllGather(torch.autograd.Function):
    """(P,) per rank -> (W, P); backward: the sum over ranks of each rank's gradient for my row."""

    @staticmethod
    def forward(ctx, x, group, world):
        ctx.group, ctx.world = group, world
        return _all_gather(x, group, world)

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


def _relay(run, first, zero, group, tol, reverse=False):
    """Settle a chain over the ranks in which each rank's result depends on the ranks before it only through
    one boundary tensor: x_r = run(e_r), e_r = the boundary returned by the rank before r (in rank order, or
    reversed), e = ``first`` on the first rank.

    Every rank runs from its current e (``zero`` until a boundary arrives), one all-gather shares every rank's
    boundary, and a rank whose e moved since its last run, by max |change| >= tol * max |e| in some batch row
    (by anything with tol = 0, NaN included), runs again; then the next all-gather, until no e moves. The first
    rank's e never changes, so rank r's is final after round r: at most W rounds and W all-gathers, and two host
    reads per round (whether any e moved, whether this rank's did), whatever the work inside ``run``.

    run(e) -> (result, boundary (B, ...) in zero's dtype, extras (P,) in zero's dtype). Returns this rank's last
    result, the last boundaries and extras of every rank by position in the chain ((W, B, ...), (W, P)), and the
    relative gap (W - 1, B) between the e each later position last ran from and the boundary before it.
    """
    rank, world = _group_info(group)
    order = list(range(world))[::-1] if reverse else list(range(world))
    pos = order.index(rank)
    used = zero.expand(world - 1, *zero.shape).clone()  # the e each position 1.. last ran from
    result, boundary, extras = run(first if pos == 0 else zero)
    for rnd in range(1, world + 1):
        gathered = _all_gather(torch.cat([boundary.reshape(-1), extras]), group, world)[order]  # (W, P)
        bounds = gathered[:, : zero.numel()].view(world, *zero.shape)
        diff, scale = ((bounds[:-1] - used).abs().flatten(2).amax(-1), bounds[:-1].abs().flatten(2).amax(-1))
        gap = torch.where(diff == 0, torch.zeros_like(diff), diff / scale)  # NaN stays NaN
        moved = (~((gap == 0) | (gap < tol))).any(-1)  # (W - 1,) per position
        if rnd == world or not bool(moved.any()):
            break
        if pos > 0 and bool(moved[pos - 1]):
            result, boundary, extras = run(bounds[pos - 1])
        used = torch.where(moved.view(-1, *[1] * zero.dim()), bounds[:-1], used)
    return result, bounds, gathered[:, zero.numel() :], gap


class _FixedPointRNN(torch.autograd.Function):
    """The context-parallel fixed point: the fused op per rank, its entering state relayed (_relay) forward,
    the gradient of that state relayed backward, from the last rank down."""

    @staticmethod
    def forward(ctx, u, lam, hh_u, hh_beta, h0, args):
        B, D = u.shape[0], u.shape[2]
        acc = acc_dtype(u)
        last = {}

        def run(e):  # e: initial_state (u's dtype) on rank 0, a relayed boundary (acc) elsewhere
            e = None if e is None else e.to(u.dtype)
            h, h_prev, n_iter, res = fp.fused_fwd(u, lam, hh_u, hh_beta, e, args.max_iter, args.tol, args.damping,
                                                  args.quantile, args.causal)
            last.update(h_prev=h_prev, e=e)
            finite = h.isfinite().flatten(1).all(1)
            return h, h[:, -1].to(acc), torch.stack([n_iter.to(acc), res.to(acc), finite.to(acc)], 1).reshape(-1)

        h, bounds, extras, gap = _relay(run, h0, u.new_zeros(B, D, dtype=acc), args.group, args.tol)
        extras = extras.view(bounds.shape[0], B, 3)
        n_iter = extras[..., 0].amax(0).to(torch.int32)
        residual = torch.maximum(extras[..., 1].amax(0), gap.amax(0)).float()
        finite = extras[..., 2].amin(0) > 0  # (B,) every rank's outputs finite
        ctx.save_for_backward(u, lam, hh_u, hh_beta, last["e"], last["h_prev"])
        ctx.args, ctx.has_h0 = args, h0 is not None
        ctx.mark_non_differentiable(n_iter, residual, finite)
        return h, bounds[-1].to(u.dtype), n_iter, residual, finite

    @staticmethod
    def backward(ctx, dh, dfinal, _dn, _dres, _dfinite):
        u, lam, hh_u, hh_beta, e, h_prev = ctx.saved_tensors
        args = ctx.args
        acc = acc_dtype(u)
        _, world = _group_info(args.group)
        adjoint = fp.adjoint_iterations(args.grad_mode, args.max_iter, args.tol)
        # The final state is the last rank's last token, returned on every rank: its gradient is their sum.
        dfinal = dfinal.to(acc).contiguous()
        dist.all_reduce(dfinal, group=args.group)
        _comm["bytes"] += 2 * (world - 1) * dfinal.numel() * dfinal.element_size() // world

        def run(c):  # c: dL/d(this rank's last-token state), from the rank after it (the sum above on the last)
            g = dh.to(u.dtype).clone()
            g[:, -1] += c.to(u.dtype)
            grads = fp.fused_bwd(u, lam, hh_u, hh_beta, e, h_prev, g, adjoint, args.damping)
            finite = torch.stack([x.isfinite().all() for x in grads if x is not None]).all()
            de = grads[-1] if grads[-1] is not None else torch.zeros_like(c)
            return grads, de.to(acc), finite.to(acc).reshape(1)

        grads, _, extras, _ = _relay(run, dfinal, torch.zeros_like(dfinal), args.group, args.tol, reverse=True)
        if args.on_nonconvergence != "ignore":
            fp.check_grads(bool(extras.amin() > 0), adjoint, args.on_nonconvergence)
        # the entering state's gradient is initial_state's on the first rank, the relayed boundary elsewhere
        return *grads[:4], (grads[4] if ctx.has_h0 else None), None


class _FixedPointArgs(NamedTuple):
    max_iter: int
    tol: float
    grad_mode: str
    damping: float
    quantile: float  # the fused op's batch_quantile
    causal: bool
    on_nonconvergence: str
    group: object


def fixed_point_rnn(u, lam, hh_u, hh_beta, max_iter=32, tol=1e-4, grad_mode="onestep", return_info=False, *,
                    initial_state=None, output_final_state=False, damping=1.0, stopping="element", quantile=0.9,
                    on_nonconvergence="ignore", group=None):
    """Context-parallel :func:`linmix.fixed_point_rnn` over a sequence split on T: the same arguments (plus
    ``group``) and returns, each rank running the fused op, with its device-side loop, on its own slice.

    Design. One iteration of the fixed point is a diagonal scan over the whole sequence, so the iterates couple
    the ranks: running the iteration itself across ranks needs an exchange of boundary states in every
    iteration and a decision to stop after each (a host synchronisation), and the fused op cannot be split
    into iterations. The fixed point does not need it: it is a (dense) linear RNN, so on a rank's slice it
    depends on the earlier tokens only through the state entering the slice, and it is the fixed point of
    the slice's own iteration started from that state: h_r = fixed_point_rnn(slice r, initial_state=E_r) with
    E_r = h_{r-1}[:, -1], which is how the op decodes a long sequence chunk by chunk. The ranks solve their
    slices at once and relay the entering states: every rank runs the fused op from its current E_r (zero at
    first; ``initial_state`` on rank 0), one all-gather shares the last-token states, and a rank whose E_r
    moved by at least tol (relative, max norm; by anything at all when tol = 0) runs again. Rank r's E_r is
    final after round r, so there are at most W rounds; when the state forgets within a slice (a contractive
    map over T / W tokens) the second round leaves every E_r within tol and the relay stops there. With
    tol = 0 the result is exactly the slice-by-slice run on one process. The backward relays the gradient of
    the entering states the same way from the last rank down (the fused backward from dh plus that gradient
    at the slice's last token), so the gradients are those of the slice-by-slice run: the one-step or
    implicit gradient of each slice, chained exactly through the entering states.

    What differs from one process: with tol > 0 the result equals the whole-sequence fixed point only up to
    the tolerance (each slice is solved to tol, and each E_r is within tol of the slice before it), not the
    whole-sequence iterate: the iteration counts are per slice, and with a max_iter too small to converge
    the outputs are different unconverged iterates. ``stopping`` applies per slice ("batch": the quantile
    of the slice's residuals; "causal" stays causal: a rank reruns only on what the ranks before it send).

    Args: u, lam (B, T_r, D), hh_u (B, T_r, R, D), hh_beta (B, T_r, R): this rank's slices, T_r >= 1; the
    rest as :func:`linmix.fixed_point_rnn`. ``initial_state`` (B, D) is read on rank 0 (its gradient appears
    there); ``group`` as :func:`linear_scan`. On CUDA the relay needs the fused op's ``initial_state``.

    Returns: as :func:`linmix.fixed_point_rnn`, identical on every rank apart from h (B, T_r, D): the global
    final state (B, D) if ``output_final_state``; with ``return_info`` n_iter (B,) int32, the most iterations
    a rank's last run took, and residual (B,) float32, the largest over the ranks of their last run's residual
    and of the relative gap between the state it started from and the one the rank before it ended with.
    ``on_nonconvergence`` reads that residual (and every rank's gradients in the backward), so all ranks warn
    or raise together.

    Cost per rank: the fused op on T / W tokens once per round (a rank whose entering state stayed put skips
    the round), two rounds typically and W at most, forward and backward alike; communication per round one
    all-gather of B * (D + 3) values forward, B * D + 1 backward, plus one all-reduce of B * D values for the
    final state's gradient; two host reads per round and none per iteration.
    """
    fp.check_args("distributed.fixed_point_rnn", grad_mode, stopping, on_nonconvergence)
    _check_slice("fixed_point_rnn", u.shape[1])
    _, world = _group_info(group)
    if world == 1:
        return fp.fixed_point_rnn(
            u, lam, hh_u, hh_beta, max_iter=max_iter, tol=tol, grad_mode=grad_mode, return_info=return_info,
            initial_state=initial_state, output_final_state=output_final_state, damping=damping, stopping=stopping,
            quantile=quantile, on_nonconvergence=on_nonconvergence)
    check_backend("distributed.fixed_point_rnn", u, lam, hh_u, hh_beta, initial_state)
    q = fp.batch_quantile(stopping, quantile)
    args = _FixedPointArgs(int(max_iter), float(tol), grad_mode, float(damping), q, stopping == "causal",
                           on_nonconvergence, group)
    h, final, n_iter, residual, finite = _FixedPointRNN.apply(u, lam, hh_u, hh_beta, initial_state, args)
    # check_converged reads its first argument for the batch size and finiteness: every rank's verdict, so that
    # all ranks warn or raise together.
    fp.check_converged(torch.where(finite, 0.0, float("nan")), residual, args.tol, args.max_iter, stopping, q,
                       on_nonconvergence)
    out = (h,) + ((final,) if output_final_state else ()) + ((n_iter, residual) if return_info else ())
    return out if len(out) > 1 else h
