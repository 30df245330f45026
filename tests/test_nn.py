"""linmix.nn layers against plain float64 PyTorch versions of the same modules written here, state-dict
compatibility with the anchors' key names, and decoding that reproduces the full forward."""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import linmix.nn as lnn
from conftest import assert_rel_close, low_precision_close

f64 = torch.float64


def close(got, want, tol=1e-9, floor=1e-30):
    """conftest's max-norm relative error below tol; the float64 modules' default 1e-9."""
    assert_rel_close(got, want, tol, floor=floor)


def ref_params(module):
    """The module's parameters as float64 leaves, by state-dict name: the reference's inputs."""
    return {k: v.detach().clone().double().requires_grad_() for k, v in module.state_dict().items()}


def check_against_reference(module, x, out, ref):
    """out = module(x) against ref(params, x) in float64: the output, and the gradients of x and of every
    parameter for one random upstream gradient. ref takes the float64 parameters by state-dict name."""
    p = ref_params(module)
    xr = x.detach().clone().requires_grad_()
    want = ref(p, xr)
    close(out, want)
    dout = torch.randn_like(out)
    out.backward(dout)
    want.backward(dout)
    close(x.grad, xr.grad)
    grads = dict(module.named_parameters())
    for name, prm in p.items():
        assert grads[name].grad is not None, name
        close(grads[name].grad, prm.grad, floor=1e-6)  # floor: e.g. the gate's gradient is exactly 0 at T = 1


def ref_causal_conv(x, w, b):
    # x (B, L, D), w (D, 1, W): y_t = b + Σ_i w[:, 0, i] x_{t-W+1+i}, then silu
    W, L = w.shape[-1], x.shape[1]
    xp = F.pad(x, (0, 0, W - 1, 0))
    y = sum(w[:, 0, i] * xp[:, i : i + L] for i in range(W))
    return F.silu(y if b is None else y + b)


def round_trip(module):
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf)


# ----------------------------------------------------------------------------------------------- Mamba

def ref_mamba(p, x, d_state, dt_rank):
    """mamba-ssm's Mamba-1 block, step by step in float64. Returns out, final ssm state (B, d, n)."""
    xz = x @ p["in_proj.weight"].T + (p["in_proj.bias"] if "in_proj.bias" in p else 0)
    xi, z = xz.chunk(2, -1)  # (B, L, d)
    xc = ref_causal_conv(xi, p["conv1d.weight"], p.get("conv1d.bias"))
    dt, Bm, Cm = (xc @ p["x_proj.weight"].T).split([dt_rank, d_state, d_state], -1)
    dt = F.softplus(dt @ p["dt_proj.weight"].T + p["dt_proj.bias"])
    A = -torch.exp(p["A_log"])
    h = x.new_zeros(x.shape[0], xc.shape[-1], d_state)
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * Bm[:, t, None, :] * xc[:, t, :, None]
        ys.append(((h * Cm[:, t, None, :]).sum(-1) + p["D"] * xc[:, t]) * F.silu(z[:, t]))
    out = torch.stack(ys, 1) @ p["out_proj.weight"].T + (p["out_proj.bias"] if "out_proj.bias" in p else 0)
    return out, h


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


# ------------------------------------------------------------------------------------------------- GLA

def ref_gla(p, x, cfg, mask=None):
    """fla's GLA layer, recurrent in float64. Returns out and the final state (B, H, V, K)."""
    H, Hkv, norm = cfg["num_heads"], cfg.get("num_kv_heads") or cfg["num_heads"], cfg.get("gate_logit_normalizer", 16)
    q, k, v = (x @ p[f"{n}_proj.weight"].T for n in "qkv")
    if mask is not None:
        q, k, v = q * mask[..., None], k * mask[..., None], v * mask[..., None]
    if cfg.get("use_short_conv"):
        q, k, v = (ref_causal_conv(t, p[f"{n}_conv1d.weight"], p.get(f"{n}_conv1d.bias")) for t, n in zip((q, k, v), "qkv"))
    gk = (x @ p["gk_proj.0.weight"].T) @ p["gk_proj.1.weight"].T + p["gk_proj.1.bias"]
    Bt, T = x.shape[:2]
    K = q.shape[-1] // H
    q = q.view(Bt, T, H, K)
    k, gk = (t.view(Bt, T, Hkv, K).repeat_interleave(H // Hkv, 2) for t in (k, gk))
    v = v.view(Bt, T, Hkv, -1).repeat_interleave(H // Hkv, 2)
    g = F.logsigmoid(gk) / norm
    if cfg.get("clamp_min") is not None:
        g = g.clamp_min(cfg["clamp_min"])
    if cfg.get("feature_map") == "relu":
        q, k = F.relu(q), F.relu(k)
    if mask is not None:
        k, g = k * mask[..., None, None], g * mask[..., None, None]
    S = x.new_zeros(Bt, H, K, v.shape[-1])
    os = []
    for t in range(T):
        S = torch.exp(g[:, t])[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        os.append(K ** -0.5 * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(os, 1)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5)
    wname = [n for n in p if n.startswith("g_norm")]
    if wname:
        o = o * p[wname[0]]
    o = o.flatten(-2)
    if cfg.get("use_output_gate", True):
        gate = {"swish": F.silu, "sigmoid": torch.sigmoid}[cfg.get("gate_fn", "swish")]
        o = o * gate(x @ p["g_proj.weight"].T)
    out = o @ p["o_proj.weight"].T
    if mask is not None:
        out = out * mask[..., None]
    return out, S.transpose(-1, -2)


GLA_CASES = [
    dict(mode="chunk", hidden_size=32, num_heads=2),
    dict(mode="fused_recurrent", hidden_size=32, num_heads=2, use_short_conv=True, conv_bias=True),
    dict(mode="chunk", hidden_size=48, num_heads=4, num_kv_heads=2, expand_k=1.0, use_short_conv=True),
    dict(mode="fused_chunk", hidden_size=32, num_heads=1, gate_fn="sigmoid", clamp_min=-0.05, feature_map="relu"),
    dict(mode="chunk", hidden_size=32, num_heads=2, use_output_gate=False, elementwise_affine=False,
         gate_logit_normalizer=4),
]


def gla_keys(cfg):
    keys = {"q_proj.weight", "k_proj.weight", "v_proj.weight", "gk_proj.0.weight", "gk_proj.1.weight",
            "gk_proj.1.bias", "o_proj.weight"}
    if cfg.get("use_output_gate", True):
        keys.add("g_proj.weight")
    if cfg.get("use_short_conv"):
        keys |= {f"{n}_conv1d.weight" for n in "qkv"} | ({f"{n}_conv1d.bias" for n in "qkv"} if cfg.get("conv_bias") else set())
    if cfg.get("elementwise_affine", True):
        fused = cfg.get("gate_fn", "swish") == "swish" and cfg.get("use_output_gate", True)
        keys.add("g_norm_swish_gate.weight" if fused else "g_norm.weight")
    return keys


@pytest.mark.parametrize("cfg", GLA_CASES, ids=lambda c: c["mode"] + ("_conv" if c.get("use_short_conv") else ""))
@pytest.mark.parametrize("T", [1, 70])
def test_gla_matches_reference(cfg, T):
    torch.manual_seed(4)
    m = lnn.GatedLinearAttention(**cfg).double()
    with torch.no_grad():  # norm weights away from 1 so a missing weight shows
        for name, prm in m.named_parameters():
            if "norm" in name:
                prm.uniform_(0.5, 1.5)
    assert set(m.state_dict()) == gla_keys(cfg)
    x = torch.randn(2, T, cfg["hidden_size"], dtype=f64, requires_grad=True)
    out, attn, cache = m(x)
    assert attn is None and cache is None
    check_against_reference(m, x, out, lambda p, xr: ref_gla(p, xr, cfg)[0])


def test_gla_loads_fla_state_dict_and_round_trips():
    # A checkpoint with fla's key names and shapes (hidden 32, expand_k 0.5, 2 heads, low rank 16), by hand.
    torch.manual_seed(5)
    sd = {"q_proj.weight": torch.randn(16, 32) / 6, "k_proj.weight": torch.randn(16, 32) / 6,
          "v_proj.weight": torch.randn(32, 32) / 6, "g_proj.weight": torch.randn(32, 32) / 6,
          "gk_proj.0.weight": torch.randn(16, 32) / 6, "gk_proj.1.weight": torch.randn(16, 16) / 4,
          "gk_proj.1.bias": torch.randn(16), "o_proj.weight": torch.randn(32, 32) / 6,
          "g_norm_swish_gate.weight": torch.rand(16) + 0.5}
    cfg = dict(hidden_size=32, num_heads=2)
    m = lnn.GatedLinearAttention(**cfg)
    m.load_state_dict(sd)
    x = torch.randn(2, 9, 32)
    want, _ = ref_gla({k: v.double() for k, v in sd.items()}, x.double(), cfg)
    close(m(x)[0], want, 1e-5)
    m2 = lnn.GatedLinearAttention(**cfg)
    m2.load_state_dict(round_trip(m))
    assert torch.equal(m2(x)[0], m(x)[0])


@pytest.mark.parametrize("cfg", GLA_CASES[:3], ids=["plain", "conv", "gqa_conv"])
def test_gla_decode_equals_forward(cfg):
    torch.manual_seed(6)
    layers = [lnn.GatedLinearAttention(**cfg, layer_idx=i).double() for i in range(2)]
    x = torch.randn(2, 80, cfg["hidden_size"], dtype=f64)

    def run(x, cache=None, use_cache=False):
        for layer in layers:
            x = layer(x, past_key_values=cache, use_cache=use_cache)[0]
        return x

    with torch.no_grad():
        full = run(x)
        cache = lnn.RecurrentCache()
        outs = [run(x[:, :67], cache, True)]  # prefill past one chunk, then token by token
        outs += [run(x[:, t : t + 1], cache, True) for t in range(67, 80)]
        close(torch.cat(outs, 1), full)
        assert len(cache) == 2 and cache.get_seq_length() == 80
        _, S = ref_gla(ref_params(layers[0]), x, cfg)
        close(cache[0]["recurrent_state"], S)
        if cfg.get("use_short_conv"):
            q_in = x @ layers[0].q_proj.weight.T
            close(cache[0]["conv_state"][0], q_in[:, -4:].transpose(1, 2))
    with pytest.raises(ValueError, match="layer_idx"):
        lnn.GatedLinearAttention(**cfg)(x[:, :3], past_key_values=lnn.RecurrentCache(), use_cache=True)


def test_gla_left_padding_mask():
    torch.manual_seed(7)
    cfg = dict(hidden_size=32, num_heads=2, use_short_conv=True)
    m = lnn.GatedLinearAttention(**cfg, layer_idx=0).double()
    x = torch.randn(2, 10, 32, dtype=f64)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        cache = lnn.RecurrentCache()
        out = m(x, attention_mask=mask, past_key_values=cache, use_cache=True)[0]
        alone, S = ref_gla(ref_params(m), x[1:, 4:], cfg)
        close(out[1, 4:], alone[0])
        assert out[1, :4].abs().max() == 0
        close(cache[0]["recurrent_state"][1], S[0])
        close(out[0], m(x[:1])[0][0])
        want, _ = ref_gla(ref_params(m), x, cfg, mask.double())
        close(out, want)


def test_gla_packed_sequences():
    torch.manual_seed(12)
    cfg = dict(hidden_size=32, num_heads=2)
    m = lnn.GatedLinearAttention(**cfg).double()
    x = torch.randn(1, 11, 32, dtype=f64)
    out = m(x, cu_seqlens=torch.tensor([0, 4, 11]))[0]
    close(out[:, :4], m(x[:, :4])[0])
    close(out[:, 4:], m(x[:, 4:])[0])
    with pytest.raises(NotImplementedError, match="cu_seqlens"):
        lnn.GatedLinearAttention(**cfg, use_short_conv=True)(x, cu_seqlens=torch.tensor([0, 4, 11]))


def test_gla_unsupported_options():
    with pytest.raises(NotImplementedError, match="feature_map='hedgehog'"):
        lnn.GatedLinearAttention(hidden_size=32, feature_map="hedgehog")
    with pytest.raises(ValueError, match="mode"):
        lnn.GatedLinearAttention(hidden_size=32, mode="parallel")
    with pytest.raises(ValueError, match="divisible"):
        lnn.GatedLinearAttention(hidden_size=32, num_heads=3)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        lnn.GatedLinearAttention(hidden_size=32, num_heads=4, num_kv_heads=3)


# --------------------------------------------------------------------------------------------- FPMamba

def ref_fp_iteration(p, x, delta, y, r, d_state):
    """One FP-Mamba iteration f(y), plain float64 (notes/fp_rnn.md sec. 1.3)."""
    d = x.shape[-1]
    y_prev = F.pad(y, (0, 0, 1, -1))
    pcat = torch.cat([x, y_prev], -1)
    u = F.normalize(F.silu(pcat @ p["mixer_proj.weight"].T).view(*x.shape[:2], r, d), dim=-1)
    alpha = torch.sigmoid(pcat @ p["mixer_gate.weight"].T + p["mixer_gate.bias"])
    v = x - y
    for i in range(r):
        v = v - 2 * alpha[..., i, None] * u[..., i, :] * (u[..., i, :] * v).sum(-1, keepdim=True)
    xt = y + v
    bc = x @ p["bc_proj.weight"].T + y_prev @ p["bc_y_proj.weight"].T
    b, c = F.normalize(bc[..., :d_state], dim=-1), F.normalize(bc[..., d_state:], dim=-1)
    A = -torch.exp(p["A_log"])
    h = x.new_zeros(x.shape[0], d, d_state)
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * b[:, t, None, :] * xt[:, t, :, None]
        ys.append((h * c[:, t, None, :]).sum(-1) + p["D"] * xt[:, t])
    return F.layer_norm(torch.stack(ys, 1), (d,), p["norm.weight"], p["norm.bias"], 1e-5)


def ref_fp_mamba(p, x_in, r, d_state, dt_rank, n_iter, damping=1.0, onestep=True):
    x, z = (x_in @ p["in_proj.weight"].T).chunk(2, -1)
    x = ref_causal_conv(x, p["conv1d.weight"], p["conv1d.bias"])
    delta = F.softplus((x @ p["x_proj.weight"].T) @ p["dt_proj.weight"].T + p["dt_proj.bias"])
    y = torch.zeros_like(x)
    with torch.set_grad_enabled(not onestep):
        for _ in range(n_iter):
            y = damping * ref_fp_iteration(p, x, delta, y, r, d_state) + (1 - damping) * y
    if onestep:
        y = ref_fp_iteration(p, x, delta, y.detach(), r, d_state)
    gate = F.silu(z + F.pad(y, (0, 0, 1, -1)) @ p["z_y_proj.weight"].T)
    return (gate * y) @ p["out_proj.weight"].T


class NoHostSync(TorchDispatchMode):
    """Fails on any op that copies a tensor value to the host (.item(), bool(tensor), data-dependent shapes)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        assert func not in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default), \
            f"host synchronisation: {func}"
        return func(*args, **(kwargs or {}))


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
    with NoHostSync():
        m(x)
        mq(x)
    with pytest.raises(AssertionError, match="host"), NoHostSync():
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_low_precision(dtype):
    # Error against float64 at most twice that of the same plain PyTorch module run in dtype (conftest's rule),
    # for the full forward and for decoding.
    torch.manual_seed(13)
    x = torch.randn(2, 70, 32)
    mamba = lnn.Mamba(32, d_state=8, layer_idx=0)
    gla = lnn.GatedLinearAttention(hidden_size=32, num_heads=2, use_short_conv=True, layer_idx=0)
    cfg = dict(num_heads=2, use_short_conv=True)
    cases = [(mamba, lambda p, x: ref_mamba(p, x, 8, mamba.dt_rank)[0], lambda m, x: m(x)),
             (gla, lambda p, x: ref_gla(p, x, cfg)[0], lambda m, x: m(x)[0])]
    for module, ref, call in cases:
        p64 = ref_params(module)
        want = ref(p64, x.double())
        pt = ref({k: v.detach().to(dtype) for k, v in p64.items()}, x.to(dtype))
        module = module.to(dtype)
        with torch.no_grad():
            low_precision_close(call(module, x.to(dtype)), want, pt)
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
