"""Gated linear attention under large and infinite gates (issue 12, section 1).

Every decay must be built from sums over the segment it spans, never as a difference of running sums, so a gate
of -inf gives an exact 0 decay (and no NaN anywhere, gradients included) and fp32 stays accurate whatever the
other gates are. Checked against the float64 reference for both ops and, on CPU in CI, through a PyTorch
emulation of the CUDA chunk kernels' block structure (GlaParams::segment_decays; the kernels themselves have
not run on a GPU yet, so the CUDA tests below are skipped without one).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import linmix
from linmix.reference import gla_ref

from conftest import DEVICES, HAS_CUDA
from test_gla import ALGOS, rel_err, run_and_grads

INF = float("inf")
TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.bfloat16: 1e-2}
NAMES = ["o", "final_state", "dq", "dk", "dv", "dg", "dh0"]


# ---- the three inputs, exactly


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ["chunk", "recurrent"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_single_step_minus_inf(device, algo, dtype, monkeypatch):
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
def test_huge_gate_keeps_later_decay(device, algo, monkeypatch):
    monkeypatch.setenv("LINMIX_UNVERIFIED_KERNELS", "1")
    q = torch.ones(1, 3, 1, 1, device=device)
    v = torch.tensor([1.0, 2.0, 3.0], device=device).view(1, 3, 1, 1)
    g = torch.tensor([-3.4e37, -0.5, -0.5], device=device).view(1, 3, 1, 1)
    o, _ = ALGOS[algo](q, q, v, g, scale=1.0)
    want = torch.tensor([1.0, 2 + math.exp(-0.5), 3 + 2 * math.exp(-0.5) + math.exp(-1.0)], dtype=torch.float64)
    assert torch.allclose(want, torch.tensor([1, 2.606531, 4.580941], dtype=torch.float64), atol=1e-6)
    assert ((o.flatten().double().cpu() - want).abs() / want).max() < 4 * 2.0**-24


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

# (name, time steps): chunks are 64 steps, sub-chunks 16.
PATTERNS = {
    "chunk-starts": [0, 64, 128],
    "chunk-ends": [63, 127],
    "middles": [30, 100],
    "subchunk-edges": [15, 16, 47, 48, 79, 80],
    "run-of-14-in-a-chunk": list(range(20, 34)),
    "run-across-a-chunk-boundary": list(range(58, 71)),
    "every-step": None,
}
# (T, pattern): T of 1, not a multiple of 64, and several chunks.
GATE_CASES = [
    (1, "chunk-starts"),
    (63, "chunk-ends"),
    (65, "chunk-starts"),
    (150, "middles"),
    (130, "subchunk-edges"),
    (150, "run-of-14-in-a-chunk"),
    (200, "run-across-a-chunk-boundary"),
    (70, "every-step"),
]
VALUES = [-INF, -1e30, -1e4]


def extreme_inputs(B, T, H, K, V, pattern, value, dtype, device, seed=0):
    """Random q, k, v, h0 and medium gates, with `value` written at the pattern's steps in half the channels
    (all channels for every-step). Inputs in `dtype` (h0 in its accumulation type), leaves with gradients."""
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    q, k = torch.randn(B, T, H, K, generator=gen, **f64), torch.randn(B, T, H, K, generator=gen, **f64)
    v = torch.randn(B, T, H, V, generator=gen, **f64)
    g = F.logsigmoid(torch.randn(B, T, H, K, generator=gen, **f64))
    steps = PATTERNS[pattern]
    if steps is None:
        g.fill_(value)
    else:
        chans = torch.randperm(K, generator=gen)[: max(1, K // 2)]
        for t in (t for t in steps if t < T):
            g[:, t, :, chans] = value
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    h0 = torch.randn(B, H, K, V, generator=gen, **f64).to(device, acc)
    ins = [t.to(device, dtype) for t in (q, k, v, g)] + [h0]
    return [t.requires_grad_() for t in ins]


def check_against_reference(fn, ins, dtype, seed=1):
    q, k, v, g, h0 = ins
    ro, rht = gla_ref(q, k, v, g, initial_state=h0, output_final_state=True)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(ro.shape, generator=gen, dtype=torch.float64).to(ro.device)
    dht = torch.randn(rht.shape, generator=gen, dtype=torch.float64).to(ro.device)
    got = run_and_grads(fn, q, k, v, g, h0, True, do, dht)
    want = run_and_grads(gla_ref, q, k, v, g, h0, True, do, dht)
    for name, a, b in zip(NAMES, got, want):
        assert torch.isfinite(b).all(), f"reference {name} not finite"
        assert torch.isfinite(a).all(), f"{name} not finite"
        assert rel_err(a, b) < TOL[dtype], f"{name}: {rel_err(a, b):.2e} (dtype {dtype})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ["chunk", "recurrent"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("value", VALUES, ids=str)
@pytest.mark.parametrize("case", GATE_CASES, ids=lambda c: f"T{c[0]}-{c[1]}")
def test_extreme_gates_match_reference(device, algo, dtype, value, case, monkeypatch):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("no float64 CUDA kernels")
    monkeypatch.setenv("LINMIX_UNVERIFIED_KERNELS", "1")
    T, pattern = case
    ins = extreme_inputs(1, T, 2, 20, 24, pattern, value, dtype, device)
    check_against_reference(ALGOS[algo], ins, dtype)


@pytest.mark.parametrize("algo", ["chunk", "recurrent"])
@pytest.mark.parametrize("value", [-INF, -1e4])
def test_gradcheck_with_extreme_gates(algo, value):
    # The function stays smooth in q, k, v, h0 and in the ordinary gates; at the extreme ones its derivative is
    # exactly 0 and so is the finite difference (-inf + eps = -inf; exp(-1e4 + eps) = 0).
    q, k, v, g, h0 = extreme_inputs(1, 70, 1, 3, 2, "run-across-a-chunk-boundary", value, torch.float64, "cpu")
    g.data[0, 0, 0, 0] = value  # a chunk start too
    fn = ALGOS[algo]

    def f(q, k, v, g, h0):
        o, ht = fn(q, k, v, g, initial_state=h0, output_final_state=True)
        return o, ht

    assert torch.autograd.gradcheck(f, (q, k, v, g, h0))


def test_reference_exact_for_minus_inf():
    # The reference steps S = exp(g) S + k v: exp(-inf) = 0 exactly and its derivative exp(-inf) * dS = 0.
    q, k, v, g, h0 = extreme_inputs(1, 10, 1, 3, 2, "every-step", -INF, torch.float64, "cpu")
    o, ht = gla_ref(q, k, v, g, scale=1.0, initial_state=h0, output_final_state=True)
    want = torch.einsum("btk,btk,btv->btv", q[:, :, 0], k[:, :, 0], v[:, :, 0]).unsqueeze(2)  # no memory at all
    assert torch.allclose(o, want, rtol=1e-14, atol=1e-14)
    (o.sum() + ht.sum()).backward()
    assert (g.grad == 0).all() and (h0.grad == 0).all()
    assert torch.autograd.gradcheck(lambda q, k, v: gla_ref(q, k, v, g.detach(), initial_state=h0.detach())[0],
                                    (q.detach().requires_grad_(), k.detach().requires_grad_(),
                                     v.detach().requires_grad_()))


# ---- emulation of the CUDA chunk kernels with segment_decays (gla_chunk_{common,fwd_kernel,bwd_kernel}.cuh)

C, SUB, BK, BV = 64, 16, 32, 32
LOG2E = 1.4426950408889634


def _pad(x, rows, cols):
    return F.pad(x, (0, cols - x.shape[-1], 0, rows - x.shape[-2]))


class Slice:
    """GlaChunkSlice<true>: one (chunk, 32-channel K slice) of q, k and its segment sums, zero-padded."""

    def __init__(self, q, k, g):  # (N, L, <=BK) each
        self.q, self.k = _pad(q, C, BK), _pad(k, C, BK)
        self.a = _pad(g * LOG2E, C, BK)  # log2 gates, 0 in padded rows and channels
        a4 = self.a.unflatten(1, (C // SUB, SUB))  # (N, 4, 16, BK)
        self.pre = a4.cumsum(2).flatten(1, 2)  # gla_subchunk_sums: inclusive prefix ...
        rev = a4.flip(2).cumsum(2).flip(2)  # ... and exclusive suffix, as sums, never differences
        self.suf = torch.cat([rev[:, :, 1:], torch.zeros_like(rev[:, :, :1])], 2).flatten(1, 2)
        self.tot = a4.sum(2)  # (N, 4, BK)

    def span(self, J0, J1):  # gla_span: totals of sub-chunks J0 .. J1-1, (N, BK)
        return self.tot[:, J0:J1].sum(1)

    def from_start(self):
        return torch.cat([self.span(0, J) + self.pre[:, SUB * J:SUB * (J + 1)] for J in range(C // SUB)], 1)

    def to_end(self):
        return torch.cat([self.suf[:, SUB * J:SUB * (J + 1)] + self.span(J + 1, C // SUB).unsqueeze(1)
                          for J in range(C // SUB)], 1)

    def total(self):
        return self.span(0, C // SUB)

    def query_side(self, I):  # rows of query sub-chunk I
        return self.pre[:, SUB * I:SUB * (I + 1)]

    def key_side(self, I):  # rows 0 .. 16 I - 1
        return torch.cat([self.suf[:, SUB * J:SUB * (J + 1)] + self.span(J + 1, I).unsqueeze(1) for J in range(I)], 1)

    def diag_exponents(self, J):  # (N, 16, 16, BK): sum_{j < m <= i} a_m for j <= i, -inf above
        a = self.a[:, SUB * J:SUB * (J + 1)]
        idx = torch.arange(SUB)
        m, j = idx.view(SUB, 1), idx.view(1, SUB)
        x = torch.where((m > j).view(1, SUB, SUB, 1), a.unsqueeze(2), torch.zeros((), dtype=a.dtype))  # (N, m, j, BK)
        seg = x.cumsum(1)  # (N, i, j, BK)
        return torch.where((m >= j).view(1, SUB, SUB, 1), seg, torch.full((), -INF, dtype=a.dtype))


def _exp2(x):
    return torch.exp2(x)


def emu_scores(s, rnd):
    """accumulate_scores<Op, true>: this slice's contribution to A (N, C, C)."""
    N = s.q.shape[0]
    A = s.q.new_zeros(N, C, C)
    for I in range(1, C // SUB):
        r = SUB * I
        x = rnd(s.q[:, r:r + SUB] * _exp2(s.query_side(I)))
        y = rnd(s.k[:, :r] * _exp2(s.key_side(I)))
        A[:, r:r + SUB, :r] += x @ y.transpose(1, 2)
    for J in range(C // SUB):
        sl = slice(SUB * J, SUB * (J + 1))
        e = _exp2(s.diag_exponents(J))  # (N, i, j, BK)
        A[:, sl, sl] += torch.einsum("nic,njc,nijc->nij", s.q[:, sl], s.k[:, sl], e)
    return A


def emu_forward(q, k, v, g, scale, h0, rnd=lambda x: x):
    """linmix_chunk_gla_fwd_kernel<T, true>, (N = B * H, T, X) layout; returns o (N, T, V), ht (N, K, V)."""
    N, T, K = q.shape
    V = v.shape[-1]
    o = q.new_zeros(N, T, V)
    S = h0.clone()
    for t0 in range(0, T, C):
        L = min(C, T - t0)
        A = q.new_zeros(N, C, C)
        oc = q.new_zeros(N, C, V)
        vt = rnd(_pad(v[:, t0:t0 + L], C, V))
        for c0 in range(0, K, BK):
            c1 = min(c0 + BK, K)
            s = Slice(q[:, t0:t0 + L, c0:c1], k[:, t0:t0 + L, c0:c1], g[:, t0:t0 + L, c0:c1])
            A += emu_scores(s, rnd)
            Sp = _pad(S[:, c0:c1], BK, V)
            for v0 in range(0, V, BV):  # one block per V slice
                oc[:, :, v0:v0 + BV] += rnd(s.q * _exp2(s.from_start())) @ rnd(Sp[:, :, v0:v0 + BV])
            Sp = Sp * _exp2(s.total()).unsqueeze(-1) + rnd(s.k * _exp2(s.to_end())).transpose(1, 2) @ vt
            S[:, c0:c1] = Sp[:, : c1 - c0]
        oc += rnd(torch.tril(A)) @ vt
        o[:, t0:t0 + L] = scale * oc[:, :L]
    return o, S


def emu_backward(q, k, v, g, do, dht, scale, h0):
    """linmix_chunk_gla_bwd_{states,grads}_kernel<T, true> (fp32 operands there, so no rounding here)."""
    N, T, K = q.shape
    V = v.shape[-1]
    n_chunks = -(-T // C)
    slices = lambda t0, L: [(c0, min(c0 + BK, K), Slice(q[:, t0:t0 + L, c0:c0 + BK], k[:, t0:t0 + L, c0:c0 + BK],
                                                        g[:, t0:t0 + L, c0:c0 + BK])) for c0 in range(0, K, BK)]
    # states kernel, forward mode: the state entering every chunk, then the final one
    states = [h0.clone()]
    for c in range(n_chunks):
        t0, L = c * C, min(C, T - c * C)
        S = states[-1].clone()
        vt = _pad(v[:, t0:t0 + L], C, V)
        for c0, c1, s in slices(t0, L):
            Sp = _pad(S[:, c0:c1], BK, V)
            Sp = Sp * _exp2(s.total()).unsqueeze(-1) + (s.k * _exp2(s.to_end())).transpose(1, 2) @ vt
            S[:, c0:c1] = Sp[:, : c1 - c0]
        states.append(S)
    # states kernel, reverse mode: the gradient of the state leaving every chunk, then dh0
    dstates = [None] * n_chunks
    dS = dht.clone()
    for c in reversed(range(n_chunks)):
        t0, L = c * C, min(C, T - c * C)
        dstates[c] = dS.clone()
        dot = scale * _pad(do[:, t0:t0 + L], C, V)
        for c0, c1, s in slices(t0, L):
            Dp = _pad(dS[:, c0:c1], BK, V)
            Dp = Dp * _exp2(s.total()).unsqueeze(-1) + (s.q * _exp2(s.from_start())).transpose(1, 2) @ dot
            dS[:, c0:c1] = Dp[:, : c1 - c0]
    dq, dk, dg = (q.new_zeros(q.shape) for _ in range(3))
    dv = v.new_zeros(v.shape)
    # grads kernel, every chunk independently
    for c in range(n_chunks):
        t0, L = c * C, min(C, T - c * C)
        sl = slices(t0, L)
        S_in, S_out, dS_out = states[c], states[c + 1], dstates[c]
        dot, vt = scale * _pad(do[:, t0:t0 + L], C, V), _pad(v[:, t0:t0 + L], C, V)
        A = sum(emu_scores(s, lambda x: x) for _, _, s in sl)
        dA = torch.tril(dot @ vt.transpose(1, 2))
        dvc = A.transpose(1, 2) @ dot
        for c0, c1, s in sl:
            dvc += (s.k * _exp2(s.to_end())) @ _pad(dS_out[:, c0:c1], BK, V)
        dv[:, t0:t0 + L] = dvc[:, :L]
        for c0, c1, s in sl:
            pad_state = lambda X: _pad(X[:, c0:c1], BK, V)
            dqc = (dot @ pad_state(S_in).transpose(1, 2)) * _exp2(s.from_start())
            dkc = (vt @ pad_state(dS_out).transpose(1, 2)) * _exp2(s.to_end())
            bnd = (pad_state(S_out) * pad_state(dS_out)).sum(-1)  # (N, BK)
            for I in range(1, C // SUB):
                r = SUB * I
                x = s.q[:, r:r + SUB] * _exp2(s.query_side(I))
                y = s.k[:, :r] * _exp2(s.key_side(I))
                dqc[:, r:r + SUB] += (dA[:, r:r + SUB, :r] @ y) * _exp2(s.query_side(I))
                dkc[:, :r] += (dA[:, r:r + SUB, :r].transpose(1, 2) @ x) * _exp2(s.key_side(I))
            for J in range(C // SUB):
                b = slice(SUB * J, SUB * (J + 1))
                w = dA[:, b, b].unsqueeze(-1) * _exp2(s.diag_exponents(J))  # (N, i, j, BK)
                dqc[:, b] += torch.einsum("nijc,njc->nic", w, s.k[:, b])
                dkc[:, b] += torch.einsum("nijc,nic->njc", w, s.q[:, b])
            term = s.q * dqc - s.k * dkc  # gla_dgate_term, then the reverse cumsum over the chunk
            dgc = term.flip(1).cumsum(1).flip(1) + bnd.unsqueeze(1)
            dq[:, t0:t0 + L, c0:c1] = dqc[:, :L, : c1 - c0]
            dk[:, t0:t0 + L, c0:c1] = dkc[:, :L, : c1 - c0]
            dg[:, t0:t0 + L, c0:c1] = dgc[:, :L, : c1 - c0]
    return dq, dk, dv, dg, dS


def _nh(x):  # (B, T, H, X) -> (B * H, T, X)
    return x.transpose(1, 2).flatten(0, 1)


def _bthx(x, B):  # (B * H, T, X) -> (B, T, H, X)
    return x.unflatten(0, (B, -1)).transpose(1, 2)


@pytest.mark.parametrize("dims", [(63, 64, 65), (64, 65, 63), (65, 63, 64), (127, 128, 129), (128, 129, 127),
                                  (129, 127, 128)], ids=lambda d: "T{}-K{}-V{}".format(*d))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_emulated_cuda_segment_kernels(dims, dtype):
    T, K, V = dims
    q, k, v, g, h0 = extreme_inputs(1, T, 2, K, V, "run-across-a-chunk-boundary", -INF, dtype, "cpu")
    with torch.no_grad():
        g[:, :T:37] = -1e30  # more extreme gates: chunk starts, sub-chunk interiors
        g[:, 15:17] = -1e4
    ro, rht = gla_ref(q, k, v, g, initial_state=h0, output_final_state=True)
    gen = torch.Generator().manual_seed(3)
    do, dht = (torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in (ro, rht))
    want = torch.autograd.grad((ro * do).sum() + (rht * dht).sum(), (q, k, v, g, h0))
    scale = K**-0.5
    with torch.no_grad():
        args = [_nh(x) for x in (q, k, v, g)]
        o, ht = emu_forward(*args, scale, h0.flatten(0, 1))
        grads = emu_backward(*args, _nh(do.to(dtype)), dht.flatten(0, 1).to(dtype), scale, h0.flatten(0, 1))
    got = [_bthx(o, 1), ht.unflatten(0, (1, -1))] + [_bthx(x, 1) for x in grads[:4]] + [grads[4].unflatten(0, (1, -1))]
    for name, a, b in zip(NAMES, got, [ro, rht, *want]):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < TOL[dtype], f"{name}: {rel_err(a, b):.2e}"


def test_emulated_forward_bf16_operands():
    # The forward kernel rounds its tensor-core operands to bf16 (from_float<Op>); the decays stay fp32.
    T, K, V = 129, 65, 64
    q, k, v, g, h0 = extreme_inputs(1, T, 2, K, V, "run-of-14-in-a-chunk", -INF, torch.bfloat16, "cpu")
    ro, rht = gla_ref(q, k, v, g, initial_state=h0, output_final_state=True)
    rnd = lambda x: x.to(torch.bfloat16).float()
    with torch.no_grad():
        o, ht = emu_forward(*[_nh(x.float()) for x in (q, k, v, g)], K**-0.5, h0.flatten(0, 1), rnd)
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()
    assert rel_err(_bthx(o, 1), ro) < 1e-2 and rel_err(ht.unflatten(0, (1, -1)), rht) < 1e-2


# ---- the CUDA kernels both ways (skipped without a GPU)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device/backend")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_switch_off_keeps_old_path_on_ordinary_gates(dtype, monkeypatch):
    # Switch off: the GPU-verified g_cumsum kernels, right on ordinary gates; switch on: the same answers.
    ins = extreme_inputs(2, 150, 2, 40, 48, "middles", -0.3, dtype, "cuda")
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


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device/backend")
def test_cuda_switch_selects_segment_kernels(monkeypatch):
    # Only the segment-sum kernels are exact for -inf: the switch must actually change the kernel.
    q, k, v = (torch.ones(1, 1, 1, 1, device="cuda") for _ in range(3))
    g = torch.full((1, 1, 1, 1), -INF, device="cuda")
    monkeypatch.setenv("LINMIX_UNVERIFIED_KERNELS", "0")
    assert torch.isnan(linmix.chunk_gla(q, k, v, g, scale=1.0)[0]).all()  # exp2(-inf - -inf)
    monkeypatch.setenv("LINMIX_UNVERIFIED_KERNELS", "1")
    assert linmix.chunk_gla(q, k, v, g, scale=1.0)[0].item() == 1.0
