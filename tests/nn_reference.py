"""Plain float64 PyTorch versions of linmix.nn's layers, written out from the anchors' definitions, and the
helpers the layer tests (test_nn_*.py) compare against them with."""

import io

import torch
import torch.nn.functional as F

from conftest import assert_rel_close

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


def ref_fp_iteration(p, x, delta, y, r, d_state):
    """One FP-Mamba iteration f(y), plain float64 (the iteration of linmix.nn.FPMamba's docstring)."""
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
