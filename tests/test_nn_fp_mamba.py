"""linmix.nn.FPMamba against a plain float64 FP-Mamba, its gradient modes, stopping rules without host
synchronisation, decoding that reproduces the full forward, and its state dict and errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import linmix.nn as lnn

from conftest import HostReads
from nn_reference import check_against_reference, close, f64, ref_fp_mamba, round_trip


def fp_layer(gate_bias=-1.0, in_scale=1.0, **kw):
    """gate_bias -1: a mixer strong enough to matter (the default init keeps Q near I), not contractive;
    gate_bias -4 with in_scale 5 (a larger x, so LayerNorm amplifies y's share less): contractive."""
    torch.manual_seed(8)
    m = lnn.FPMamba(12, d_state=4, mixer_rank=2, **kw).double()
    with torch.no_grad():
        m.mixer_gate.bias.fill_(gate_bias)
        m.in_proj.weight.mul_(in_scale)
        m.norm.weight.uniform_(0.5, 1.5)
        m.norm.bias.uniform_(-0.2, 0.2)
    return m


@pytest.mark.parametrize("grad_mode,damping", [("onestep", 1.0), ("unroll", 0.7), ("onestep", 0.5)])
@pytest.mark.parametrize("L", [1, 9])
def test_fp_mamba_matches_reference(grad_mode, damping, L):
    m = fp_layer(max_iter=4, tol=0.0, damping=damping, grad_mode=grad_mode)
    x = torch.randn(2, L, 12, dtype=f64, requires_grad=True)
    out, info = m(x, return_info=True)
    assert info["n_iter"].tolist() == [4, 4]
    # onestep: max_iter iterations without autograd, then one differentiable one (max_iter + 1 in all)
    check_against_reference(m, x, out, lambda p, xr: ref_fp_mamba(p, xr, 2, 4, m.dt_rank, 4, damping,
                                                                   onestep=grad_mode == "onestep"))


def test_fp_mamba_converges_and_implicit_gradient():
    # At a converged fixed point, the implicit gradient equals backprop through many iterations.
    torch.manual_seed(9)
    x = torch.randn(2, 10, 12, dtype=f64)
    grads = {}
    for mode in ("implicit", "unroll", "onestep"):
        m = fp_layer(-4.0, 5.0, max_iter=24, tol=0.0, grad_mode=mode)
        out, info = m(x, return_info=True)
        assert info["residual"].max() < 1e-10, info
        out.pow(2).sum().backward()
        grads[mode] = torch.cat([q.grad.flatten() for q in m.parameters()])
    close(grads["implicit"], grads["unroll"], 1e-7)
    cos = F.cosine_similarity(grads["onestep"], grads["unroll"], dim=0)
    assert cos < 1 - 1e-6  # the one-step gradient is an approximation: the test can tell them apart


def test_fp_mamba_stopping_is_per_element_and_on_device():
    torch.manual_seed(10)
    m = fp_layer(-4.0, 5.0, max_iter=24, tol=1e-6)
    x = torch.randn(3, 8, 12, dtype=f64)
    x[1] *= 3  # a larger input converges faster: the elements stop at different iterations
    with torch.no_grad():
        out, info = m(x, return_info=True)
        assert (info["residual"] < 1e-6).all() and (info["n_iter"] < 24).all()
        for b in range(3):  # each element stops on its own: the same as running it alone
            alone, one = m(x[b : b + 1], return_info=True)
            assert one["n_iter"].item() == info["n_iter"][b].item()
            close(out[b], alone[0], 1e-12)
        mq = fp_layer(-4.0, 5.0, max_iter=24, tol=1e-6, stopping="batch", quantile=1.0)
        _, infoq = mq(x, return_info=True)
        assert infoq["n_iter"].unique().numel() == 1 and infoq["n_iter"][0] == info["n_iter"].max()
        m1 = fp_layer(-4.0, 5.0, max_iter=3, tol=1e-6)
        _, info1 = m1(x, return_info=True)
        assert info1["n_iter"].tolist() == [3, 3, 3] and (info1["residual"] > 1e-6).all()
    # No host synchronisation (masks, counts and residuals stay tensors): no op reads a value to the host.
    with HostReads(strict=True):
        m(x)
        mq(x)
    with pytest.raises(AssertionError, match="host"), HostReads(strict=True):
        torch.ones(2).sum().item()  # the check can fail


def test_fp_mamba_causal_stopping():
    # With tol > 0, "causal" outputs for a prefix equal the full sequence's; "element" ones need not (the
    # later tokens change the shared iteration count), which is what makes this test able to fail.
    torch.manual_seed(14)
    x = torch.randn(2, 12, 12, dtype=f64)
    x[:, 8:] *= 0.3  # later tokens that converge more slowly
    errs = {}
    for stopping in ("causal", "element"):
        m = fp_layer(-4.0, 5.0, max_iter=24, tol=1e-4, stopping=stopping)
        with torch.no_grad():
            full, info = m(x, return_info=True)
            prefix = m(x[:, :6])
        assert (info["residual"] < 1e-4).all()
        errs[stopping] = (full[:, :6] - prefix).abs().max().item()
    assert errs["causal"] < 1e-13 and errs["element"] > 1e-9, errs


@pytest.mark.parametrize("grad_mode,d_conv", [("onestep", 4), ("unroll", 0), ("implicit", 4)])
def test_fp_mamba_decode_equals_forward(grad_mode, d_conv):
    # Streaming: a prefill, then one token at a time from the returned state, reproduces the full forward
    # (tol = 0 and enough iterations: both are at the fixed point).
    m = fp_layer(-4.0, 5.0, max_iter=24, tol=0.0, grad_mode=grad_mode, d_conv=d_conv)
    torch.manual_seed(11)
    x = torch.randn(2, 9, 12, dtype=f64)
    full, final = m(x, return_state=True)
    out, state, info = m(x[:, :4], return_state=True, return_info=True)
    assert info["residual"].max() < 1e-12
    outs = [out]
    for t in range(4, 9):
        out, state = m(x[:, t : t + 1], state=state, return_state=True)
        outs.append(out)
    close(torch.cat(outs, 1), full, 1e-12)
    for got, want in zip(state, final):
        if want is None:
            assert got is None and d_conv == 0
        else:
            close(got, want, 1e-12)
    assert isinstance(state, lnn.FPMambaState) and state.ssm.shape == (2, 24, 4) and state.y.shape == (2, 24)
    torch.cat(outs, 1).sum().backward()  # differentiable through the carried state
    assert m.in_proj.weight.grad is not None


def test_fp_mamba_state_dict_and_errors():
    m = fp_layer(max_iter=3)
    assert sorted(m.state_dict()) == sorted(
        ["in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
         "A_log", "D", "bc_proj.weight", "bc_y_proj.weight", "mixer_proj.weight", "mixer_gate.weight",
         "mixer_gate.bias", "norm.weight", "norm.bias", "z_y_proj.weight", "out_proj.weight"])
    m2 = lnn.FPMamba(12, d_state=4, mixer_rank=2, max_iter=3).double()
    m2.load_state_dict(round_trip(m))
    x = torch.randn(1, 5, 12, dtype=f64)
    assert torch.equal(m2(x), m(x))
    default = lnn.FPMamba(12)
    assert torch.allclose(torch.sigmoid(default.mixer_gate.bias), torch.tensor(1 / (1 + math.e ** 4)))
    for kw, msg in [(dict(grad_mode="exact"), "grad_mode"), (dict(damping=0.0), "damping"),
                    (dict(quantile=1.5), "quantile"), (dict(stopping="token"), "stopping"), (dict(max_iter=0), "max_iter")]:
        with pytest.raises(ValueError, match=msg):
            lnn.FPMamba(12, **kw)
