import inspect
import itertools
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

import linmix
from linmix.reference import linear_scan_ref

from conftest import DEVICES, HostReads, low_precision_close


def make(B, T, D, dtype, device, h0=True, requires_grad=False, a_low=0.5):
    a = (a_low + (1 - a_low) * torch.rand(B, T, D, dtype=torch.float64)).to(device, dtype)
    b = torch.randn(B, T, D, dtype=torch.float64).to(device, dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    h = torch.randn(B, D, dtype=torch.float64).to(device, acc) if h0 else None
    for t in (a, b, h):
        if t is not None:
            t.requires_grad_(requires_grad)
    return a, b, h


# (1, 300, 130) and (2, 9, 2100) split their rows into several channel blocks (linear_scan_cpu.cpp: channel_block).
SHAPES = [(1, 1, 1), (2, 7, 5), (3, 64, 33), (2, 65, 64), (1, 300, 130), (2, 1000, 40), (2, 9, 2100)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_h0", [False, True])
def test_forward_backward_fp64_and_fp32(device, shape, reverse, with_h0):
    dtypes = [torch.float64, torch.float32] if device == "cpu" else [torch.float32]
    for dtype in dtypes:
        a, b, h0 = make(*shape, dtype, device, with_h0, requires_grad=True)
        h = linmix.linear_scan(a, b, h0, reverse)
        ref = linear_scan_ref(a, b, h0, reverse)
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h.double(), ref, **tol)
        dh = torch.randn_like(ref)
        inputs = [x for x in (a, b, h0) if x is not None]
        got = torch.autograd.grad(h, inputs, dh.to(dtype))
        want = torch.autograd.grad(ref, inputs, dh)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w.double(), **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(device, dtype):
    a, b, h0 = make(2, 333, 96, dtype, device)
    h = linmix.linear_scan(a, b, h0)
    ref = linear_scan_ref(a, b, h0)
    # PyTorch's own low-precision computation: the same loop, state rounded to dtype every step.
    hp, outs = h0.to(dtype), []
    for t in range(a.shape[1]):
        hp = a[:, t] * hp + b[:, t]
        outs.append(hp)
    low_precision_close(h, ref, torch.stack(outs, 1))


@pytest.mark.no_emulation("checks the CPU twin's bf16 stores (cpu_cast); emulated, the CUDA kernel's rounding runs")
def test_bf16_stores_round_as_torch():
    # The CPU kernels' bf16 stores (cpu_cast) round without torch's conversion; they must give its bits. With
    # T = 1, a = 1 and b = -0, h = 1 * h0 + (-0) is h0 exactly, so the forward stores bf16(h0), and with dh = 1
    # the backward's da = dh * h0 does too, for arbitrary fp32 h0: every class of value, ties and random bits.
    bits = torch.randint(-(2**31), 2**31, (20000,), dtype=torch.int64)
    ties = (bits & ~0xFFFF) | 0x8000  # exactly halfway between two bf16 values, odd and even
    special = torch.tensor([0.0, -0.0, 1.0, float("inf"), -float("inf"), float("nan"), -float("nan"), 1e-40,
                            -1e-45, 3.3895314e38, 3.4028235e38, 1.0 + 2**-8, 1.0 + 3 * 2**-8])
    h0 = torch.cat([special, torch.cat([bits, ties]).to(torch.int32).view(torch.float32)]).view(1, -1)
    a = torch.ones(1, 1, h0.shape[1], dtype=torch.bfloat16)
    b = torch.full_like(a, -0.0)
    want = h0.to(torch.bfloat16).view(torch.int16)
    nan = h0.isnan()
    want[nan] = 0x7FC0  # c10::BFloat16(float)'s NaN (ATen's vectorised conversion writes 0xFFFF)
    h = torch.ops.linmix.linear_scan_fwd(a=a, b=b, h0=h0, cu_seqlens=None, reverse=False)
    da, _, _ = torch.ops.linmix.linear_scan_bwd(a=a, h0=h0, cu_seqlens=None, h=h, dh=torch.ones_like(a),
                                                reverse=False)
    for got in (h, da):
        assert torch.equal(got.view(1, -1).view(torch.int16), want)


def _anon_huge_kb(address: int) -> int:
    """AnonHugePages (kB) of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    raise AssertionError("no mapping holds the address")


def test_large_cpu_outputs_get_huge_pages():
    # checks.h's advise_huge_pages: a CPU output of 4 MB or more is advised MADV_HUGEPAGE before the kernel's first
    # write, so with transparent huge pages in "madvise" mode (or "always") it is faulted in 2 MB pages. It runs in
    # a fresh process: in this one, blocks freed by earlier tests can serve the 64 MB from glibc's heap (pages
    # touched before, nothing left to advise); fresh, 64 MB is above glibc's largest mmap threshold, a new mapping.
    thp = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text() or not pathlib.Path("/proc/self/smaps").exists():
        pytest.skip("no transparent huge pages here")
    code = inspect.getsource(_anon_huge_kb) + textwrap.dedent("""
        import torch, linmix
        a = torch.full((1, 4096, 4096), 0.5)
        h = linmix.linear_scan(a, a)
        # The advice splits the mapping: its 2 MB-aligned interior (which holds the middle) is a mapping of its own.
        print(_anon_huge_kb(h.data_ptr() + h.numel() * h.element_size() // 2))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out.split()[-1]) >= 2048


def test_gradcheck():
    for reverse in (False, True):
        a, b, h0 = make(2, 11, 6, torch.float64, "cpu", requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, b, h: linmix.linear_scan(a, b, h, reverse), (a, b, h0))
        assert torch.autograd.gradcheck(lambda a, b: linmix.linear_scan(a, b, None, reverse), (a, b))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous(device):
    a, b, h0 = make(3, 50, 40, torch.float32, device)
    a_nc = a.transpose(0, 1).contiguous().transpose(0, 1)  # batch/time strides swapped
    b_nc = torch.randn(3, 50, 80, device=device)[:, :, ::2]  # non-unit channel stride
    torch.testing.assert_close(linmix.linear_scan(a_nc, b_nc, h0), linmix.linear_scan(a, b_nc.contiguous(), h0))


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    for shape in [(0, 5, 3), (2, 0, 3), (2, 5, 0)]:
        a, b, _ = make(*shape, torch.float32, device, h0=False, requires_grad=True)
        h = linmix.linear_scan(a, b)
        assert h.shape == shape
        h.sum().backward()
        assert a.grad.shape == shape


def test_opcheck():
    a, b, h0 = make(2, 9, 7, torch.float32, "cpu")
    h = torch.ops.linmix.linear_scan_fwd(a=a, b=b, h0=h0, cu_seqlens=None, reverse=False)
    for rev in (False, True):
        torch.library.opcheck(torch.ops.linmix.linear_scan_fwd, (), dict(a=a, b=b, h0=h0, cu_seqlens=None, reverse=rev))
        torch.library.opcheck(torch.ops.linmix.linear_scan_fwd, (), dict(a=a, b=b, h0=None, cu_seqlens=None, reverse=rev))
        torch.library.opcheck(torch.ops.linmix.linear_scan_bwd, (),
                              dict(a=a, h0=h0, h=h, dh=torch.randn_like(h), cu_seqlens=None, reverse=rev))


def test_compile_fullgraph():
    a, b, h0 = make(2, 17, 8, torch.float32, "cpu", requires_grad=True)

    def f(a, b, h0):
        return (linmix.linear_scan(a, b, h0) * 2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(a, b, h0)
    out.backward()
    ga = a.grad.clone()
    a.grad = None
    f(a, b, h0).backward()
    torch.testing.assert_close(out, f(a, b, h0))
    torch.testing.assert_close(ga, a.grad)


@pytest.mark.parametrize(
    "args, match",
    [
        (lambda: (torch.rand(2, 3), torch.rand(2, 3)), "a must have shape"),
        (lambda: (torch.rand(2, 3, 4), torch.rand(2, 3, 5)), "b must have shape"),
        (lambda: (torch.rand(2, 3, 4), torch.rand(2, 3, 4, dtype=torch.float16)), "b must have the same dtype"),
        (lambda: (torch.rand(2, 3, 4).int(), torch.rand(2, 3, 4).int()), "a must be float32"),
        (lambda: (torch.rand(2, 3, 4), torch.rand(2, 3, 4), torch.rand(2, 5)), "h0 must have shape"),
    ],
)
def test_bad_inputs(args, match):
    with pytest.raises(RuntimeError, match=match):
        linmix.linear_scan(*args())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mixed_devices():
    with pytest.raises(RuntimeError, match="same device"):
        linmix.linear_scan(torch.rand(2, 3, 4, device="cuda"), torch.rand(2, 3, 4))


# ---------------------------------------------------------------------------------------------- packed sequences

def packed(lengths, D, dtype=torch.float64, offsets_dtype=torch.int32, requires_grad=True):
    a, b, _ = make(1, sum(lengths), D, dtype, "cpu", h0=False, requires_grad=requires_grad)
    h0 = torch.randn(len(lengths), D, dtype=torch.float64).to(acc_dtype(dtype)).requires_grad_(requires_grad)
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=offsets_dtype)
    return a, b, h0, cu


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# Empty and length-1 sequences, boundaries inside and on the edge of a 64-step CUDA chunk, one longer than it.
VARLEN = [(4, 0, 1, 64, 70, 2), (1,), (0, 0), (129, 3)]


@pytest.mark.parametrize("lengths", VARLEN)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("offsets_dtype", [torch.int32, torch.int64])
def test_varlen_matches_each_sequence(lengths, reverse, offsets_dtype):
    for dtype in (torch.float64, torch.float32):
        a, b, h0, cu = packed(lengths, 37, dtype, offsets_dtype)
        with HostReads(strict=True):
            h = linmix.linear_scan(a, b, h0, reverse, cu_seqlens=cu)
        bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
        ref = torch.cat([linear_scan_ref(a[:, s:e], b[:, s:e], h0[i : i + 1], reverse)
                         for i, (s, e) in enumerate(bounds)], 1)
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h.double(), ref, **tol)
        dh = torch.randn_like(ref)
        with HostReads(strict=True):
            got = torch.autograd.grad(h, (a, b, h0), dh.to(dtype))
        # with no steps at all the reference is a constant: every gradient is 0
        want = torch.autograd.grad(ref, (a, b, h0), dh) if ref.requires_grad else [torch.zeros_like(x) for x in got]
        for name, g, w in zip("a b h0".split(), got, want):
            torch.testing.assert_close(g.double(), w.double(), **tol, msg=name)


def test_varlen_gradcheck():
    a, b, h0, cu = packed((3, 0, 1, 5), 4)
    for reverse in (False, True):
        assert torch.autograd.gradcheck(lambda a, b, h0: linmix.linear_scan(a, b, h0, reverse, cu_seqlens=cu),
                                        (a, b, h0))


def test_varlen_opcheck_and_compile():
    a, b, h0, cu = packed((3, 0, 9), 5, torch.float32)
    torch.library.opcheck(torch.ops.linmix.linear_scan_fwd.default, (a.detach(), b.detach(), h0.detach(), cu, False))
    f = torch.compile(lambda a, b, h0, cu: linmix.linear_scan(a, b, h0, cu_seqlens=cu), fullgraph=True, dynamic=True)
    for lengths in ((3, 0, 9), (1, 6, 2, 7)):
        a, b, h0, cu = packed(lengths, 5, torch.float32)
        h = f(a, b, h0, cu)
        torch.testing.assert_close(h, linmix.linear_scan(a, b, h0, cu_seqlens=cu))
        h.sum().backward()


@pytest.mark.parametrize("bad", [[1, 3, 12], [0, 5, 3, 12], [0, 3, 11], [0, 3, 13]])
def test_varlen_malformed_offsets(bad):
    a, b, _, _ = packed((3, 9), 5)
    with pytest.raises(RuntimeError, match="cu_seqlens must rise from 0"):
        linmix.linear_scan(a, b, cu_seqlens=torch.tensor(bad))


def test_varlen_errors():
    a, b, h0, cu = packed((3, 9), 5)
    with pytest.raises(RuntimeError, match="batch size must be 1"):
        linmix.linear_scan(a.expand(2, -1, -1), b.expand(2, -1, -1), cu_seqlens=cu)
    with pytest.raises(RuntimeError, match="int32 or int64"):
        linmix.linear_scan(a, b, cu_seqlens=cu.float())
    with pytest.raises(RuntimeError, match="one row per sequence"):
        linmix.linear_scan(a, b, h0[:1], cu_seqlens=cu)
    with pytest.raises(RuntimeError, match="1-D"):
        linmix.linear_scan(a, b, cu_seqlens=cu[None])
