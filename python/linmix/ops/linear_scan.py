"""linear_scan: the first-order diagonal recurrence h_t = a_t * h_{t-1} + b_t."""

from __future__ import annotations

import torch

from .._native import acc_dtype, check_backend, nvtx_range


@torch.library.register_fake("linmix::linear_scan_fwd")
def _fwd_fake(a, b, h0, reverse):
    return torch.empty_like(a, memory_format=torch.contiguous_format)


@torch.library.register_fake("linmix::linear_scan_bwd")
def _bwd_fake(a, h0, h, dh, reverse):
    da = torch.empty_like(a, memory_format=torch.contiguous_format)
    db = torch.empty_like(a, memory_format=torch.contiguous_format)
    dh0 = a.new_empty((a.shape[0], a.shape[2]), dtype=acc_dtype(a))
    return da, db, dh0


class LinearScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0, reverse):
        with nvtx_range("linmix/linear_scan/fwd", a):
            h = torch.ops.linmix.linear_scan_fwd(a=a, b=b, h0=h0, reverse=reverse)
        ctx.save_for_backward(a, h, h0)
        ctx.reverse = reverse
        return h

    @staticmethod
    def backward(ctx, dh):
        a, h, h0 = ctx.saved_tensors
        with nvtx_range("linmix/linear_scan/bwd", a):
            da, db, dh0 = torch.ops.linmix.linear_scan_bwd(a=a, h0=h0, h=h, dh=dh.to(a.dtype), reverse=ctx.reverse)
        return da, db, (dh0 if h0 is not None else None), None


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, reverse: bool = False) -> torch.Tensor:
    """First-order diagonal linear recurrence over time, channel-last.

    ``h_t = a_t * h_{t-1} + b_t`` with ``h_{-1} = h0`` (zeros if None); ``reverse=True`` runs from
    ``t = T-1`` down to 0 (``h_t = a_t * h_{t+1} + b_t``).

    Args:
        a, b: (B, T, D), float32 / float16 / bfloat16 (float64 on CPU); same dtype and device.
        h0: optional (B, D) initial state; cast to float32 (float64 for float64 inputs).
        reverse: scan direction.

    Returns:
        h: (B, T, D) in a's dtype. Accumulation is float32 (float64 for float64 inputs).
        Differentiable with respect to a, b and h0.
    """
    check_backend("linear_scan", a, b, h0)
    if h0 is not None and a.dim() == 3:
        h0 = h0.to(acc_dtype(a))
    return LinearScanFn.apply(a, b, h0, reverse)
