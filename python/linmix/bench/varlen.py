"""python -m linmix.bench --varlen: packed sequences (cu_seqlens) against one sequence of the same tokens.

Per op and mode (fwd, fwd+bwd): N sequences of seeded random lengths in [1, 256] (512 sequences; 64 with
--quick) packed into one batch-1 call with cu_seqlens, timed beside the same op on the same tokens as a single
sequence (no cu_seqlens). The ratio is what packing costs: the kernels find each sequence from the offsets on the
device, so it should stay near 1 however many sequences there are (issue 22's target on the CPU: within 1.2x).
The inputs are the contract table's (linmix._cases) at the sizes below. Results: bench/results/<device>/varlen.json
/ .csv (varlen_quick with --quick).
"""

from __future__ import annotations

import torch

from linmix._cases import CASES, make

from . import env, report
from .cp import _shape
from .timing import bench

# (op, sizes with T / L the packed length, choices): the ops whose contract row takes cu_seqlens.
_TIME = {"linear_scan": "T", "selective_scan": "L", "chunk_gla": "T", "fused_recurrent_gla": "T",
         "fixed_point_rnn": "T"}
_SIZES = {
    "linear_scan": (dict(B=1, D=256), {}),
    "selective_scan": (dict(b=1, d=64, n=16), dict(z="given", delta_softplus=True)),
    "chunk_gla": (dict(B=1, H=2, K=64, V=64), {}),
    "fused_recurrent_gla": (dict(B=1, H=2, K=64, V=64), {}),
    "fixed_point_rnn": (dict(B=1, D=64, R=2), dict(max_iter=8, tol=0.0)),
}


def packed_offsets(n_seqs: int, seed: int = 0, max_len: int = 256) -> torch.Tensor:
    """cu_seqlens of n_seqs sequences of random lengths in [1, max_len]."""
    lengths = torch.randint(1, max_len + 1, (n_seqs,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])


def _runner(op: str, x: dict, mode: str):
    fn = CASES[op].fn
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return fn(**x)
        return fwd
    x = {k: v.detach().requires_grad_() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in x.items()}
    leaves = [v for v in x.values() if torch.is_tensor(v) and v.requires_grad]
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    with torch.no_grad():
        dout = torch.randn_like(first(fn(**x)))

    def fwd_bwd():
        return torch.autograd.grad(first(fn(**x)), leaves, dout)
    return fwd_bwd


def run(ops: list[str], device: str, quick: bool, out_dir: str, dtype: torch.dtype = torch.float32) -> list[str]:
    """Time every op that takes cu_seqlens, print the table and write varlen[_quick].json / .csv."""
    cu = packed_offsets(64 if quick else 512).to(device)
    total = int(cu[-1])
    rows = []
    for op in ops:
        sizes, choices = _SIZES[op]
        sizes = {**sizes, _TIME[op]: total}
        x = make(CASES[op], device, dtype, sizes=sizes, **choices)
        for mode in ("fwd", "fwd+bwd"):
            one = bench(_runner(op, x, mode), device, quick)[0]
            packed = bench(_runner(op, dict(x, cu_seqlens=cu), mode), device, quick)[0]
            rows.append(dict(op=op, shape=_shape(sizes, choices), dtype=str(dtype).replace("torch.", ""), mode=mode,
                             n_seqs=cu.numel() - 1, tokens=total, one_sequence_ms=one, packed_ms=packed,
                             ratio=packed / one))
    head = f"{'op':<20} {'shape':<40} {'mode':<8} {'seqs':>5} {'tokens':>7} {'1 seq ms':>9} {'packed ms':>10} ratio"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['op']:<20} {r['shape']:<40} {r['mode']:<8} {r['n_seqs']:>5} {r['tokens']:>7} "
              f"{r['one_sequence_ms']:>9.3f} {r['packed_ms']:>10.3f} {r['ratio']:.2f}")
    meta = env.collect(device)
    meta["args"] = dict(varlen=True, quick=quick, threads=torch.get_num_threads() if device == "cpu" else None,
                        lengths="uniform in [1, 256], seed 0")
    tag = "varlen" + ("_quick" if quick else "")
    return report.write_json_csv(out_dir, tag, {"env": meta, "rows": rows}, rows)


def supported() -> list[str]:
    """The ops whose contract row takes cu_seqlens (the others still lack packed sequences)."""
    return [op for op in _TIME if any(a.name == "cu_seqlens" for a in CASES[op].args)]
