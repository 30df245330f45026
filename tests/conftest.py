"""Shared test helpers: devices, dtypes, and tolerance rules."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import linmix
from linmix import emulation

HAS_CUDA = torch.cuda.is_available() and linmix.build_info()["cuda"]

# LINMIX_EMULATE_CUDA=1: CPU calls in fp32/fp16/bf16 run the CUDA kernels' source under the emulator
# (linmix.emulation). Tests marked no_emulation("why") are skipped then: shapes too large for the emulator, or
# behaviour of the CPU kernels only (the CUDA path has another contract there).
EMULATED = emulation.enabled()


def pytest_collection_modifyitems(config, items):
    if not EMULATED:
        return
    for item in items:
        mark = item.get_closest_marker("no_emulation")
        if mark is not None:
            item.add_marker(pytest.mark.skip(reason=f"LINMIX_EMULATE_CUDA=1: {mark.args[0]}"))

# Marks a test that needs a CUDA device and linmix's CUDA backend; DEVICES parametrises over cpu and cuda.
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device/backend")
DEVICES = ["cpu", pytest.param("cuda", marks=cuda_only)]


def low_precision_close(out: torch.Tensor, ref: torch.Tensor, out_pt: torch.Tensor, rtol: float = 2.0, atol: float = 1e-5):
    """FlashAttention's rule: our error may be at most `rtol` times PyTorch's own error in that dtype.

    out: linmix result; ref: float64 reference; out_pt: a PyTorch computation in the low-precision dtype.
    """
    ref = ref.double()
    err = (out.double() - ref).abs().max().item()
    err_pt = (out_pt.double() - ref).abs().max().item()
    assert err <= rtol * err_pt + atol, f"linmix error {err:.3e} > {rtol} x PyTorch's {err_pt:.3e} + {atol}"


# The one tolerance rule for comparisons against the float64 reference: (rtol, atol) by the dtype compared.
TOLERANCES = {
    torch.float64: (1e-9, 1e-11),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (5e-2, 1e-2),
}


# Low precision against the float64 reference on the same (rounded) inputs, the fuzzer's and the layer cases'
# rule: assert_close(tol=LOW_TOL[dtype]): rtol = tol, atol = tol * max(1, max |expected|), so a gradient that
# is exactly 0 in float64 (dg of a one-step sequence) may carry the rounding of the terms that cancel there.
LOW_TOL = {torch.float32: 2e-4, torch.bfloat16: 5e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, exact: bool = False, name: str = "output",
                 dtype: torch.dtype | None = None, tol: float | None = None) -> None:
    """The one elementwise closeness check: bitwise (exact=True, same computation two ways: compiled vs eager,
    strided vs contiguous); with `tol`, rtol = tol and atol = tol * max(1, max|expected|) (outputs of long
    reductions lose absolute digits in proportion to their size); otherwise within TOLERANCES[dtype or
    actual.dtype] of `expected` (e.g. the float64 reference)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if exact:
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{name}: {m}")
        return
    if tol is not None:
        scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
        rtol, atol = tol, tol * scale
    else:
        rtol, atol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{name}: {m}")


def rel_err(actual: torch.Tensor, expected: torch.Tensor, norm: str = "max", floor: float = 1e-30) -> float:
    """The one whole-tensor error: |actual - expected| / |expected| in the max norm (norm="max") or the 2-norm
    (norm="fro"), the denominator at least `floor` (for an expected tensor that is (near) zero)."""
    diff, want = actual.double() - expected.double(), expected.double()
    if norm == "max":
        return (diff.abs().max() / want.abs().max().clamp_min(floor)).item()
    return (diff.norm() / want.norm().clamp_min(floor)).item()


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, *, name: str = "output",
                     norm: str = "max", floor: float = 1e-30) -> None:
    """rel_err(actual, expected, norm, floor) below tol."""
    err = rel_err(actual, expected, norm, floor)
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol}"


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so an unwritten output element shows up."""
    return t.fill_(float("nan"))


class HostReads(TorchDispatchMode):
    """Counts the ops that copy a tensor value to the host (.item(), bool(tensor), data-dependent shapes: each a
    synchronisation on a GPU) in `count`; with strict=True the first one fails instead."""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)

    def __init__(self, strict: bool = False):
        super().__init__()
        self.strict, self.count = strict, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            assert not self.strict, f"host synchronisation: {func}"
            self.count += 1
        return func(*args, **(kwargs or {}))
