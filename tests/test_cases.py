"""linmix._cases, the registry of op cases: every op, every documented argument value (one at a time), at the
registry's small odd sizes, against the case's float64 reference: outputs, and the gradients of every
differentiable input. Also what make() builds: dims, dtypes, broadcast inputs, seeds."""

from __future__ import annotations

import pytest
import torch

from linmix._cases import CASES, make, variants
from conftest import assert_close

# Argument combinations the fuzzer (test_fuzz.py) found wrong once, kept as regular cases.
FOUND = [
    ("chunk_gla", {"initial_state": "given", "state_v_first": True}),
]
VARIANTS = [pytest.param(case, choice, id=f"{case.name}-" + ("-".join(f"{k}={v}" for k, v in choice.items()) or "default"))
            for case in CASES.values() for choice in variants(case)]
VARIANTS += [pytest.param(CASES[name], choice, id=f"{name}-" + "-".join(f"{k}={v}" for k, v in choice.items()))
             for name, choice in FOUND]


def _grads(outs, leaves, seed):
    """Gradients of the leaves for one random cotangent per floating output."""
    gen = torch.Generator().manual_seed(seed)
    pairs = [(o, torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype))
             for o in outs if o.is_floating_point() and o.requires_grad]
    return torch.autograd.grad([o for o, _ in pairs], leaves, [w for _, w in pairs], allow_unused=True)


@pytest.mark.parametrize("case,choice", VARIANTS)
def test_op_matches_reference(case, choice):
    x = make(case, "cpu", torch.float64, seed=3, **choice)
    names = [n for n in case.grads if x.get(n) is not None]
    xo = {k: v.detach().clone().requires_grad_(k in names) if torch.is_tensor(v) else v for k, v in x.items()}
    xr = {k: v.detach().clone().requires_grad_(k in names) if torch.is_tensor(v) else v for k, v in x.items()}
    outs, refs = case.run(xo), case.reference(**xr)
    assert len(outs) == len(refs)
    for i, (o, r) in enumerate(zip(outs, refs)):
        if o.is_floating_point():
            assert_close(o, r, name=f"output {i}")
        else:  # fixed_point_rnn's iteration count
            assert torch.equal(o, r.to(o.dtype)), f"output {i}: {o} != {r}"
    if not names:
        return
    got = _grads(outs, [xo[n] for n in names], 4)
    want = _grads(refs, [xr[n] for n in names], 4)
    # The implicit gradient is the adjoint iteration's, stopped at the op's tol (1e-4 relative by default); the
    # reference's is the exact fixed point's.
    tol = 1e-3 if x.get("grad_mode") == "implicit" else None
    for n, g, w in zip(names, got, want):
        assert_close(g, w, name=f"d{n}", tol=tol)


def test_make_dims_dtypes_and_seeds():
    gla = CASES["chunk_gla"]
    x = make(gla, "cpu", torch.bfloat16, seed=5, sizes=dict(T=11), initial_state="given")
    assert x["q"].shape == (2, 11, 2, 5) and x["v"].shape == (2, 11, 2, 3) and x["q"].dtype == torch.bfloat16
    assert x["initial_state"].dtype == torch.float32 and x.time_dim("v") == 1 and x.time_dim("initial_state") is None
    assert (x["g"] <= 0).all()
    y = make(gla, "cpu", torch.float64, seed=5, sizes=dict(T=11), initial_state="given")
    torch.testing.assert_close(y["q"].to(torch.bfloat16), x["q"], rtol=0, atol=0)  # the same draw in every dtype
    assert not torch.equal(make(gla, seed=6)["q"], make(gla, seed=5)["q"])
    assert make(gla, initial_state="given", state_v_first=True)["initial_state"].shape == (2, 2, 3, 5)  # (B H V K)
    packed = make(gla, cu_seqlens="given", initial_state="given")
    c = packed["cu_seqlens"].tolist()
    assert packed["q"].shape[0] == 1 and c[0] == 0 and c[-1] == 7 and c == sorted(c)
    assert packed["initial_state"].shape[0] == len(c) - 1
    heads = make(CASES["selective_state_update"], state="heads", state_batch_indices="given")
    assert heads["state"].shape == (5, 3, 2, 5) and heads["A"].stride() == (1, 0, 0)  # A tied per head
    assert heads["state_batch_indices"].tolist().count(-1) == 1
    with pytest.raises(ValueError, match="no argument"):
        make(gla, reverse=True)  # fused_recurrent_gla's, not chunk_gla's
