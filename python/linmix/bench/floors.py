"""Hardware rates and the floor of a row: max(bytes / bandwidth, flops / peak, special-function ops / rate).

Formulas per op live in each op module's `cost()` and are written out in bench/NOTES.md.
"""

from __future__ import annotations

import time

import torch

# H100 SXM (bench/NOTES.md, floors): device-to-device copy bandwidth as measured, dense bf16 tensor-core matmul,
# CUDA-core fp32 FMA rate (132 SMs x 128 lanes x 2 flops x 1.83 GHz) and MUFU ex2 rate (16/clk/SM x 132 x 1.83 GHz).
H100 = {
    "name": "H100 SXM (nominal)",
    "bytes_per_s": 3.0e12,
    "tc_flops_per_s": 790e12,
    "flops_per_s": 132 * 128 * 2 * 1.83e9,
    "sfu_per_s": 16 * 132 * 1.83e9,
}


def _best_rate(fn, work: float, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return work / best


def measure_cpu() -> dict:
    """This CPU, measured with torch on all its threads: copy bandwidth of a 256 MB buffer (read + write
    counted), fp32 matmul rate (1024^3, used for both flop kinds), torch.exp rate on a 1M-element buffer."""
    x = torch.ones(64 * 1024 * 1024)
    y = torch.empty_like(x)
    m = torch.randn(1024, 1024)
    e = torch.randn(1024 * 1024)
    flops = _best_rate(lambda: m @ m, 2 * 1024**3)
    return {
        "name": f"CPU measured ({torch.get_num_threads()} threads)",
        "bytes_per_s": _best_rate(lambda: y.copy_(x), 2 * x.numel() * 4),
        "tc_flops_per_s": flops,
        "flops_per_s": flops,
        "sfu_per_s": _best_rate(lambda: torch.exp(e), e.numel()),
    }


# H200 SXM: the H100's chip (same SMs, clocks and rates) with HBM3e; 4.3 TB/s is the device-to-device copy
# bandwidth measured on the H200 machines here (read + write counted).
H200 = dict(H100, name="H200 SXM (nominal)", bytes_per_s=4.3e12)


def hardware(device: str) -> dict:
    """The rates floors are computed with: the H200's on an H200, else the H100's (kept, and named, on any
    other GPU); on the CPU, measured."""
    if device != "cuda":
        return measure_cpu()
    return H200 if "H200" in torch.cuda.get_device_name() else H100


def floor_ms(cost: dict, hw: dict) -> tuple[float, str]:
    """The floor in ms and which resource sets it ('bytes', 'tc_flops', 'flops' or 'sfu')."""
    terms = {
        "bytes": cost.get("bytes", 0) / hw["bytes_per_s"],
        "tc_flops": cost.get("tc_flops", 0) / hw["tc_flops_per_s"],
        "flops": cost.get("flops", 0) / hw["flops_per_s"],
        "sfu": cost.get("sfu", 0) / hw["sfu_per_s"],
    }
    bound = max(terms, key=terms.get)
    return terms[bound] * 1e3, bound


def add(*costs: dict) -> dict:
    """Sum of cost dicts (forward + backward)."""
    out: dict = {}
    for c in costs:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out
