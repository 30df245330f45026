"""Minimal main job until the full suite lands: time linear_scan against its PyTorch reference."""

from __future__ import annotations

import argparse
import time

import torch

import linmix
from linmix.reference import linear_scan_ref


def _time(fn, reps: int, sync) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m linmix.bench")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="output folder (unused by this minimal job)")
    args = ap.parse_args()
    dev = args.device
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    B, T, D = (2, 256, 256) if args.quick else (8, 2048, 1024)
    a = torch.rand(B, T, D, device=dev)
    b = torch.randn(B, T, D, device=dev)
    ms = _time(lambda: linmix.linear_scan(a, b), 5, sync)
    ref_ms = _time(lambda: linear_scan_ref(a, b), 1, sync)
    err = (linmix.linear_scan(a, b).double() - linear_scan_ref(a, b)).abs().max().item()
    print(f"linmix {linmix.__version__} on {dev}: {linmix.build_info()}")
    print(f"linear_scan B={B} T={T} D={D} fp32: linmix {ms:.3f} ms, float64 reference {ref_ms:.3f} ms, "
          f"speed-up {ref_ms / ms:.1f}x, max abs err {err:.2e}")


if __name__ == "__main__":
    main()
