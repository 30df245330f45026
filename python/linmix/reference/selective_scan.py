"""Reference selective scan (Mamba-1 S6): a plain time loop in float64."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_channel(X: torch.Tensor, d: int) -> torch.Tensor:
    """Fixed (d, n) stays; variable (b, n, L) / grouped (b, g, n, L) -> (b, d, n, L)."""
    X = X.double()
    if X.dim() == 2:
        return X
    if X.dim() == 3:
        X = X.unsqueeze(1)
    return X.repeat_interleave(d // X.shape[1], dim=1)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       initial_state=None, return_final_state=False):
    """Selective scan in float64 (differentiable); same arguments and returns as linmix.selective_scan.

    h_t = exp(δ_t A) h_{t-1} + δ_t B_t u_t, y_t = Σ_n C_t h_t + D u_t, out_t = y_t silu(z_t).
    """
    u, delta, A = u.double(), delta.double(), A.double()
    b, d, L = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    B, C = _per_channel(B, d), _per_channel(C, d)
    h = u.new_zeros((b, d, A.shape[1])) if initial_state is None else initial_state.double()
    # unbind once: indexing [..., t] per step would cost a full-size gradient buffer per step in backward
    us, deltas = u.unbind(-1), delta.unbind(-1)  # L x (b, d)
    Bs = [B] * L if B.dim() == 2 else B.unbind(-1)  # L x (d, n) or (b, d, n)
    Cs = [C] * L if C.dim() == 2 else C.unbind(-1)
    ys = []
    for t in range(L):
        dt = deltas[t][..., None]  # (b, d, 1)
        h = torch.exp(dt * A) * h + dt * Bs[t] * us[t][..., None]
        ys.append((h * Cs[t]).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros((b, d, 0))
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    return (y, h) if return_final_state else y


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                               state_batch_indices=None):
    """One decoding step in float64, the spec of linmix.selective_state_update (same arguments and layouts).

    Returns (out, new_state): out in float64 with x's shape; new_state a float64 copy of the whole state with
    the indexed rows stepped (padding rows, negative indices, untouched). Nothing is updated in place.
    Two roundings are part of the contract (mamba-ssm's selective_state_update_ref makes them): the output
    reads the new state as stored, rounded to state's dtype, and silu(z) is rounded to z's dtype.
    """
    heads = state.dim() == 4
    state_dtype, z_dtype = state.dtype, None if z is None else z.dtype
    f = lambda t: None if t is None else t.double()  # noqa: E731
    S, x, dt, A, B, C, D, z, dt_bias = (f(t) for t in (state, x, dt, A, B, C, D, z, dt_bias))
    if not heads:  # Mamba-1: channels are heads of size 1
        S, x, dt, z = S.unsqueeze(2), x.unsqueeze(-1), dt.unsqueeze(-1), None if z is None else z.unsqueeze(-1)
        A, D, dt_bias = A.unsqueeze(1), None if D is None else D[:, None], None if dt_bias is None else dt_bias[:, None]
    B, C = (t.unsqueeze(1) if t.dim() == 2 else t for t in (B, C))
    b, h = x.shape[:2]
    rows = torch.arange(b) if state_batch_indices is None else state_batch_indices.long().cpu()
    live = (rows >= 0).nonzero().squeeze(1)
    delta = dt + (0 if dt_bias is None else dt_bias)
    delta = F.softplus(delta) if dt_softplus else delta
    Bh, Ch = (t.repeat_interleave(h // t.shape[1], dim=1)[:, :, None] for t in (B, C))  # (b, h, 1, n)
    s = S[rows.clamp(min=0).to(S.device)]
    s = (torch.exp(delta[..., None] * A) * s + delta[..., None] * Bh * x[..., None]).to(state_dtype).double()
    out = (s * Ch).sum(-1) + (0 if D is None else D * x)
    out = out * F.silu(z).to(z_dtype).double() if z is not None else out
    out[(rows < 0).to(out.device)] = 0
    new = S.clone()
    new[rows[live].to(S.device)] = s[live.to(S.device)]
    return (out, new) if heads else (out.squeeze(-1), new.squeeze(2))
