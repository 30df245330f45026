import pytest
import torch

import linmix
from linmix.reference import linear_scan_ref

from conftest import DEVICES, low_precision_close


def make(B, T, D, dtype, device, h0=True, requires_grad=False, a_low=0.5):
    a = (a_low + (1 - a_low) * torch.rand(B, T, D, dtype=torch.float64)).to(device, dtype)
    b = torch.randn(B, T, D, dtype=torch.float64).to(device, dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    h = torch.randn(B, D, dtype=torch.float64).to(device, acc) if h0 else None
    for t in (a, b, h):
        if t is not None:
            t.requires_grad_(requires_grad)
    return a, b, h


SHAPES = [(1, 1, 1), (2, 7, 5), (3, 64, 33), (2, 65, 64), (1, 300, 130), (2, 1000, 40)]


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
    h = torch.ops.linmix.linear_scan_fwd(a=a, b=b, h0=h0, reverse=False)
    for rev in (False, True):
        torch.library.opcheck(torch.ops.linmix.linear_scan_fwd, (), dict(a=a, b=b, h0=h0, reverse=rev))
        torch.library.opcheck(torch.ops.linmix.linear_scan_fwd, (), dict(a=a, b=b, h0=None, reverse=rev))
        torch.library.opcheck(torch.ops.linmix.linear_scan_bwd, (),
                              dict(a=a, h0=h0, h=h, dh=torch.randn_like(h), reverse=rev))


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
