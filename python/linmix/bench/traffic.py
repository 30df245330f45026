"""python -m linmix.bench --op chunk_gla --traffic: the global-memory bytes each CUDA kernel family moves, counted
without a GPU by the CUDA emulator's traffic build (every load and store of the kernels' own source, csrc/emu/
traffic.cpp; ``linmix.emulation.traffic``).

Per family, mode (fwd, fwd+bwd) and shape: every launch's unique bytes read and written (each byte once per launch:
what DRAM would see with no cache reuse across launches and perfect reuse inside one) and all bytes requested (every
access: no reuse at all), their sums over the launches, bytes per token-head, and ``traffic_x_min``: the unique total
over the minimum (the op's inputs read once, its outputs written once: q, k, g, v read and o and the fp32 final
state written; for fwd+bwd that plus q, k, g, v, do read and dq, dk, dg, dv and the fp32 dh0 written), with
``requested_x_min`` the same for the requested bytes. DRAM traffic lies between the two. Each run is a subprocess with
``LINMIX_KERNELS=<family>``; JSON and a table under bench/results/emulated/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from .. import emulation

# op -> its kernel families (common/kernels.h); the default one first
FAMILIES = {"chunk_gla": ["chunk_gla", "gla_fused"]}
# long enough that the per-(batch, head) states weigh little per token
SHAPES = [dict(B=1, T=1024, H=2, K=64, V=64), dict(B=1, T=1024, H=1, K=128, V=128)]
QUICK_SHAPES = [dict(B=1, T=256, H=1, K=128, V=128)]
MODES = ("fwd", "fwd+bwd")


def minimum_bytes(shape: dict, mode: str, itemsize: int) -> int:
    BTH, K, V, BH = shape["B"] * shape["T"] * shape["H"], shape["K"], shape["V"], shape["B"] * shape["H"]
    fwd = BTH * (3 * K + 2 * V) * itemsize + BH * K * V * 4
    return fwd if mode == "fwd" else fwd + BTH * (6 * K + 3 * V) * itemsize + BH * K * V * 4


def _measure(job: dict) -> list[dict]:
    """In the traffic build: the launches of one call (fwd) or one call and its backward (fwd+bwd)."""
    import linmix

    s, dtype = job["shape"], getattr(torch, job["dtype"])
    gen = torch.Generator().manual_seed(0)
    B, T, H, K, V = (s[n] for n in "BTHKV")
    q, k = (torch.randn(B, T, H, K, generator=gen).to(dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen).to(dtype)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, generator=gen)).to(dtype)
    emulation.traffic(reset=True)
    if job["mode"] == "fwd":
        with torch.no_grad():
            linmix.chunk_gla(q, k, v, g)
    else:
        ins = [t.requires_grad_() for t in (q, k, v, g)]
        o, _ = linmix.chunk_gla(*ins)
        torch.autograd.grad(o, ins, torch.randn(o.shape, generator=gen).to(dtype))
    return emulation.traffic(reset=True)


def run_one(op: str, family: str, mode: str, shape: dict, dtype: str = "bfloat16") -> dict:
    env = emulation.environment(traffic=True)
    env.pop("LINMIX_UNVERIFIED_KERNELS", None)
    env["LINMIX_KERNELS"] = family
    job = dict(mode=mode, shape=shape, dtype=dtype)
    p = subprocess.run([sys.executable, "-m", "linmix.bench.traffic", json.dumps(job)], env=env, capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise RuntimeError(f"traffic run {family} {mode} {shape} failed:\n{p.stderr[-3000:]}")
    launches = json.loads(p.stdout.splitlines()[-1])
    unique = sum(r["unique_read"] + r["unique_written"] for r in launches)
    requested = sum(r["read"] + r["written"] for r in launches)
    BTH = shape["B"] * shape["T"] * shape["H"]
    least = minimum_bytes(shape, mode, getattr(torch, dtype).itemsize)
    return dict(op=op, family=family, mode=mode, dtype=dtype, **shape, launches=launches, unique_bytes=unique,
                requested_bytes=requested, min_bytes=least, bytes_per_token_head=unique / BTH,
                requested_per_token_head=requested / BTH, min_per_token_head=least / BTH, traffic_x_min=unique / least,
                requested_x_min=requested / least)


def table(rows: list[dict]) -> str:
    head = (f"{'op':<10} {'family':<14} {'mode':<8} {'B,T,H,K,V':<20} {'B/token-head':>13} {'requested':>10} "
            f"{'min':>7} {'x_min':>6} {'req x_min':>9}  kernels")
    lines = [head, "-" * len(head)]
    for r in rows:
        kernels = ", ".join(sorted({l["kernel"].split("<")[0].removeprefix("linmix_") for l in r["launches"]}))
        lines.append(f"{r['op']:<10} {r['family']:<14} {r['mode']:<8} "
                     f"{','.join(str(r[n]) for n in 'BTHKV'):<20} {r['bytes_per_token_head']:>13.0f} "
                     f"{r['requested_per_token_head']:>10.0f} {r['min_per_token_head']:>7.0f} {r['traffic_x_min']:>6.2f} "
                     f"{r['requested_x_min']:>9.2f}  "
                     f"{kernels}")
    return "\n".join(lines)


def run(op: str, quick: bool, out_dir: str, meta: dict) -> list[str]:
    if "traffic" not in emulation.builds():
        raise SystemExit("--traffic needs the emulator's traffic build: LINMIX_CUDA_EMU=ON LINMIX_CUDA_EMU_SANITIZERS=ON")
    ops = list(FAMILIES) if op == "all" else [op]
    if any(o not in FAMILIES for o in ops):
        raise SystemExit(f"--traffic covers {', '.join(FAMILIES)}")
    rows = []
    for o in ops:
        for shape in QUICK_SHAPES if quick else SHAPES:
            for family in FAMILIES[o]:
                for mode in MODES:
                    rows.append(run_one(o, family, mode, shape))
                    print(f"\r{len(rows)} runs", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    print(table(rows))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"traffic_{'quick' if quick else 'full'}_{op}.json")
    with open(path, "w") as f:
        json.dump(dict(env=meta, rows=rows), f, indent=1)
    return [path]


if __name__ == "__main__":
    print(json.dumps(_measure(json.loads(sys.argv[1]))))
