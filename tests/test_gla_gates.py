"""Gated linear attention under large and infinite gates.

Every decay must be built from sums over the segment it spans, never as a difference of running sums, so a gate
of -inf gives an exact 0 decay (and no NaN anywhere, gradients included) and fp32 stays accurate whatever the
other gates are; the gradient of a gate whose decay underflows is exactly 0 (gla_gate_grad). Checked against the
float64 reference for both ops on CPU (the CPU twin) and, with a GPU, with LINMIX_UNVERIFIED_KERNELS=1 (the
fused chunk_gla kernels; under LINMIX_EMULATE_CUDA=1 the cpu cases run their source too).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import linmix
from linmix.reference import gla_ref

from conftest import DEVICES, cuda_only, rel_err
from test_gla import ALGOS, run_and_grads

INF = float("inf")
TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.bfloat16: 1e-2}
NAMES = ["o", "final_state", "dq", "dk", "dv", "dg", "dh0"]


def skip_fp64_cuda(device, dtype):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("no float64 CUDA kernels")


# ---- three inputs that running-sum decays get wrong, exactly


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ["chunk", "recurrent"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_single_step_minus_inf(device, algo, dtype, monkeypatch):
    skip_fp64_cuda(device, dtype)
    monkeypatch.setenv("LINMIX_UNVERIFIED_KERNELS", "1")
    q, k, v = (torch.ones(1, 1, 1, 1, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
    g = torch.full((1, 1, 1, 1), -INF, dtype=dtype, device=device, requires_grad=True)
    o, ht = ALGOS[algo](q, k, v, g, scale=1.0, output_final_state=True)
    assert o.item() == 1.0 and ht.item() == 1.0
    (o.sum() + ht.sum()).backward()
    # o = q k v and S = k v: dq = 1, dk = dv = 2; the gate's gradient is exp(-inf) * (...) = 0.
    assert [t.grad.item() for t in (q, k, v, g)] == [1.0, 2.0, 2.0, 0.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ["chunk", "recurrent"])
@pytest.mark.parametrize("dtype, big", [(torch.float32, -3.4e37), (torch.float64, -1.7e307)], ids=["fp32", "fp64"])
def test_huge_gate_keeps_later_decay(device, algo, dtype, big, monkeypatch):
    skip_fp64_cuda(device, dtype)
    monkeypatch.setenv("LINMIX_UNVERIFIED_KERNELS", "1")
    q = torch.ones(1, 3, 1, 1, dtype=dtype, device=device)
    v = torch.tensor([1.0, 2.0, 3.0], dtype=dtype, device=device).view(1, 3, 1, 1)
    g = torch.tensor([big, -0.5, -0.5], dtype=dtype, device=device).view(1, 3, 1, 1)
    o, _ = ALGOS[algo](q, q, v, g, scale=1.0)
    want = torch.tensor([1.0, 2 + math.exp(-0.5), 3 + 2 * math.exp(-0.5) + math.exp(-1.0)], dtype=torch.float64)
    assert torch.allclose(want, torch.tensor([1, 2.606531, 4.580941], dtype=torch.float64), atol=1e-6)
    eps = torch.finfo(dtype).eps
    assert ((o.flatten().double().cpu() - want).abs() / want).max() < 4 * eps


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ["chunk", "recurrent"])
def test_twelve_huge_gates_in_a_row(device, algo, monkeypatch):
    # Twelve gates of -3.4e37 in a row inside one chunk (was NaN): the state forgets everything before them.
    monkeypatch.setenv("LINMIX_UNVERIFIED_KERNELS", "1")
    T = 20
    q = torch.ones(1, T, 1, 1, device=device)
    v = torch.arange(1.0, T + 1, device=device).view(1, T, 1, 1)
    g = torch.full((1, T, 1, 1), -0.5, device=device)
    g[:, 3:15] = -3.4e37
    o, _ = ALGOS[algo](q, q, v, g, scale=1.0)
    want, _ = gla_ref(q, q, v, g, scale=1.0)
    assert torch.isfinite(o).all()
    assert ((o.double().cpu() - want.cpu()).abs() / want.cpu().abs()).max() < 8 * 2.0**-24


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ["chunk", "recurrent"])
@pytest.mark.parametrize("big", [-1e3, -1e4, -1e5, -1e7, -1e30])
def test_fp32_error_at_ulp_level_whatever_the_first_gate(device, algo, big, monkeypatch):
    monkeypatch.setenv("LINMIX_UNVERIFIED_KERNELS", "1")
    q = torch.ones(1, 3, 1, 1, device=device)
    v = torch.tensor([1.0, 2.0, 3.0], device=device).view(1, 3, 1, 1)
    g = torch.tensor([big, -0.5, -0.5], device=device).view(1, 3, 1, 1)
    o, _ = ALGOS[algo](q, q, v, g, scale=1.0)
    want, _ = gla_ref(q, q, v, g, scale=1.0)
    assert ((o.double() - want).abs() / want.abs()).max() < 4 * 2.0**-24  # a few fp32 ulp (was 2.7e-4 at -1e4)


# ---- the kind: extreme gates at chunk starts, ends, middles and in runs

# Time steps of each pattern (chunks are 64 steps, sub-chunks 16); in the mixed input each pattern owns its own
# group of key channels, so one sequence carries all of them.
PATTERNS = {
    "chunk-starts": [0, 64, 128],
    "chunk-ends": [63, 127],
    "middles": [30, 100],
    "subchunk-edges": [15, 16, 47, 48, 79, 80],
    "run-of-14-in-a-chunk": list(range(20, 34)),
    "run-across-a-chunk-boundary": list(range(58, 71)),
}
# (T, patterns): T of 1, one chunk and a bit, several chunks with every pattern, and every step extreme (the whole
# dg is then exactly 0, so its relative error is measured against nothing but zeros).
GATE_CASES = [
    (1, ["chunk-starts"]),
    (65, ["chunk-starts", "chunk-ends"]),
    (150, list(PATTERNS)),
    (70, None),
]
VALUES = [-INF, -1e30, -1e4]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def extreme_inputs(B, T, H, K, V, patterns, value, dtype, device, seed=0):
    """Random q, k, v, h0 and medium gates, with `value` written at each pattern's steps in its own group of key
    channels (every entry when patterns is None). Inputs in `dtype` (h0 in its accumulation type), leaves with
    gradients, and the boolean mask of the extreme entries."""
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    q, k = torch.randn(B, T, H, K, generator=gen, **f64), torch.randn(B, T, H, K, generator=gen, **f64)
    v = torch.randn(B, T, H, V, generator=gen, **f64)
    g = F.logsigmoid(torch.randn(B, T, H, K, generator=gen, **f64))
    mask = torch.zeros(g.shape, dtype=torch.bool)
    if patterns is None:
        mask[:] = True
    else:
        groups = torch.randperm(K, generator=gen).chunk(len(patterns))
        for name, chans in zip(patterns, groups):
            for t in (t for t in PATTERNS[name] if t < T):
                mask[:, t, :, chans] = True
    g[mask] = value
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    h0 = torch.randn(B, H, K, V, generator=gen, **f64).to(device, acc)
    ins = [t.to(device, dtype) for t in (q, k, v, g)] + [h0]
    return [t.requires_grad_() for t in ins], mask.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", VALUES, ids=str)
@pytest.mark.parametrize("case", GATE_CASES, ids=lambda c: f"T{c[0]}-{'every-step' if c[1] is None else len(c[1])}")
def test_extreme_gates_match_reference(device, dtype, value, case, monkeypatch):
    """Both ops, forward and every gradient, against one float64 reference (the reference's Python time loop is
    the slow part, so it runs once per case)."""
    skip_fp64_cuda(device, dtype)
    monkeypatch.setenv("LINMIX_UNVERIFIED_KERNELS", "1")
    T, patterns = case
    ins, mask = extreme_inputs(1, T, 2, 20, 24, patterns, value, dtype, device)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(1, T, 2, 24, generator=gen, dtype=torch.float64).to(device)
    dht = torch.randn(1, 2, 20, 24, generator=gen, dtype=torch.float64).to(device)
    want = run_and_grads(gla_ref, *ins, True, do, dht)
    for name, b in zip(NAMES, want):
        assert torch.isfinite(b).all(), f"reference {name} not finite"
    assert (want[5][mask] == 0).all()  # the gate's gradient carries exp(g): exactly 0 at every extreme gate
    for algo, fn in ALGOS.items():
        got = run_and_grads(fn, *ins, True, do, dht)
        # The fused CUDA kernels round bf16 tensor-core operands (the chunk states among them): a max-error bar.
        tol = 3e-2 if (device, algo, dtype) == ("cuda", "chunk", torch.bfloat16) else TOL[dtype]
        for name, a, b in zip(NAMES, got, want):
            assert torch.isfinite(a).all(), f"{algo} {name} not finite"
            assert rel_err(a, b) < tol, f"{algo} {name}: {rel_err(a, b):.2e} (dtype {dtype})"
        assert (got[5][mask] == 0).all(), f"{algo} dg not exactly 0 at the extreme gates"


@pytest.mark.parametrize("algo", ["chunk", "recurrent"])
@pytest.mark.parametrize("value", [-INF, -1e4])
def test_gradcheck_with_extreme_gates(algo, value):
    # The function stays smooth in q, k, v, h0 and in the ordinary gates; at the extreme ones its derivative is
    # exactly 0 and so is the finite difference (-inf + eps = -inf; exp(-1e4 + eps) = 0).
    (q, k, v, g, h0), _ = extreme_inputs(1, 70, 1, 3, 2, ["run-across-a-chunk-boundary"], value, torch.float64, "cpu")
    g.data[0, 0, 0, 0] = value  # a chunk start too
    fn = ALGOS[algo]

    def f(q, k, v, g, h0):
        o, ht = fn(q, k, v, g, initial_state=h0, output_final_state=True)
        return o, ht

    assert torch.autograd.gradcheck(f, (q, k, v, g, h0))


def test_reference_exact_for_minus_inf():
    # The reference steps S = exp(g) S + k v: exp(-inf) = 0 exactly and its derivative exp(-inf) * dS = 0.
    (q, k, v, g, h0), _ = extreme_inputs(1, 10, 1, 3, 2, None, -INF, torch.float64, "cpu")
    o, ht = gla_ref(q, k, v, g, scale=1.0, initial_state=h0, output_final_state=True)
    want = torch.einsum("btk,btk,btv->btv", q[:, :, 0], k[:, :, 0], v[:, :, 0]).unsqueeze(2)  # no memory at all
    assert torch.allclose(o, want, rtol=1e-14, atol=1e-14)
    (o.sum() + ht.sum()).backward()
    assert (g.grad == 0).all() and (h0.grad == 0).all()
    assert torch.autograd.gradcheck(lambda q, k, v: gla_ref(q, k, v, g.detach(), initial_state=h0.detach())[0],
                                    (q.detach().requires_grad_(), k.detach().requires_grad_(),
                                     v.detach().requires_grad_()))


# ---- the CUDA kernels both ways (skipped without a GPU)


def check_against_reference(fn, ins, dtype, seed=1):
    q, k, v, g, h0 = ins
    ro, rht = gla_ref(q, k, v, g, initial_state=h0, output_final_state=True)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(ro.shape, generator=gen, dtype=torch.float64).to(ro.device)
    dht = torch.randn(rht.shape, generator=gen, dtype=torch.float64).to(ro.device)
    got = run_and_grads(fn, q, k, v, g, h0, True, do, dht)
    want = run_and_grads(gla_ref, q, k, v, g, h0, True, do, dht)
    for name, a, b in zip(NAMES, got, want):
        assert torch.isfinite(a).all(), f"{name} not finite"
        assert rel_err(a, b) < TOL[dtype], f"{name}: {rel_err(a, b):.2e} (dtype {dtype})"


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_switch_off_keeps_old_path_on_ordinary_gates(dtype, monkeypatch):
    # Switch off: the GPU-verified g_cumsum chunk kernels, right on ordinary gates; switch on: the fused
    # (segment-sum) kernels, the same answers.
    ins, _ = extreme_inputs(2, 150, 2, 40, 48, ["middles"], -0.3, dtype, "cuda")
    outs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("LINMIX_UNVERIFIED_KERNELS", flag)
        check_against_reference(linmix.chunk_gla, ins, dtype)
        gen = torch.Generator().manual_seed(5)
        do = torch.randn(2, 150, 2, 48, generator=gen, dtype=torch.float64).cuda()
        dht = torch.randn(2, 2, 40, 48, generator=gen, dtype=torch.float64).cuda()
        outs[flag] = run_and_grads(linmix.chunk_gla, *ins, True, do, dht)
    for a, b in zip(outs["0"], outs["1"]):
        assert rel_err(a, b) < TOL[dtype]


@cuda_only
def test_cuda_switch_selects_segment_kernels(monkeypatch):
    # Only the segment-sum (fused) kernels are exact for -inf: the switch must actually change the kernel.
    q, k, v = (torch.ones(1, 1, 1, 1, device="cuda") for _ in range(3))
    g = torch.full((1, 1, 1, 1), -INF, device="cuda")
    monkeypatch.setenv("LINMIX_UNVERIFIED_KERNELS", "0")
    assert torch.isnan(linmix.chunk_gla(q, k, v, g, scale=1.0)[0]).all()  # exp2(-inf - -inf)
    monkeypatch.setenv("LINMIX_UNVERIFIED_KERNELS", "1")
    assert linmix.chunk_gla(q, k, v, g, scale=1.0)[0].item() == 1.0
