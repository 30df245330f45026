"""linmix.nn.Mamba against a plain float64 Mamba-1 block, mamba-ssm's state-dict keys, decoding that reproduces
the full forward, torch.compile, and low precision."""

import pytest
import torch
import torch.nn.functional as F

import linmix.nn as lnn
from conftest import low_precision_close
from nn_reference import check_against_reference, close, f64, ref_mamba, ref_params, round_trip


MAMBA_KEYS = ["A_log", "D", "conv1d.bias", "conv1d.weight", "dt_proj.bias", "dt_proj.weight", "in_proj.weight",
              "out_proj.weight", "x_proj.weight"]


@pytest.mark.parametrize("L,bias", [(1, False), (7, True), (33, False)])
def test_mamba_matches_reference(L, bias):
    torch.manual_seed(0)
    m = lnn.Mamba(16, d_state=4, bias=bias).double()
    x = torch.randn(2, L, 16, dtype=f64, requires_grad=True)
    check_against_reference(m, x, m(x), lambda p, xr: ref_mamba(p, xr, 4, m.dt_rank)[0])


def test_mamba_init_and_keys():
    torch.manual_seed(0)
    m = lnn.Mamba(40, d_state=8, dt_min=0.01, dt_max=0.05)
    assert m.d_inner == 80 and m.dt_rank == 3
    assert sorted(m.state_dict()) == MAMBA_KEYS
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"A_log": (80, 8), "D": (80,), "conv1d.bias": (80,), "conv1d.weight": (80, 1, 4),
                      "dt_proj.bias": (80,), "dt_proj.weight": (80, 3), "in_proj.weight": (160, 40),
                      "out_proj.weight": (40, 80), "x_proj.weight": (19, 80)}
    dt = F.softplus(m.dt_proj.bias.detach())
    assert dt.min() >= 0.01 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    assert dt.max() / dt.min() > 2  # log-uniform spread, not a constant
    assert torch.equal(m.A_log.detach(), torch.log(torch.arange(1.0, 9.0)).expand(80, 8))
    assert m.A_log.dtype == torch.float32 and torch.equal(m.D.detach(), torch.ones(80))
    assert m.dt_proj.weight.abs().max() <= 3 ** -0.5
    const = lnn.Mamba(40, dt_init="constant", dt_scale=2.0)
    assert torch.allclose(const.dt_proj.weight, torch.full_like(const.dt_proj.weight, 2 * 3 ** -0.5))
    with pytest.raises(NotImplementedError, match="dt_init"):
        lnn.Mamba(40, dt_init="xavier")


def test_mamba_loads_mamba_ssm_state_dict():
    # A checkpoint as mamba-ssm writes it (key names and shapes of its Mamba), built by hand.
    torch.manual_seed(1)
    d_model, d_inner, n, r, W = 8, 16, 4, 1, 4
    sd = {"in_proj.weight": torch.randn(2 * d_inner, d_model) / 3, "conv1d.weight": torch.randn(d_inner, 1, W) / 2,
          "conv1d.bias": torch.randn(d_inner) / 4, "x_proj.weight": torch.randn(r + 2 * n, d_inner) / 4,
          "dt_proj.weight": torch.randn(d_inner, r), "dt_proj.bias": torch.randn(d_inner) - 3,
          "A_log": torch.rand(d_inner, n), "D": torch.randn(d_inner), "out_proj.weight": torch.randn(d_model, d_inner)}
    m = lnn.Mamba(d_model, d_state=n)
    m.load_state_dict(sd)  # strict: same keys, same shapes
    x = torch.randn(2, 9, d_model)
    want, _ = ref_mamba({k: v.double() for k, v in sd.items()}, x.double(), n, r)
    close(m(x), want, 1e-5)
    m2 = lnn.Mamba(d_model, d_state=n)
    m2.load_state_dict(round_trip(m))
    assert torch.equal(m2(x), m(x))


def test_mamba_decode_equals_forward():
    torch.manual_seed(2)
    m = lnn.Mamba(16, d_state=4, layer_idx=3).double()
    x = torch.randn(2, 12, 16, dtype=f64)
    with torch.no_grad():
        full = m(x)
        _, h_ref = ref_mamba(ref_params(m), x, 4, m.dt_rank)
        # prefill 5 tokens through inference_params, then the rest one by one through step()
        ip = lnn.InferenceParams(max_seqlen=12, max_batch_size=2)
        outs = [m(x[:, :5], inference_params=ip)]
        ip.seqlen_offset = 5
        for t in range(5, 12):
            outs.append(m(x[:, t : t + 1], inference_params=ip))
            ip.seqlen_offset += 1
        close(torch.cat(outs, 1), full)
        conv_state, ssm_state = ip.key_value_memory_dict[3]
        close(ssm_state, h_ref)
        xi = (x @ m.in_proj.weight.T).chunk(2, -1)[0]
        close(conv_state, xi[:, -4:].transpose(1, 2))
        # the same with step() and allocate_inference_cache, and a several-token continuation
        conv, ssm = m.allocate_inference_cache(2, 12)
        assert conv.shape == (2, 32, 4) and ssm.shape == (2, 32, 4) and ssm.dtype == f64
        steps = [m.step(x[:, t : t + 1], conv, ssm)[0] for t in range(3)]
        ip2 = lnn.InferenceParams(12, 2, seqlen_offset=3, key_value_memory_dict={3: (conv, ssm)})
        steps.append(m(x[:, 3:], inference_params=ip2))
        close(torch.cat(steps, 1), full)
        close(ssm, h_ref)
    with pytest.raises(ValueError, match="one token"):
        m.step(x[:, :2], conv, ssm)
    with pytest.raises(ValueError, match="layer_idx"):
        lnn.Mamba(16)(x[:, :1].float(), inference_params=lnn.InferenceParams(4, 2))


def test_mamba_compile_fullgraph():
    torch.manual_seed(3)
    m = lnn.Mamba(16, d_state=4)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    for L in (5, 17):
        x = torch.randn(2, L, 16)
        torch.testing.assert_close(compiled(x), m(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mamba_low_precision(dtype):
    # Error against float64 at most twice that of the same plain PyTorch module run in dtype (conftest's rule),
    # for the full forward and for decoding.
    torch.manual_seed(13)
    x = torch.randn(2, 70, 32)
    mamba = lnn.Mamba(32, d_state=8, layer_idx=0)
    p64 = ref_params(mamba)
    want = ref_mamba(p64, x.double(), 8, mamba.dt_rank)[0]
    pt = ref_mamba({k: v.detach().to(dtype) for k, v in p64.items()}, x.to(dtype), 8, mamba.dt_rank)[0]
    mamba = mamba.to(dtype)
    with torch.no_grad():
        low_precision_close(mamba(x.to(dtype)), want, pt)
    with torch.no_grad():  # bf16 / fp32 decoding keeps the SSM state in float32
        ip = lnn.InferenceParams(70, 2)
        outs = [mamba(x[:, :60].to(dtype), inference_params=ip)]
        ip.seqlen_offset = 60
        for t in range(60, 70):
            outs.append(mamba(x[:, t : t + 1].to(dtype), inference_params=ip))
            ip.seqlen_offset += 1
        assert ip.key_value_memory_dict[0][1].dtype == torch.float32
        p = ref_params(mamba)  # the dtype-rounded weights, in float64
        want = ref_mamba(p, x.double(), 8, mamba.dt_rank)[0]
        pt = ref_mamba({k: v.detach().to(dtype) for k, v in p.items()}, x.to(dtype), 8, mamba.dt_rank)[0]
        low_precision_close(torch.cat(outs, 1), want, pt)
