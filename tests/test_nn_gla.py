"""linmix.nn.GatedLinearAttention against a plain float64 GLA layer (flash-linear-attention's), its state-dict keys,
decoding that reproduces the full forward, padding masks, packed sequences, and low precision."""

import pytest
import torch

import linmix.nn as lnn
from conftest import HostReads, low_precision_close
from nn_reference import check_against_reference, close, f64, ref_gla, ref_params, round_trip


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


@pytest.mark.parametrize("mode", ["chunk", "fused_recurrent"])
@pytest.mark.parametrize("short_conv", [False, True])
def test_gla_packed_sequences(mode, short_conv):
    # packed == each sequence on its own (outputs and every gradient), the short convolutions restarting at every
    # boundary; lengths: an empty and a length-1 sequence, one shorter than the conv window, one past a chunk
    torch.manual_seed(12)
    cfg = dict(hidden_size=32, num_heads=2)
    m = lnn.GatedLinearAttention(**cfg, mode=mode, use_short_conv=short_conv).double()
    lens = [4, 0, 1, 2, 70]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    x = torch.randn(1, sum(lens), 32, dtype=f64, requires_grad=True)
    w = torch.randn(1, sum(lens), 32, dtype=f64)
    with HostReads(strict=True):
        out = m(x, cu_seqlens=cu)[0]
        got = torch.autograd.grad((out * w).sum(), [x, *m.parameters()])
    parts = [m(x[:, a:b])[0] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()) if b > a]
    want_out = torch.cat(parts, 1)
    want = torch.autograd.grad((want_out * w).sum(), [x, *m.parameters()])
    close(out, want_out)
    for a, b in zip(got, want, strict=True):
        close(a, b)


def test_gla_unsupported_options():
    with pytest.raises(NotImplementedError, match="feature_map='hedgehog'"):
        lnn.GatedLinearAttention(hidden_size=32, feature_map="hedgehog")
    with pytest.raises(ValueError, match="mode"):
        lnn.GatedLinearAttention(hidden_size=32, mode="parallel")
    with pytest.raises(ValueError, match="divisible"):
        lnn.GatedLinearAttention(hidden_size=32, num_heads=3)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        lnn.GatedLinearAttention(hidden_size=32, num_heads=4, num_kv_heads=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gla_low_precision(dtype):
    # Error against float64 at most twice that of the same plain PyTorch module run in dtype (conftest's rule).
    torch.manual_seed(13)
    x = torch.randn(2, 70, 32)
    gla = lnn.GatedLinearAttention(hidden_size=32, num_heads=2, use_short_conv=True, layer_idx=0)
    cfg = dict(num_heads=2, use_short_conv=True)
    p64 = ref_params(gla)
    want = ref_gla(p64, x.double(), cfg)[0]
    pt = ref_gla({k: v.detach().to(dtype) for k, v in p64.items()}, x.to(dtype), cfg)[0]
    gla = gla.to(dtype)
    with torch.no_grad():
        low_precision_close(gla(x.to(dtype))[0], want, pt)
