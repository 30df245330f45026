"""selective_state_update bench: one decoding step (batch 1..256), Mamba-1 layout (state (b, d, n)) and Mamba-2
heads layout (state (b, h, 64, n), A/dt/D/dt_bias tied per head), against the plain PyTorch step and
mamba-ssm's Triton kernel. The step updates the state in place, so every timed call advances it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import linmix
from linmix._cases import SELECTIVE_STATE_UPDATE

from .baselines import BenchOp, Impl, linmix_impl, optional

ARGS = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")  # mamba-ssm's positional order
HEADDIM = 64  # Mamba-2's head dim


def configs(device: str, quick: bool) -> list[dict]:
    """The decode table. CPU: fp32 throughout. CUDA: bf16 activations, fp32 state and parameters (mamba's
    serving setup). Only the Mamba-1 rows at the largest d form the plotted batch sweep."""
    if quick:
        bs, ds = [1, 16], [1024]
    else:
        bs, ds = ([1, 16, 64, 256], [2048, 5120]) if device == "cuda" else ([1, 16, 256], [1024, 5120])
    dtype, sdt = (torch.bfloat16, torch.float32) if device == "cuda" else (torch.float32, torch.float32)
    return [dict(layout=layout, b=b, d=d, n=16, p=HEADDIM, dtype=dtype, state_dtype=sdt,
                 in_sweep=layout == "m1" and d == ds[-1])
            for layout in ("m1", "m2") for d in ds for b in bs]


def small(cfg: dict) -> dict:
    return dict(cfg, b=min(cfg["b"], 3), d=min(cfg["d"], 4 * HEADDIM))


def step_torch(state, x, dt, A, B, C, D, z, dt_bias) -> torch.Tensor:
    """The plain PyTorch step in fp32 (heads layout; Mamba-1 as heads of size 1), state updated in place."""
    heads = state.dim() == 4
    if not heads:
        x, dt, z, A, D, dt_bias = x[..., None], dt[..., None], z[..., None], A[:, None], D[:, None], dt_bias[:, None]
        B, C = B[:, None], C[:, None]
    delta = F.softplus(dt.float() + dt_bias)[..., None]  # (b, h, p, 1)
    s = state if heads else state[:, :, None]
    new = s * torch.exp(delta * A) + delta * x.float()[..., None] * B.float()[:, :, None]
    s.copy_(new)
    y = (new @ C.float()[:, :, :, None]).squeeze(-1) + D * x.float()
    out = (y * F.silu(z.float())).to(x.dtype)
    return out if heads else out.squeeze(-1)


def impls(device: str) -> list[Impl]:
    mamba, why = optional("mamba_ssm.ops.triton.selective_state_update", "selective_state_update")
    if mamba is not None and device != "cuda":
        why = "mamba-ssm's selective_state_update is a Triton (CUDA) kernel"
    fwd = ("fwd",)
    return [
        linmix_impl("linmix", linmix.selective_state_update, modes=fwd),
        Impl("mamba-ssm (Triton)", lambda x: mamba(*(x[k] for k in ARGS), dt_softplus=True), modes=fwd)
        if why is None else Impl("mamba-ssm (Triton)", skip=why),
        Impl("torch step (fp32)", lambda x: step_torch(*(x[k] for k in ARGS)), modes=fwd),
    ]


def cost(cfg: dict, mode: str) -> dict:
    """The byte floor: the state read once and written once, (b, d, n) elements; x, dt, z read and out
    written, (b, d) each; B, C (b, n) read; A (d, n) fp32 in the Mamba-1 layout (tied per head in Mamba-2's,
    negligible), D and dt_bias (d,) fp32. Per state element one exp (Mamba-1; one per row when tied) and
    about 5 flops (δA, δBx, the update, C·s); per row softplus and silu (4 MUFU ops) and about 10 flops."""
    b, d, n, s, ss = cfg["b"], cfg["d"], cfg["n"], cfg["dtype"].itemsize, cfg["state_dtype"].itemsize
    tied = cfg["layout"] == "m2"
    params = (0 if tied else d * n * 4) + 2 * d * 4
    byts = 2 * b * d * n * ss + 4 * b * d * s + 2 * b * n * s + params
    return {"bytes": byts, "flops": b * d * (5 * n + 10), "sfu": b * d * ((0 if tied else n) + 4)}


def _choices(cfg: dict) -> dict:
    """Mamba-1's layout (m1) or Mamba-2's heads of HEADDIM (m2, A, dt, D and dt_bias tied per head), with D, the
    z gate, dt_bias and softplus: mamba's decoding step. The state is float32 whatever the activations."""
    return dict(state="mamba1" if cfg["layout"] == "m1" else "heads", D="given", z="given", dt_bias="given",
                dt_softplus=True)


OP = BenchOp(SELECTIVE_STATE_UPDATE, kernels="linmix_selective_state_update", shape=("layout", "b", "d", "n"),
             sweep="b", configs=configs, choices=_choices, small=small, impls=impls, cost=cost, check_grad=False)
