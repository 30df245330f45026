"""Context parallelism (linmix.distributed), DDP, FSDP2 and activation checkpointing on CPU with gloo.

The test spawns one pool of 2 and one of 4 processes on loopback; every case runs inside the pool (one spawn
per world size, not per case) and every rank compares its slice of the outputs and of every gradient with
the single-process run, which each rank computes itself from the same seeded data.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import linmix
import linmix.distributed as lmd
from linmix.bench.cp import free_port

from conftest import HostReads

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def _splits(world: int, T: int, kind: int) -> list[int]:
    """Uneven contiguous splits of T tokens; kind 0 gives rank 0 a single token, kind 1 the last rank."""
    if kind == 0:
        rest = T - 1
        return [1] + [rest // (world - 1) + (1 if i < rest % (world - 1) else 0) for i in range(world - 1)]
    head = [(T - 1) // (world - 1) + (1 if i == 0 else 0) for i in range(world - 1)]
    head[0] += T - 1 - sum(head)
    return head + [1]


def _compare(splits, inputs, kinds, single, parallel, out_dim, first=0, tol=None, scale_atol=False):
    """Run `single` on the full inputs and `parallel` on this rank's slices; compare outputs and gradients.

    kinds[i]: an int (the time dim: sliced), "rep" (replicated parameter: gradients summed over ranks),
    "init" (initial state: given on rank `first` only, None elsewhere). single/parallel return (out, final).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    lo = sum(splits[:rank])
    n = splits[rank]
    dtype = next(x for x in inputs if x is not None).dtype
    tol = tol or TOL[dtype]
    full = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
    out, fin = single(*full)
    gen = torch.Generator().manual_seed(123)
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    wf = None if fin is None else torch.randn(fin.shape, generator=gen, dtype=torch.float64).to(fin.dtype)
    loss = (out * w).sum() + (0 if fin is None else (fin * wf).sum())
    used = [x for x in full if x is not None]
    want = torch.autograd.grad(loss, used)

    mine = []
    for x, k in zip(inputs, kinds):
        if x is None or (k == "init" and rank != first):
            mine.append(None)
        elif isinstance(k, int):
            mine.append(x.detach().narrow(k, lo, n).clone().requires_grad_())
        else:
            mine.append(x.detach().clone().requires_grad_())
    o, f = parallel(*mine)
    torch.testing.assert_close(o, out.detach().narrow(out_dim, lo, n), **tol)
    if fin is not None:
        torch.testing.assert_close(f, fin.detach(), **tol)
    # The final state's loss term lives on rank 0 only: its gradient must reach every rank's slice.
    loss = (o * w.narrow(out_dim, lo, n)).sum() + (0 if f is None or rank != 0 else (f * wf).sum())
    got = iter(torch.autograd.grad(loss, [x for x in mine if x is not None]))
    for x, k, g_want in zip([x for x in inputs if x is not None], [k for x, k in zip(inputs, kinds) if x is not None],
                            want):
        if k == "init" and rank != first:
            continue
        g = next(got)
        if k == "rep":
            dist.all_reduce(g)
        elif isinstance(k, int):
            g_want = g_want.narrow(k, lo, n)
        t = dict(tol)
        if scale_atol:
            t["atol"] = t["atol"] * max(1.0, g_want.abs().max().item())
        torch.testing.assert_close(g, g_want, **t)


# ---------------------------------------------------------------------------------------------------- cases


def case_linear_scan(world):
    for dtype in (torch.float64, torch.float32):
        for kind in (0, 1):
            for reverse in (False, True):
                for with_h0 in (False, True):
                    torch.manual_seed(0)
                    B, T, D = 2, 13, 5
                    a = (0.5 + 0.5 * torch.rand(B, T, D, dtype=torch.float64)).to(dtype)
                    b = torch.randn(B, T, D, dtype=torch.float64).to(dtype)
                    h0 = torch.randn(B, D, dtype=dtype) if with_h0 else None
                    splits = _splits(world, T, kind)
                    _compare(splits, [a, b, h0], [1, 1, "init"],
                             lambda a, b, h0: (linmix.linear_scan(a, b, h0, reverse),
                                               linmix.linear_scan(a, b, h0, reverse)[:, 0 if reverse else -1]),
                             lambda a, b, h0: lmd.linear_scan(a, b, h0, reverse, return_final_state=True),
                             1, first=world - 1 if reverse else 0)


def case_selective_scan(world):
    for dtype in (torch.float64, torch.float32):
        for kind in (0, 1):
            for with_h0 in (False, True):
                torch.manual_seed(1)
                b, d, n, L = 2, 4, 3, 11
                u, delta, z = (torch.randn(b, d, L, dtype=torch.float64).to(dtype) for _ in range(3))
                A = -torch.rand(d, n, dtype=torch.float64).to(dtype) - 0.2
                Bv = torch.randn(b, n, L, dtype=torch.float64).to(dtype)  # variable B
                Cf = torch.randn(d, n, dtype=torch.float64).to(dtype)  # fixed C
                D, bias = torch.randn(d, dtype=dtype), torch.randn(d, dtype=dtype)
                h0 = torch.randn(b, d, n, dtype=dtype) if with_h0 else None

                def single(u, delta, z, A, Bv, Cf, D, bias, h0):
                    return linmix.selective_scan(u, delta, A, Bv, Cf, D, z, bias, True, h0, True)

                def parallel(u, delta, z, A, Bv, Cf, D, bias, h0):
                    return lmd.selective_scan(u, delta, A, Bv, Cf, D, z, bias, True, h0, True)

                _compare(_splits(world, L, kind), [u, delta, z, A, Bv, Cf, D, bias, h0],
                         [2, 2, 2, "rep", 2, "rep", "rep", "rep", "init"], single, parallel, 2, scale_atol=True)


def case_chunk_gla(world):
    for dtype in (torch.float64, torch.float32):
        for kind in (0, 1):
            for with_h0 in (False, True):
                torch.manual_seed(2)
                B, T, H, K, V = 1, 70, 2, 8, 6  # 70 tokens: slices of one token and of more than one chunk
                q, k = (torch.randn(B, T, H, K, dtype=torch.float64).to(dtype) for _ in range(2))
                v = torch.randn(B, T, H, V, dtype=torch.float64).to(dtype)
                g = F.logsigmoid(torch.randn(B, T, H, K, dtype=torch.float64)).to(dtype)
                h0 = torch.randn(B, H, K, V, dtype=dtype) if with_h0 else None
                _compare(_splits(world, T, kind), [q, k, v, g, h0], [1, 1, 1, 1, "init"],
                         lambda q, k, v, g, h0: linmix.chunk_gla(q, k, v, g, None, h0, True),
                         lambda q, k, v, g, h0: lmd.chunk_gla(q, k, v, g, None, h0, True), 1, scale_atol=True)


def _fixed_point_inputs(dtype, T, B=2, D=6, R=2):
    torch.manual_seed(3)
    u = torch.randn(B, T, D, dtype=torch.float64)
    lam = 0.3 + 0.6 * torch.rand(B, T, D, dtype=torch.float64)
    hh_u = F.normalize(torch.randn(B, T, R, D, dtype=torch.float64), dim=-1)
    hh_beta = 2 * torch.rand(B, T, R, dtype=torch.float64) * 0.9
    return [x.to(dtype) for x in (u, lam, hh_u, hh_beta)]


def _slice_by_slice(splits, u, lam, hh_u, hh_beta, initial_state=None, **kw):
    """linmix.fixed_point_rnn on one process over the slices in turn, each from the last state of the one
    before (chunked decoding): (h, final state, n_iter, residual) as linmix.distributed.fixed_point_rnn
    gives them, which is what it computes exactly with tol = 0."""
    outs, e, lo = [], initial_state, 0
    for n in splits:
        h, n_iter, res = linmix.fixed_point_rnn(*(x[:, lo : lo + n] for x in (u, lam, hh_u, hh_beta)),
                                                initial_state=e, return_info=True, **kw)
        outs.append((h, n_iter, res))
        e, lo = h[:, -1], lo + n
    hs, ns, rs = zip(*outs)
    return torch.cat(hs, 1), e, torch.stack(ns).amax(0), torch.stack(rs).amax(0)


def case_fixed_point_rnn(world):
    T = 9
    rank = dist.get_rank()
    # tol = 0: exactly the slice-by-slice run (outputs, final state, every gradient, the info), every argument
    for dtype, grad_mode, damping, stopping in ((torch.float64, "onestep", 1.0, "element"),
                                                (torch.float64, "implicit", 0.7, "batch"),
                                                (torch.float32, "onestep", 1.0, "causal")):
        for kind in (0, 1):
            for with_h0 in (False, True):
                inputs = _fixed_point_inputs(dtype, T) + [torch.randn(2, 6, dtype=dtype) if with_h0 else None]
                kw = dict(max_iter=6, tol=0.0, grad_mode=grad_mode, damping=damping, stopping=stopping, quantile=0.5)
                splits, info = _splits(world, T, kind), {}

                def single(u, lam, hh_u, hh_beta, h0):
                    h, fin, *info["single"] = _slice_by_slice(splits, u, lam, hh_u, hh_beta, h0, **kw)
                    return h, fin

                def parallel(u, lam, hh_u, hh_beta, h0):
                    h, fin, *info["parallel"] = lmd.fixed_point_rnn(u, lam, hh_u, hh_beta, initial_state=h0,
                                                                    output_final_state=True, return_info=True, **kw)
                    return h, fin

                exact = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
                _compare(splits, inputs, [1, 1, 1, 1, "init"], single, parallel, 1, tol=exact)
                for a, b in zip(info["single"], info["parallel"]):
                    assert torch.equal(a, b), (a, b)
    # tol > 0, run to convergence: the whole sequence's fixed point and its exact gradient, every stopping rule
    inputs = _fixed_point_inputs(torch.float64, T) + [torch.randn(2, 6, dtype=torch.float64)]
    for stopping in ("element", "batch", "causal"):
        kw = dict(max_iter=300, tol=1e-12, grad_mode="implicit", stopping=stopping, quantile=1.0)
        _compare(_splits(world, T, 1), inputs, [1, 1, 1, 1, "init"],
                 lambda u, lam, hh_u, hh_beta, h0: linmix.fixed_point_rnn(
                     u, lam, hh_u, hh_beta, initial_state=h0, output_final_state=True, **kw),
                 lambda u, lam, hh_u, hh_beta, h0: lmd.fixed_point_rnn(
                     u, lam, hh_u, hh_beta, initial_state=h0, output_final_state=True, **kw),
                 1, tol=dict(rtol=1e-8, atol=1e-8))
    # No host synchronisation per iteration: 30 iterations on every rank (tol is never met), at most a few host
    # reads per round of the relay, forward and backward (a loop with one per iteration reads 30 or more).
    xs = [x.clone().requires_grad_() for x in _slices(world, T, 0, *_fixed_point_inputs(torch.float64, T))]
    with HostReads() as reads:
        h, n_iter, _ = lmd.fixed_point_rnn(*xs, max_iter=30, tol=1e-300, return_info=True)
        h.sum().backward()
    assert (n_iter == 30).all() and reads.count <= 4 * world, (n_iter, reads.count)
    # Slices of 100 tokens: the state forgets within a slice, so the second round moves no entering state by 1e-8
    # and the relay stops there: two rounds of W - 1 received payloads of B (D + 3) float64 values, not W.
    lmd.reset_comm_bytes()
    with torch.no_grad():
        lmd.fixed_point_rnn(*(x.chunk(world, 1)[rank] for x in _fixed_point_inputs(torch.float64, 100 * world)),
                            max_iter=20, tol=1e-8)
    assert lmd.comm_bytes() == 2 * (world - 1) * 2 * (6 + 3) * 8, lmd.comm_bytes()
    # on_nonconvergence reads the residual of every rank: all of them raise together
    with pytest.raises(linmix.FixedPointConvergenceError, match="did not converge"):
        lmd.fixed_point_rnn(*_slices(world, T, 0, *inputs[:4]), max_iter=1, tol=1e-12, on_nonconvergence="raise",
                            initial_state=inputs[4] if rank == 0 else None)


class _TinyMixer(torch.nn.Module):
    """x -> (sigmoid gate a, input b) -> linear_scan -> out projection; context parallel when cp_group is set."""

    def __init__(self, dim, cp_group=None):
        super().__init__()
        self.proj = torch.nn.Linear(dim, 2 * dim)
        self.out = torch.nn.Linear(dim, dim)
        self.cp_group = cp_group

    def forward(self, x):
        a, b = self.proj(x).chunk(2, -1)
        a = torch.sigmoid(a)
        h = linmix.linear_scan(a, b) if self.cp_group is None else lmd.linear_scan(a, b, group=self.cp_group)
        return self.out(h)


def _step_matches(world, seed, kind, wrap, params_of):
    """One SGD step of a context-parallel _TinyMixer wrapped by `wrap` (each rank: its slice of the sequence,
    loss = its slice's sum) equals a single process's step on the whole sequence with the loss divided by
    the world size (DDP and FSDP2 average gradients over the ranks)."""
    rank = dist.get_rank()
    torch.manual_seed(seed)
    dim, T = 4, 10
    x, y = torch.randn(2, T, dim, dtype=torch.float64), torch.randn(2, T, dim, dtype=torch.float64)
    ref = _TinyMixer(dim).double()
    cp_group = dist.new_group(list(range(world)))  # the context-parallel collectives apart from DDP/FSDP's
    model = _TinyMixer(dim, cp_group).double()
    model.load_state_dict(ref.state_dict())
    for m, xs, ys, div in ((ref, x, y, world), (wrap(model), *_slices(world, T, kind, x, y), 1)):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        (((m(xs) - ys) ** 2).sum() / div).backward()
        opt.step()
    for g, w in zip(params_of(model), ref.parameters()):
        torch.testing.assert_close(g, w.detach(), **TOL[torch.float64])
    dist.destroy_process_group(cp_group)


def _slices(world, T, kind, *xs):
    splits, rank = _splits(world, T, kind), dist.get_rank()
    lo = sum(splits[:rank])
    return [x[:, lo : lo + splits[rank]] for x in xs]


def case_ddp_step(world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    _step_matches(world, 4, 0, DDP, lambda m: [p.detach() for p in m.parameters()])


def case_fsdp2_step(world):
    """FSDP2 (fully_shard: parameters sharded over the ranks, activations not) works on CPU with gloo."""
    from torch.distributed.fsdp import fully_shard

    _step_matches(world, 5, 1, lambda m: fully_shard(m), lambda m: [p.full_tensor() for p in m.parameters()])


def case_checkpoint(world):
    """torch.utils.checkpoint around a context-parallel op: the recomputation reruns the collectives in the
    same order on every rank, and the gradients equal the uncheckpointed ones."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(6)
    B, T, H, K, V = 1, 12, 2, 4, 4
    q, k = torch.randn(B, T, H, K, dtype=torch.float64), torch.randn(B, T, H, K, dtype=torch.float64)
    v = torch.randn(B, T, H, V, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(B, T, H, K, dtype=torch.float64))
    def fn(q, k, v, g):
        o, f = lmd.chunk_gla(q, k, v, g, None, None, True)
        return (o.sin() ** 2).sum() + f.sum()

    grads = []
    for ckpt in (False, True):
        xs = [x.clone().requires_grad_() for x in _slices(world, T, 0, q, k, v, g)]
        loss = checkpoint(fn, *xs, use_reentrant=False) if ckpt else fn(*xs)
        grads.append(torch.autograd.grad(loss, xs))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


CASES = [case_linear_scan, case_selective_scan, case_chunk_gla, case_fixed_point_rnn, case_ddp_step, case_fsdp2_step,
         case_checkpoint]


def _worker(rank, world, port, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    errors = {}
    for case in CASES:
        try:
            case(world)
        except Exception:  # reported per case and rank by the parent test
            errors[case.__name__] = traceback.format_exc()
    gathered = [None] * world
    dist.all_gather_object(gathered, errors)
    if rank == 0:
        torch.save(gathered, out_path)
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: after DDP on gloo, torch's C++ static destructors abort now and
    # then ("terminate called without an active exception", no Python frame), once every result is written.
    os._exit(0)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel(world):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "errors.pt")
        mp.spawn(_worker, args=(world, free_port(), out_path), nprocs=world)
        gathered = torch.load(out_path)
    failures = [f"rank {r} {name}:\n{tb}" for r, errs in enumerate(gathered) for name, tb in errs.items()]
    assert not failures, "\n".join(failures)


def test_single_process_is_the_op():
    """Without an initialised process group (or with one rank) the context-parallel ops are the plain ops."""
    torch.manual_seed(0)
    a, b = torch.rand(2, 5, 3, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(lmd.linear_scan(a, b), linmix.linear_scan(a, b), rtol=0, atol=0)
    with pytest.raises(ValueError, match="at least one token"):
        lmd.linear_scan(a[:, :0], b[:, :0])
    with pytest.raises(ValueError, match="grad_mode"):
        lmd.fixed_point_rnn(a, a, a[:, :, None], a[:, :, :1], grad_mode="exact")
