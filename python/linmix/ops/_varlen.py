"""Packed variable-length batches (FlashAttention's cu_seqlens convention), shared by the ops that take them."""

from __future__ import annotations

import torch


def n_seqs(batch: int, cu_seqlens: torch.Tensor | None) -> int:
    """The states' first dim: the batch, or the number of packed sequences (cu_seqlens holds N + 1 offsets)."""
    return batch if cu_seqlens is None else cu_seqlens.shape[0] - 1


def check_offsets(name: str, cu_seqlens: torch.Tensor, total: int) -> None:
    """Asserts that cu_seqlens rises from 0 to the packed length ``total``, without a host synchronisation: on CUDA
    the check is an asynchronous device assert (a malformed tensor fails at the next synchronising call; the kernels
    clamp every offset they read, so it never makes them touch memory outside their tensors), on the CPU it raises
    RuntimeError at once. Shape, dtype and device are the extension's checks (``varlen_view`` in checks.h)."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.is_floating_point():
        return  # the op's own checks name the problem
    ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == total) & (cu_seqlens[1:] >= cu_seqlens[:-1]).all()
    torch._assert_async(ok, f"linmix.{name}: cu_seqlens must rise from 0 to the packed length (the inputs' time dim)")

