"""python -m linmix.bench: time linmix's ops against PyTorch, SDPA, flash-linear-attention and mamba-ssm.

Every row: op, implementation, shape, dtype, mode (fwd / fwd+bwd), ms (median, p20, p80), tokens/s, GB/s
(the op's bytes: each input read once, each output written once), the ratio to the floor, and the result of a
correctness check against the float64 reference made once, before timing. See bench/NOTES.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys

import torch

import linmix

from . import env, floors, report, timing
from . import fixed_point_rnn, gla, linear_scan, selective_scan, selective_state_update

OPS = {m.OP.name: m.OP for m in (selective_scan, selective_state_update, gla, fixed_point_rnn, linear_scan)}
TOL = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}  # max |err| / max |ref|, per tensor
MODES = ("fwd", "fwd+bwd")


def shape_str(op, cfg: dict) -> str:
    return " ".join(f"{k}={cfg[k]}" for k in op.shape)


def _dname(dt: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dt, str(dt))


def _leaves(x: dict, names, double: bool = False) -> dict:
    out = {}
    for k, v in x.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().double() if double and v.is_floating_point() else v.detach()
            v.requires_grad_(k in names)
        out[k] = v
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    err = (a.double() - b.double()).abs().max().item()
    return err, err / max(b.double().abs().max().item(), 1e-30)


def _grads(op, impl, x: dict) -> tuple[str, ...]:
    """The inputs whose gradients fwd+bwd computes (and the check compares) for this implementation."""
    return op.grads(x) if impl.grads is None else impl.grads


def check(op, impl, cfg: dict, device: str) -> dict:
    """Output (and, where the op defines them comparably, input gradients) at op.small(cfg) vs float64."""
    torch.manual_seed(0)  # the random output gradient
    x = op.make_inputs(op.small(cfg), device)
    grads = _grads(op, impl, x) if (op.check_grad and "fwd+bwd" in impl.modes) else ()
    xi, xr = _leaves(x, grads), _leaves(x, grads, double=True)
    out, ref = impl.fn(xi), (impl.ref or op.reference)(xr)
    pairs = [(out, ref)]
    if grads:
        gout = torch.randn(ref.shape, dtype=torch.float64, device=device)
        names = [n for n in grads if n in x]
        pairs += zip(torch.autograd.grad(out, [xi[n] for n in names], gout.to(out.dtype)),
                     torch.autograd.grad(ref, [xr[n] for n in names], gout))
    errs = [_rel(a, b) for a, b in pairs]
    err, rel = max(e[0] for e in errs), max(e[1] for e in errs)
    ok = rel <= TOL.get(cfg["dtype"], 1e-8) and rel == rel
    return {"check": ("pass" if ok else "FAIL") + ("" if grads else " (fwd)"), "max_err": err, "rel_err": rel}


def runner(impl, x: dict, mode: str, grads) -> callable:
    """A zero-argument callable for the timed region. Output gradients are built here, before timing."""
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return impl.fn(x)
        return fwd
    xg = _leaves(x, grads)
    gout = torch.randn_like(impl.fn(xg))
    leaves = [xg[n] for n in grads if n in xg]
    return lambda: torch.autograd.grad(impl.fn(xg), leaves, gout)


def nvtx_name(op: str, idx: int, mode: str, impl: str) -> str:
    """The bench's NVTX range around one timed row, e.g. bench_chunk_gla_3_fwdbwd_linmix (no '/' or spaces:
    ncu's --nvtx-include reads '/' as push/pop nesting)."""
    return f"bench_{op}_{idx}_{mode.replace('+', '')}_" + re.sub(r"[^A-Za-z0-9]+", "_", impl).strip("_")


def plan(args) -> list[tuple]:
    """(op, config index, config, impl, mode) for every timed row, in run order, and the skip lines."""
    work, skipped = [], []
    for name in (OPS if args.op == "all" else [args.op]):
        op = OPS[name]
        cfgs = list(enumerate(op.configs(args.device, args.quick)))
        if args.only is not None:
            cfgs = [c for c in cfgs if c[0] == args.only]
        impls = [i for i in op.impls(args.device) if args.impl is None or args.impl in i.label]
        if args.quick:
            skipped += [f"{name} / {i.label}: not timed with --quick" for i in impls if not i.quick and not i.skip]
            impls = [i for i in impls if i.quick]
        for i in impls:
            if i.skip:
                skipped.append(f"{name} / {i.label}: {i.skip}")
        for idx, cfg in cfgs:
            for impl in impls:
                if impl.skip:
                    continue
                why = impl.when(cfg, args.device) if impl.when else None
                if why:
                    skipped.append(f"{name} / {impl.label} / {shape_str(op, cfg)}: {why}")
                    continue
                for mode in impl.modes:
                    if args.mode in ("all", mode):
                        work.append((op, idx, cfg, impl, mode))
    return work, skipped


def run(args, hw: dict) -> tuple[list[dict], list[str]]:
    work, skipped = plan(args)
    rows, checks, inputs_key, x = [], {}, None, None
    for n, (op, idx, cfg, impl, mode) in enumerate(work):
        shape = shape_str(op, cfg)
        print(f"\r[{n + 1}/{len(work)}] {op.name} {impl.label} {mode} {shape}".ljust(100)[:100], file=sys.stderr,
              end="" if sys.stderr.isatty() else "\n", flush=True)
        try:
            if inputs_key != (op.name, idx):
                x, inputs_key = None, None
                if args.device == "cuda":
                    torch.cuda.empty_cache()
                x, inputs_key = op.make_inputs(cfg, args.device, seed=idx), (op.name, idx)
            ckey = (op.name, impl.label, shape_str(op, op.small(cfg)), cfg["dtype"])
            if ckey not in checks:
                checks[ckey] = check(op, impl, cfg, args.device)
            fn = runner(impl, x, mode, _grads(op, impl, x))
            nvtx = torch.cuda.nvtx.range(nvtx_name(op.name, idx, mode, impl.label)) if args.device == "cuda" else contextlib.nullcontext()
            with nvtx:
                ms, p20, p80 = timing.bench(fn, args.device, args.quick, args.reps, args.clock)
            del fn
        except Exception as e:  # OOM, a backend refusing a shape: one line, and go on
            skipped.append(f"{op.name} / {impl.label} / {shape} / {mode}: error {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
            continue
        c = (impl.cost or op.cost)(cfg, mode)
        fl, bound = floors.floor_ms(c, hw, cfg["dtype"])
        row = {
            "op": op.name, "impl": impl.label, "impl_name": impl.name, "variant": impl.variant, "shape": shape, "dtype": _dname(cfg["dtype"]), "mode": mode,
            "ms": ms, "p20": p20, "p80": p80, "tokens_per_s": op.tokens(cfg) / (ms / 1e3),
            "gb_per_s": c["bytes"] / (ms / 1e3) / 1e9, "floor_ms": fl, "floor_bound": bound, "x_floor": ms / fl if fl else None,
            "config": idx, "sweep": cfg.get(op.sweep) if cfg.get("in_sweep", True) else None, "sweep_key": op.sweep,
            "cost": c, **checks[ckey],
        }
        rows.append(row)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    for op in {r[0].name: r[0] for r in work}.values():
        if op.annotate:
            op.annotate(rows)
    report.add_speedups(rows)
    return rows, skipped


def profile_cmds(args) -> str:
    """nsys and ncu command lines for one configuration, running the bench on just that row (linmix only)."""
    name = "chunk_gla" if args.op == "all" else args.op
    op, idx = OPS[name], args.config or 0
    cfgs = op.configs("cuda", args.quick)
    cfg = cfgs[idx]
    one = f"python -m linmix.bench --device cuda --op {name} --only {idx} --impl linmix --no-plot --out /tmp/linmix-prof"
    lines = [
        f"# {name} config {idx}: {shape_str(op, cfg)} {_dname(cfg['dtype'])} (of {len(cfgs)}: --config N picks another,"
        f" --list shows them); kernels linmix_<op>[_<family>]_<phase>_kernel (GLA: linmix_gla_<family>_<phase>),"
        f" op ranges linmix/<op>/fwd|bwd",
        f"nsys profile -t cuda,nvtx,osrt -o linmix_{name}_{idx} --force-overwrite true {one} --reps 20",
    ]
    for mode in MODES:
        rng = nvtx_name(name, idx, mode, "linmix")
        lines.append(f"ncu --kernel-name regex:{op.kernels} --nvtx --nvtx-include '{rng}/' --set full --import-source yes "
                     f"-o linmix_{name}_{idx}_{mode.replace('+', '')} -f {one} --mode {mode} --reps 1")
    return "\n".join(lines)


def default_out(device: str) -> str:
    root = env.checkout_root()
    base = os.path.join(root, "bench", "results") if root else "linmix-bench-results"
    return os.path.join(base, env.slug(device))


def main(argv=None) -> int:
    cuda_ok = torch.cuda.is_available() and linmix.build_info()["cuda"]
    ap = argparse.ArgumentParser(prog="python -m linmix.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", default="all", choices=[*OPS, "all"])
    ap.add_argument("--device", default="cuda" if cuda_ok else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="a couple of small configs per op, short timing")
    ap.add_argument("--out", default=None, help="output folder (default: bench/results/<device> in a checkout)")
    ap.add_argument("--only", type=int, default=None, help="run only configuration N of the op (see --list)")
    ap.add_argument("--reps", type=int, default=None, help="exactly N timed calls after one warm-up (profiling)")
    ap.add_argument("--impl", default=None, help="only implementations whose name contains this")
    ap.add_argument("--mode", default="all", choices=[*MODES, "all"])
    ap.add_argument("--list", action="store_true", help="list the configurations with their indices and exit")
    ap.add_argument("--profile-cmd", action="store_true", help="print nsys / ncu command lines and exit")
    ap.add_argument("--config", type=int, default=None, help="configuration index for --profile-cmd")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default torch's; 1 gives stable numbers on a busy machine)")
    ap.add_argument("--clock", default="wall", choices=list(timing.CLOCKS),
                    help="CPU rows and floors: the wall clock, or (with --threads 1) the thread's CPU time, which "
                         "leaves out waits for a core on a loaded machine")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--traffic", action="store_true",
                    help="count each CUDA kernel family's global-memory bytes under the emulator (bench/traffic.py)")
    ap.add_argument("--varlen", action="store_true",
                    help="time packed sequences (cu_seqlens) against one sequence of the same tokens (bench/varlen.py)")
    ap.add_argument("--cp", type=int, default=None, metavar="N",
                    help="time the context-parallel ops on N local processes against the single-process op")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and (args.device != "cpu" or torch.get_num_threads() != 1):
        ap.error("--clock thread times the calling thread only: it needs --device cpu --threads 1")
    if args.profile_cmd:
        print(profile_cmds(args))
        return 0
    if args.list:
        for name in (OPS if args.op == "all" else [args.op]):
            for i, cfg in enumerate(OPS[name].configs(args.device, args.quick)):
                print(f"{name} {i}: {shape_str(OPS[name], cfg)} {_dname(cfg['dtype'])}")
        return 0
    if args.traffic:
        from . import traffic

        root = env.checkout_root()
        out = args.out or os.path.join(root or "linmix-bench-results", *(("bench", "results") if root else ()), "emulated")
        print("wrote " + ", ".join(traffic.run(args.op, args.quick, out, env.collect("cpu"))))
        return 0
    if args.device == "cuda" and not cuda_ok:
        ap.error("--device cuda needs a GPU and a linmix build with the CUDA backend")
    if args.varlen:
        from . import varlen

        ops = varlen.supported() if args.op == "all" else [args.op]
        print("wrote " + ", ".join(varlen.run(ops, args.device, args.quick, args.out or default_out(args.device))))
        return 0
    if args.cp:
        from . import cp

        print("wrote " + ", ".join(cp.run(args.cp, args.device, args.quick, args.out or default_out(args.device))))
        return 0
    meta = env.collect(args.device)
    meta["args"] = vars(args)
    meta["hardware"] = floors.hardware(args.device, args.clock)
    rows, skipped = run(args, meta["hardware"])
    meta["loadavg_end"] = env.loadavg()
    print(f"linmix {meta['linmix_commit'] or meta['linmix_version']} on {meta['device_name']} "
          f"(torch {meta['torch']}, CUDA {meta['torch_cuda']}, Triton {meta['triton']}, driver {meta['driver']})")
    print(report.table(rows, skipped))
    out = args.out or default_out(args.device)
    tag = ("quick" if args.quick else "full") + ("" if args.op == "all" else f"_{args.op}")
    files = report.write(out, meta, rows, skipped, tag)
    if not args.no_plot and rows:
        try:
            files += report.plots(out, rows, f"{meta['device_name']}, linmix {meta['linmix_commit'] or meta['linmix_version']}", tag.split("_")[0])
        except ImportError:
            print("plots skipped: matplotlib is not installed (pip install matplotlib)")
    print("wrote " + ", ".join(files))
    failed = [r for r in rows if r["check"].startswith("FAIL")]
    for r in failed:
        print(f"WARNING: {r['op']} / {r['impl']} / {r['shape']}: correctness check failed (rel_err {r['rel_err']:.2e})")
    return 1 if any(r["impl_name"] == "linmix" for r in failed) else 0


if __name__ == "__main__":
    sys.exit(main())
