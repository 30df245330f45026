"""Reference linear_scan: a plain time loop in float64."""

from __future__ import annotations

import torch


def linear_scan_ref(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, reverse: bool = False):
    """h_t = a_t h_{t-1} + b_t over (B, T, D), computed step by step in float64 (differentiable)."""
    a, b = a.double(), b.double()
    h = a.new_zeros(a.shape[0], a.shape[2]) if h0 is None else h0.double()
    steps = range(a.shape[1] - 1, -1, -1) if reverse else range(a.shape[1])
    out = [None] * a.shape[1]
    for t in steps:
        h = a[:, t] * h + b[:, t]
        out[t] = h
    return torch.stack(out, dim=1) if out else torch.empty_like(a)
