"""selective_scan bench: Mamba-1 S6 at mamba's usage (variable B and C, D, z, delta_bias, softplus), against
mamba-ssm's CUDA kernel and PyTorch."""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

import linmix
from linmix._cases import SELECTIVE_SCAN

from .baselines import BenchOp, Impl, linmix_impl, loop_reference, optional, scan_torch

ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")  # mamba-ssm's positional order


def configs(device: str, quick: bool) -> list[dict]:
    if device == "cuda":
        Ls = [512, 2048] if quick else [512, 1024, 2048, 4096, 8192, 16384]
        return [dict(b=8, d=5120, n=16, L=L, dtype=torch.bfloat16) for L in Ls]
    Ls = [128, 512] if quick else [256, 1024, 2048]
    return [dict(b=2, d=64, n=16, L=L, dtype=torch.float32) for L in Ls]


def small(cfg: dict) -> dict:
    return dict(cfg, b=2, d=min(cfg["d"], 24), L=min(cfg["L"], 200))


def sscan_torch(u, delta, A, B, C, D, z, delta_bias) -> torch.Tensor:
    """fp32 PyTorch: materialises (b, d, n, L) and scans it with the doubling scan."""
    dt = F.softplus(delta.float() + delta_bias[:, None])  # (b, d, L)
    dA = torch.exp(dt[:, :, None] * A[None, :, :, None])  # (b, d, n, L)
    dBu = (dt * u.float())[:, :, None] * B.float()[:, None]  # (b, d, n, L)
    h = scan_torch(dA, dBu, dim=-1)
    y = torch.einsum("bdnl,bnl->bdl", h, C.float()) + D[:, None] * u.float()
    return (y * F.silu(z.float())).to(u.dtype)


def _torch_when(cfg: dict, device: str) -> str | None:
    # autograd keeps two (b, d, n, L) fp32 tensors per doubling step
    gb = cfg["b"] * cfg["d"] * cfg["n"] * cfg["L"] * 4 * (2 * math.ceil(math.log2(cfg["L"])) + 6) / 1e9
    return f"would hold about {gb:.0f} GB of (b, d, n, L) tensors" if gb > 40 else None


def _deterministic_when(cfg: dict, device: str) -> str | None:
    if device != "cuda":
        return "the CPU backward is deterministic already (the linmix row)"
    if os.environ.get("LINMIX_UNVERIFIED_KERNELS") != "1":
        return "the deterministic CUDA backward is unverified: runs with LINMIX_UNVERIFIED_KERNELS=1"
    return None


def impls(device: str) -> list[Impl]:
    mamba, why = optional("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")
    if mamba is not None and device != "cuda":
        why = "mamba-ssm's selective_scan_fn is CUDA only"
    return [
        linmix_impl("linmix", linmix.selective_scan),
        linmix_impl("linmix deterministic", linmix.selective_scan, dict(deterministic=True), when=_deterministic_when),
        Impl("mamba-ssm", lambda x: mamba(*(x[n] for n in ARGS), delta_softplus=True)) if why is None else Impl("mamba-ssm", skip=why),
        Impl("torch (doubling scan, fp32)", lambda x: sscan_torch(*(x[n] for n in ARGS)), when=_torch_when),
        loop_reference(SELECTIVE_SCAN, cuda_limit=1024, cpu_limit=512),
    ]


def cost(cfg: dict, mode: str) -> dict:
    """fwd: read u, delta, z (b d L each), B, C (b n L each), A, D, delta_bias (fp32); write out (b d L).
    Per (b, d, L, n): exp(delta A) on the MUFU and about 6 flops (delta A, dBu, h update, C h); per (b, d, L):
    softplus and silu (4 MUFU ops: ex2, lg2, ex2, rcp) and about 10 flops. bwd: read the forward inputs and dout,
    write du, ddelta, dz, dB, dC, dA, dD, ddelta_bias; exp(delta A) recomputed; about 14 flops per state element."""
    b, d, n, L, s = cfg["b"], cfg["d"], cfg["n"], cfg["L"], cfg["dtype"].itemsize
    bdL, bnL, par = b * d * L, b * n * L, (d * n + 2 * d) * 4
    fwd = {"bytes": 4 * bdL * s + 2 * bnL * s + par, "flops": bdL * (6 * n + 10), "sfu": bdL * (n + 4)}
    if mode == "fwd":
        return fwd
    bwd = {"bytes": 7 * bdL * s + 4 * bnL * s + 2 * par, "flops": bdL * (14 * n + 20), "sfu": bdL * (n + 4)}
    return {k: fwd[k] + bwd[k] for k in fwd}


# mamba's usage: variable B and C, D, the z gate, delta_bias and softplus
OP = BenchOp(SELECTIVE_SCAN, kernels="linmix_selective_scan", shape=("b", "d", "n", "L"), sweep="L", configs=configs,
             choices=lambda cfg: dict(D="given", z="given", delta_bias="given", delta_softplus=True), small=small,
             impls=impls, cost=cost)
