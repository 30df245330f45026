"""python -m linmix.bench --cp N: the context-parallel ops on N local processes against the single-process op.

N processes are spawned on this machine (gloo and one CPU thread each on the CPU; NCCL and one GPU each on
CUDA), the sequence of every configuration is split evenly over them, and each row gives, per op and mode
(fwd, fwd+bwd): the single-process op on the whole sequence (timed on rank 0 while the others wait, one call
before each context-parallel call so both see the same background load), the context-parallel op (the
slowest rank's median), the speedup, and the bytes each rank received over the
collectives for one call (linmix.distributed.comm_bytes). Every rank also checks its slice of the output
against the single-process one. Results: bench/results/<device>/cp_<N>.json / .csv.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import linmix
import linmix.distributed as lmd
from linmix._cases import CASES, make

from . import env, report


def _configs(quick: bool) -> list[tuple[str, dict, dict]]:
    """(op, sizes, linmix._cases.make choices) per configuration."""
    s = 4 if quick else 2
    return [
        ("linear_scan", dict(B=2, T=16384 // s, D=256), {}),
        ("selective_scan", dict(b=1, d=256, n=16, L=8192 // s), dict(z="given", delta_softplus=True)),
        ("chunk_gla", dict(B=1, T=8192 // s, H=4, K=64, V=64), {}),
        # converged (about 16 iterations): unconverged, a slice's iterate is not the whole sequence's
        ("fixed_point_rnn", dict(B=1, T=4096 // s, D=64, R=2), dict(max_iter=64, tol=1e-4)),
    ]


def _call(op: str, cp: bool, x: dict):
    """The op (its context-parallel version with cp) on keyword inputs; its first output."""
    out = getattr(lmd if cp else linmix, op)(**x)
    return out[0] if isinstance(out, tuple) else out


def _runner(op, cp, x, mode):
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return _call(op, cp, x)
        return fwd
    x = {k: v.detach().requires_grad_() if torch.is_tensor(v) else v for k, v in x.items()}
    leaves = [v for v in x.values() if torch.is_tensor(v)]
    with torch.no_grad():
        dout = torch.randn_like(_call(op, cp, x))

    def fwd_bwd():
        return torch.autograd.grad(_call(op, cp, x), leaves, dout)
    return fwd_bwd


def _timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def _shape(sizes: dict, choices: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in {**sizes, **choices}.items())


def _worker(rank: int, world: int, port: int, device: str, quick: bool, reps: int, out_path: str):
    if device == "cuda":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(minutes=10))
    dev = f"cuda:{rank}" if device == "cuda" else "cpu"
    rows = []
    for op, sizes, choices in _configs(quick):
        case = CASES[op]
        full = make(case, dev, seed=0, sizes=sizes, **choices)  # every rank draws the whole sequence alike
        T = sizes[case.time]
        lo, hi = rank * T // world, (rank + 1) * T // world
        mine = {k: v if full.time_dim(k) is None else v.narrow(full.time_dim(k), lo, hi - lo).contiguous()
                for k, v in full.items()}  # replicated where it has no time axis
        out_time = full.time_dim(next(iter(full)))  # the output's time axis: the first input's
        with torch.no_grad():
            want = _call(op, False, full).narrow(out_time, lo, hi - lo)
            got = _call(op, True, mine)
        err = ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).reshape(1)
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
        for mode in ("fwd", "fwd+bwd"):
            single, fn = _runner(op, False, full, mode), _runner(op, True, mine, mode)
            lmd.reset_comm_bytes()
            fn()  # also the warm-up
            nbytes = lmd.comm_bytes()
            if rank == 0:
                single()
            # Paired, interleaved samples (rank 0's single-process call, then every rank's context-parallel
            # call) so both see the same background load.
            t_single, t_cp = [], []
            for _ in range(reps):
                if rank == 0:
                    t_single.append(_timed(single, device))
                dist.barrier()
                t_cp.append(_timed(fn, device))
            ms = torch.tensor(t_cp, dtype=torch.float64).median().reshape(1).to(dev)
            dist.all_reduce(ms, op=dist.ReduceOp.MAX)  # the slowest rank
            if rank == 0:
                one = torch.tensor(t_single, dtype=torch.float64).median().item()
                rows.append(dict(op=op, shape=_shape(sizes, choices), mode=mode, ranks=world, single_ms=one,
                                 cp_ms=ms.item(), speedup=one / ms.item(), comm_bytes_per_rank=nbytes,
                                 rel_err=err.item()))
    if rank == 0:
        torch.save(rows, out_path)
    dist.destroy_process_group()


def free_port() -> int:
    """A free TCP port on loopback for the spawned processes' rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, device: str, quick: bool, out_dir: str) -> list[str]:
    """Spawn `world` processes, time every configuration, print the table and write cp_<world>.json / .csv."""
    if device == "cuda" and torch.cuda.device_count() < world:
        raise SystemExit(f"--cp {world} on CUDA needs {world} GPUs, {torch.cuda.device_count()} present")
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".cp_{world}.pt")
    reps = 5 if quick else 10  # a fixed count: every rank must make the same number of collective calls
    mp.spawn(_worker, args=(world, free_port(), device, quick, reps, tmp), nprocs=world)
    rows = torch.load(tmp)
    os.remove(tmp)
    w = max(len(r["shape"]) for r in rows)
    head = f"{'op':<16} {'shape':<{w}} {'mode':<8} {'ranks':>5} {'1 proc ms':>10} {'CP ms':>10} {'speedup':>8} " \
           f"{'comm B/rank':>12}  rel err"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['op']:<16} {r['shape']:<{w}} {r['mode']:<8} {r['ranks']:>5} {r['single_ms']:>10.3f} "
              f"{r['cp_ms']:>10.3f} {r['speedup']:>8.2f} {r['comm_bytes_per_rank']:>12}  {r['rel_err']:.1e}")
    meta = env.collect(device)
    meta["args"] = dict(cp=world, quick=quick, reps=reps, threads_per_rank=1 if device == "cpu" else None)
    tag = f"cp_{world}" + ("_quick" if quick else "")
    return report.write_json_csv(out_dir, tag, {"env": meta, "rows": rows}, rows)
