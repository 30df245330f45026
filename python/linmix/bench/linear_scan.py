"""linear_scan bench: h_t = a_t h_{t-1} + b_t over (B, T, D)."""

from __future__ import annotations

import torch

import linmix.reference as R

from .baselines import Impl, linmix_impl, scan_torch

NAME = "linear_scan"
KERNELS = "linmix_linear_scan"
SHAPE = ("B", "T", "D")
SWEEP = "T"
GRAD = ("a", "b")
CHECK_GRAD = True



def configs(device: str, quick: bool) -> list[dict]:
    if device == "cuda":
        Ts = [512, 2048] if quick else [512, 1024, 2048, 4096, 8192, 16384]
        return [dict(B=8, T=T, D=1024, dtype=torch.bfloat16) for T in Ts]
    if quick:
        return [dict(B=2, T=T, D=256, dtype=torch.float32) for T in (128, 512)]
    return [dict(B=4, T=T, D=512, dtype=torch.float32) for T in (256, 1024, 4096)]


def small(cfg: dict) -> dict:
    return dict(cfg, B=2, T=min(cfg["T"], 300), D=min(cfg["D"], 256))


def make_inputs(cfg: dict, device: str) -> dict:
    B, T, D, dt = cfg["B"], cfg["T"], cfg["D"], cfg["dtype"]
    # decays in (0.5, 1): long memory without overflow, as in a real gated recurrence
    return {"a": (0.5 + 0.5 * torch.rand(B, T, D, device=device)).to(dt), "b": torch.randn(B, T, D, device=device, dtype=dt)}


def reference(x: dict) -> torch.Tensor:
    return R.linear_scan_ref(x["a"].double(), x["b"].double())


def _ref_when(cfg: dict, device: str) -> str | None:
    limit = 2048 if device == "cuda" else 256  # its backward is quadratic in T (a full-size gradient per step)
    return f"float64 loop reference timed only at T <= {limit}" if cfg["T"] > limit else None


def impls(device: str) -> list[Impl]:
    return [
        linmix_impl("linmix", "linear_scan", lambda f, x: f(x["a"], x["b"])),
        Impl("torch (doubling scan, fp32)", lambda x: scan_torch(x["a"], x["b"]).to(x["a"].dtype)),
        Impl("torch reference (float64 loop)", lambda x: R.linear_scan_ref(x["a"], x["b"]).to(x["a"].dtype), when=_ref_when),
    ]


def tokens(cfg: dict) -> int:
    return cfg["B"] * cfg["T"]


def cost(cfg: dict, mode: str) -> dict:
    """fwd: read a, b, write h; 2 flops (one FMA) per element. bwd: read a, h, dh, write da, db; 4 flops."""
    n, s = cfg["B"] * cfg["T"] * cfg["D"], cfg["dtype"].itemsize
    if mode == "fwd":
        return {"bytes": 3 * n * s, "flops": 2 * n}
    return {"bytes": 8 * n * s, "flops": 6 * n}
