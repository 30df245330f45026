"""The reference formulations agree with the float64 specification: linmix.reference.gla_chunked_ref (the chunked
GLA form the bench times and chunked kernels follow) against gla_ref (the recurrent time loop)."""

import pytest
import torch

from linmix.reference import gla_chunked_ref, gla_ref

from conftest import assert_close
from test_gla import make


@pytest.mark.parametrize("T", [1, 37, 63, 64, 65, 130])
@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("acc_dtype", [torch.float64, torch.float32])
def test_gla_chunked_matches_recurrent(T, chunk, acc_dtype):
    torch.manual_seed(T * 100 + chunk)
    q, k, v, g, _ = make(2, T, 3, 8, 5, torch.float64, "cpu", h0=False)
    want, _ = gla_ref(q, k, v, g)
    got = gla_chunked_ref(q, k, v, g, chunk=chunk, acc_dtype=acc_dtype)
    assert got.dtype == torch.float64 and got.shape == want.shape
    assert_close(got, want, dtype=acc_dtype)


def test_gla_chunked_gradients_match_recurrent():
    torch.manual_seed(0)
    q, k, v, g, _ = make(1, 45, 2, 4, 3, torch.float64, "cpu", h0=False, requires_grad=True)
    do = torch.randn(1, 45, 2, 3, dtype=torch.float64)
    want = torch.autograd.grad(gla_ref(q, k, v, g)[0], (q, k, v, g), do)
    got = torch.autograd.grad(gla_chunked_ref(q, k, v, g, chunk=16, acc_dtype=torch.float64), (q, k, v, g), do)
    for name, a, b in zip("qkvg", got, want):
        assert_close(a, b, name=f"d{name}")


def test_gla_chunked_keeps_input_dtype_and_empty():
    q, k, v, g, _ = make(1, 0, 2, 4, 3, torch.float32, "cpu", h0=False)
    assert gla_chunked_ref(q, k, v, g).shape == (1, 0, 2, 3)
    q, k, v, g, _ = make(1, 5, 2, 4, 3, torch.bfloat16, "cpu", h0=False)
    assert gla_chunked_ref(q, k, v, g).dtype == torch.bfloat16


@pytest.mark.parametrize("B,T", [(0, 0), (2, 0), (0, 3)])
def test_references_take_empty_batches_and_sequences(B, T):
    """Found by the fuzzer (test_fuzz.py): the references raised at T = 0 (linear_scan's, which the fixed-point
    one runs) and at B = 0 with stopping="batch" (a quantile of no residuals)."""
    from linmix._cases import CASES, make

    for name, choice in (("linear_scan", {}), ("fixed_point_rnn", {}), ("fixed_point_rnn", {"stopping": "batch"})):
        case = CASES[name]
        x = make(case, "cpu", torch.float64, sizes={case.batch: B, case.time: T}, **choice)
        out = case.reference(**x)[0]
        assert out.shape == x["u" if name == "fixed_point_rnn" else "a"].shape
