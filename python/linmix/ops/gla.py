"""Gated linear attention: chunk_gla (chunked, tensor cores on CUDA) and fused_recurrent_gla (step by step)."""

from __future__ import annotations

import warnings

import torch

from .. import _C
from .._native import acc_dtype, check_backend, nvtx_range
from ._varlen import check_offsets, n_seqs


def _fwd_fake(q, k, v, g, initial_state, cu_seqlens, scale):
    B, T, H, K = q.shape
    out = q.new_empty((B, T, H, v.shape[-1]))
    final_state = q.new_empty((n_seqs(q.shape[0], cu_seqlens), H, K, v.shape[-1]), dtype=acc_dtype(q))
    return out, final_state


def _bwd_fake(q, k, v, g, initial_state, cu_seqlens, dout, dfinal_state, scale):
    B, T, H, K = q.shape
    dq, dk, dg = (q.new_empty(q.shape) for _ in range(3))
    dv = v.new_empty(v.shape)
    dinitial_state = q.new_empty((n_seqs(q.shape[0], cu_seqlens), H, K, v.shape[-1]), dtype=acc_dtype(q))
    return dq, dk, dv, dg, dinitial_state


for _algo in ("chunk_gla", "fused_recurrent_gla"):
    torch.library.register_fake(f"linmix::{_algo}_fwd")(_fwd_fake)
    torch.library.register_fake(f"linmix::{_algo}_bwd")(_bwd_fake)


class GlaFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, recurrent, cu_seqlens):
        name = "fused_recurrent_gla" if recurrent else "chunk_gla"
        fwd = torch.ops.linmix.fused_recurrent_gla_fwd if recurrent else torch.ops.linmix.chunk_gla_fwd
        with nvtx_range(f"linmix/{name}/fwd", q):
            out, final_state = fwd(q=q, k=k, v=v, g=g, initial_state=initial_state, scale=scale,
                                   cu_seqlens=cu_seqlens)
        ctx.save_for_backward(q, k, v, g, initial_state, cu_seqlens)
        ctx.scale, ctx.recurrent = scale, recurrent
        return out, final_state

    @staticmethod
    def backward(ctx, dout, dfinal_state):
        q, k, v, g, initial_state, cu_seqlens = ctx.saved_tensors
        name = "fused_recurrent_gla" if ctx.recurrent else "chunk_gla"
        bwd = torch.ops.linmix.fused_recurrent_gla_bwd if ctx.recurrent else torch.ops.linmix.chunk_gla_bwd
        with nvtx_range(f"linmix/{name}/bwd", q):
            dq, dk, dv, dg, dinitial_state = bwd(q=q, k=k, v=v, g=g, initial_state=initial_state,
                                                 dout=dout.to(q.dtype), dfinal_state=dfinal_state, scale=ctx.scale,
                                                 cu_seqlens=cu_seqlens)
        return dq, dk, dv, dg, None, (dinitial_state if initial_state is not None else None), None, None


def _gla(name, recurrent, q, k, v, g, scale, initial_state, output_final_state, state_v_first=False,
         cu_seqlens=None, reverse=False):
    check_backend(name, q, k, v, g, initial_state)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if initial_state is not None and state_v_first:
        initial_state = initial_state.transpose(-1, -2)
    if initial_state is not None and q.dim() == 4:
        initial_state = initial_state.to(acc_dtype(q))
    if cu_seqlens is not None:
        check_offsets(name, cu_seqlens, q.shape[1])
    if reverse:  # the recurrence from T-1 down to 0 is the forward one on time-reversed inputs
        q, k, v, g = (t.flip(1) for t in (q, k, v, g))
        if cu_seqlens is not None:  # where sequence N-1-n lies in the flipped tensors, offsets computed on the device
            cu_seqlens = q.shape[1] - cu_seqlens.flip(0)
            initial_state = None if initial_state is None else initial_state.flip(0)
    o, ht = GlaFn.apply(q, k, v, g, float(scale), initial_state, recurrent, cu_seqlens)
    if reverse:
        o = o.flip(1)
        ht = ht if cu_seqlens is None else ht.flip(0)
    if state_v_first:
        ht = ht.transpose(-1, -2)
    return o, (ht if output_final_state else None)


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention, chunked (flash-linear-attention's ``chunk_gla`` contract and signature).

    ``S_t = diag(exp g_t) S_{t-1} + k_t^T v_t`` and ``o_t = scale * q_t S_t`` per batch and head,
    with ``S_{-1} = initial_state`` (zeros if None). Computed in chunks of 64 steps (sub-chunks of 16).

    Args:
        q, k, g: (B, T, H, K); v: (B, T, H, V); float32 / float16 / bfloat16 (float64 on CPU), one dtype.
            g is the log forget gate per key channel and should be <= 0 (e.g. ``logsigmoid(x)``).
            g > 0 is mathematically valid (a growing state) but the exponents are then no longer
            bounded by 0, so large positive cumulative gates overflow to inf; it is not guarded.
            Every g <= 0 is exact, -inf included (the decays across it are 0, and so is its gradient), on
            CPU and with ``LINMIX_UNVERIFIED_KERNELS=1`` on CUDA: decays are sums over the segment they span.
            The default CUDA kernel takes differences of running gate sums: NaN for -inf, and a relative error
            that grows with a gate below about -1e3.
        scale: multiplies q S; defaults to K ** -0.5.
        initial_state: optional (B, H, K, V), cast to float32 (float64 for float64 inputs).
        output_final_state: return the final state as well.
        state_v_first: initial_state and final_state are (B, H, V, K) instead.
        cu_seqlens: packed variable-length sequences as in FlashAttention's varlen API: q, k, v, g are
            (1, total_T, H, .) and cu_seqlens (N + 1,) int32 or int64 offsets [0, ..., total_T] on their device;
            each sequence starts from its own initial_state row ((N, H, K, V), or zeros; chunks start at the
            sequence's first step) and final_state is (N, H, K, V); empty sequences are allowed. One op call
            whose kernels read the offsets on the device: no host loop and no host synchronisation, and it
            compiles under torch.compile(fullgraph=True). Offsets that do not rise from 0 to total_T fail an
            asynchronous device assert (RuntimeError at once on CPU, at the next synchronising call on CUDA;
            the kernels clamp every offset they read). RuntimeError for offsets that are not a 1-D int32 /
            int64 tensor on the inputs' device, a batch other than 1, or states that are not (N, H, K, V).
            On CUDA, packed calls run the ``gla_varlen`` kernels (fused_recurrent_gla's, walking each sequence;
            above head dim {cuda_max_head_dim} gla_head512's sizes), which pass the tests under the CUDA
            emulator but have not yet run on a GPU: the first such call in a process warns.
        cu_seqlens_cpu: flash-linear-attention's host copy of the offsets: accepted, never needed; used (copied
            to the inputs' device without a synchronisation) only when cu_seqlens is not given.
        K and V may be anything in [1, {max_head_dim}]. On CUDA, K or V above {cuda_max_head_dim} run the
        ``gla_head512`` kernels, which pass the tests under the CUDA emulator but have not yet run on a GPU:
        the first such call in a process warns.

    Returns:
        o: (B, T, H, V) in q's dtype; final_state: (B, H, K, V) float32 (float64 for float64 inputs)
        or None. Differentiable with respect to q, k, v, g, initial_state, also through final_state.
        The gate sums, the diagonal-block scores, the state and every accumulation are float32.
    """
    if cu_seqlens is None and cu_seqlens_cpu is not None:  # a host-to-device copy, no synchronisation
        cu_seqlens = cu_seqlens_cpu.to(q.device, non_blocking=True)
    return _gla("chunk_gla", False, q, k, v, g, scale, initial_state, output_final_state, state_v_first, cu_seqlens)


def fused_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    *,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    transpose_state_layout: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention computed step by step: the decoding / short-sequence path.

    Same contract, shapes and dtypes as :func:`chunk_gla`; the state is updated once per time step.
    flash-linear-attention's keywords work too: ``gk`` is ``g`` (no gate at all means no decay),
    ``reverse=True`` runs the recurrence from T-1 down to 0 (each packed sequence from its last step down to its
    first, from its own initial state: the offsets of the time-flipped batch are computed on the device),
    ``state_v_first`` and ``cu_seqlens`` as in :func:`chunk_gla`; value gates (``gv``) are not supported yet and raise ``NotImplementedError``.
    ``transpose_state_layout`` is fla's former name of ``state_v_first``: it still works, with a
    ``DeprecationWarning``, and passing it together with ``state_v_first=True`` is a ``ValueError`` (as fla).
    """
    if transpose_state_layout is not None:
        if state_v_first:
            raise ValueError("linmix.fused_recurrent_gla: pass state_v_first or the deprecated transpose_state_layout, "
                             "not both")
        warnings.warn("linmix.fused_recurrent_gla: transpose_state_layout is deprecated and renamed to state_v_first",
                      DeprecationWarning, stacklevel=2)
        state_v_first = transpose_state_layout
    if g is not None and gk is not None:
        raise ValueError("linmix.fused_recurrent_gla: pass the key gate as g or as gk, not both")
    if gv is not None:
        raise NotImplementedError("linmix.fused_recurrent_gla: value gates (gv) are not supported yet")
    g = gk if g is None else g
    if g is None:
        g = torch.zeros_like(k)
    return _gla("fused_recurrent_gla", True, q, k, v, g, scale, initial_state, output_final_state, state_v_first,
                cu_seqlens, reverse)


# The head-dim limits in the docstring are the extension's (gla/params.h), not copies.
chunk_gla.__doc__ = chunk_gla.__doc__.replace("{max_head_dim}", str(_C.gla_max_head_dim)).replace(
    "{cuda_max_head_dim}", str(_C.gla_cuda_max_head_dim))
