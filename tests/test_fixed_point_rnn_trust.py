"""fixed_point_rnn's iteration variants and its convergence record: damping, the
stopping rules (per element, the authors' batch quantile, causal per token), initial/final state for
streaming decode, and the failure modes users hit (a pinned iteration count, implicit training to NaN)."""

import warnings

import pytest
import torch

import linmix
from linmix import FixedPointConvergenceError, FixedPointConvergenceWarning
from linmix.reference import fixed_point_dense_ref, fixed_point_step_ref
from linmix.reference.fixed_point_rnn import fixed_point_iter_ref, fixed_point_iterate_ref, fixed_point_solve_ref

from conftest import HAS_CUDA, HostReads, cuda_only, rel_err
from test_fixed_point_rnn import make


def layer_like(B, T, D, R, seed, lam_shift=0.0):
    """Inputs as the paper's layer makes them: lam = sigmoid(.), beta = 2 sigmoid(.) in (0, 2), so the
    documented ranges hold but lam can be small: not contractive everywhere."""
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=gen)
    u = torch.randn(B, T, D, **f64)
    lam = torch.sigmoid(torch.randn(B, T, D, **f64) + lam_shift)
    hh_u = torch.nn.functional.normalize(torch.randn(B, T, R, D, **f64), dim=-1)
    hh_beta = 2 * torch.sigmoid(2 * torch.randn(B, T, R, **f64))
    return u, lam, hh_u, hh_beta


@pytest.mark.parametrize("damping", [0.5, 0.8])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_damped_iteration_exact(damping, k):
    inputs = make(2, 19, 7, 2, seed=11)
    h0 = torch.randn(2, 7, dtype=torch.float64)
    h, n_iter, _ = linmix.fixed_point_rnn(*inputs, max_iter=k, tol=0.0, damping=damping, initial_state=h0,
                                          return_info=True)
    assert n_iter.tolist() == [k, k]
    torch.testing.assert_close(h, fixed_point_iter_ref(*inputs, k, h0, damping), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stopping", ["element", "batch", "causal"])
@pytest.mark.parametrize("damping", [1.0, 0.7])
def test_stopping_rules_match_reference(stopping, damping):
    fast = make(3, 30, 9, 2, lam_low=0.9, beta_high=0.5, seed=12)
    slow = make(2, 30, 9, 2, lam_low=0.3, beta_high=1.9, seed=13)
    inputs = [torch.cat([f, s]) for f, s in zip(fast, slow)]
    h0 = torch.randn(5, 9, dtype=torch.float64)
    for tol, q in ((1e-3, 0.5), (1e-7, 0.75)):
        h, n_iter, res = linmix.fixed_point_rnn(*inputs, max_iter=60, tol=tol, initial_state=h0, damping=damping,
                                                stopping=stopping, quantile=q, return_info=True)
        want_h, want_prev, want_n, want_res = fixed_point_solve_ref(*inputs, 60, tol, h0, damping, stopping, q)
        assert n_iter.tolist() == want_n.tolist()
        torch.testing.assert_close(res, want_res, rtol=1e-6, atol=1e-14)  # converged ones: rounding level
        torch.testing.assert_close(h, want_h, rtol=1e-12, atol=1e-12)
        if stopping == "batch":
            assert len(set(n_iter.tolist())) == 1  # the batch iterates together
        else:
            assert n_iter[3:].min() > n_iter[:3].max()  # slow elements take longer


def test_batch_quantile_leaves_the_slowest_unconverged():
    fast = make(3, 30, 9, 2, lam_low=0.9, beta_high=0.5, seed=14)
    slow = make(1, 30, 9, 2, lam_low=0.3, beta_high=1.9, seed=15)
    inputs = [torch.cat([f, s]) for f, s in zip(fast, slow)]
    _, n_q, res_q = linmix.fixed_point_rnn(*inputs, max_iter=500, tol=1e-8, stopping="batch", quantile=0.5,
                                           return_info=True)
    _, n_1, res_1 = linmix.fixed_point_rnn(*inputs, max_iter=500, tol=1e-8, stopping="batch", quantile=1.0,
                                           return_info=True)
    assert n_q[0] < n_1[0] < 500
    assert res_q[3] >= 1e-8 and (res_q[:3] < 1e-8).any() and (res_1 < 1e-8).all()
    with pytest.warns(FixedPointConvergenceWarning):  # q = 1 at the cap: the rule was not met
        linmix.fixed_point_rnn(*inputs, max_iter=3, tol=1e-8, stopping="batch", quantile=1.0, on_nonconvergence="warn")
    with warnings.catch_warnings():  # the quantile rule met: no warning for the element it ignores
        warnings.simplefilter("error")
        linmix.fixed_point_rnn(*inputs, max_iter=500, tol=1e-8, stopping="batch", quantile=0.5, on_nonconvergence="warn")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32: the CUDA kernels under emulation
def test_causal_stopping_is_causal(dtype):
    # Make the last token slow to converge: with per-element stopping that raises the shared iteration
    # count, which changes the outputs of every earlier token; with causal stopping it must not.
    u, lam, hh_u, hh_beta = make(2, 40, 8, 2, dtype, lam_low=0.8, beta_high=0.6, seed=16)
    slow = make(2, 40, 8, 2, dtype, lam_low=0.3, beta_high=1.9, seed=17)
    u2, lam2, hh_u2, hh_beta2 = (torch.cat([x[:, :-4], s[:, -4:]], 1) for x, s in zip((u, lam, hh_u, hh_beta), slow))
    kw = dict(max_iter=100, tol=1e-3)
    a = linmix.fixed_point_rnn(u, lam, hh_u, hh_beta, **kw, stopping="causal")
    b = linmix.fixed_point_rnn(u2, lam2, hh_u2, hh_beta2, **kw, stopping="causal")
    torch.testing.assert_close(a[:, :-4], b[:, :-4], rtol=0, atol=0)
    a = linmix.fixed_point_rnn(u, lam, hh_u, hh_beta, **kw)
    b = linmix.fixed_point_rnn(u2, lam2, hh_u2, hh_beta2, **kw)
    assert (a[:, :-4] - b[:, :-4]).abs().max() > 1e-6  # the shared count leaks the future


@pytest.mark.parametrize("grad_mode", ["onestep", "implicit"])
def test_initial_state_gradients(grad_mode):
    inputs = make(2, 9, 6, 2, requires_grad=True, seed=18)
    h0 = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    h, final = linmix.fixed_point_rnn(*inputs, max_iter=3000, tol=1e-13, grad_mode=grad_mode, initial_state=h0,
                                      output_final_state=True)
    ref = fixed_point_dense_ref(*inputs, h0)
    torch.testing.assert_close(final, ref[:, -1], rtol=1e-10, atol=1e-10)
    if grad_mode == "onestep":
        ref = fixed_point_step_ref(*inputs, ref.detach(), h0)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(h, (*inputs, h0), g)
    want = torch.autograd.grad(ref, (*inputs, h0), g)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)


def test_gradcheck_initial_state_damped():
    inputs = make(2, 5, 4, 2, requires_grad=True, seed=19)
    h0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    fn = lambda *x: linmix.fixed_point_rnn(*x[:4], max_iter=3000, tol=1e-14, grad_mode="implicit",  # noqa: E731
                                           damping=0.6, initial_state=x[4])
    assert torch.autograd.gradcheck(fn, (*inputs, h0))


@pytest.mark.parametrize("stopping", ["element", "causal"])
def test_streaming_decode_matches_forward(stopping):
    # One 64-token forward against 16 + 16 + 32 chunks and against 64 single tokens, each call starting
    # from the previous call's final state. Near the fixed point (tol 1e-12) they agree to 1e-9.
    u, lam, hh_u, hh_beta = make(2, 64, 12, 2, seed=20)
    h0 = torch.randn(2, 12, dtype=torch.float64)
    kw = dict(max_iter=2000, tol=1e-12, stopping=stopping)
    full, final = linmix.fixed_point_rnn(u, lam, hh_u, hh_beta, **kw, initial_state=h0, output_final_state=True)
    for bounds in ([0, 16, 32, 64], list(range(65))):
        state, outs = h0, []
        for a, b in zip(bounds[:-1], bounds[1:]):
            o, state = linmix.fixed_point_rnn(u[:, a:b], lam[:, a:b], hh_u[:, a:b], hh_beta[:, a:b], **kw,
                                              initial_state=state, output_final_state=True)
            outs.append(o)
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(state, final, rtol=1e-9, atol=1e-9)


def test_failure_mode_pinned_at_cap():
    # A layer's ranges, beta in [0, 2) (lam = sigmoid, beta = 2 sigmoid), and max_iter=16: the count pins at the cap
    # with the output far from the fixed point. The record must say so, and warn / raise on request.
    inputs = layer_like(4, 64, 16, 1, seed=21)
    h, n_iter, res = linmix.fixed_point_rnn(*inputs, max_iter=16, tol=1e-4, return_info=True)
    assert (n_iter == 16).all() and (res >= 1e-4).all()
    assert rel_err(h, fixed_point_dense_ref(*inputs), "fro") > 0.1
    with pytest.warns(FixedPointConvergenceWarning, match="did not converge within max_iter=16"):
        linmix.fixed_point_rnn(*inputs, max_iter=16, tol=1e-4, on_nonconvergence="warn")
    with pytest.raises(FixedPointConvergenceError, match="4 of 4 batch elements"):
        linmix.fixed_point_rnn(*inputs, max_iter=16, tol=1e-4, on_nonconvergence="raise")
    # Inside the derived convergence range (lam > 1/2 for any beta < 2) enough iterations reach it.
    inputs = list(inputs)
    inputs[1] = 0.5 + 0.5 * inputs[1]
    h, n_iter, res = linmix.fixed_point_rnn(*inputs, max_iter=400, tol=1e-10, return_info=True,
                                            on_nonconvergence="raise")
    assert (n_iter < 400).all() and rel_err(h, fixed_point_dense_ref(*inputs), "fro") < 1e-8


def test_failure_mode_implicit_training_nan():
    # Implicit training once went to NaN with no warning. Where rho(diag(1 - lam)(I - Q)) > 1 the
    # forward has no attracting fixed point and the adjoint iteration diverges with it.
    u, lam, hh_u, hh_beta = layer_like(2, 32, 8, 1, seed=22, lam_shift=-4.0)  # lam ~ 0.02, beta up to 2
    hh_beta = hh_beta.clamp(min=1.5)
    inputs = [x.requires_grad_() for x in (u, lam, hh_u, hh_beta)]
    kw = dict(max_iter=2000, tol=1e-6, grad_mode="implicit")
    h = linmix.fixed_point_rnn(*inputs, **kw)  # default "ignore": the silent failure, now only recorded
    grads = torch.autograd.grad(h.square().sum(), inputs, allow_unused=True)
    assert not all(g.isfinite().all() for g in grads)
    with pytest.warns(FixedPointConvergenceWarning) as record:
        h = linmix.fixed_point_rnn(*inputs, **kw, on_nonconvergence="warn")
        torch.autograd.grad(h.square().sum(), inputs)
    assert any("non-finite gradients" in str(w.message) for w in record)
    with pytest.raises(FixedPointConvergenceError):
        linmix.fixed_point_rnn(*inputs, **kw, on_nonconvergence="raise")


def test_opcheck_new_arguments():
    u, lam, hh_u, hh_beta = make(3, 9, 7, 3, torch.float32, seed=23)
    h0 = torch.randn(3, 7)
    x = dict(u=u, lam=lam, hh_u=hh_u, hh_beta=hh_beta, cu_seqlens=None)
    for state, damping, batch_quantile, causal in ((h0, 0.7, -1.0, False), (None, 1.0, 0.5, False),
                                                   (h0, 1.0, -1.0, True)):
        torch.library.opcheck(torch.ops.linmix.fixed_point_rnn_fwd, (),
                              dict(x, initial_state=state, max_iter=5, tol=1e-4, damping=damping,
                                   batch_quantile=batch_quantile, causal=causal))
    _, h_prev, _, _ = torch.ops.linmix.fixed_point_rnn_fwd(**x, initial_state=h0, max_iter=4, tol=1e-4, damping=0.7)
    for max_iter, tol, state, damping in ((20, 1e-5, h0, 0.7), (1, 0.0, None, 1.0)):
        torch.library.opcheck(torch.ops.linmix.fixed_point_rnn_bwd, (),
                              dict(x, initial_state=state, h_prev=h_prev, dh=torch.randn_like(u), max_iter=max_iter,
                                   tol=tol, damping=damping))


def test_compile_fullgraph_new_arguments():
    inputs = make(2, 11, 8, 2, torch.float32, requires_grad=True, seed=24)
    h0 = torch.randn(2, 8, requires_grad=True)

    def f(u, lam, hh_u, hh_beta, h0):
        h, final = linmix.fixed_point_rnn(u, lam, hh_u, hh_beta, max_iter=200, damping=0.8, initial_state=h0,
                                          output_final_state=True, stopping="causal", on_nonconvergence="warn")
        return (h * 2).sum() + final.sum()

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(*inputs, h0)
    got = torch.autograd.grad(out, h0)[0]
    want_out = f(*inputs, h0)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(got, torch.autograd.grad(want_out, h0)[0])


def test_edge_shapes_new_arguments():
    for shape in [(0, 5, 3, 1), (2, 0, 3, 2), (2, 5, 0, 1), (1, 1, 7, 2)]:  # (B, T, D, R)
        inputs = make(*shape, requires_grad=True)
        h0 = torch.randn(shape[0], shape[2], dtype=torch.float64, requires_grad=True)
        h, final = linmix.fixed_point_rnn(*inputs, initial_state=h0, output_final_state=True, damping=0.9,
                                          stopping="causal")
        assert h.shape == shape[:3] and final.shape == h0.shape
        (h.sum() + final.sum()).backward()
        assert h0.grad.shape == h0.shape
        if shape[1] == 0:
            torch.testing.assert_close(h0.grad, torch.ones_like(h0))  # the final state is the initial one


def _bad(**over):
    args = dict(u=torch.rand(2, 3, 4), lam=torch.rand(2, 3, 4), hh_u=torch.rand(2, 3, 2, 4),
                hh_beta=torch.rand(2, 3, 2))
    return lambda: linmix.fixed_point_rnn(**args, **over)


@pytest.mark.parametrize(
    "call, err, match",
    [
        (_bad(initial_state=torch.rand(2, 5)), RuntimeError, "initial_state must have shape"),
        (_bad(initial_state=torch.rand(2, 4).double()), RuntimeError, "initial_state must have the same dtype"),
        (_bad(damping=0.0), RuntimeError, "damping must be in"),
        (_bad(damping=1.5), RuntimeError, "damping must be in"),
        (_bad(stopping="batch", quantile=1.5), RuntimeError, "quantile must be in"),
        (_bad(stopping="token"), ValueError, "stopping must be one of"),
        (_bad(on_nonconvergence="loud"), ValueError, "on_nonconvergence must be one of"),
    ],
)
def test_bad_new_arguments(call, err, match):
    with pytest.raises(err, match=match):
        call()


VARIANTS = [dict(damping=0.5), dict(initial_state="given"), dict(stopping="batch", quantile=0.5),
            dict(stopping="causal"), dict(stopping="causal", damping=0.7, initial_state="given")]


def _variant_call(kw, device, seed):
    """fixed_point_rnn's inputs (float32 on `device`, where float32 runs the CUDA kernels: on a GPU, or under
    LINMIX_EMULATE_CUDA=1 on the CPU) and keyword arguments for one entry of VARIANTS."""
    inputs = make(3, 33, 40, 2, torch.float32, device, seed=seed, lam_low=0.5)
    kw = dict(kw, max_iter=80, tol=1e-5, grad_mode="implicit", return_info=True)
    if kw.get("initial_state") == "given":
        kw["initial_state"] = torch.randn(3, 40, generator=torch.Generator().manual_seed(seed)).to(device)
    return inputs, kw


@pytest.mark.parametrize("kw", VARIANTS)
def test_variants_run_without_host_sync(kw):
    # initial_state, damping and the stopping rules on the CUDA kernels (a GPU, or the emulator) stop early with the
    # device-side rule and no host read per iteration, forward and backward: with on_nonconvergence="ignore" the
    # Python side reads nothing, and the launchers cannot (the emulated build, which compiles them, has no
    # synchronising CUDA call: csrc/emu/include/cuda_runtime.h).
    device = "cuda" if HAS_CUDA else "cpu"
    inputs, kw = _variant_call(kw, device, seed=25)
    inputs = [x.requires_grad_() for x in inputs]
    with HostReads(strict=True):
        h, n_iter, res = linmix.fixed_point_rnn(*inputs, **kw)
        torch.autograd.grad(h.square().sum(), inputs)
    assert (n_iter < kw["max_iter"]).any() and (res < kw["tol"]).any()
    # and the iteration counts and numbers of the float64 CPU kernels, up to float32 rounding (which may move a
    # residual near tol across it: one iteration more or less)
    kw64 = {k: (v.double().cpu() if torch.is_tensor(v) else v) for k, v in kw.items()}
    h64, n64, _ = linmix.fixed_point_rnn(*(x.detach().double().cpu() for x in inputs), **kw64)
    assert (n_iter.cpu() - n64).abs().max() <= 1, (n_iter, n64)
    assert rel_err(h.detach().double().cpu(), h64, "fro") < 1e-4


@cuda_only
@pytest.mark.parametrize("kw", VARIANTS)
def test_variants_cuda_graph_capture(kw):
    inputs, kw = _variant_call(kw, "cuda", seed=26)
    want = linmix.fixed_point_rnn(*inputs, **kw)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        linmix.fixed_point_rnn(*inputs, **kw)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = linmix.fixed_point_rnn(*inputs, **kw)
    graph.replay()
    torch.cuda.synchronize()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_documented_convergence_range(rank):
    # The ranges where convergence is guaranteed are documented, and they hold. The
    # docstring's sufficient check: (1 - min_d lam_td) * min(2, sum_i beta_ti) < 1 for every token.
    doc = linmix.fixed_point_rnn.__doc__
    assert "(1 - min_d lam_{t,d}) * min(2, sum_i beta_{t,i}) < 1" in doc and "lam > 1/2" in doc
    from linmix.reference.fixed_point_rnn import householder_dense_ref

    gen = torch.Generator().manual_seed(40 + rank)
    B, T, D = 3, 24, 6
    u = torch.randn(B, T, D, dtype=torch.float64, generator=gen)
    hh_u = torch.nn.functional.normalize(torch.randn(B, T, rank, D, dtype=torch.float64, generator=gen), dim=-1)
    hh_beta = 1.99 * torch.rand(B, T, rank, dtype=torch.float64, generator=gen)
    # lam just inside the bound: 1 - min lam = 0.98 / min(2, sum beta)
    bound = hh_beta.sum(-1).clamp(max=2.0)
    lam_min = 1 - 0.98 / bound
    lam = lam_min[..., None] + (1 - lam_min[..., None]) * torch.rand(B, T, D, dtype=torch.float64, generator=gen)
    lam = lam.clamp(max=0.999)
    jac = (1 - lam)[..., None] * (torch.eye(D, dtype=torch.float64) - householder_dense_ref(hh_u, hh_beta))
    assert (torch.linalg.eigvals(jac).abs().amax(-1) < 1).all()  # the spectral condition the check implies
    h, n_iter, res = linmix.fixed_point_rnn(u, lam, hh_u, hh_beta, max_iter=5000, tol=1e-11, return_info=True,
                                            on_nonconvergence="raise")
    assert rel_err(h, fixed_point_dense_ref(u, lam, hh_u, hh_beta), "fro") < 1e-8
    # Outside it: the documented rank-1 counterexample rho_t = beta_t sum_d (1 - lam_td) u_td^2 > 1 diverges.
    if rank == 1:
        lam_bad = torch.full_like(lam, 0.05)
        beta_bad = torch.full_like(hh_beta, 1.9)
        rho = beta_bad[..., 0] * ((1 - lam_bad) * hh_u[..., 0, :] ** 2).sum(-1)
        assert (rho > 1).all()
        h, n_iter, res = linmix.fixed_point_rnn(u, lam_bad, hh_u, beta_bad, max_iter=200, tol=1e-6, return_info=True)
        assert (n_iter == 200).all() and not (res < 1e-6).any()
