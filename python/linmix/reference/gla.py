"""Reference gated linear attention: the recurrent form (a plain time loop in float64, the specification) and the
chunked form (matmuls within a chunk, a loop over chunks for the state), the formulation chunked kernels follow."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def gla_chunked_ref(q, k, v, g, chunk: int = 64, acc_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The same o as gla_ref (scale K^-0.5, zero initial state), in the chunked form (Yang et al., "Gated Linear
    Attention Transformers with Hardware-Efficient Training", ICML 2024): within a chunk the scores are
    one matmul of gate-rescaled q and k, q_t exp(G_t) . k_s exp(-G_s) with G the gate's cumulative sum from the
    chunk start; the state S is carried across chunks by a loop, S_n = diag(exp G_last) S_{n-1} + a chunk's own
    k^T v. The rescaling is exact while a chunk's gate sum stays above about -80 in float32 (about -700 in float64):
    below that exp(-G) overflows.

    q, k, g: (B, T, H, K); v: (B, T, H, V); any float dtype, computed in acc_dtype. chunk: any length >= 1 (T is
    zero-padded to a multiple: a padded k = 0, g = 0 adds nothing). Returns o: (B, T, H, V) in q's dtype.
    Differentiable (plain PyTorch ops); the bench times it as the "torch chunked (fp32)" baseline.
    """
    dtype, (B, T, H, K), V = q.dtype, q.shape, v.shape[-1]
    if T == 0:
        return q.new_zeros(B, 0, H, V)
    pad = (-T) % chunk
    N = (T + pad) // chunk

    def blocks(t):  # (B, T, H, X) -> (B, H, N, C, X), zero-padded
        return F.pad(t.to(acc_dtype), (0, 0, 0, 0, 0, pad)).view(B, N, chunk, H, -1).permute(0, 3, 1, 2, 4)

    q, k, v, g = blocks(q) * K**-0.5, blocks(k), blocks(v), blocks(g)
    G = g.cumsum(3)  # (B, H, N, C, K) log decay from the chunk start, inclusive
    qg, kg = q * G.exp(), k * (-G).exp()
    mask = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    o = (qg @ kg.transpose(-1, -2)).masked_fill(~mask, 0) @ v  # (B, H, N, C, V)
    last = G[:, :, :, -1:]  # (B, H, N, 1, K)
    dS = (k * (last - G).exp()).transpose(-1, -2) @ v  # (B, H, N, K, V): a chunk's own contribution
    decay = last.squeeze(3).exp().unsqueeze(-1)  # (B, H, N, K, 1)
    S, states = q.new_zeros(B, H, K, V), []
    for n in range(N):
        states.append(S)
        S = decay[:, :, n] * S + dS[:, :, n]
    o = o + qg @ torch.stack(states, dim=2)  # inter-chunk part: q_t exp(G_t) S_{n-1}
    return o.permute(0, 2, 3, 1, 4).reshape(B, N * chunk, H, V)[:, :T].to(dtype)
