"""The chunk-parallel CUDA chunk_gla (csrc/gla/gla_chunkpar_*.cuh, behind LINMIX_UNVERIFIED_KERNELS=1).

On CPU: its PyTorch replay (replays/gla_chunkpar.py, the kernels' tiles, phases, segment-sum decays and dg
closed form) against the float64 reference at tile boundaries and under -inf / huge gates. On a GPU: the kernels
themselves, with the switch on, against the reference and against the replay.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import linmix
from linmix.reference import gla_ref

from conftest import HAS_CUDA, rel_err
from replays import gla_chunkpar

NAMES = ["o", "final_state", "dq", "dk", "dv", "dg", "dh0"]


def make(B, T, H, K, V, seed=0, gate=None):
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=gen)
    q, k, x = (torch.randn(B, T, H, K, **f64) for _ in range(3))
    v = torch.randn(B, T, H, V, **f64)
    g = F.logsigmoid(x)
    if gate is not None:
        gate(g)
    h0 = torch.randn(B, H, K, V, **f64)
    do, dht = torch.randn(B, T, H, V, **f64), torch.randn(B, H, K, V, **f64)
    return q, k, v, g, h0, do, dht


def reference(q, k, v, g, h0, do, dht, scale):
    """Float64 reference outputs and gradients of (o * do).sum() + (ht * dht).sum()."""
    ins = [t.double().detach().requires_grad_() for t in (q, k, v, g, h0)]
    o, ht = gla_ref(*ins[:4], scale=scale, initial_state=ins[4], output_final_state=True)
    grads = torch.autograd.grad((o * do.double()).sum() + (ht * dht.double()).sum(), ins)
    return [o.detach(), ht.detach(), *grads]


def replayed(q, k, v, g, h0, do, dht, scale, acc):
    o, ht = gla_chunkpar.fwd(q, k, v, g, scale, h0.to(acc), acc=acc)
    dq, dk, dv, dg, dh0 = gla_chunkpar.bwd(q, k, v, g, do, dht.to(acc), scale, h0.to(acc), acc=acc)
    return [o, ht, dq, dk, dv, dg, dh0]


def check(got, want, tol, names=NAMES):
    for name, a, b in zip(names, got, want):
        assert torch.isfinite(a).all(), name
        err = rel_err(a, b)
        assert err < tol, f"{name}: {err:.2e} >= {tol:.0e}"


def check_rms(got, want):
    """Relative RMS error against the reference: FLA's bar of 5e-3, except dg at 1e-2. dg is a reverse sum over
    the chunk of q dq - k dk, whose terms cancel, and it is rounded to the input dtype once more at the end
    (bf16 rounding alone is about 1.7e-3 RMS), so its relative error is about twice the others'."""
    for name, a, b in zip(NAMES, got, want):
        rms = rel_err(a, b, "fro")
        assert rms < (1e-2 if name == "dg" else 5e-3), f"{name}: relative RMS {rms:.2e}"


# (T, K, V): chunk (64), K-slice (32 / 64) and V-tile (64) boundaries, one and several chunks.
SHAPES = [(1, 16, 16), (63, 63, 65), (64, 64, 64), (65, 65, 63), (127, 127, 129), (128, 128, 128), (129, 129, 127),
          (200, 33, 256), (130, 256, 31)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_replay_matches_reference(shape):
    T, K, V = shape
    ins = make(1, T, 2, K, V, seed=T + K + V)
    scale = K**-0.5
    want = reference(*ins, scale)
    check(replayed(*ins, scale, torch.float64), want, 1e-11)  # the algebra, exactly
    check(replayed(*[t.float() for t in ins], scale, torch.float32), want, 2e-5)  # the fp32 kernels' arithmetic


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_replay_half_operands(dtype):
    """fp16/bf16 inputs: tensor-core operands rounded as the kernels round them; against the reference on the
    same rounded inputs, within FLA's accuracy bar (relative RMS 5e-3; dg 1e-2, see rms_bound) and a max-error
    bound."""
    ins = make(1, 130, 2, 65, 129, seed=3)
    low = [t.to(dtype) for t in ins[:4]] + [ins[4].float(), ins[5].to(dtype), ins[6].float()]
    want = reference(*low, 0.125)
    got = replayed(*low, 0.125, torch.float32)
    check_rms(got, want)
    check(got, want, 3e-2)


def put(positions, value, channels=slice(None, None, 2)):
    def gate(g):
        for t in positions:
            if t < g.shape[1]:
                g[:, t, :, channels] = value
    return gate


# Gates the segment sums must survive: -inf / -1e30 / -1e4 at chunk and sub-chunk starts, ends, middles, in runs.
HARSH = {
    "neginf-ends": put([0, 15, 16, 63, 64, 127, 128, 129], -math.inf),
    "neginf-run": put(range(20, 45), -math.inf),
    "neginf-all-channels": put([5, 70], -math.inf, slice(None)),
    "1e30-mid": put([7, 40, 64, 100], -1e30),
    "1e4-run": put(range(60, 70), -1e4),
}


def check_harsh(ins, scale):
    """fp64 (the algebra) and fp32 replay against the reference, and dg exactly 0 wherever the decay
    underflows (gla_gate_grad), as the reference's exp(g) * (...) is."""
    want = reference(*ins, scale)
    extreme = ins[3] < -1e3
    assert (want[5][extreme] == 0).all()
    for acc, tol in ((torch.float64, 1e-11), (torch.float32, 2e-5)):
        got = replayed(*[t.to(acc) for t in ins], scale, acc)
        check(got, want, tol)
        assert (got[5][extreme] == 0).all(), f"dg not exactly 0 at the extreme gates ({acc})"


@pytest.mark.parametrize("gate", HARSH, ids=list(HARSH))
def test_replay_harsh_gates(gate):
    check_harsh(make(1, 130, 1, 65, 33, seed=7, gate=HARSH[gate]), 0.5)


def at_tile_boundaries(g):
    """-inf, -1e30 and -1e4 in turn at the chunk (64, 128) and sub-chunk (16, 80) edges, in alternating channels,
    and a run of -inf across the first chunk boundary in the others."""
    steps = [0, 15, 16, 62, 63, 64, 65, 79, 80, 126, 127, 128]
    for i, t in enumerate(s for s in steps if s < g.shape[1]):
        g[:, t, :, ::2] = (-math.inf, -1e30, -1e4)[i % 3]
    g[:, 60:68, :, 1::2] = -math.inf


@pytest.mark.parametrize("shape", [s for s in SHAPES if 63 <= s[0] <= 129], ids=lambda s: "x".join(map(str, s)))
def test_replay_extreme_gates_at_tile_boundaries(shape):
    T, K, V = shape
    check_harsh(make(1, T, 1, K, V, seed=T + K, gate=at_tile_boundaries), K**-0.5)


def test_replay_extreme_gate_inputs():
    """Three inputs that running-sum decays get wrong: a -inf gate at T = 1, a gate of -3.4e37 before ordinary
    ones, and one of -1e4."""
    one = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    o, ht = gla_chunkpar.fwd(one, one, one, -math.inf * one, 1.0, None, acc=torch.float64)
    assert o.item() == 1.0 and ht.item() == 1.0
    dq, dk, dv, dg, dh0 = gla_chunkpar.bwd(one, one, one, -math.inf * one, one, one, 1.0, None, acc=torch.float64)
    assert [t.item() for t in (dq, dk, dv, dg)] == [1.0, 2.0, 2.0, 0.0]
    ones = torch.ones(1, 3, 1, 1)
    v = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    g = torch.tensor([-3.4e37, -0.5, -0.5]).view(1, 3, 1, 1)
    o, _ = gla_chunkpar.fwd(ones, ones, v, g, 1.0, None)
    torch.testing.assert_close(o.flatten(), torch.tensor([1.0, 2.606531, 4.580941]), rtol=2e-6, atol=0)
    g = torch.tensor([-1e4, -0.5, -0.5]).view(1, 3, 1, 1)
    want, _ = gla_ref(ones.double(), ones.double(), v.double(), g.double(), scale=1.0)
    assert rel_err(gla_chunkpar.fwd(ones, ones, v, g, 1.0, None)[0], want) < 1e-6


# ---- the CUDA kernels themselves (need a GPU) ----
cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device/backend")


def run_cuda(q, k, v, g, h0, do, dht, scale):
    dev = [t.cuda().requires_grad_() for t in (q, k, v, g, h0)]
    o, ht = linmix.chunk_gla(*dev[:4], scale=scale, initial_state=dev[4], output_final_state=True)
    grads = torch.autograd.grad((o.float() * do.cuda().float()).sum() + (ht * dht.cuda()).sum(), dev)
    return [t.detach().cpu() for t in (o, ht, *grads)]


@pytest.fixture
def unverified(monkeypatch):
    monkeypatch.setenv("LINMIX_UNVERIFIED_KERNELS", "1")


@cuda
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_fp32(unverified, shape):
    T, K, V = shape
    ins = [t.float() for t in make(2, T, 2, K, V, seed=T * K + V)]
    check(run_cuda(*ins, K**-0.5), reference(*ins, K**-0.5), 2e-5)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(65, 65, 63), (129, 128, 129), (200, 256, 64)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_half(unverified, dtype, shape):
    """Against the replay of the same rounding (tight) and the float64 reference (FLA's bar)."""
    T, K, V = shape
    ins = make(2, T, 2, K, V, seed=T + 2 * K + V)
    low = [t.to(dtype) for t in ins[:4]] + [ins[4].float(), ins[5].to(dtype), ins[6].float()]
    got = run_cuda(*low, K**-0.5)
    want = reference(*low, K**-0.5)
    check_rms(got, want)
    check(got, replayed(*low, K**-0.5, torch.float32), 2e-2)


@cuda
@pytest.mark.parametrize("gate", HARSH, ids=list(HARSH))
def test_cuda_harsh_gates(unverified, gate):
    ins = [t.float() for t in make(1, 130, 2, 65, 33, seed=11, gate=HARSH[gate])]
    check(run_cuda(*ins, 0.5), reference(*ins, 0.5), 2e-5)


@cuda
@pytest.mark.parametrize("shape", [s for s in SHAPES if 63 <= s[0] <= 129], ids=lambda s: "x".join(map(str, s)))
def test_cuda_extreme_gates_at_tile_boundaries(unverified, shape):
    T, K, V = shape
    ins = [t.float() for t in make(2, T, 2, K, V, seed=T + K, gate=at_tile_boundaries)]
    got = run_cuda(*ins, K**-0.5)
    check(got, reference(*ins, K**-0.5), 2e-5)
    assert (got[5][ins[3] < -1e3] == 0).all()


@cuda
def test_cuda_extreme_gate_inputs(unverified):
    one = torch.ones(1, 1, 1, 1)
    o, ht = linmix.chunk_gla(one.cuda(), one.cuda(), one.cuda(), -math.inf * one.cuda(), scale=1.0,
                             output_final_state=True)
    assert o.item() == 1.0 and ht.item() == 1.0
    ones = torch.ones(1, 3, 1, 1, device="cuda")
    v = torch.tensor([1.0, 2.0, 3.0], device="cuda").view(1, 3, 1, 1)
    g = torch.tensor([-3.4e37, -0.5, -0.5], device="cuda").view(1, 3, 1, 1)
    o, _ = linmix.chunk_gla(ones, ones, v, g, scale=1.0)
    torch.testing.assert_close(o.flatten().cpu(), torch.tensor([1.0, 2.606531, 4.580941]), rtol=2e-6, atol=0)


@cuda
def test_cuda_empty_and_strided(unverified):
    """T = 0 passes h0 through; non-contiguous (B, T, H, K) views give the same result as contiguous ones."""
    q, k, v, g, h0, _, _ = make(1, 0, 2, 16, 16)
    o, ht = linmix.chunk_gla(*(t.float().cuda() for t in (q, k, v, g)), initial_state=h0.float().cuda(),
                             output_final_state=True)
    assert o.shape == (1, 0, 2, 16)
    torch.testing.assert_close(ht.cpu(), h0.float())
    q, k, v, g, h0, _, _ = make(2, 70, 3, 40, 24)
    dev = [t.float().cuda() for t in (q, k, v, g)]
    strided = [t.transpose(0, 2).contiguous().transpose(0, 2) for t in dev]
    a = linmix.chunk_gla(*dev, output_final_state=True)
    b = linmix.chunk_gla(*strided, output_final_state=True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
