"""GatedLinearAttention: the GLA layer (Yang et al. 2024, flash-linear-attention's ``fla.layers.GatedLinearAttention``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.gla import chunk_gla, fused_recurrent_gla
from .cache import RecurrentCache
from .conv import ShortConvolution
from .norm import RMSNorm

# The activation names fla's ACT2FN gives these layers that linmix implements; others raise.
_ACTIVATIONS = {
    "swish": F.silu, "silu": F.silu, "sigmoid": torch.sigmoid, "relu": F.relu, "gelu": F.gelu,
    "tanh": torch.tanh, "logsigmoid": F.logsigmoid, "elu": F.elu,
}


def _activation(arg: str, name: str | None):
    if name is None:
        return None
    if name not in _ACTIVATIONS:
        raise NotImplementedError(f"linmix.nn.GatedLinearAttention: {arg}={name!r} is not implemented; "
                                  f"supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


class GatedLinearAttention(nn.Module):
    """Gated linear attention layer, a drop-in for flash-linear-attention's ``GatedLinearAttention``.

    Same constructor arguments, defaults and parameter names (``q_proj``, ``k_proj``, ``v_proj``,
    ``g_proj``, ``gk_proj.0`` / ``gk_proj.1`` (the low-rank gate), ``o_proj``, ``g_norm_swish_gate`` or
    ``g_norm``, ``{q,k,v}_conv1d``), so state dicts load either way. Per head, with
    g_t = logsigmoid(gk_proj(x_t)) / gate_logit_normalizer (clamped below at clamp_min if given)::

        S_t = diag(exp g_t) S_{t-1} + k_tᵀ v_t,   o_t = K^-½ q_t S_t
        out = o_proj(RMSNorm(o) ⊙ gate_fn(g_proj(x)))      (RMSNorm(o) alone without the output gate)

    through :func:`linmix.chunk_gla` (mode "chunk" or "fused_chunk", which are the same math) or
    :func:`linmix.fused_recurrent_gla` (mode "fused_recurrent", and always for T <= 64, as fla does).

    Args:
        mode ("chunk"), hidden_size (1024), expand_k (0.5), expand_v (1.0), num_heads (4),
        num_kv_heads (None: num_heads; fewer share k, v and the gate across head groups),
        feature_map (None, or an activation name applied to q and k), use_short_conv (False),
        conv_size (4), conv_bias (False), use_output_gate (True), gate_fn ("swish"),
        elementwise_affine (True), norm_eps (1e-5), gate_logit_normalizer (16), gate_low_rank_dim (16),
        clamp_min (None), fuse_norm (True: names the norm ``g_norm_swish_gate`` when gate_fn is swish and
        the output gate is on, as fla; the arithmetic is the same either way), layer_idx (this layer's
        index in a :class:`~linmix.nn.RecurrentCache`).

    Raises:
        ValueError: unknown mode, key/value dims not divisible by num_heads, num_heads not a multiple of
            num_kv_heads; (forward) past_key_values on a layer without layer_idx, a mask that is not (B, T).
        NotImplementedError: a feature_map or gate_fn name outside swish/silu/sigmoid/relu/gelu/tanh/
            logsigmoid/elu.
    """

    def __init__(self, mode: str = "chunk", hidden_size: int = 1024, expand_k: float = 0.5, expand_v: float = 1.0,
                 num_heads: int = 4, num_kv_heads: int | None = None, feature_map: str | None = None,
                 use_short_conv: bool = False, conv_size: int = 4, conv_bias: bool = False,
                 use_output_gate: bool = True, gate_fn: str = "swish", elementwise_affine: bool | None = True,
                 norm_eps: float = 1e-5, gate_logit_normalizer: int = 16, gate_low_rank_dim: int = 16,
                 clamp_min: float | None = None, fuse_norm: bool = True, layer_idx: int | None = None):
        super().__init__()
        if mode not in ("chunk", "fused_recurrent", "fused_chunk"):
            raise ValueError(f"linmix.nn.GatedLinearAttention: mode must be chunk, fused_recurrent or "
                             f"fused_chunk, got {mode!r}")
        self.mode, self.hidden_size, self.expand_k, self.expand_v = mode, hidden_size, expand_k, expand_v
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads if num_kv_heads is not None else num_heads
        self.num_kv_groups = num_heads // self.num_kv_heads
        self.feature_map_fn = _activation("feature_map", feature_map)
        self.use_short_conv, self.conv_size, self.conv_bias = use_short_conv, conv_size, conv_bias
        self.use_output_gate = use_output_gate
        self.key_dim, self.value_dim = int(hidden_size * expand_k), int(hidden_size * expand_v)
        self.key_dim_per_group = self.key_dim // self.num_kv_groups
        self.value_dim_per_group = self.value_dim // self.num_kv_groups
        self.clamp_min, self.layer_idx, self.gate_logit_normalizer = clamp_min, layer_idx, gate_logit_normalizer
        if num_heads % self.num_kv_heads:
            raise ValueError(f"linmix.nn.GatedLinearAttention: num_heads={num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.key_dim % num_heads or self.value_dim % num_heads:
            raise ValueError(f"linmix.nn.GatedLinearAttention: key dim {self.key_dim} and value dim "
                             f"{self.value_dim} must be divisible by num_heads={num_heads}")
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim_per_group, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim_per_group, bias=False)
        if use_output_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        if use_short_conv:
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, conv_bias)
            self.k_conv1d = ShortConvolution(self.key_dim_per_group, conv_size, conv_bias)
            self.v_conv1d = ShortConvolution(self.value_dim_per_group, conv_size, conv_bias)
        self.gk_proj = nn.Sequential(nn.Linear(hidden_size, gate_low_rank_dim, bias=False),
                                     nn.Linear(gate_low_rank_dim, self.key_dim_per_group, bias=True))
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        self.fuse_norm_and_gate = gate_fn == "swish" and fuse_norm and use_output_gate
        if self.fuse_norm_and_gate:
            self.g_norm_swish_gate = RMSNorm(self.head_v_dim, elementwise_affine, norm_eps)
        else:
            self.g_norm = RMSNorm(self.head_v_dim, elementwise_affine, norm_eps, dtype=torch.float32)
        self.gate_fn = _activation("gate_fn", gate_fn)

    def _heads(self, t: torch.Tensor, d: int) -> torch.Tensor:
        # (B, T, h_kv * d) -> (B, T, h_kv * groups, d): each kv head serves `groups` consecutive heads
        t = t.unflatten(-1, (-1, d))
        return t.repeat_interleave(self.num_kv_groups, dim=-2) if self.num_kv_groups > 1 else t

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: RecurrentCache | None = None, use_cache: bool | None = False,
                output_attentions: bool | None = False, **kwargs):
        """hidden_states (B, T, hidden_size) -> (out (B, T, hidden_size), None, past_key_values).

        attention_mask: optional (B, T') 0/1 padding mask (1 = token), its last T columns used. Padded
            positions neither decay nor write the state and read zeros into the short convolutions, so
            left padding (generation) gives each row its unpadded result; their outputs are zero.
        past_key_values: a :class:`~linmix.nn.RecurrentCache` (or fla's ``Cache``); this layer continues from
            its entry ``past_key_values[layer_idx]`` when present, and with ``use_cache`` stores its new
            states there (recurrent state (B, H, V, K), conv windows (B, D, W)).
        cu_seqlens (keyword): packed sequences over a batch-1 input ((N + 1,) int32 / int64 offsets): the GLA op
            and the short convolutions restart at every boundary, read from the offsets on the input's device (no
            host synchronisation); the cached states are then per sequence, (N, H, V, K) and (N, D, W). A cache
            to continue from cannot carry conv windows with cu_seqlens (ValueError, as :func:`causal_conv`).
        """
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"linmix.nn.GatedLinearAttention: attention_mask must be a (batch, seq_len) 0/1 "
                             f"padding mask, got shape {tuple(attention_mask.shape)}")
        batch, q_len, _ = hidden_states.shape
        mode = "fused_recurrent" if q_len <= 64 else self.mode
        cu_seqlens = kwargs.get("cu_seqlens")
        if past_key_values is not None and self.layer_idx is None:
            raise ValueError("linmix.nn.GatedLinearAttention: past_key_values needs the layer's layer_idx (its "
                             "index in the cache); construct it with layer_idx=")
        last = None
        if past_key_values is not None and len(past_key_values) > self.layer_idx:
            last = past_key_values[self.layer_idx]
        mask = None if attention_mask is None else attention_mask[:, -q_len:].to(hidden_states.dtype).unsqueeze(-1)

        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        conv_state = None
        if self.use_short_conv:
            conv_q, conv_k, conv_v = last["conv_state"] if last is not None else (None, None, None)
            if mask is not None:
                q, k, v = q * mask, k * mask, v * mask
            (q, conv_q), (k, conv_k), (v, conv_v) = (self.q_conv1d(q, conv_q, cu_seqlens),
                                                     self.k_conv1d(k, conv_k, cu_seqlens),
                                                     self.v_conv1d(v, conv_v, cu_seqlens))
            conv_state = (conv_q, conv_k, conv_v)
        gk = self.gk_proj(hidden_states)
        q = q.unflatten(-1, (-1, self.head_k_dim))
        k, gk, v = self._heads(k, self.head_k_dim), self._heads(gk, self.head_k_dim), self._heads(v, self.head_v_dim)
        gk = F.logsigmoid(gk) / self.gate_logit_normalizer
        if self.clamp_min is not None:
            gk = torch.clamp_min(gk, self.clamp_min)
        if self.feature_map_fn is not None:
            q, k = self.feature_map_fn(q), self.feature_map_fn(k)
        if mask is not None:  # a padded token leaves the state alone: no write (k = 0), no decay (g = 0)
            k, gk = k * mask.unsqueeze(-1), gk * mask.unsqueeze(-1)

        state = last["recurrent_state"] if last is not None else None
        op = fused_recurrent_gla if mode == "fused_recurrent" else chunk_gla
        o, state = op(q, k, v, gk, initial_state=state, output_final_state=bool(use_cache), state_v_first=True,
                      cu_seqlens=cu_seqlens)
        if past_key_values is not None and use_cache:
            past_key_values.update(recurrent_state=state, conv_state=conv_state, layer_idx=self.layer_idx,
                                   offset=q_len)

        if self.use_output_gate:
            g = self.g_proj(hidden_states)
            norm = self.g_norm_swish_gate if self.fuse_norm_and_gate else self.g_norm
            o = norm(o).flatten(-2) * self.gate_fn(g)
        else:
            o = self.g_norm(o).flatten(-2)
        o = self.o_proj(o.to(hidden_states.dtype))
        if mask is not None:
            o = o * mask
        return o, None, past_key_values

