"""linear_scan bench: h_t = a_t h_{t-1} + b_t over (B, T, D)."""

from __future__ import annotations

import torch

import linmix
from linmix._cases import LINEAR_SCAN

from .baselines import BenchOp, Impl, linmix_impl, loop_reference, scan_torch


def configs(device: str, quick: bool) -> list[dict]:
    if device == "cuda":
        Ts = [512, 2048] if quick else [512, 1024, 2048, 4096, 8192, 16384]
        return [dict(B=8, T=T, D=1024, dtype=torch.bfloat16) for T in Ts]
    if quick:
        return [dict(B=2, T=T, D=256, dtype=torch.float32) for T in (128, 512)]
    return [dict(B=4, T=T, D=512, dtype=torch.float32) for T in (256, 1024, 4096)]


def small(cfg: dict) -> dict:
    return dict(cfg, B=2, T=min(cfg["T"], 300), D=min(cfg["D"], 256))


def impls(device: str) -> list[Impl]:
    return [
        linmix_impl("linmix", linmix.linear_scan),
        Impl("torch (doubling scan, fp32)", lambda x: scan_torch(x["a"], x["b"]).to(x["a"].dtype)),
        # its backward is quadratic in T (a full-size gradient per step)
        loop_reference(LINEAR_SCAN, cuda_limit=2048, cpu_limit=256),
    ]


def cost(cfg: dict, mode: str) -> dict:
    """fwd: read a, b, write h; 2 flops (one FMA) per element. bwd: read a, h, dh, write da, db; 4 flops."""
    n, s = cfg["B"] * cfg["T"] * cfg["D"], cfg["dtype"].itemsize
    if mode == "fwd":
        return {"bytes": 3 * n * s, "flops": 2 * n}
    return {"bytes": 8 * n * s, "flops": 6 * n}


OP = BenchOp(LINEAR_SCAN, kernels="linmix_linear_scan", shape=("B", "T", "D"), sweep="T", configs=configs,
             choices=lambda cfg: {}, small=small, impls=impls, cost=cost)
