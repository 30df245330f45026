"""linmix.nn.FixedPointRNN against a plain float64 PyTorch version of the same layer."""

import io
import json

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


@pytest.mark.parametrize("state_dependent", [False, True])
@pytest.mark.parametrize("stopping", ["element", "causal"])
def test_decode_equals_forward(stopping, state_dependent):
    kw = dict(rank=2, max_iter=500, tol=1e-12, stopping=stopping)
    layer = sd_layer(**kw) if state_dependent else make_layer(**kw)
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

    res = state_tracking.main(["--steps", "3", "--batch", "8", "--d", "8", "--d-state", "4", "--test-lens", "4,8",
                               "--test-batch", "8", "--models", "diagonal,mamba,fp-mamba,fp-rnn", "--ranks", "1",
                               "--max-iter", "4", "--eval-max-iter", "8", "--out", str(tmp_path)])
    assert set(res) == {"diagonal", "mamba", "fp-mamba r=1", "fp-rnn r=1"}
    assert (tmp_path / "results.json").exists() and (tmp_path / "accuracy_vs_length.png").exists()
    assert all(0 <= r["test"][8]["token_acc"] <= 1 for r in res.values())
    assert all(1 <= res[k]["test"][8]["mean_iters"] <= 8 for k in ("fp-mamba r=1", "fp-rnn r=1"))
    assert res["fp-mamba r=1"]["test_at_train_max_iter"][8]["mean_iters"] <= 4
    # --append keeps the other models of the folder's results.json
    state_tracking.main(["--steps", "2", "--batch", "4", "--d", "8", "--test-lens", "4", "--test-batch", "4",
                         "--models", "diagonal", "--seed", "1", "--out", str(tmp_path), "--append"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["results"]) == set(res) and saved["results"]["diagonal"]["run"]["args"]["seed"] == 1


def state_dependent_ref(layer, x, state=None):
    """The state-dependent layer's fixed point in float64, token by token: Q_t from [v_t; h_{t-1}] with the
    exact h_{t-1}, then the one-token dense solve of the linear fixed point with that Q_t."""
    p = {k: v.double() for k, v in layer.named_parameters()}
    lin = lambda name, t: F.linear(t, p[f"{name}.weight"], p.get(f"{name}.bias"))  # noqa: E731
    v = lin("in_proj", x.double())
    u = F.silu(lin("b_proj", v)) * v
    lam = torch.sigmoid(lin("lam_proj", v))
    B, T, _ = x.shape
    h = v.new_zeros(B, layer.d_inner) if state is None else state.double()
    out = []
    for t in range(T):
        pt = torch.cat([v[:, t], h], -1)
        hh_u = F.normalize(F.silu(lin("mixer_proj", pt)).view(B, 1, layer.rank, layer.d_inner), dim=-1)
        hh_beta = 2 * torch.sigmoid(lin("beta_proj", pt)).view(B, 1, layer.rank)
        h = fixed_point_dense_ref(u[:, t : t + 1], lam[:, t : t + 1], hh_u, hh_beta, h)[:, 0]
        out.append(h)
    h = torch.stack(out, 1)
    return lin("out_proj", h), h


def sd_layer(seed=0, **kw):
    torch.manual_seed(seed)
    layer = FixedPointRNN(12, d_inner=10, dtype=torch.float64, state_dependent=True, **kw)
    with torch.no_grad():
        layer.beta_proj.bias.fill_(-1.0)  # beta ~ 0.5: the per-token maps contract
    return layer


@pytest.mark.parametrize("rank", [1, 2])
def test_state_dependent_matches_token_by_token_solve(rank):
    layer = sd_layer(rank=rank, max_iter=400, tol=1e-13)
    x = torch.randn(3, 13, 12, dtype=torch.float64)
    state = torch.randn(3, 10, dtype=torch.float64)
    y, final = layer(x, state, return_state=True)
    n_iter, residual = layer.last_info
    assert (residual < 1e-13).all() and (n_iter < 400).all()
    y_ref, h_ref = state_dependent_ref(layer, x, state)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, h_ref[:, -1], rtol=1e-10, atol=1e-10)
    # it is not the linear (x-only) layer: zeroing the h_{t-1} half of the mixer's weights changes the output
    with torch.no_grad():
        layer.mixer_proj.weight[:, 10:] = 0
        layer.beta_proj.weight[:, 10:] = 0
    assert (layer(x, state) - y).abs().max() > 1e-3


@pytest.mark.parametrize("grad_mode", ["onestep", "implicit", "unroll"])
def test_state_dependent_gradients(grad_mode):
    layer = sd_layer(rank=2, max_iter=400, tol=1e-13, grad_mode=grad_mode)
    x = torch.randn(2, 9, 12, dtype=torch.float64, requires_grad=True)
    state = torch.randn(2, 10, dtype=torch.float64, requires_grad=True)
    y = layer(x, state)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, state, *layer.parameters()], g)
    ref_layer = sd_layer(rank=2)
    ref_layer.load_state_dict(layer.state_dict())
    x_ref, s_ref = x.detach().requires_grad_(), state.detach().requires_grad_()
    if grad_mode == "onestep":  # one differentiable iteration, written out, from the detached fixed point
        y_ref = _one_step_ref(ref_layer, x_ref, s_ref)
    else:  # implicit, and an unroll run to convergence: the gradient of the exact fixed point
        y_ref = state_dependent_ref(ref_layer, x_ref, s_ref)[0]
    want = torch.autograd.grad(y_ref, [x_ref, s_ref, *ref_layer.parameters()], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8)


def _one_step_ref(layer, x, state):
    """out_proj(f(h*)), h* the detached float64 fixed point, f one iteration (the mixer reading h*_{t-1})."""
    p = {k: v.double() for k, v in layer.named_parameters()}
    lin = lambda name, t: F.linear(t, p[f"{name}.weight"], p.get(f"{name}.bias"))  # noqa: E731
    with torch.no_grad():
        h_star = state_dependent_ref(layer, x, state)[1]
    v = lin("in_proj", x)
    u = F.silu(lin("b_proj", v)) * v
    lam = torch.sigmoid(lin("lam_proj", v))
    B, T, _ = x.shape
    pt = torch.cat([v, torch.cat([state[:, None], h_star[:, :-1]], 1)], -1)
    hh_u = F.normalize(F.silu(lin("mixer_proj", pt)).view(B, T, layer.rank, layer.d_inner), dim=-1)
    hh_beta = 2 * torch.sigmoid(lin("beta_proj", pt))
    return lin("out_proj", fixed_point_step_ref(u, lam, hh_u, hh_beta, h_star, state))


def test_state_dependent_nonconvergence_and_arguments():
    layer = sd_layer(rank=1, max_iter=2, tol=1e-6)  # 2 iterations cannot reach the fixed point of 16 tokens
    with pytest.warns(RuntimeWarning, match="did not converge within max_iter=2"):
        layer(torch.randn(2, 16, 12, dtype=torch.float64))
    assert (layer.last_info[0] == 2).all() and (layer.last_info[1] > 1e-6).all()
    layer.on_nonconvergence = "raise"
    with pytest.raises(RuntimeError, match="did not converge"):
        layer(torch.randn(2, 16, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="state_dependent=True needs mixer='householder'"):
        FixedPointRNN(4, mixer="none", state_dependent=True)
    with pytest.raises(ValueError, match="grad_mode must be one of"):
        FixedPointRNN(4, grad_mode="unroll")
    assert FixedPointRNN(4, d_inner=6, rank=2, state_dependent=True).mixer_proj.weight.shape == (12, 12)
