"""Decoding caches for linmix.nn layers, duck-type compatible with mamba-ssm's and flash-linear-attention's.

Neither anchor package is imported: these are small objects of our own with the same fields and methods
the layers read, so a cache of the anchor's type works too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class InferenceParams:
    """Per-generation state for :class:`linmix.nn.Mamba` (the fields of mamba-ssm's ``InferenceParams``).

    ``key_value_memory_dict[layer_idx]`` holds that layer's ``(conv_state, ssm_state)``: (b, d_inner, d_conv)
    and (b, d_inner, d_state). A layer called with ``seqlen_offset == 0`` starts from zero states (a prefill);
    with ``seqlen_offset > 0`` it continues from the cached states, which it updates in place. The caller
    advances ``seqlen_offset`` by the number of tokens consumed, as in mamba-ssm's generation loop.
    """

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict = field(default_factory=dict)
    lengths_per_sample: torch.Tensor | None = None

    def reset(self, max_seqlen: int, max_batch_size: int) -> None:
        self.max_seqlen, self.max_batch_size, self.seqlen_offset = max_seqlen, max_batch_size, 0
        if self.lengths_per_sample is not None:
            self.lengths_per_sample.zero_()


class RecurrentCache:
    """``past_key_values`` for :class:`linmix.nn.GatedLinearAttention` (the role of fla's ``Cache``).

    One dict per layer index with keys ``recurrent_state`` ((B, H, V, K), fla's value-first layout),
    ``conv_state`` (a (q, k, v) tuple of (B, D, W) short-convolution windows, or None), ``attn_state``
    and ``ffn_state`` (unused here, kept for the shape of fla's entries). ``cache[i]`` reads layer i,
    ``len(cache)`` is the number of layers seen, ``get_seq_length()`` the tokens consumed.
    """

    def __init__(self) -> None:
        self.states: list[dict] = []
        self._seen_tokens = 0

    def __getitem__(self, layer_idx: int) -> dict:
        return self.states[layer_idx]

    def __len__(self) -> int:
        return len(self.states)

    def update(self, recurrent_state=None, attn_state=None, conv_state=None, ffn_state=None, layer_idx: int = 0,
               offset: int = 1, **kwargs) -> dict:
        """Store layer ``layer_idx``'s new states; the first layer's call advances the token count by offset."""
        if layer_idx == 0:
            self._seen_tokens += offset
        entry = dict(recurrent_state=recurrent_state, attn_state=attn_state, conv_state=conv_state,
                     ffn_state=ffn_state)
        if layer_idx < len(self.states):
            self.states[layer_idx] = entry
        elif layer_idx == len(self.states):
            self.states.append(entry)
        else:
            raise ValueError(f"linmix.nn.RecurrentCache.update: layer_idx {layer_idx} skips layers; "
                             f"{len(self.states)} layer(s) are cached, so the next must be {len(self.states)}")
        return entry

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._seen_tokens if layer_idx < len(self.states) else 0
