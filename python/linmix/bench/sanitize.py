"""Every linmix op's forward and backward on tiny CUDA shapes, for
`compute-sanitizer --tool memcheck|racecheck python -m linmix.bench.sanitize [OP ...]`; naming ops (such as
chunk_gla or fixed_point_rnn) runs only their cases, so a slow tool can be given one op at a time. Exits non-zero
on any error.

The cases come from linmix._cases: per op, the default call at three lengths (1, a prime, past a chunk) and
every documented argument value the CUDA backend takes, one at a time, at the prime length; in float32 and
bfloat16.
"""

from __future__ import annotations

import argparse
import sys

import torch

import linmix
from linmix._cases import CASES, make, variants

# Per op: sizes that reach the kernels' tilings (channels past a warp, head dims of a tensor-core tile), and the
# lengths of its default call; every other variant runs at the middle one.
SHAPES = {
    "linear_scan": (dict(B=2, D=40), (1, 37, 300)),
    "selective_scan": (dict(b=2, d=24, n=16), (1, 37, 300)),
    "selective_state_update": (dict(b=3, d=192, p=64, n=17), (None,)),  # Mamba-1 d = 192; heads: 3 of 64
    "chunk_gla": (dict(B=1, H=2, K=64, V=64), (1, 37, 130)),
    "fused_recurrent_gla": (dict(B=1, H=2, K=64, V=64), (1, 37, 130)),
    "fixed_point_rnn": (dict(B=2, D=48, R=2), (1, 37, 300)),
}


def runs(dev: str, dt: torch.dtype, ops=()):
    """(case, label, inputs) for every run (of `ops` only, if given): inputs from linmix._cases.make."""
    for name, (sizes, lengths) in SHAPES.items():
        if ops and name not in ops:
            continue
        case = CASES[name]
        for T in lengths:
            for choice in variants(case) if T == lengths[len(lengths) // 2] else [{}]:
                s = dict(sizes) if T is None else dict(sizes, **{case.time: T})
                label = " ".join([name, *(f"{k}={v}" for k, v in choice.items())] + ([] if T is None else [f"T={T}"]))
                yield case, label, make(case, dev, dt, seed=1, sizes=s, **choice)


def run(case, x) -> None:
    """The op's forward, and its backward for one random output gradient where it has one."""
    names = [n for n in case.grads if x.get(n) is not None]
    for n in names:
        x[n].requires_grad_()
    outs = [o for o in case.run(x) if o.requires_grad]
    if outs:
        torch.autograd.grad(outs, [x[n] for n in names], [torch.randn_like(o) for o in outs], allow_unused=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m linmix.bench.sanitize")
    ap.add_argument("ops", nargs="*", help=f"run only these ops' cases (of {', '.join(SHAPES)})")
    args = ap.parse_args(argv)
    if set(args.ops) - set(SHAPES):
        ap.error(f"unknown ops {sorted(set(args.ops) - set(SHAPES))}; the ops are {', '.join(SHAPES)}")
    if not (torch.cuda.is_available() and linmix.build_info()["cuda"]):
        print("sanitize: needs a GPU and a linmix build with the CUDA backend")
        return 1
    failed = 0
    for dt in (torch.float32, torch.bfloat16):
        for case, name, x in runs("cuda", dt, args.ops):
            try:
                run(case, x)
                torch.cuda.synchronize()
                print(f"ok   {name} {dt}")
            except Exception as e:
                failed += 1
                print(f"FAIL {name} {dt}: {type(e).__name__}: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
