"""The depthwise causal short convolution that Mamba and GLA put before their mixers, with a rolling state: the
function the layers call, and flash-linear-attention's ``ShortConvolution`` module on it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None,
                silu: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """y_t = act(bias + Σ_i weight[:, 0, i] x_{t - W + 1 + i}) per channel, x_{<0} from ``state``.

    x: (B, D, L); weight: (D, 1, W) (nn.Conv1d's depthwise layout); state: (B, D, W), the last W inputs seen
    (causal-conv1d's convention: its first column is dropped), or None for zeros. Returns y (B, D, L) and
    the new state (B, D, W): the last W inputs of [state, x].
    """
    W = weight.shape[-1]
    prev = x.new_zeros(x.shape[0], x.shape[1], W) if state is None else state.to(x.dtype)
    full = torch.cat([prev, x], dim=-1)  # (B, D, W + L)
    y = F.conv1d(full[..., 1:], weight, bias, groups=x.shape[1])  # (B, D, L)
    return (F.silu(y) if silu else y), full[..., -W:]


class ShortConvolution(nn.Conv1d):
    """Depthwise causal conv with SiLU over (B, T, D) input; weight (D, 1, W) as fla's ``ShortConvolution``."""

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False, activation: str | None = "silu"):
        super().__init__(hidden_size, hidden_size, kernel_size, groups=hidden_size, padding=kernel_size - 1,
                         bias=bias)
        if activation not in (None, "silu", "swish"):
            raise NotImplementedError(f"linmix.nn.ShortConvolution: activation {activation!r}; only silu/swish")
        self.activation = activation

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None):
        """x (B, T, D), cache (B, D, W) or None -> (y (B, T, D), new cache (B, D, W): the last W inputs)."""
        y, state = causal_conv(x.transpose(1, 2), self.weight, self.bias, cache, silu=self.activation is not None)
        return y.transpose(1, 2), state
