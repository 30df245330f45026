"""linmix.nn.FixedPointRNN against a plain float64 PyTorch version of the same layer."""

import io

import pytest
import torch
import torch.nn.functional as F

from linmix.nn import FixedPointRNN
from linmix.reference import fixed_point_dense_ref, fixed_point_step_ref, linear_scan_ref

CONVERGED = dict(max_iter=3000, tol=1e-13)


def layer_ref(layer, x, state=None):
    """The layer in plain float64 PyTorch: the projections written out, the dense RNN solved token by token
    (onestep: one more step from the detached solution)."""
    p = {k: v.double() for k, v in layer.named_parameters()}
    lin = lambda name, t: F.linear(t, p[f"{name}.weight"], p.get(f"{name}.bias"))  # noqa: E731
    x = x.double()
    v = lin("in_proj", x)
    u = F.silu(lin("b_proj", v)) * v
    s = torch.sigmoid(lin("lam_proj", v))
    lam = (1 + s) / 2 if layer.contractive else s
    if layer.mixer == "none":
        h = linear_scan_ref(lam, (1 - lam) * u, state)
    else:
        B, T, _ = x.shape
        hh_u = F.normalize(F.silu(lin("mixer_proj", v)).view(B, T, layer.rank, layer.d_inner), dim=-1)
        hh_beta = 2 * torch.sigmoid(lin("beta_proj", v))
        h = fixed_point_dense_ref(u, lam, hh_u, hh_beta, state)
        if layer.grad_mode == "onestep":
            h = fixed_point_step_ref(u, lam, hh_u, hh_beta, h.detach(), state)
    return lin("out_proj", h), h[:, -1]


def make_layer(seed=0, **kw):
    torch.manual_seed(seed)
    return FixedPointRNN(12, d_inner=10, dtype=torch.float64, contractive=True, **kw)


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("grad_mode", ["onestep", "implicit"])
def test_matches_float64_module(rank, grad_mode):
    layer = make_layer(rank=rank, grad_mode=grad_mode, **CONVERGED)
    x = torch.randn(3, 17, 12, dtype=torch.float64, requires_grad=True)
    state = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    y, final = layer(x, state, return_state=True)
    n_iter, residual = layer.last_info
    assert (n_iter < 3000).all() and (residual < 1e-13).all()
    # the float64 module on a copy of the parameters (so gradients land on separate leaves)
    ref_layer = make_layer(rank=rank, grad_mode=grad_mode, **CONVERGED)
    ref_layer.load_state_dict(layer.state_dict())
    y_ref, final_ref = layer_ref(ref_layer, x, state)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, state, *layer.parameters()], g)
    want = torch.autograd.grad(y_ref, [x, state, *ref_layer.parameters()], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_diagonal_baseline():
    layer = make_layer(mixer="none")
    assert not hasattr(layer, "mixer_proj")
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    state = torch.randn(2, 10, dtype=torch.float64)
    y, final = layer(x, state, return_state=True)
    y_ref, final_ref = layer_ref(layer, x, state)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, final_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mixer", ["householder", "none"])
def test_state_dict_round_trip(mixer):
    layer = make_layer(rank=2, mixer=mixer)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    other = make_layer(seed=1, rank=2, mixer=mixer)
    other.load_state_dict(torch.load(buf))
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
    keys = {"in_proj", "b_proj", "lam_proj", "out_proj"} | ({"mixer_proj", "beta_proj"} if mixer != "none" else set())
    assert {k.split(".")[0] for k in layer.state_dict()} == keys


@pytest.mark.parametrize("stopping", ["element", "causal"])
def test_decode_equals_forward(stopping):
    layer = make_layer(rank=2, max_iter=500, tol=1e-12, stopping=stopping)
    x = torch.randn(2, 24, 12, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
        state, outs = None, []
        for t in range(24):
            y, state = layer.step(x[:, t], state)
            outs.append(y)
        chunks, state = [], None
        for a, b in ((0, 5), (5, 6), (6, 24)):
            y, state = layer(x[:, a:b], state, return_state=True)
            chunks.append(y)
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=1e-9, atol=1e-9)


def test_nonconvergence_warns_by_default():
    # The paper's parametrisation (lam = sigmoid) with large weights leaves the convergence range.
    torch.manual_seed(3)
    layer = FixedPointRNN(8, rank=1, max_iter=16, tol=1e-4)
    with torch.no_grad():
        layer.lam_proj.bias.fill_(-4.0)  # lam ~ 0.02
        layer.beta_proj.bias.fill_(4.0)  # beta ~ 2
    with pytest.warns(RuntimeWarning, match="did not converge within max_iter=16"):
        layer(torch.randn(2, 32, 8))
    layer.contractive = True  # lam in (1/2, 1): converges for every beta in (0, 2), here slowly (rho ~ 0.96)
    layer.max_iter = 3000
    layer.on_nonconvergence = "raise"
    layer(torch.randn(2, 32, 8))


def test_float32_layer_trains():
    torch.manual_seed(4)
    layer = FixedPointRNN(8, rank=2, contractive=True, max_iter=64, tol=1e-5)
    x = torch.randn(4, 20, 8)
    y = layer(x)
    y.square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in layer.parameters())


def test_bad_arguments():
    with pytest.raises(ValueError, match="mixer must be one of"):
        FixedPointRNN(4, mixer="kronecker")
    with pytest.raises(ValueError, match="rank must be in"):
        FixedPointRNN(4, rank=17)
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, 4\)"):
        FixedPointRNN(4)(torch.randn(2, 3, 5))


def test_state_tracking_example_smoke(tmp_path):
    from linmix.examples import state_tracking

    res = state_tracking.main(["--steps", "3", "--batch", "8", "--d", "8", "--test-lens", "4,8", "--test-batch", "8",
                               "--ranks", "1", "--out", str(tmp_path)])
    assert set(res) == {"diagonal", "fp-householder r=1"}
    assert (tmp_path / "results.json").exists() and (tmp_path / "accuracy_vs_length.png").exists()
    assert all(0 <= r["test"][8]["token_acc"] <= 1 for r in res.values())
