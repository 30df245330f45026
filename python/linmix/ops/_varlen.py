"""Packed variable-length batches (FlashAttention's cu_seqlens convention), shared by the ops that take them."""

from __future__ import annotations

import torch


def segments(name: str, batch: int, total: int, cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    """The (start, end) of each packed sequence, checked: batch 1, 0 = c_0 <= c_1 <= ... <= c_N = total.
    Reading the offsets is a host synchronisation."""
    if batch != 1:
        raise ValueError(f"linmix.{name}: with cu_seqlens the batch size must be 1 (sequences packed along time), "
                         f"got {batch}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
        raise ValueError(f"linmix.{name}: cu_seqlens must be a 1-D integer tensor [0, ..., total] of N + 1 offsets")
    c = cu_seqlens.tolist()
    if c[0] != 0 or c[-1] != total or any(b < a for a, b in zip(c, c[1:])):
        raise ValueError(f"linmix.{name}: cu_seqlens must rise from 0 to the packed length {total}, got {c}")
    return list(zip(c, c[1:]))


def check_offsets(name: str, cu_seqlens: torch.Tensor, total: int) -> None:
    """Asserts that cu_seqlens rises from 0 to the packed length ``total``, without a host synchronisation: on CUDA
    the check is an asynchronous device assert (a malformed tensor fails at the next synchronising call; the kernels
    clamp every offset they read, so it never makes them touch memory outside their tensors), on the CPU it raises
    RuntimeError at once. Shape, dtype and device are the extension's checks (``varlen_view`` in checks.h)."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.is_floating_point():
        return  # the op's own checks name the problem
    ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == total) & (cu_seqlens[1:] >= cu_seqlens[:-1]).all()
    torch._assert_async(ok, f"linmix.{name}: cu_seqlens must rise from 0 to the packed length (the inputs' time dim)")


def check_states(name: str, initial_state: torch.Tensor | None, n_seq: int) -> None:
    if initial_state is not None and initial_state.shape[0] != n_seq:
        raise ValueError(f"linmix.{name}: initial_state must have one state per sequence ({n_seq}), got "
                         f"{initial_state.shape[0]}")
