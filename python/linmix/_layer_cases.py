"""The layer cases: linmix.nn's public layers in the op registry's form (linmix._cases: Case, Input, Arg, make,
variants), so that the contract tests enumerate every layer and every documented constructor and forward argument
as they enumerate the ops (``LAYERS``, beside the ops' ``CASES``).

A layer case's tensor inputs are its forward's tensors and its parameters, by state-dict name under ``layer.``
(``layer.in_proj.weight``), drawn around the layer's own initialisation (built on the CPU with seed 0 from the
options: A_log, dt biases, norm weights, D, the mixer gate's bias keep their scale, and each moves by 10% of its
largest value so that a weight read wrongly shows). Its options are its constructor's and its forward's keyword
arguments. ``case.fn(**x)`` builds the layer on the meta device from the options and calls it with x's parameters
(torch.func.functional_call); its outputs, as a tuple: the output, then the states it returns or caches, then its
iteration info. ``case.reference`` is the same layer with every linmix op it calls replaced by that op's float64
reference (the op case's ``reference``): the layer composed from the op-level references. ShortConvolution and
RMSNorm, which call no linmix op, have references written out here. ``case.refuses`` lists the documented errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ._cases import CASES, Arg, Case, Input, _segments, offsets
from .nn import FixedPointRNN, FPMamba, FPMambaState, GatedLinearAttention, InferenceParams, Mamba, RecurrentCache
from .nn import RMSNorm, ShortConvolution
from .nn import fixed_point_rnn as _fixed_point_rnn_layer, fp_mamba as _fp_mamba_layer, gla as _gla_layer
from .nn import mamba as _mamba_layer
from .ops.fixed_point_rnn import FixedPointConvergenceError, FixedPointConvergenceWarning

# The linmix ops each layer module calls, by the name it calls them: the reference swaps them for their cases'
# references (tests/test_cases.py checks that no other op is reachable from linmix.nn).
LAYER_OPS = {
    _gla_layer: ("chunk_gla", "fused_recurrent_gla"),
    _mamba_layer: ("selective_scan", "selective_state_update"),
    _fp_mamba_layer: ("selective_scan",),
    _fixed_point_rnn_layer: ("fixed_point_rnn", "linear_scan"),
}


def _constructor(cls, required: dict, options: dict):
    """cls's keyword arguments: the sizes it needs, then those of `options` that are its constructor's."""
    names = inspect.signature(cls).parameters
    return {**required, **{k: v for k, v in options.items() if k in names}}


def _parameters(cls, required: dict, options: dict):
    """(the layer built on the CPU with seed 0, an Input per parameter around its initial value)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layer = cls(**_constructor(cls, required, options))

    def around(value):
        spread = 0.1 * max(value.abs().max().item() if value.numel() else 0.0, 0.1)
        return lambda g, shape, dev: value.to(dev) + spread * torch.randn(shape, generator=g, device=dev)

    return layer, {f"layer.{k}": Input(" ".join(map(str, v.shape)), around(v.detach().float()))
                   for k, v in layer.state_dict().items()}


def _layer(cls, required, call):
    """A layer case's fn: cls built on the meta device from the options in x (required(x): the sizes its
    constructor needs, read off the inputs), called by call(layer, forward, rest of x), where forward runs it
    with x's parameters; the outputs that are not None, as a tuple."""
    def fn(**x):
        kwargs = _constructor(cls, required(x), x)
        for k in kwargs:
            x.pop(k, None)
        with torch.device("meta"):
            layer = cls(**kwargs)
        params = {k: x.pop(f"layer.{k}") for k in layer.state_dict()}

        def forward(*args, **kw):
            return functional_call(layer, params, args, kw)
        return tuple(t for t in call(layer, forward, x) if t is not None)
    return fn


def _op_reference(name: str):
    """linmix.<name> in float64, from its case's reference, returning what the op returns."""
    case, signature = CASES[name], inspect.signature(CASES[name].fn)

    def op(*args, **kwargs):
        a = signature.bind(*args, **kwargs).arguments
        outs = case.reference(**a)
        if name in ("chunk_gla", "fused_recurrent_gla"):
            return outs[0], (outs[1] if a.get("output_final_state") else None)
        if name == "selective_state_update":  # the state is updated in place
            a["state"].copy_(outs[1])
        return outs[0] if len(outs) == 1 or name == "selective_state_update" else outs
    return op


@contextlib.contextmanager
def reference_ops():
    """Within: the layers call the ops' float64 references instead of the ops."""
    saved = [(module, name, getattr(module, name)) for module, names in LAYER_OPS.items() for name in names]
    try:
        for module, name, _ in saved:
            setattr(module, name, _op_reference(name))
        yield
    finally:
        for module, name, op in saved:
            setattr(module, name, op)


def _composed(fn):
    def reference(**x):
        with reference_ops():
            return fn(**x)
    return reference


def _grads(tensors: str, params: str) -> tuple[str, ...]:
    """The differentiable inputs: the forward's tensors, then every parameter the layer can have (``layer.``)."""
    return tuple(tensors.split()) + tuple(f"layer.{p}" for p in params.split())


def _left_padding(g, shape, dev):
    """An attention mask (B, T) of 1s, row 1 left-padded by 3 zeros (a generation batch)."""
    mask = torch.ones(shape, dtype=torch.long, device=dev)
    if shape[0] > 1:
        mask[1, : min(3, shape[1])] = 0
    return mask


def _packed(s, cu_seqlens):
    """Packed sequences: batch 1, N = 3 sequences (``offsets`` draws their boundaries, empty ones included)."""
    if cu_seqlens:
        s.update(B=1, N=3)
    return cu_seqlens and Input(str(s["N"] + 1), offsets(s["T"]), "index")


# ------------------------------------------------------------------------------------- GatedLinearAttention

def _gla_tensors(s, attention_mask=None, past_key_values=None, cu_seqlens=None, **options):
    """With past_key_values, a cache entry to continue from: the recurrent state (B, H, V, K) and, with
    use_short_conv, the q / k / v conv windows (B, D, W)."""
    layer, params = _parameters(GatedLinearAttention, dict(hidden_size=s["M"]), options)
    packed = _packed(s, cu_seqlens)
    rows = "N" if cu_seqlens else "B"
    windows = bool(past_key_values) and layer.use_short_conv
    state = f"{rows} {layer.num_heads} {layer.head_v_dim} {layer.head_k_dim}"
    return {
        "hidden_states": Input("B T M"),  # attention_mask "B T 1": a mask of the wrong rank (refused)
        "attention_mask": attention_mask and Input("B T 1" if attention_mask == "B T 1" else "B T", _left_padding,
                                                   "index"),
        "recurrent_state": past_key_values and Input(state, dtype="acc"),
        "conv_q": Input(f"{rows} {layer.key_dim} {layer.conv_size}") if windows else None,
        "conv_k": Input(f"{rows} {layer.key_dim_per_group} {layer.conv_size}") if windows else None,
        "conv_v": Input(f"{rows} {layer.value_dim_per_group} {layer.conv_size}") if windows else None,
        "cu_seqlens": packed, **params,
    }


def _gla_call(layer, forward, x):
    cache = None
    if "recurrent_state" in x:
        windows = tuple(x.pop(f"conv_{n}") for n in "qkv") if "conv_q" in x else None
        cache = RecurrentCache()
        cache.update(recurrent_state=x.pop("recurrent_state"), conv_state=windows, layer_idx=0, offset=5)
    out, attentions, cache = forward(x.pop("hidden_states"), past_key_values=cache, **x)
    assert attentions is None
    if cache is None or not x.get("use_cache"):
        return (out,)
    return (out, cache[0]["recurrent_state"], *(cache[0]["conv_state"] or ()))


_GLA_CONV = dict(use_short_conv=True)
_CACHE = dict(layer_idx=0, past_key_values="given")

GATED_LINEAR_ATTENTION = Case(
    # T = 65: the layer runs fused_recurrent_gla whatever its mode for T <= 64
    "GatedLinearAttention", _layer(GatedLinearAttention, lambda x: dict(hidden_size=x["hidden_states"].shape[-1]),
                                   _gla_call),
    dict(B=2, T=65, M=16), "B", "T", _gla_tensors,
    args=(
        Arg("mode", ("chunk", "fused_recurrent", "fused_chunk")), Arg("expand_k", (0.5, 1.0)),
        Arg("expand_v", (1.0, 0.5)), Arg("num_heads", (4, 2)), Arg("num_kv_heads", (None, 2)),
        Arg("feature_map", (None, "relu")), Arg("use_short_conv", (False, True)),
        Arg("conv_size", (4, 3), needs=_GLA_CONV), Arg("conv_bias", (False, True), needs=_GLA_CONV),
        Arg("use_output_gate", (True, False)), Arg("gate_fn", ("swish", "sigmoid")),
        Arg("elementwise_affine", (True, False)), Arg("norm_eps", (1e-5, 0.1)), Arg("gate_logit_normalizer", (16, 4)),
        Arg("gate_low_rank_dim", (16, 3)), Arg("clamp_min", (None, -0.05)), Arg("fuse_norm", (True, False)),
        Arg("layer_idx", (None, 0)),
        Arg("attention_mask", (None, "given"), tensor=True),
        Arg("past_key_values", (None, "given"), tensor=True, needs=dict(layer_idx=0)),
        # with the conv windows: the new cache entry holds the state and all three windows
        Arg("use_cache", (False, True), needs={**_CACHE, **_GLA_CONV}),
        Arg("output_attentions", (False, True)),  # accepted; no attention weights (None)
        Arg("cu_seqlens", (None, "given"), tensor=True),
    ),
    reference=None,
    grads=_grads("hidden_states recurrent_state conv_q conv_k conv_v",
                 "q_proj.weight k_proj.weight v_proj.weight g_proj.weight gk_proj.0.weight gk_proj.1.weight "
                 "gk_proj.1.bias o_proj.weight g_norm_swish_gate.weight g_norm.weight q_conv1d.weight q_conv1d.bias "
                 "k_conv1d.weight k_conv1d.bias v_conv1d.weight v_conv1d.bias"),
    refuses=(
        (dict(mode="parallel"), ValueError, "mode must be"),
        (dict(feature_map="hedgehog"), NotImplementedError, "feature_map='hedgehog'"),
        (dict(gate_fn="softmax"), NotImplementedError, "gate_fn='softmax'"),
        (dict(num_heads=3), ValueError, "divisible by num_heads=3"),
        (dict(num_kv_heads=3), ValueError, "multiple of num_kv_heads=3"),
        (dict(past_key_values="given"), ValueError, "needs the layer's layer_idx"),
        (dict(attention_mask="B T 1"), ValueError, r"attention_mask must be a \(batch, seq_len\)"),
        ({**_CACHE, **_GLA_CONV, "cu_seqlens": "given"}, ValueError, "cu_seqlens needs .* no state"),
    ),
)


# ------------------------------------------------------------------------------------------------- Mamba

def _mamba_tensors(s, cu_seqlens=None, inference_params=None, **options):
    """inference_params: "prefill" (seqlen_offset 0: the layer starts from zeros and fills the cache),
    "continue" (offset 5: several tokens from the cached states), "step" (offset 5, one token: Mamba.step)."""
    layer, params = _parameters(Mamba, dict(d_model=s["M"]), options)
    packed = _packed(s, cu_seqlens)
    if inference_params == "step":
        s["T"] = 1
    return {"hidden_states": Input("B T M"),
            "conv_state": inference_params and Input(f"B {layer.d_inner} {layer.d_conv}"),
            "ssm_state": inference_params and Input(f"B {layer.d_inner} {layer.d_state}", dtype="acc"),
            "cu_seqlens": packed, **params}


def _mamba_call(layer, forward, x):
    hidden, mode = x.pop("hidden_states"), x.pop("inference_params", None)
    if mode is None:
        return (forward(hidden, **x),)
    cache = InferenceParams(max_seqlen=64, max_batch_size=hidden.shape[0], seqlen_offset=0 if mode == "prefill" else 5)
    states = (x.pop("conv_state").clone(), x.pop("ssm_state").clone())  # updated in place by the layer
    cache.key_value_memory_dict[layer.layer_idx] = states
    # Continuing is decoding, without autograd: the cached states are overwritten in place after the scan read
    # them (the op's backward then refuses), and selective_state_update (step) has no backward, as mamba-ssm's.
    with torch.set_grad_enabled(mode == "prefill" and torch.is_grad_enabled()):
        return (forward(hidden, inference_params=cache, **x), *states)


MAMBA = Case(
    "Mamba", _layer(Mamba, lambda x: dict(d_model=x["hidden_states"].shape[-1]), _mamba_call),
    dict(B=2, T=7, M=8), "B", "T", _mamba_tensors,
    args=(
        Arg("d_state", (16, 3)), Arg("d_conv", (4, 2)), Arg("expand", (2, 1)), Arg("dt_rank", ("auto", 3)),
        # dt_proj's initialisation: they move the drawn dt weights and biases
        Arg("dt_min", (0.001, 0.01)), Arg("dt_max", (0.1, 0.5)), Arg("dt_init", ("random", "constant")),
        Arg("dt_scale", (1.0, 2.0)), Arg("dt_init_floor", (1e-4, 0.05)),
        Arg("conv_bias", (True, False)), Arg("bias", (False, True)), Arg("use_fast_path", (True, False)),
        Arg("layer_idx", (None, 0)),
        Arg("inference_params", (None, "prefill", "continue", "step"), needs=dict(layer_idx=0)),
        Arg("cu_seqlens", (None, "given"), tensor=True),
    ),
    reference=None,
    grads=_grads("hidden_states", "A_log D in_proj.weight in_proj.bias conv1d.weight conv1d.bias x_proj.weight "
                 "dt_proj.weight dt_proj.bias out_proj.weight out_proj.bias"),
    refuses=(
        (dict(dt_init="xavier"), NotImplementedError, "dt_init must be"),
        (dict(inference_params="prefill"), ValueError, "needs the layer's layer_idx"),
        (dict(layer_idx=0, inference_params="prefill", cu_seqlens="given"), NotImplementedError,
         "cu_seqlens .* with inference_params"),
    ),
)


# ----------------------------------------------------------------------------------------------- FPMamba

def _fp_mamba_tensors(s, state=None, cu_seqlens=None, **options):
    """state: an FPMambaState to continue from, as state_conv (B, d_inner, d_conv; none with d_conv = 0),
    state_ssm (B, d_inner, d_state) and state_y (B, d_inner)."""
    layer, params = _parameters(FPMamba, dict(d_model=s["M"]), options)
    d = layer.d_inner
    return {"hidden_states": Input("B T M"),
            "state_conv": Input(f"B {d} {layer.d_conv}") if state and layer.d_conv else None,
            "state_ssm": state and Input(f"B {d} {layer.d_state}", dtype="acc"), "state_y": state and Input(f"B {d}"),
            "cu_seqlens": _packed(s, cu_seqlens), **params}


def _fp_mamba_call(layer, forward, x):
    if "state_ssm" in x:
        x["state"] = FPMambaState(x.pop("state_conv", None), x.pop("state_ssm"), x.pop("state_y"))
    outs = forward(x.pop("hidden_states"), **x)
    flat = []
    for out in outs if isinstance(outs, tuple) else (outs,):
        flat += (list(out) if isinstance(out, FPMambaState) else [out["n_iter"], out["residual"]]
                 if isinstance(out, dict) else [out])
    return flat


FP_MAMBA = Case(
    "FPMamba", _layer(FPMamba, lambda x: dict(d_model=x["hidden_states"].shape[-1]), _fp_mamba_call),
    dict(B=2, T=7, M=4), "B", "T", _fp_mamba_tensors,  # d_inner 8: the emulated scan is the slow part
    args=(
        Arg("d_state", (16, 3)), Arg("d_conv", (4, 0)), Arg("expand", (2, 1)), Arg("dt_rank", ("auto", 2)),
        Arg("dt_min", (0.001, 0.01)), Arg("dt_max", (0.1, 0.5)), Arg("dt_init", ("random", "constant")),
        Arg("dt_scale", (1.0, 2.0)), Arg("dt_init_floor", (1e-4, 0.05)),
        Arg("conv_bias", (True, False)), Arg("bias", (False, True)), Arg("mixer_rank", (1, 2)),
        Arg("max_iter", (16, 3)), Arg("tol", (1e-3, 0.0)), Arg("damping", (1.0, 0.7)),
        Arg("stopping", ("element", "batch", "causal")), Arg("quantile", (0.75, 0.5), needs=dict(stopping="batch")),
        Arg("grad_mode", ("onestep", "implicit", "unroll")), Arg("norm_eps", (1e-5, 0.1)),
        Arg("mixer_gate_bias_init", (-4.0, -1.0)),
        Arg("state", (None, "given"), tensor=True), Arg("return_state", (False, True)),
        Arg("return_info", (False, True)), Arg("cu_seqlens", (None, "given"), tensor=True),
    ),
    reference=None,
    grads=_grads("hidden_states state_conv state_ssm state_y",
                 "A_log D in_proj.weight in_proj.bias conv1d.weight conv1d.bias x_proj.weight dt_proj.weight "
                 "dt_proj.bias bc_proj.weight bc_y_proj.weight mixer_proj.weight mixer_gate.weight mixer_gate.bias "
                 "norm.weight norm.bias z_y_proj.weight out_proj.weight out_proj.bias"),
    refuses=(
        (dict(grad_mode="exact"), ValueError, "grad_mode must be"), (dict(damping=0.0), ValueError, "damping must be"),
        (dict(stopping="token"), ValueError, "stopping must be"), (dict(quantile=1.5), ValueError, "quantile must be"),
        (dict(max_iter=0), ValueError, "max_iter must be"),
        (dict(state="given", cu_seqlens="given"), NotImplementedError, "cu_seqlens .* with state or return_state"),
        (dict(return_state=True, cu_seqlens="given"), NotImplementedError, "cu_seqlens .* with state or return_state"),
    ),
)


# ----------------------------------------------------------------------------------------- FixedPointRNN

def _fixed_point_rnn_tensors(s, state=None, **options):
    layer, params = _parameters(FixedPointRNN, dict(d_model=s["M"]), options)
    return {"x": Input("B T M"), "state": state and Input(f"B {layer.d_inner}"), **params}


def _fixed_point_rnn_call(layer, forward, x):
    outs = forward(x.pop("x"), **x)
    return (outs if isinstance(outs, tuple) else (outs,)) + (layer.last_info or ())


FIXED_POINT_RNN_LAYER = Case(
    "FixedPointRNN", _layer(FixedPointRNN, lambda x: dict(d_model=x["x"].shape[-1]), _fixed_point_rnn_call),
    dict(B=2, T=7, M=8), "B", "T", _fixed_point_rnn_tensors,
    args=(
        Arg("d_inner", (None, 6)), Arg("rank", (1, 2)), Arg("mixer", ("householder", "none")),
        Arg("max_iter", (32, 4)), Arg("tol", (1e-4, 0.0)), Arg("grad_mode", ("onestep", "implicit")),
        Arg("damping", (1.0, 0.7)), Arg("stopping", ("element", "batch", "causal")),
        Arg("quantile", (0.9, 0.5), needs=dict(stopping="batch")),
        Arg("on_nonconvergence", ("warn", "ignore", "raise")), Arg("contractive", (False, True)),
        # the layer's own loop around linear_scan; grad_mode may then also be "unroll"
        Arg("state_dependent", (False, True)), Arg("bias", (True, False)),
        Arg("state", (None, "given"), tensor=True), Arg("return_state", (False, True)),
    ),
    reference=None,
    grads=_grads("x state", "in_proj.weight in_proj.bias b_proj.weight b_proj.bias lam_proj.weight lam_proj.bias "
                 "mixer_proj.weight mixer_proj.bias beta_proj.weight beta_proj.bias out_proj.weight out_proj.bias"),
    refuses=(
        (dict(mixer="dense"), ValueError, "mixer must be"),
        (dict(state_dependent=True, mixer="none"), ValueError, "state_dependent=True needs mixer='householder'"),
        (dict(grad_mode="unroll"), ValueError, "grad_mode must be"), (dict(stopping="token"), ValueError, "stopping"),
        (dict(rank=17), ValueError, "rank must be"),
        # one iteration does not meet tol = 1e-4: on_nonconvergence's warning (the default) and error
        (dict(max_iter=1), FixedPointConvergenceWarning, "did not converge within max_iter=1"),
        (dict(max_iter=1, on_nonconvergence="raise"), FixedPointConvergenceError, "did not converge within max_iter=1"),
    ),
)


# ---------------------------------------------------------------------------------------- ShortConvolution

def _short_conv_tensors(s, cache=None, cu_seqlens=None, **options):
    layer, params = _parameters(ShortConvolution, dict(hidden_size=s["D"], kernel_size=4), options)
    return {"x": Input("B T D"), "cache": cache and Input(f"B D {layer.kernel_size[0]}"),
            "cu_seqlens": _packed(s, cu_seqlens), **params}


def _short_conv_reference(x, cache=None, cu_seqlens=None, kernel_size=4, bias=False, activation="silu", **params):
    """y_t = act(b + Σ_i w_i x_{t-W+1+i}) per sequence, x before its start from the cache (zeros); the new cache:
    each sequence's last W inputs."""
    w, b, W = params["layer.weight"], params.get("layer.bias"), kernel_size
    prev = x.new_zeros(x.shape[0], W, x.shape[2]) if cache is None else cache.transpose(1, 2)  # (B, W, D)
    ys, states = [], []
    for s, e in _segments(cu_seqlens, x.shape[1]):
        full = torch.cat([prev, x[:, s:e]], 1)  # (B, W + L, D)
        y = sum(w[:, 0, i] * full[:, 1 + i : 1 + i + e - s] for i in range(W)) + (0 if b is None else b)
        ys.append(y if activation is None else F.silu(y))
        states.append(full[:, full.shape[1] - W :].transpose(1, 2))
    return torch.cat(ys, 1), torch.cat(states, 0)


SHORT_CONVOLUTION = Case(
    "ShortConvolution", _layer(ShortConvolution, lambda x: dict(hidden_size=x["x"].shape[-1], kernel_size=4),
                               lambda layer, forward, x: forward(x.pop("x"), **x)),
    dict(B=2, T=7, D=5), "B", "T", _short_conv_tensors,
    args=(Arg("kernel_size", (4, 2)), Arg("bias", (False, True)), Arg("activation", ("silu", None, "swish")),
          Arg("cache", (None, "given"), tensor=True), Arg("cu_seqlens", (None, "given"), tensor=True)),
    reference=_short_conv_reference,
    grads=_grads("x cache", "weight bias"),
    refuses=(
        (dict(activation="relu"), NotImplementedError, "activation 'relu'"),
        (dict(cache="given", cu_seqlens="given"), ValueError, "cu_seqlens needs .* no state"),
    ),
)


# ------------------------------------------------------------------------------------------------- RMSNorm

def _rms_norm_tensors(s, **options):
    return {"x": Input("B T D"), **_parameters(RMSNorm, dict(hidden_size=s["D"]), options)[1]}


def _rms_norm_reference(x, elementwise_affine=True, eps=1e-5, **params):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (y * params["layer.weight"] if elementwise_affine else y,)


RMS_NORM = Case(
    "RMSNorm", _layer(RMSNorm, lambda x: dict(hidden_size=x["x"].shape[-1]),
                      lambda layer, forward, x: (forward(x.pop("x")),)),
    dict(B=2, T=7, D=5), "B", "T", _rms_norm_tensors,
    args=(Arg("elementwise_affine", (True, False)), Arg("eps", (1e-5, 0.1))),
    reference=_rms_norm_reference, grads=_grads("x", "weight"),
)


# The arguments no variant changes, and why (tests/test_cases.py checks that every other constructor and forward
# argument of each layer is one of its case's Args).
NOT_VARIED = {
    "GatedLinearAttention": {"hidden_size": "a size (M)"},
    "Mamba": {"d_model": "a size (M)", "device": "a factory argument: the case supplies the parameters",
              "dtype": "a factory argument: the case supplies the parameters"},
    "FPMamba": {"d_model": "a size (M)", "device": "a factory argument", "dtype": "a factory argument"},
    "FixedPointRNN": {"d_model": "a size (M)", "device": "a factory argument", "dtype": "a factory argument"},
    "ShortConvolution": {"hidden_size": "a size (D)"},
    "RMSNorm": {"hidden_size": "a size (D)", "dtype": "a factory argument"},
}

LAYERS = {c.name: c for c in (GATED_LINEAR_ATTENTION, MAMBA, FP_MAMBA, FIXED_POINT_RNN_LAYER, SHORT_CONVOLUTION,
                              RMS_NORM)}
LAYERS.update({name: dataclasses.replace(c, reference=_composed(c.fn)) for name, c in LAYERS.items()
               if c.reference is None})
