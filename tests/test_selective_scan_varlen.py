"""selective_scan with cu_seqlens (packed sequences inside the kernels): a packed call equals each sequence run on
its own (the float64 PyTorch reference) for the output, every final state and every gradient; no host sync; one
traced op under torch.compile; malformed offsets and bad arguments raise. The float32 cases run the CUDA kernels'
source under the CUDA emulator (``python -m linmix.emulation -- python -m pytest tests/test_selective_scan_varlen.py``),
the float64 ones the CPU kernels."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import linmix
from linmix import reference as R
from linmix.ops.selective_scan import CHUNK

from conftest import EMULATED, HAS_CUDA, HostReads, assert_rel_close

f64 = torch.float64
GRADS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def offsets(lengths, dtype=torch.int64):
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist(), dtype=dtype)


def inputs(lengths, d=4, n=3, bc="variable", groups=2, h0=True, seed=0):
    """float64 leaves of a packed call; bc: 'variable' (1, g, n, L) or 'fixed' (d, n)."""
    g = torch.Generator().manual_seed(seed)
    L, N = sum(lengths), len(lengths)
    r = lambda *s: torch.randn(*s, generator=g, dtype=f64)  # noqa: E731
    x = dict(u=r(1, d, L), delta=r(1, d, L) * 0.5, A=-torch.rand(d, n, generator=g, dtype=f64) - 0.5,
             B=r(1, groups, n, L) if bc == "variable" else r(d, n), C=r(1, groups, n, L) if bc == "variable" else r(d, n),
             D=r(d), z=r(1, d, L), delta_bias=r(d) * 0.1, initial_state=r(N, d, n) if h0 else None)
    return {k: v for k, v in x.items() if v is not None}


def per_sequence(x, cu, softplus=True):
    """The float64 reference, one sequence at a time: out (1, d, L), final states (N, d, n)."""
    outs, finals = [], []
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        cut = lambda t: t if t.dim() <= 2 else t[..., s:e]  # noqa: E731  fixed B/C, A, D, bias have no time
        h0 = x["initial_state"][i : i + 1] if "initial_state" in x else None
        out, fin = R.selective_scan_ref(cut(x["u"]), cut(x["delta"]), x["A"], cut(x["B"]), cut(x["C"]), x["D"],
                                        cut(x["z"]), x["delta_bias"], softplus, h0, return_final_state=True)
        outs.append(out), finals.append(fin)
    return torch.cat(outs, -1), torch.cat(finals, 0)


def packed(x, cu, dtype=f64, **kw):
    """The packed call in `dtype` (states and parameters in its accumulation dtype)."""
    acc = f64 if dtype == f64 else torch.float32
    y = {k: v.to(acc if k in ("A", "D", "delta_bias", "initial_state") or v.dim() == 2 else dtype)
         for k, v in x.items()}
    return linmix.selective_scan(**y, delta_softplus=True, return_final_state=True, cu_seqlens=cu, **kw)


def compare(x, cu, dtype, tol):
    """Output, final states and every gradient of the packed call in `dtype` against the float64 reference."""
    leaves = {k: v.detach().to(dtype).double().requires_grad_() for k, v in x.items()}
    g = torch.Generator().manual_seed(1)
    out, fin = packed(leaves, cu, dtype)
    want_out, want_fin = per_sequence(leaves, cu)
    w_out, w_fin = torch.randn(out.shape, generator=g, dtype=f64), torch.randn(fin.shape, generator=g, dtype=f64)
    got = torch.autograd.grad((out.double() * w_out).sum() + (fin.double() * w_fin).sum(), list(leaves.values()))
    want = torch.autograd.grad((want_out * w_out).sum() + (want_fin * w_fin).sum(), list(leaves.values()))
    assert fin.shape == want_fin.shape
    assert_rel_close(out.double(), want_out, tol, name="out", norm="fro")
    assert_rel_close(fin.double(), want_fin, tol, name="final_state", norm="fro")
    for name, a, b in zip(leaves, got, want):
        assert_rel_close(a, b, tol, name=f"d{name}", norm="fro")


TOL = {f64: 1e-10, torch.float32: 2e-4}


@pytest.mark.parametrize("dtype", [f64, torch.float32])
@pytest.mark.parametrize("index", [torch.int32, torch.int64])
@pytest.mark.parametrize("bc, groups", [("variable", 2), ("variable", 1), ("fixed", 1)])
@pytest.mark.parametrize("h0", [True, False])
def test_packed_matches_per_sequence(dtype, index, bc, groups, h0):
    # empty and length-1 sequences, at the start, in the middle and at the end; a longer one
    lengths = [0, 5, 1, 0, 37, 2, 1]
    x = inputs(lengths, bc=bc, groups=groups, h0=h0)
    compare(x, offsets(lengths, index), dtype, TOL[dtype])


@pytest.mark.parametrize("dtype", [f64, torch.float32])
@pytest.mark.parametrize("lengths", [
    [CHUNK - 3, 10, CHUNK + 5],      # boundaries inside a chunk, a sequence shorter than a chunk, one spanning two
    [CHUNK, CHUNK, 1],               # boundaries exactly on chunk edges, whole-chunk sequences
], ids=["inside", "edge"])
def test_packed_across_chunks(dtype, lengths):
    # The checkpoint slots (packed_chunk_slot) of sequences that start mid-chunk or on an edge: backward restarts
    # every chunk of every sequence from its own checkpoint.
    x = inputs(lengths, d=2, n=2, bc="variable", groups=1)
    compare(x, offsets(lengths), dtype, TOL[dtype])


def test_no_sequences():
    x = inputs([], d=3, n=2, bc="fixed")
    x["initial_state"] = torch.zeros(0, 3, 2, dtype=f64)
    leaves = {k: v.requires_grad_() for k, v in x.items()}
    out, fin = packed(leaves, offsets([]))
    assert out.shape == (1, 3, 0) and fin.shape == (0, 3, 2)
    (out.sum() + fin.sum()).backward()
    assert torch.count_nonzero(leaves["A"].grad) == 0 and leaves["initial_state"].grad.shape == (0, 3, 2)


def test_gradcheck():
    lengths = [3, 0, 1, 4]
    cu = offsets(lengths, torch.int32)
    x = {k: v.requires_grad_() for k, v in inputs(lengths, d=2, n=2, groups=1).items()}
    names = list(x)

    def f(*ts):
        return packed(dict(zip(names, ts)), cu)
    assert torch.autograd.gradcheck(f, tuple(x.values()))


def test_no_host_sync_and_one_launch_per_direction():
    lengths = [4, 0, 9, 1]
    x = {k: v.requires_grad_() for k, v in inputs(lengths).items()}
    cu = offsets(lengths)
    with HostReads(strict=True):
        out, fin = packed(x, cu)
        (out.sum() + fin.sum()).backward()
    with torch.profiler.profile() as prof:
        out, fin = packed(x, cu)
        (out.sum() + fin.sum()).backward()
    calls = [e.key for e in prof.key_averages() if e.key.startswith("linmix::selective_scan")]
    counts = {k: e.count for e in prof.key_averages() for k in calls if e.key == k}
    assert counts == {"linmix::selective_scan_fwd": 1, "linmix::selective_scan_bwd": 1}, counts


@pytest.mark.skipif(not (HAS_CUDA or EMULATED), reason="the CUDA kernels (a GPU, or LINMIX_EMULATE_CUDA=1)")
def test_cuda_deterministic_backward_with_variable_bc_raises():
    # the documented gap the fuzzer hit: the varlen backward adds variable dB/dC with float atomics, so a
    # deterministic one is refused by name (fixed B/C need no atomics and run)
    device = "cuda" if HAS_CUDA else "cpu"
    cu = offsets([3, 0, 5]).to(device)
    for bc, refused in (("variable", True), ("fixed", False)):
        x = {k: v.to(device).requires_grad_() for k, v in inputs([3, 0, 5], bc=bc).items()}
        out, final = packed(x, cu, torch.float32, deterministic=True)
        if refused:
            with pytest.raises(RuntimeError, match="deterministic backward .* and cu_seqlens on CUDA is not available"):
                out.sum().backward()
        else:
            out.sum().backward()
            assert x["B"].grad is not None


def test_compile_fullgraph_dynamic():
    torch._dynamo.reset()
    fn = torch.compile(lambda x, cu: packed(x, cu), fullgraph=True, dynamic=True)
    for lengths in ([3, 0, 6], [5, 1, 1, 8]):
        x = {k: v.requires_grad_() for k, v in inputs(lengths).items()}
        cu = offsets(lengths)
        out, fin = fn(x, cu)
        (out.sum() + fin.sum()).backward()
        want_out, want_fin = per_sequence(x, cu)
        torch.testing.assert_close(out, want_out)
        torch.testing.assert_close(fin, want_fin)


@pytest.mark.parametrize("cu, why", [([0, 3, 2, 9], "decreasing"), ([0, 4, 8], "not ending at L"),
                                     ([1, 4, 9], "not starting at 0"), ([0, 4, 12], "past L")])
def test_malformed_offsets_raise(cu, why):
    x = inputs([4, 5], h0=False)
    with pytest.raises(RuntimeError, match="cu_seqlens must rise from 0"):
        packed(x, torch.tensor(cu))


def test_bad_arguments_raise():
    x = inputs([4, 5])
    cu = offsets([4, 5])
    with pytest.raises(RuntimeError, match="cu_seqlens must be int32 or int64"):
        packed(x, cu.double())
    with pytest.raises(RuntimeError, match=r"cu_seqlens must be 1-D"):
        packed(x, cu[None])
    with pytest.raises(RuntimeError, match="initial_state"):
        packed(dict(x, initial_state=x["initial_state"][:1]), cu)
    two = {k: (torch.cat([v, v]) if k in ("u", "delta", "z", "B", "C") else v) for k, v in x.items()}
    with pytest.raises(RuntimeError, match="batch size must be 1"):
        packed(two, cu)


def test_opcheck():
    lengths = [3, 0, 6, 1]
    x = inputs(lengths)
    cu = offsets(lengths, torch.int32)
    pos = [x[k] for k in GRADS] + [cu]
    out, ckpt, fin = torch.ops.linmix.selective_scan_fwd(*pos, True)
    assert ckpt.shape == (1, 4, 1 + len(lengths), 3)  # packed_chunk_slots: ceil(L / chunk) + N
    torch.library.opcheck(torch.ops.linmix.selective_scan_fwd, (*pos, True))
    for dfin in (None, torch.randn_like(fin)):
        torch.library.opcheck(torch.ops.linmix.selective_scan_bwd, (*pos, ckpt, torch.randn_like(out), dfin, True))


WARN_ONCE = """
import warnings, torch, linmix
u = torch.randn(1, 3, 9, device="{device}")
A, cu = -torch.rand(3, 2, device="{device}"), torch.tensor([0, 4, 9], device="{device}")
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    for _ in range(2):
        linmix.selective_scan(u, u.abs(), A, A, A, cu_seqlens=cu)
print(sum("have not yet run on a GPU" in str(x.message) for x in w))
"""

CUDA_KERNELS = pytest.mark.skipif(not (HAS_CUDA or EMULATED), reason="the CUDA kernels (a GPU, or the emulator)")


@CUDA_KERNELS
def test_cuda_packed_calls_warn_once():
    # No GPU-verified kernel takes cu_seqlens: the emulation-verified selective_scan_varlen family runs them by
    # default and warns once per process; switched on, it runs without a warning.
    device = "cuda" if HAS_CUDA else "cpu"
    for switch, warnings_seen in ((None, 1), ("selective_scan_varlen", 0)):
        env = {n: x for n, x in os.environ.items() if n not in ("LINMIX_KERNELS", "LINMIX_UNVERIFIED_KERNELS")}
        env.update({"LINMIX_KERNELS": switch} if switch else {})
        out = subprocess.run([sys.executable, "-c", WARN_ONCE.format(device=device)], env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[-1] == str(warnings_seen), (switch, out.stdout)


@CUDA_KERNELS
def test_cuda_deterministic_with_variable_bc_raises():
    # the varlen backward adds variable dB/dC with float atomics; fixed B/C need none
    device = "cuda" if HAS_CUDA else "cpu"
    lengths = [3, 5]
    x = {k: v.to(device).requires_grad_() for k, v in inputs(lengths).items()}
    cu = offsets(lengths).to(device)
    out, _ = packed(x, cu, torch.float32, deterministic=True)
    with pytest.raises(RuntimeError, match="deterministic backward .* cu_seqlens"):
        out.sum().backward()
    x = {k: v.to(device).requires_grad_() for k, v in inputs(lengths, bc="fixed").items()}
    packed(x, cu, torch.float32, deterministic=True)[0].sum().backward()
