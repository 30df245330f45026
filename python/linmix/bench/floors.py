"""Hardware rates and the floor of a row: max(bytes / bandwidth, flops / peak, special-function ops / rate).

Formulas per op live in each op module's `cost()` and are written out in bench/NOTES.md.
"""

from __future__ import annotations

import torch

from .timing import CLOCKS

# H100 SXM (bench/NOTES.md, floors): device-to-device copy bandwidth as measured, dense bf16 tensor-core matmul,
# CUDA-core fp32 FMA rate (132 SMs x 128 lanes x 2 flops x 1.83 GHz) and MUFU ex2 rate (16/clk/SM x 132 x 1.83 GHz).
H100 = {
    "name": "H100 SXM (nominal)",
    "bytes_per_s": 3.0e12,
    "tc_flops_per_s": 790e12,
    "flops_per_s": 132 * 128 * 2 * 1.83e9,
    "sfu_per_s": 16 * 132 * 1.83e9,
}


def _best_rate(fn, work: float, clock: str, reps: int = 5) -> float:
    now = CLOCKS[clock]
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = now()
        fn()
        best = min(best, now() - t0)
    return work / best


def measure_cpu(clock: str = "wall") -> dict:
    """This CPU, measured with torch on all its threads and the rows' clock (timing.CLOCKS): copy bandwidth of a
    256 MB buffer (read + write counted), fp32 matmul rate (1024^3, used for both flop kinds), bf16 matmul rate
    (1024^3, fp32 accumulation: the GEMM term of bf16 rows), torch.exp rate on a 1M-element buffer."""
    x = torch.ones(64 * 1024 * 1024)
    y = torch.empty_like(x)
    m = torch.randn(1024, 1024)
    mb = m.bfloat16()
    e = torch.randn(1024 * 1024)
    flops = _best_rate(lambda: m @ m, 2 * 1024**3, clock)
    return {
        "name": f"CPU measured ({torch.get_num_threads()} threads, {clock} clock)",
        "bytes_per_s": _best_rate(lambda: y.copy_(x), 2 * x.numel() * 4, clock),
        "tc_flops_per_s": flops,
        "tc_flops_per_s_bf16": _best_rate(lambda: mb @ mb, 2 * 1024**3, clock),
        "flops_per_s": flops,
        "sfu_per_s": _best_rate(lambda: torch.exp(e), e.numel(), clock),
    }


# H200 SXM: the H100's chip (same SMs, clocks and rates) with HBM3e; 4.3 TB/s is the device-to-device copy
# bandwidth measured on the H200 machines here (read + write counted).
H200 = dict(H100, name="H200 SXM (nominal)", bytes_per_s=4.3e12)


def hardware(device: str, clock: str = "wall") -> dict:
    """The rates floors are computed with: the H200's on an H200, else the H100's (kept, and named, on any
    other GPU); on the CPU, measured with the rows' clock."""
    if device != "cuda":
        return measure_cpu(clock)
    return H200 if "H200" in torch.cuda.get_device_name() else H100


def floor_ms(cost: dict, hw: dict, dtype: torch.dtype | None = None) -> tuple[float, str]:
    """The floor in ms and which resource sets it ('bytes', 'tc_flops', 'flops' or 'sfu'). On the CPU, bf16 rows'
    GEMM term uses the measured bf16 GEMM rate (the GPUs' tensor-core peak is the bf16 one already)."""
    tc_rate = hw.get("tc_flops_per_s_bf16", hw["tc_flops_per_s"]) if dtype == torch.bfloat16 else hw["tc_flops_per_s"]
    terms = {
        "bytes": cost.get("bytes", 0) / hw["bytes_per_s"],
        "tc_flops": cost.get("tc_flops", 0) / tc_rate,
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
