"""Mamba: the Mamba-1 block (Gu & Dao 2023, mamba-ssm's ``Mamba``) on linmix's selective scan."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._native import acc_dtype
from ..ops.selective_scan import selective_scan, selective_state_update
from .conv import causal_conv


def init_dt_proj(layer: str, dt_proj: nn.Linear, dt_init: str, dt_scale: float, dt_min: float, dt_max: float,
                 dt_init_floor: float) -> None:
    """Mamba's dt initialisation (Gu & Dao 2023, sec. 3.6), in place, for linmix.nn.<layer>.

    weight: uniform in ±dt_scale / sqrt(dt_rank) ("random") or that constant ("constant"); bias: softplus⁻¹
    of dt = exp(U(log dt_min, log dt_max)) floored at dt_init_floor, i.e. dt + log(1 - exp(-dt)), so that
    softplus(bias) is log-uniform in [dt_min, dt_max]. The bias is marked ``_no_reinit`` (mamba-ssm's
    marker: a model-level init must keep it).
    """
    std = dt_proj.in_features ** -0.5 * dt_scale
    if dt_init == "constant":
        nn.init.constant_(dt_proj.weight, std)
    elif dt_init == "random":
        nn.init.uniform_(dt_proj.weight, -std, std)
    else:
        raise NotImplementedError(f"linmix.nn.{layer}: dt_init must be 'random' or 'constant', got {dt_init!r}")
    with torch.no_grad():
        u = torch.rand(dt_proj.bias.shape, device=dt_proj.bias.device, dtype=torch.float32)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
        dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    dt_proj.bias._no_reinit = True


class Mamba(nn.Module):
    """The Mamba-1 block, a drop-in for ``mamba_ssm.modules.mamba_simple.Mamba``.

    Same constructor arguments, defaults, initialisation and parameter names, so state dicts load either
    way: ``in_proj`` (d_model -> 2 d_inner: x and the gate z), ``conv1d`` (depthwise causal, width d_conv),
    ``x_proj`` (d_inner -> dt_rank + 2 d_state: the low-rank dt and the input-dependent B, C),
    ``dt_proj`` (dt_rank -> d_inner, its bias initialised so softplus(bias) lies in [dt_min, dt_max]),
    ``A_log`` (d_inner, d_state; A = -exp(A_log), S4D-real init log(1..d_state)), ``D`` (d_inner,) and
    ``out_proj``. The scan is :func:`linmix.selective_scan` with D, the z gate and softplus(dt + bias).

    Args:
        d_model: model width. d_state (16): SSM state size per channel. d_conv (4): conv width.
        expand (2): d_inner = expand * d_model. dt_rank ("auto" = ceil(d_model / 16)).
        dt_min, dt_max (0.001, 0.1), dt_init ("random" | "constant"), dt_scale (1.0), dt_init_floor (1e-4):
            dt_proj's initialisation (weight uniform in ±dt_scale / sqrt(dt_rank), or that constant).
        conv_bias (True), bias (False): biases of conv1d and of in_proj / out_proj.
        use_fast_path: accepted for compatibility; linmix has one path.
        layer_idx: this layer's key in an :class:`~linmix.nn.InferenceParams` cache.
        device, dtype: factory arguments. A_log and D are float32 unless the module is cast.

    Raises:
        NotImplementedError: dt_init other than "random" or "constant".
    """

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                 dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False,
                 use_fast_path=True, layer_idx=None, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.use_fast_path, self.layer_idx = use_fast_path, layer_idx

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                bias=conv_bias, **factory)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        init_dt_proj("Mamba", self.dt_proj, dt_init, dt_scale, dt_min, dt_max, dt_init_floor)

        a = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).expand(self.d_inner, d_state)
        self.A_log = nn.Parameter(torch.log(a).contiguous())
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def _dt_b_c(self, x: torch.Tensor):
        # x: (..., d_inner) -> dt (..., d_inner) without its bias, B and C (..., d_state)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C

    def forward(self, hidden_states: torch.Tensor, inference_params=None, cu_seqlens=None) -> torch.Tensor:
        """hidden_states (B, L, d_model) -> (B, L, d_model), in the module's dtype.

        With ``inference_params`` (an :class:`~linmix.nn.InferenceParams` or mamba-ssm's), the layer's
        conv and SSM states are read from / written to its cache entry: a prefill when
        ``seqlen_offset == 0`` (states start at zero), otherwise a continuation from the cached states:
        :meth:`step` for one token, the full scan from those states for several (mamba-ssm allows one).

        cu_seqlens: packed sequences (FlashAttention's convention): hidden_states (1, L, d_model) holds N
        sequences back to back, cu_seqlens (N + 1,) int32 / int64 offsets [0, ..., L] on its device. The conv
        and the scan restart at every boundary, so each sequence's output is the layer's output on it alone;
        no host synchronisation. Not with ``inference_params`` (NotImplementedError).
        """
        batch, seqlen, _ = hidden_states.shape
        conv_state = ssm_state = None
        continuing = False
        if inference_params is not None and cu_seqlens is not None:
            raise NotImplementedError("linmix.nn.Mamba: cu_seqlens (packed sequences) with inference_params is not "
                                      "supported; decode each sequence in a batch row of its own")
        if inference_params is not None:
            conv_state, ssm_state = self._get_states_from_cache(inference_params, batch)
            continuing = inference_params.seqlen_offset > 0
            if continuing and seqlen == 1:
                return self.step(hidden_states, conv_state, ssm_state)[0]
        x, z = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)  # (B, d_inner, L) each
        x, new_conv = causal_conv(x, self.conv1d.weight, self.conv1d.bias, conv_state if continuing else None,
                                  cu_seqlens=cu_seqlens)
        dt, B, C = self._dt_b_c(x.transpose(1, 2))  # (B, L, .)
        A = -torch.exp(self.A_log.to(acc_dtype(x)))
        y, last = selective_scan(x, dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), self.D, z=z,
                                 delta_bias=self.dt_proj.bias, delta_softplus=True,
                                 initial_state=ssm_state if continuing else None, return_final_state=True,
                                 cu_seqlens=cu_seqlens)
        if inference_params is not None:
            conv_state.copy_(new_conv)
            ssm_state.copy_(last)
        return self.out_proj(y.transpose(1, 2))

    def step(self, hidden_states: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor):
        """One decoding step: hidden_states (B, 1, d_model) -> (out (B, 1, d_model), conv_state, ssm_state).

        conv_state (B, d_inner, d_conv) and ssm_state (B, d_inner, d_state) are updated in place (the SSM
        through :func:`linmix.selective_state_update`, float32 arithmetic), as mamba-ssm's ``step``.
        """
        if hidden_states.shape[1] != 1:
            raise ValueError(f"linmix.nn.Mamba.step: hidden_states must be (B, 1, d_model), one token, got "
                             f"{tuple(hidden_states.shape)}")
        x, z = self.in_proj(hidden_states.squeeze(1)).chunk(2, dim=-1)  # (B, d_inner)
        x, new_conv = causal_conv(x.unsqueeze(-1), self.conv1d.weight, self.conv1d.bias, conv_state)
        conv_state.copy_(new_conv)
        x = x.squeeze(-1)
        dt, B, C = self._dt_b_c(x)
        A = -torch.exp(self.A_log.to(acc_dtype(x)))
        y = selective_state_update(ssm_state, x, dt, A, B, C, self.D, z=z, dt_bias=self.dt_proj.bias,
                                   dt_softplus=True)
        return self.out_proj(y).unsqueeze(1), conv_state, ssm_state

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs):
        """Zero (conv_state (B, d_inner, d_conv), ssm_state (B, d_inner, d_state)) for :meth:`step`.

        conv_state takes conv1d's dtype and ssm_state float32 (float64 for a float64 module) unless
        ``dtype`` is given; mamba-ssm stores ssm_state in the weights' dtype, which rounds a bf16 state
        every step.
        """
        w = self.conv1d.weight
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=w.device, dtype=dtype or w.dtype)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=w.device,
                                dtype=dtype or acc_dtype(self.dt_proj.weight))
        return conv_state, ssm_state

    def _get_states_from_cache(self, inference_params, batch_size: int, initialize_states: bool = False):
        if self.layer_idx is None:
            raise ValueError("linmix.nn.Mamba: decoding with inference_params needs the layer's layer_idx "
                             "(its key in inference_params.key_value_memory_dict); construct it with layer_idx=")
        cache = inference_params.key_value_memory_dict
        if self.layer_idx not in cache:
            cache[self.layer_idx] = self.allocate_inference_cache(batch_size, inference_params.max_seqlen)
        conv_state, ssm_state = cache[self.layer_idx]
        if initialize_states:
            conv_state.zero_()
            ssm_state.zero_()
        return conv_state, ssm_state
