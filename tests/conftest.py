"""Shared test helpers: devices, dtypes, and tolerance rules."""

from __future__ import annotations

import pytest
import torch

import linmix

HAS_CUDA = torch.cuda.is_available() and linmix.build_info()["cuda"]

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device/backend"))]


def low_precision_close(out: torch.Tensor, ref: torch.Tensor, out_pt: torch.Tensor, rtol: float = 2.0, atol: float = 1e-5):
    """FlashAttention's rule: our error may be at most `rtol` times PyTorch's own error in that dtype.

    out: linmix result; ref: float64 reference; out_pt: a PyTorch computation in the low-precision dtype.
    """
    ref = ref.double()
    err = (out.double() - ref).abs().max().item()
    err_pt = (out_pt.double() - ref).abs().max().item()
    assert err <= rtol * err_pt + atol, f"linmix error {err:.3e} > {rtol} x PyTorch's {err_pt:.3e} + {atol}"


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so an unwritten output element shows up."""
    return t.fill_(float("nan"))
