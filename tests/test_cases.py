"""linmix._cases, the registry of op cases, and linmix._layer_cases, the layers in the same form: every op and
layer, every documented argument value (one at a time), at the registry's small odd sizes, against the case's
float64 reference: outputs, and the gradients of every differentiable input; every documented error. Also what
make() builds: dims, dtypes, broadcast inputs, seeds.

The layers run in float64 on the CPU kernels, and under LINMIX_EMULATE_CUDA=1 in float32, so that their calls
run the CUDA kernels' own source (against the float64 reference, at conftest.LOW_TOL)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch

import linmix.nn
from linmix._cases import CASES, make, variants
from linmix._layer_cases import LAYER_OPS, LAYERS, NOT_VARIED
from conftest import EMULATED, LOW_TOL, assert_close

# Argument combinations the fuzzer (test_fuzz.py) found wrong once, kept as regular cases.
FOUND = [
    ("chunk_gla", {"initial_state": "given", "state_v_first": True}),
    ("chunk_gla", {"cu_seqlens": "given", "cu_seqlens_cpu": "given"}),  # the reference read cu_seqlens_cpu first
]
# Layer argument combinations that one-at-a-time variants do not reach.
COMBINATIONS = [
    ("FixedPointRNN", {"state_dependent": True, "grad_mode": "unroll"}),
    ("FixedPointRNN", {"state_dependent": True, "grad_mode": "implicit", "state": "given", "return_state": True}),
    ("FPMamba", {"state": "given", "return_state": True, "return_info": True, "d_conv": 0}),
    ("GatedLinearAttention", {"layer_idx": 0, "past_key_values": "given", "use_cache": True, "cu_seqlens": "given"}),
    ("GatedLinearAttention", {"mode": "fused_recurrent", "use_short_conv": True, "attention_mask": "given"}),
]


def _id(name, choice):
    return f"{name}-" + ("-".join(f"{k}={v}" for k, v in choice.items()) or "default")


VARIANTS = [pytest.param(case, choice, id=_id(case.name, choice))
            for case in CASES.values() for choice in variants(case)]
VARIANTS += [pytest.param(CASES[name], choice, id=_id(name, choice)) for name, choice in FOUND]
LAYER_VARIANTS = [pytest.param(case, choice, id=_id(case.name, choice))
                  for case in LAYERS.values() for choice in variants(case)]
LAYER_VARIANTS += [pytest.param(LAYERS[name], choice, id=_id(name, choice)) for name, choice in COMBINATIONS]
# Under the emulator, float32 layer calls run the CUDA kernels; float64 ones the CPU kernels.
LAYER_DTYPE = torch.float32 if EMULATED else torch.float64


def _grads(outs, leaves, seed):
    """Gradients of the leaves for one random cotangent per floating output."""
    gen = torch.Generator().manual_seed(seed)
    pairs = [(o, torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype))
             for o in outs if o.is_floating_point() and o.requires_grad]
    return torch.autograd.grad([o for o, _ in pairs], leaves, [w for _, w in pairs], allow_unused=True)


def _check(case, choice, dtype=torch.float64):
    """case in dtype against its reference on the same values in float64: outputs and input gradients."""
    x = make(case, "cpu", dtype, seed=3, **choice)
    x64 = make(case, "cpu", torch.float64, seed=3, **choice) if dtype != torch.float64 else x
    names = [n for n in case.grads if x.get(n) is not None]
    xo = {k: v.detach().clone().requires_grad_(k in names) if torch.is_tensor(v) else v for k, v in x.items()}
    xr = {k: v.detach().clone().requires_grad_(k in names) if torch.is_tensor(v) else v for k, v in x64.items()}
    outs, refs = case.run(xo), case.reference(**xr)
    assert len(outs) == len(refs)
    low = None if dtype == torch.float64 else LOW_TOL[dtype]
    for i, (o, r) in enumerate(zip(outs, refs)):
        if o.is_floating_point():
            assert_close(o, r, name=f"output {i}", tol=low)
        else:  # fixed_point_rnn's iteration count
            assert torch.equal(o, r.to(o.dtype)), f"output {i}: {o} != {r}"
    differentiable = any(o.requires_grad for o in outs)
    assert differentiable == any(r.requires_grad for r in refs)
    if not names or not differentiable:  # Mamba's decoding runs without autograd (linmix._layer_cases)
        return
    got = _grads(outs, [xo[n] for n in names], 4)
    want = _grads(refs, [xr[n] for n in names], 4)
    # The op's implicit gradient is the adjoint iteration's, stopped at the op's tol (1e-4 relative by default);
    # the reference's is the exact fixed point's. (FPMamba's implicit gradient is the layer's own Python loop,
    # the same in its reference.)
    implicit = x.get("grad_mode") == "implicit" and case.name in ("fixed_point_rnn", "FixedPointRNN")
    tol = 1e-3 if implicit else low
    for n, g, w in zip(names, got, want):
        assert (g is None) == (w is None), f"d{n}: {g} vs {w}"
        if g is not None:
            assert_close(g, w, name=f"d{n}", tol=tol)


@pytest.mark.parametrize("case,choice", VARIANTS)
def test_op_matches_reference(case, choice):
    _check(case, choice)


@pytest.mark.filterwarnings("ignore::linmix.ops.fixed_point_rnn.FixedPointConvergenceWarning")
@pytest.mark.parametrize("case,choice", LAYER_VARIANTS)
def test_layer_matches_reference(case, choice):
    _check(case, choice, LAYER_DTYPE)


@pytest.mark.parametrize("case,choice,error,match", [
    pytest.param(case, choice, error, match, id=_id(case.name, choice))
    for case in LAYERS.values() for choice, error, match in case.refuses])
def test_layer_refuses(case, choice, error, match):
    with (pytest.warns if issubclass(error, Warning) else pytest.raises)(error, match=match):
        case.run(make(case, "cpu", LAYER_DTYPE, seed=3, **choice))


def test_layer_cases_take_every_argument():
    """Every constructor and forward argument of every public layer is one of its case's Args, but for the sizes
    and factory arguments listed in NOT_VARIED."""
    for case in LAYERS.values():
        cls = getattr(linmix.nn, case.name)
        forward = list(inspect.signature(cls.forward).parameters.values())[2:]  # after self and the input
        names = set(inspect.signature(cls).parameters) | {p.name for p in forward if p.kind != p.VAR_KEYWORD}
        args = {a.name for a in case.args}
        assert names - args == set(NOT_VARIED[case.name]), case.name
    assert "cu_seqlens" in {a.name for a in LAYERS["GatedLinearAttention"].args}  # forward's **kwargs


def test_layer_references_replace_every_op():
    """The layers' references swap each linmix op a linmix.nn module calls (LAYER_OPS); an op called under
    another name, or from a module not listed, would make a layer its own reference."""
    ops = {case.fn for case in CASES.values()}
    for info in pkgutil.iter_modules(linmix.nn.__path__):
        module = importlib.import_module(f"linmix.nn.{info.name}")
        called = {name for name, v in vars(module).items() if any(v is op for op in ops)}
        assert called == set(LAYER_OPS.get(module, ())), module.__name__
    assert set(linmix.nn.__all__) - set(LAYERS) == {"FPMambaState", "InferenceParams", "RecurrentCache"}


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


def test_layer_references_match_the_written_out_layers():
    """The composed references (the layer's own code on the ops' float64 references) against the layers written
    out in plain float64 (tests/nn_reference.py), at each layer's default call (FPMamba with tol = 0: exactly
    max_iter iterations, then the one-step gradient's extra one, as the written-out loop): outputs, and the
    gradients of the input and of every parameter."""
    from nn_reference import ref_causal_conv, ref_fp_mamba, ref_gla, ref_mamba

    written_out = {
        "GatedLinearAttention": ({}, lambda p, x: ref_gla(p, x, dict(num_heads=4))[0]),
        "Mamba": ({}, lambda p, x: ref_mamba(p, x, 16, 1)[0]),
        "FPMamba": (dict(tol=0.0), lambda p, x: ref_fp_mamba(p, x, 1, 16, 1, 16)),
        "ShortConvolution": ({}, lambda p, x: ref_causal_conv(x, p["weight"], None)),
    }
    for name, (choice, ref) in written_out.items():
        case = LAYERS[name]
        x = {k: v.requires_grad_() if torch.is_tensor(v) and v.is_floating_point() else v
             for k, v in make(case, "cpu", torch.float64, seed=3, **choice).items()}
        leaves = [v for v in x.values() if torch.is_tensor(v) and v.requires_grad]
        out = case.reference(**x)[0]
        params = {k[len("layer."):]: v for k, v in x.items() if k.startswith("layer.")}
        want = ref(params, x["x"] if "x" in x else x["hidden_states"])
        assert_close(out, want, name=name)
        for g, w in zip(*(_grads([o], leaves, 5) for o in (out, want)), strict=True):
            assert_close(g, w, name=f"{name} gradient")
