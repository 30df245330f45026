"""The depthwise causal short convolution that Mamba and GLA put before their mixers, with a rolling state: the
function the layers call, and flash-linear-attention's ``ShortConvolution`` module on it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None,
                silu: bool = True, cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y_t = act(bias + Σ_i weight[:, 0, i] x_{t - W + 1 + i}) per channel, x_{<0} from ``state``.

    x: (B, D, L); weight: (D, 1, W) (nn.Conv1d's depthwise layout); state: (B, D, W), the last W inputs seen
    (causal-conv1d's convention: its first column is dropped), or None for zeros. Returns y (B, D, L) and
    the new state (B, D, W): the last W inputs of [state, x].

    cu_seqlens: packed sequences (FlashAttention's convention) over a batch-1 x, (N + 1,) int32 / int64 offsets:
    each sequence sees zeros before its first step (``state`` must then be None), and the returned state is
    (N, D, W), each sequence's last W inputs (zeros before its start). No host synchronisation: the masks come
    from the offsets on x's device. Raises ValueError for a batch other than 1 or a state with cu_seqlens.
    """
    W = weight.shape[-1]
    if cu_seqlens is not None:
        return _causal_conv_packed(x, weight, bias, state, silu, cu_seqlens)
    prev = x.new_zeros(x.shape[0], x.shape[1], W) if state is None else state.to(x.dtype)
    full = torch.cat([prev, x], dim=-1)  # (B, D, W + L)
    y = F.conv1d(full[..., 1:], weight, bias, groups=x.shape[1])  # (B, D, L)
    return (F.silu(y) if silu else y), full[..., -W:]


def _causal_conv_packed(x, weight, bias, state, silu, cu_seqlens):
    if x.shape[0] != 1 or state is not None:
        raise ValueError("linmix.nn.ShortConvolution: cu_seqlens needs a batch-1 (packed) x and no state, got batch "
                         f"{x.shape[0]}" + (" and a state" if state is not None else ""))
    W, L = weight.shape[-1], x.shape[-1]
    cu = cu_seqlens.to(device=x.device, dtype=torch.long)
    t = torch.arange(L, device=x.device)
    # position of each step inside its sequence: steps before a boundary are masked out of the taps after it
    pos = t - cu[torch.searchsorted(cu[1:], t, right=True).clamp(max=cu.numel() - 1)]
    y = x * weight[:, 0, W - 1, None] if bias is None else x * weight[:, 0, W - 1, None] + bias[:, None]
    for lag in range(1, W):  # tap W - 1 - lag reads x_{t - lag}, from the same sequence only
        shifted = F.pad(x, (lag, 0))[..., :L]
        y = y + shifted * weight[:, 0, W - 1 - lag, None] * (pos >= lag).to(x.dtype)
    # each sequence's last W inputs: packed steps end - W .. end - 1 that are not before its start
    idx = cu[1:, None] - W + torch.arange(W, device=x.device)  # (N, W)
    valid = (idx >= cu[:-1, None]).to(x.dtype)
    window = x[0][:, idx.clamp(0, max(L - 1, 0))] if L else x.new_zeros(x.shape[1], *idx.shape)  # (D, N, W)
    return (F.silu(y) if silu else y), (window * valid).transpose(0, 1)


class ShortConvolution(nn.Conv1d):
    """Depthwise causal conv with SiLU over (B, T, D) input; weight (D, 1, W) as fla's ``ShortConvolution``."""

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False, activation: str | None = "silu"):
        super().__init__(hidden_size, hidden_size, kernel_size, groups=hidden_size, padding=kernel_size - 1,
                         bias=bias)
        if activation not in (None, "silu", "swish"):
            raise NotImplementedError(f"linmix.nn.ShortConvolution: activation {activation!r}; only silu/swish")
        self.activation = activation

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None):
        """x (B, T, D), cache (B, D, W) or None -> (y (B, T, D), new cache (B, D, W): the last W inputs).
        cu_seqlens: packed sequences over a batch-1 x, each convolved on its own (:func:`causal_conv`); the new
        cache is then (N, D, W)."""
        y, state = causal_conv(x.transpose(1, 2), self.weight, self.bias, cache, silu=self.activation is not None,
                               cu_seqlens=cu_seqlens)
        return y.transpose(1, 2), state
