"""linear_scan: the first-order diagonal recurrence h_t = a_t * h_{t-1} + b_t."""

from __future__ import annotations

import torch

from .._native import acc_dtype, check_backend, nvtx_range
from ._varlen import check_offsets, n_seqs


@torch.library.register_fake("linmix::linear_scan_fwd")
def _fwd_fake(a, b, h0, cu_seqlens, reverse):
    return torch.empty_like(a, memory_format=torch.contiguous_format)


@torch.library.register_fake("linmix::linear_scan_bwd")
def _bwd_fake(a, h0, cu_seqlens, h, dh, reverse):
    da = torch.empty_like(a, memory_format=torch.contiguous_format)
    db = torch.empty_like(a, memory_format=torch.contiguous_format)
    dh0 = a.new_empty((n_seqs(a.shape[0], cu_seqlens), a.shape[2]), dtype=acc_dtype(a))
    return da, db, dh0


class LinearScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0, reverse, cu_seqlens):
        with nvtx_range("linmix/linear_scan/fwd", a):
            h = torch.ops.linmix.linear_scan_fwd(a=a, b=b, h0=h0, reverse=reverse, cu_seqlens=cu_seqlens)
        ctx.save_for_backward(a, h, h0, cu_seqlens)
        ctx.reverse = reverse
        return h

    @staticmethod
    def backward(ctx, dh):
        a, h, h0, cu_seqlens = ctx.saved_tensors
        with nvtx_range("linmix/linear_scan/bwd", a):
            da, db, dh0 = torch.ops.linmix.linear_scan_bwd(a=a, h0=h0, h=h, dh=dh.to(a.dtype), reverse=ctx.reverse,
                                                           cu_seqlens=cu_seqlens)
        return da, db, (dh0 if h0 is not None else None), None, None


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, reverse: bool = False,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """First-order diagonal linear recurrence over time, channel-last.

    ``h_t = a_t * h_{t-1} + b_t`` with ``h_{-1} = h0`` (zeros if None); ``reverse=True`` runs from
    ``t = T-1`` down to 0 (``h_t = a_t * h_{t+1} + b_t``).

    Args:
        a, b: (B, T, D), float32 / float16 / bfloat16 (float64 on CPU); same dtype and device.
        h0: optional (B, D) initial state; cast to float32 (float64 for float64 inputs).
        reverse: scan direction.
        cu_seqlens: packed variable-length sequences (FlashAttention's convention): a, b are (1, T, D), the
            sequences concatenated along T, and cu_seqlens (N + 1,) int32 / int64 offsets [0, ..., T] on their
            device; each sequence scans on its own (from its h0 row, h0 (N, D), or zeros; ``reverse`` within
            each). One kernel launch per direction whatever N, no host synchronisation: the kernels read the
            offsets on the device (clamped, so a malformed tensor never reaches outside a and b) and a malformed
            tensor raises RuntimeError through an asynchronous device assert (at once on the CPU). On CUDA the
            packed kernels (``linear_scan_varlen``) have not yet run on a GPU: the first such call warns.

    Raises:
        RuntimeError: shapes, dtypes or devices that do not match the above, batch > 1 with cu_seqlens.

    Returns:
        h: (B, T, D) in a's dtype. Accumulation is float32 (float64 for float64 inputs).
        Differentiable with respect to a, b and h0.
    """
    check_backend("linear_scan", a, b, h0, cu_seqlens)
    if h0 is not None and a.dim() == 3:
        h0 = h0.to(acc_dtype(a))
    if cu_seqlens is not None and a.dim() == 3:
        check_offsets("linear_scan", cu_seqlens, a.shape[1])
    return LinearScanFn.apply(a, b, h0, reverse, cu_seqlens)
