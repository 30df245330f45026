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


def check_states(name: str, initial_state: torch.Tensor | None, n_seq: int) -> None:
    if initial_state is not None and initial_state.shape[0] != n_seq:
        raise ValueError(f"linmix.{name}: initial_state must have one state per sequence ({n_seq}), got "
                         f"{initial_state.shape[0]}")
