import itertools

import pytest
import torch

import linmix
from linmix.reference import fixed_point_dense_ref, fixed_point_iter_ref, fixed_point_step_ref, linear_scan_ref
from linmix.reference.fixed_point_rnn import householder_apply_ref, householder_dense_ref

from conftest import DEVICES, HostReads, cuda_only, low_precision_close

CONVERGED = dict(max_iter=3000, tol=1e-13)  # float64: run to the fixed point


def make(B, T, D, R, dtype=torch.float64, device="cpu", requires_grad=False, lam_low=0.3, beta_high=1.9, seed=None):
    """Contractive data: lam in [lam_low, 0.99], beta in [0, beta_high], unit Householder vectors."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    f64 = dict(dtype=torch.float64, generator=gen)
    u = torch.randn(B, T, D, **f64)
    lam = lam_low + (0.99 - lam_low) * torch.rand(B, T, D, **f64)
    hh_u = torch.nn.functional.normalize(torch.randn(B, T, R, D, **f64), dim=-1)
    hh_beta = beta_high * torch.rand(B, T, R, **f64)
    # These ranges are contractive for most tokens but not all (e.g. D = 1: (1 - lam) beta up to 1.33);
    # shrink beta on the tokens where |(I - diag(lam_t))(I - Q_t)|_2 > 0.9 so every test converges.
    while True:
        jac = (1 - lam)[..., None] * (torch.eye(D, dtype=torch.float64) - householder_dense_ref(hh_u, hh_beta))
        bad = torch.linalg.matrix_norm(jac, 2) > 0.9 if D else torch.zeros(B, T, dtype=torch.bool)
        if not bad.any():
            break
        hh_beta[bad] *= 0.8
    out = [x.to(device, dtype).requires_grad_(requires_grad) for x in (u, lam, hh_u, hh_beta)]
    return out


def residual_history(u, lam, hh_u, hh_beta, n):
    """Residual max_t |h^l_t - h^{l-1}_t|_inf / |h^l_t|_inf of iterations l = 1..n per batch element (float64)."""
    prev, out = torch.zeros_like(u, dtype=torch.float64), []
    for _ in range(n):
        h = fixed_point_step_ref(u, lam, hh_u, hh_beta, prev)
        diff, norm = (h - prev).abs().amax(-1), h.abs().amax(-1)
        ratio = torch.where(diff > 0, diff / norm, torch.zeros_like(diff))
        out.append(ratio.amax(-1) if ratio.shape[-1] else torch.zeros(u.shape[0], dtype=torch.float64))
        prev = h
    return torch.stack(out, 1)  # (B, n)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 9, 6, 3), (3, 33, 17, 1), (2, 20, 16, 8), (1, 5, 40, 16)])
def test_converges_to_dense_fp64(shape):
    u, lam, hh_u, hh_beta = make(*shape)
    h, n_iter, res = linmix.fixed_point_rnn(u, lam, hh_u, hh_beta, **CONVERGED, return_info=True)
    assert (n_iter < CONVERGED["max_iter"]).all() and (res < CONVERGED["tol"]).all()
    ref = fixed_point_dense_ref(u, lam, hh_u, hh_beta)
    assert ((h - ref).abs().max() / ref.abs().max()).item() < 1e-10


@pytest.mark.parametrize("device", DEVICES)
def test_converges_to_dense_fp32(device):
    u, lam, hh_u, hh_beta = make(2, 40, 32, 2, torch.float32, device)
    h, n_iter, res = linmix.fixed_point_rnn(u, lam, hh_u, hh_beta, max_iter=500, tol=1e-6, return_info=True)
    assert (n_iter < 500).all()
    ref = fixed_point_dense_ref(u, lam, hh_u, hh_beta)
    assert ((h.double() - ref).abs().max() / ref.abs().max()).item() < 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 7, 5, 2), (3, 65, 33, 3), (1, 130, 64, 1)])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_fixed_iteration_count(device, shape, k):
    dtypes = [torch.float64, torch.float32] if device == "cpu" else [torch.float32]
    for dtype in dtypes:
        u, lam, hh_u, hh_beta = make(*shape, dtype, device)
        h, n_iter, res = linmix.fixed_point_rnn(u, lam, hh_u, hh_beta, max_iter=k, tol=0.0, return_info=True)
        assert n_iter.tolist() == [k] * shape[0]
        ref = fixed_point_iter_ref(u, lam, hh_u, hh_beta, k)
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h.double(), ref, **tol)
        want_res = residual_history(u.double(), lam, hh_u, hh_beta, k)[:, -1]
        torch.testing.assert_close(res.double(), want_res, rtol=1e-5 if dtype == torch.float64 else 1e-3, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_limits(device):
    # beta = 0: Q = I, so the first iteration is already the diagonal RNN h_t = lam h_{t-1} + (1 - lam) u.
    u, lam, hh_u, hh_beta = make(2, 37, 20, 2, torch.float32, device)
    zero = torch.zeros_like(hh_beta)
    h, n_iter, res = linmix.fixed_point_rnn(u, lam, hh_u, zero, max_iter=10, tol=1e-6, return_info=True)
    diag = linear_scan_ref(lam, (1 - lam) * u)
    torch.testing.assert_close(h.double(), diag, rtol=1e-5, atol=1e-5)
    assert n_iter.tolist() == [2, 2] and (res < 1e-6).all()  # the second iteration changes only rounding
    # One iteration from 0 is the diagonal scan of (1 - lam) * Q u.
    h1 = linmix.fixed_point_rnn(u, lam, hh_u, hh_beta, max_iter=1, tol=0.0)
    qu = householder_apply_ref(hh_u.double(), hh_beta.double(), u.double()).to(u.dtype)
    torch.testing.assert_close(h1, linmix.linear_scan(lam, (1 - lam) * qu), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_stopping_rule(device):
    # float64 on the CPU; fp32 elsewhere, where residuals within `margin` of tol may fall either side.
    dtype, margin, close = (torch.float64, 0.0, 1e-12) if device == "cpu" else (torch.float32, 1e-3, 1e-4)
    u, lam, hh_u, hh_beta = make(3, 24, 10, 2, dtype, device, seed=1)
    args64 = [x.double().cpu() for x in (u, lam, hh_u, hh_beta)]
    for tol in (1e-2, 1e-4) if dtype == torch.float32 else (1e-2, 1e-5, 1e-9):
        h, n_iter, res = linmix.fixed_point_rnn(u, lam, hh_u, hh_beta, max_iter=400, tol=tol, return_info=True)
        n_iter, res, h = n_iter.cpu(), res.cpu(), h.cpu()
        hist = residual_history(*args64, int(n_iter.max()))
        for b in range(3):
            n = int(n_iter[b])
            # n is the first iteration whose residual is below tol
            assert (hist[b, : n - 1] >= tol * (1 - margin)).all() and hist[b, n - 1] < tol * (1 + margin)
            torch.testing.assert_close(res[b].double(), hist[b, n - 1], rtol=1e-5 if margin == 0 else 1e-2, atol=0)
            want = fixed_point_iter_ref(*(x[b : b + 1] for x in args64), n)[0]
            torch.testing.assert_close(h[b].double(), want, rtol=close, atol=close)
    # max_iter caps it, and the residual is then the last iteration's.
    _, n_iter, res = linmix.fixed_point_rnn(u, lam, hh_u, hh_beta, max_iter=3, tol=1e-12, return_info=True)
    assert n_iter.tolist() == [3, 3, 3]
    torch.testing.assert_close(res.double().cpu(), residual_history(*args64, 3)[:, -1], rtol=1e-5, atol=0)


@cuda_only
def test_cuda_graph_capture():
    # The iteration loop has no host synchronisation, so the whole call can be captured and replayed.
    inputs = make(3, 64, 40, 2, torch.float32, "cuda", seed=8)
    want = linmix.fixed_point_rnn(*inputs, max_iter=60, tol=1e-5, return_info=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        linmix.fixed_point_rnn(*inputs, max_iter=60, tol=1e-5)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = linmix.fixed_point_rnn(*inputs, max_iter=60, tol=1e-5, return_info=True)
    graph.replay()
    torch.cuda.synchronize()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_batch_independence(device):
    # Element 1 converges slowly (small lam, large beta); elements 0 and 2 quickly. Results per element
    # must not depend on what else is in the batch.
    fast = make(2, 50, 24, 2, torch.float32, device, lam_low=0.9, beta_high=0.5, seed=2)
    slow = make(1, 50, 24, 2, torch.float32, device, lam_low=0.3, beta_high=1.9, seed=3)
    batch = [torch.cat([f[:1], s, f[1:]]) for f, s in zip(fast, slow)]
    h, n_iter, res = linmix.fixed_point_rnn(*batch, max_iter=300, tol=1e-5, return_info=True)
    assert n_iter[1] > n_iter[0] and n_iter[1] > n_iter[2]
    for b in range(3):
        hb, nb, rb = linmix.fixed_point_rnn(*(x[b : b + 1] for x in batch), max_iter=300, tol=1e-5, return_info=True)
        assert nb.item() == n_iter[b].item()
        torch.testing.assert_close(hb[0], h[b], rtol=0, atol=0)
        torch.testing.assert_close(rb[0], res[b], rtol=0, atol=0)


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("shape", [(2, 9, 6, 3), (1, 17, 12, 1), (2, 6, 8, 8)])
def test_implicit_gradients_match_dense(shape):
    inputs = make(*shape, requires_grad=True)
    h = linmix.fixed_point_rnn(*inputs, **CONVERGED, grad_mode="implicit")
    ref = fixed_point_dense_ref(*inputs)
    g = torch.randn_like(ref)
    for got, want in zip(_grads(h, inputs, g), _grads(ref, inputs, g)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", [(2, 9, 6, 3), (1, 17, 12, 1)])
def test_onestep_gradients(shape):
    inputs = make(*shape, requires_grad=True)
    # At the fixed point: autograd of one float64 step at the detached dense solution.
    h = linmix.fixed_point_rnn(*inputs, **CONVERGED)
    h_star = fixed_point_dense_ref(*inputs).detach()
    ref = fixed_point_step_ref(*inputs, h_star)
    g = torch.randn_like(ref)
    for got, want in zip(_grads(h, inputs, g), _grads(ref, inputs, g)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # Exactly: with k iterations the output is f(h^{k-1}) and the gradient is f's VJP at h^{k-1}.
    k = 3
    h = linmix.fixed_point_rnn(*inputs, max_iter=k, tol=0.0)
    ref = fixed_point_step_ref(*inputs, fixed_point_iter_ref(*inputs, k - 1).detach())
    torch.testing.assert_close(h, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(_grads(h, inputs, g), _grads(ref, inputs, g)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_onestep_differs_from_implicit():
    inputs = make(1, 12, 8, 2, requires_grad=True, seed=4)
    g = torch.randn(1, 12, 8, dtype=torch.float64)
    one = _grads(linmix.fixed_point_rnn(*inputs, **CONVERGED), inputs, g)
    imp = _grads(linmix.fixed_point_rnn(*inputs, **CONVERGED, grad_mode="implicit"), inputs, g)
    assert (one[0] - imp[0]).abs().max() > 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_fp32(device):
    inputs = make(2, 70, 40, 2, torch.float32, device, requires_grad=True, seed=5)
    ref_inputs = [x.detach().double().cpu().requires_grad_() for x in inputs]
    ref = fixed_point_dense_ref(*ref_inputs)
    g = torch.randn_like(ref)
    for mode in ("onestep", "implicit"):
        h = linmix.fixed_point_rnn(*inputs, max_iter=500, tol=1e-7, grad_mode=mode)
        want_out = ref if mode == "implicit" else fixed_point_step_ref(*ref_inputs, ref.detach())
        want = _grads(want_out, ref_inputs, g)
        for got, w in zip(_grads(h, inputs, g.to(device, torch.float32)), want):
            err = (got.double().cpu() - w).abs().max() / w.abs().max()
            assert err < 1e-4, (mode, err.item())


def test_gradcheck():
    inputs = make(2, 5, 4, 2, requires_grad=True, seed=6)
    assert torch.autograd.gradcheck(
        lambda *x: linmix.fixed_point_rnn(*x, max_iter=3000, tol=1e-14, grad_mode="implicit"), inputs
    )
    # onestep with beta = 0: one iteration is the exact map (Q = I), so onestep is the exact gradient too.
    u, lam, hh_u, _ = make(2, 5, 4, 2, requires_grad=True, seed=7)
    beta = torch.zeros(2, 5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: linmix.fixed_point_rnn(*x, max_iter=1, tol=0.0), (u, lam, hh_u, beta))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_edge_shapes(device):
    u, lam, hh_u, hh_beta = make(3, 21, 10, 2, torch.float32, device)
    u_nc = u.transpose(0, 1).contiguous().transpose(0, 1)
    hh_u_nc = torch.stack([hh_u, hh_u], -1)[..., 0]
    lam_nc = torch.stack([lam, lam], -1)[..., 0]
    kw = dict(max_iter=4, tol=0.0)
    torch.testing.assert_close(linmix.fixed_point_rnn(u_nc, lam_nc, hh_u_nc, hh_beta, **kw),
                               linmix.fixed_point_rnn(u, lam, hh_u, hh_beta, **kw))
    for shape in [(0, 5, 3, 1), (2, 0, 3, 2), (2, 5, 0, 1), (1, 1, 7, 2)]:  # (B, T, D, R)
        inputs = make(*shape, torch.float32, device, requires_grad=True)
        h, n_iter, res = linmix.fixed_point_rnn(*inputs, return_info=True)
        assert h.shape == shape[:3] and n_iter.shape == (shape[0],) and res.shape == (shape[0],)
        h.sum().backward()
        assert inputs[2].grad.shape == (shape[0], shape[1], shape[3], shape[2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(device, dtype):
    u, lam, hh_u, hh_beta = make(2, 200, 64, 2, dtype, device)
    h = linmix.fixed_point_rnn(u, lam, hh_u, hh_beta, max_iter=6, tol=0.0)
    ref = fixed_point_iter_ref(u, lam, hh_u, hh_beta, 6)
    # PyTorch's own computation in the low-precision dtype: the same iteration, rounded to dtype.
    h_pt = torch.zeros_like(u)
    for _ in range(6):
        x = h_pt + householder_apply_ref(hh_u, hh_beta, u - h_pt)
        b, outs, s = (1 - lam) * x, [], torch.zeros_like(u[:, 0])
        for t in range(u.shape[1]):
            s = lam[:, t] * s + b[:, t]
            outs.append(s)
        h_pt = torch.stack(outs, 1)
    low_precision_close(h, ref, h_pt)
    # Gradients: one step's VJP at h^5, against float64 autograd. Inputs and outputs are rounded to the
    # dtype, the accumulation is fp32: within 4 eps of the largest entry (about 0.5 eps on the CPU).
    inputs = [x.clone().requires_grad_() for x in (u, lam, hh_u, hh_beta)]
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    g = torch.randn_like(ref)
    got = _grads(linmix.fixed_point_rnn(*inputs, max_iter=6, tol=0.0), inputs, g.to(dtype))
    want = _grads(fixed_point_step_ref(*ref_inputs, fixed_point_iter_ref(*ref_inputs, 5).detach()), ref_inputs, g)
    for a, b in zip(got, want):
        assert ((a.double() - b).abs().max() / b.abs().max()).item() < 4 * torch.finfo(dtype).eps


def test_opcheck():
    u, lam, hh_u, hh_beta = make(2, 9, 7, 3, torch.float32)
    x = dict(u=u, lam=lam, hh_u=hh_u, hh_beta=hh_beta, initial_state=None, cu_seqlens=None)
    h, h_prev, _, _ = torch.ops.linmix.fixed_point_rnn_fwd(**x, max_iter=4, tol=1e-4)
    torch.library.opcheck(torch.ops.linmix.fixed_point_rnn_fwd, (), dict(x, max_iter=4, tol=1e-4))
    torch.library.opcheck(torch.ops.linmix.fixed_point_rnn_fwd, (), dict(x, max_iter=3, tol=0.0))
    for max_iter, tol in ((1, 0.0), (20, 1e-5)):
        torch.library.opcheck(torch.ops.linmix.fixed_point_rnn_bwd, (),
                              dict(x, h_prev=h_prev, dh=torch.randn_like(h), max_iter=max_iter, tol=tol))


def test_compile_fullgraph():
    inputs = make(2, 17, 8, 2, torch.float32, requires_grad=True)

    def f(u, lam, hh_u, hh_beta):
        h, n_iter, res = linmix.fixed_point_rnn(u, lam, hh_u, hh_beta, max_iter=8, grad_mode="implicit",
                                                return_info=True)
        return (h * 2).sum(), n_iter

    torch._dynamo.reset()
    out, n_iter = torch.compile(f, fullgraph=True, backend="aot_eager")(*inputs)
    out.backward()
    got = inputs[0].grad.clone()
    inputs[0].grad = None
    want, want_n = f(*inputs)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(n_iter, want_n)
    torch.testing.assert_close(got, inputs[0].grad)


def _bad(**over):
    args = dict(u=torch.rand(2, 3, 4), lam=torch.rand(2, 3, 4), hh_u=torch.rand(2, 3, 2, 4),
                hh_beta=torch.rand(2, 3, 2))
    args.update({k: v for k, v in over.items() if k in args})
    kw = {k: v for k, v in over.items() if k not in args}
    return lambda: linmix.fixed_point_rnn(**args, **kw)


@pytest.mark.parametrize(
    "call, err, match",
    [
        (_bad(u=torch.rand(2, 3)), RuntimeError, "u must have shape"),
        (_bad(lam=torch.rand(2, 3, 5)), RuntimeError, "lam must have shape"),
        (_bad(hh_u=torch.rand(2, 3, 4)), RuntimeError, "hh_u must have shape"),
        (_bad(hh_u=torch.rand(2, 3, 2, 5)), RuntimeError, "hh_u must have shape"),
        (_bad(hh_u=torch.rand(2, 3, 17, 4), hh_beta=torch.rand(2, 3, 17)), RuntimeError, "rank R"),
        (_bad(hh_beta=torch.rand(2, 3, 3)), RuntimeError, "hh_beta must have shape"),
        (_bad(lam=torch.rand(2, 3, 4, dtype=torch.float64)), RuntimeError, "lam must have the same dtype"),
        (_bad(u=torch.rand(2, 3, 4).int()), RuntimeError, "u must be float32"),
        (_bad(max_iter=0), RuntimeError, "max_iter must be >= 1"),
        (_bad(tol=-1.0), RuntimeError, "tol must be >= 0"),
        (_bad(grad_mode="exact"), ValueError, "grad_mode must be one of"),
    ],
)
def test_bad_inputs(call, err, match):
    with pytest.raises(err, match=match):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mixed_devices():
    with pytest.raises(RuntimeError, match="same device"):
        _bad(lam=torch.rand(2, 3, 4, device="cuda"))()


# ---------------------------------------------------------------------------------------------- packed sequences

def packed(lengths, D=6, R=2, dtype=torch.float64, seed=30, offsets_dtype=torch.int64):
    """(1, sum(lengths), ...) contractive inputs, one initial-state row per sequence, and the offsets."""
    xs = make(1, sum(lengths), D, R, dtype, seed=seed)
    h0 = torch.randn(len(lengths), D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(dtype)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=offsets_dtype)
    return [x.requires_grad_() for x in (*xs, h0)], cu


@pytest.mark.parametrize("stopping", ["element", "causal"])
@pytest.mark.parametrize("grad_mode", ["onestep", "implicit"])
@pytest.mark.parametrize("offsets_dtype, dtype", [(torch.int32, torch.float64), (torch.int64, torch.float64),
                                                  (torch.int32, torch.float32)])
def test_varlen_matches_each_sequence(stopping, grad_mode, offsets_dtype, dtype):
    # Each sequence is its own batch element: its own iteration count, residual, stopping and final state. In
    # float32 (the CUDA kernels under the emulator) a sequence's arithmetic is the same packed or alone.
    (u, lam, hh_u, hh_beta, h0), cu = packed((5, 0, 1, 11, 3), dtype=dtype, offsets_dtype=offsets_dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    grad_tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    kw = dict(max_iter=40, tol=1e-6, grad_mode=grad_mode, stopping=stopping, damping=0.9, output_final_state=True,
              return_info=True)
    with HostReads(strict=True):
        h, final, n_iter, res = linmix.fixed_point_rnn(u, lam, hh_u, hh_beta, initial_state=h0, cu_seqlens=cu, **kw)
    g_h, g_final = torch.randn_like(h), torch.randn_like(final)
    with HostReads(strict=True):
        got = torch.autograd.grad((h * g_h).sum() + (final * g_final).sum(), (u, lam, hh_u, hh_beta, h0))
    hs, wants = [], []
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        hi, fi, ni, ri = linmix.fixed_point_rnn(*(x[:, s:e] for x in (u, lam, hh_u, hh_beta)),
                                                initial_state=h0[i : i + 1], **kw)
        assert n_iter[i] == ni[0] and res[i] == ri[0]
        torch.testing.assert_close(final[i : i + 1], fi, **tol)
        hs.append(hi)
        wants.append((hi * g_h[:, s:e]).sum() + (fi * g_final[i : i + 1]).sum())
    torch.testing.assert_close(h, torch.cat(hs, 1), **tol)
    want = torch.autograd.grad(sum(wants), (u, lam, hh_u, hh_beta, h0))
    for name, a, b in zip(("u", "lam", "hh_u", "hh_beta", "h0"), got, want):
        torch.testing.assert_close(a, b, **grad_tol, msg=name)
    assert n_iter.unique().numel() > 1  # the sequences did stop at different iterations


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32: the CUDA kernels when emulated
def test_varlen_empty_sequence_causal(dtype):
    # A fuzzer find: with causal stopping an empty sequence has no token to stop, so it counts one iteration (as a
    # call with no tokens), while tol = 0 runs the others to max_iter. The case table's packed reference agrees.
    from linmix._cases import _fixed_point_rnn_reference
    (u, lam, hh_u, hh_beta, h0), cu = packed((2, 0, 3), dtype=dtype)
    kw = dict(max_iter=5, tol=0.0, stopping="causal", return_info=True, cu_seqlens=cu)
    h, n_iter, _ = linmix.fixed_point_rnn(u, lam, hh_u, hh_beta, initial_state=h0, **kw)
    h_ref, n_ref, _ = _fixed_point_rnn_reference(*(x.double() for x in (u, lam, hh_u, hh_beta)),
                                                 initial_state=h0.double(), **kw)
    assert n_iter.tolist() == n_ref.tolist() == [5, 1, 5]
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)


def test_varlen_batch_quantile_and_gradcheck():
    # stopping="batch": the quantile is over the sequences (the contract table's padded reference).
    from linmix._cases import _fixed_point_rnn_reference
    (u, lam, hh_u, hh_beta, h0), cu = packed((4, 9, 0, 2))
    kw = dict(max_iter=30, tol=1e-5, stopping="batch", quantile=0.5, return_info=True, initial_state=h0,
              cu_seqlens=cu)
    h, n_iter, res = linmix.fixed_point_rnn(u, lam, hh_u, hh_beta, **kw)
    h_ref, n_ref, res_ref = _fixed_point_rnn_reference(u, lam, hh_u, hh_beta, **kw)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)
    assert n_iter.tolist() == n_ref.tolist() and n_iter.unique().numel() == 1
    torch.testing.assert_close(res.double(), res_ref.double(), rtol=1e-6, atol=0.0)
    (u, lam, hh_u, hh_beta, h0), cu = packed((2, 0, 3), D=3)
    assert torch.autograd.gradcheck(
        lambda *x: linmix.fixed_point_rnn(*x[:4], initial_state=x[4], cu_seqlens=cu, max_iter=3000, tol=1e-14,
                                          grad_mode="implicit", output_final_state=True), (u, lam, hh_u, hh_beta, h0))


def test_varlen_compile_and_errors():
    (u, lam, hh_u, hh_beta, h0), cu = packed((3, 0, 6), dtype=torch.float32)
    f = torch.compile(lambda *x, cu: linmix.fixed_point_rnn(*x, max_iter=8, cu_seqlens=cu), fullgraph=True,
                      dynamic=True)
    for lengths in ((3, 0, 6), (1, 4, 2, 7)):
        (u, lam, hh_u, hh_beta, h0), cu = packed(lengths, dtype=torch.float32)
        h = f(u, lam, hh_u, hh_beta, cu=cu)
        torch.testing.assert_close(h, linmix.fixed_point_rnn(u, lam, hh_u, hh_beta, max_iter=8, cu_seqlens=cu))
        h.sum().backward()
    with pytest.raises(RuntimeError, match="cu_seqlens must rise from 0"):
        linmix.fixed_point_rnn(u, lam, hh_u, hh_beta, cu_seqlens=torch.tensor([0, 5, 3, 14]))
    with pytest.raises(RuntimeError, match="one row per sequence"):
        linmix.fixed_point_rnn(u, lam, hh_u, hh_beta, initial_state=h0[:2], cu_seqlens=cu)
    with pytest.raises(RuntimeError, match="batch size must be 1"):
        linmix.fixed_point_rnn(*(x.expand(2, *x.shape[1:]) for x in (u, lam, hh_u, hh_beta)), cu_seqlens=cu)
