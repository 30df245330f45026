"""Reference gated linear attention: the recurrent form, a plain time loop in float64."""

from __future__ import annotations

import torch


def gla_ref(q, k, v, g, scale=None, initial_state=None, output_final_state=False):
    """S_t = diag(exp g_t) S_{t-1} + k_t^T v_t ; o_t = scale * q_t S_t (float64, differentiable).

    q, k, g: (B, T, H, K); v: (B, T, H, V); initial_state: (B, H, K, V) or None (zeros).
    Returns (o (B, T, H, V) float64, final_state (B, H, K, V) float64 or None).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    q, k, v, g = q.double(), k.double(), v.double(), g.double()
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.double()
    out = []
    for t in range(T):
        S = g[:, t].exp().unsqueeze(-1) * S + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(out, dim=1) if out else q.new_zeros(B, 0, H, V)
    return o, (S if output_final_state else None)
