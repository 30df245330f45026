"""State tracking on group word problems: a one-layer fixed-point RNN against the diagonal baseline.

The paper's headline (Movahedi et al., "Fixed-Point RNNs", arXiv 2503.10799, Sec. 5 / Fig. 4): a single
FP-RNN layer with a Householder mixer tracks the state of the A5 / S5 word problems past its training
length, where diagonal (Mamba-like) layers fail. Task: tokens g_1..g_T are group elements drawn uniformly;
the label at position t is the prefix product g_1 g_2 ⋯ g_t (one class per group element). Train at
--train-len, then test per-token accuracy at every length in --test-lens.

Models: embedding -> linmix.nn.FixedPointRNN (mixer="householder", rank r; or mixer="none", the same layer
with Q = I: a diagonal RNN) -> LayerNorm -> MLP head. The fixed point is iterated at most --max-iter times
in training (tol --tol), and up to --eval-max-iter at test.

    python -m linmix.examples.state_tracking --group s3 --steps 600 --out bench/results/cpu/state_tracking

writes results.json and accuracy_vs_length.png under --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time

import torch
from torch import nn

from ..nn import FixedPointRNN


def group_table(name: str) -> torch.Tensor:
    """Multiplication table (n, n) of S3, A5 or S5 as permutations: table[a, b] = index of a∘b."""
    k = {"s3": 3, "a5": 5, "s5": 5}[name]
    perms = list(itertools.permutations(range(k)))
    if name == "a5":  # even permutations
        perms = [p for p in perms if sum(p[i] > p[j] for i in range(k) for j in range(i + 1, k)) % 2 == 0]
    index = {p: i for i, p in enumerate(perms)}
    table = [[index[tuple(a[b[i]] for i in range(k))] for b in perms] for a in perms]
    return torch.tensor(table)


def batch(table: torch.Tensor, B: int, T: int, gen: torch.Generator):
    """Random words (B, T) and their prefix products (B, T)."""
    n = table.shape[0]
    x = torch.randint(0, n, (B, T), generator=gen)
    y = torch.empty_like(x)
    acc = x[:, 0]
    y[:, 0] = acc
    for t in range(1, T):
        acc = table[acc, x[:, t]]
        y[:, t] = acc
    return x, y


class Model(nn.Module):
    def __init__(self, n: int, d: int, mixer: str, rank: int, max_iter: int, tol: float):
        super().__init__()
        self.embed = nn.Embedding(n, d)
        self.rnn = FixedPointRNN(d, rank=rank, mixer=mixer, max_iter=max_iter, tol=tol, on_nonconvergence="ignore")
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, n))

    def forward(self, x):
        return self.head(self.rnn(self.embed(x)))


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.start = total, label, time.time()

    def update(self, i: int, note: str = ""):
        done = int(30 * i / self.total)
        rate = (time.time() - self.start) / max(i, 1)
        sys.stderr.write(f"\r{self.label:>18} [{'#' * done}{'.' * (30 - done)}] {i}/{self.total} "
                         f"eta {rate * (self.total - i):5.0f}s {note}   ")
        sys.stderr.flush()
        if i == self.total:
            sys.stderr.write("\n")


def train_and_test(name: str, mixer: str, rank: int, table: torch.Tensor, args) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    n = table.shape[0]
    model = Model(n, args.d, mixer, rank, args.max_iter, args.tol)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.1)
    bar = Progress(args.steps, name)
    t0, iters, losses = time.time(), [], []
    for step in range(1, args.steps + 1):
        x, y = batch(table, args.batch, args.train_len, gen)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if model.rnn.last_info is not None:
            iters.append(model.rnn.last_info[0].float().mean().item())
        if step % 10 == 0 or step == args.steps:
            bar.update(step, f"loss {sum(losses[-10:]) / len(losses[-10:]):.3f}")
    train_s = time.time() - t0
    model.eval()
    model.rnn.max_iter = args.eval_max_iter
    test = {}
    test_gen = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for T in args.test_lens:
            x, y = batch(table, args.test_batch, T, test_gen)
            pred = model(x).argmax(-1)
            info = model.rnn.last_info
            test[T] = {
                "token_acc": (pred == y).float().mean().item(),
                "last_token_acc": (pred[:, -1] == y[:, -1]).float().mean().item(),
                "mean_iters": info[0].float().mean().item() if info is not None else None,
                "converged_frac": (info[1] < args.tol).float().mean().item() if info is not None else None,
            }
    return {"mixer": mixer, "rank": rank if mixer != "none" else 0, "train_seconds": train_s,
            "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
            "mean_train_iters": sum(iters) / len(iters) if iters else None, "test": test}


def plot(results: dict, path: str, group: str, train_len: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        lens = sorted(int(t) for t in r["test"])
        ax.plot(lens, [r["test"][t]["token_acc"] for t in lens], marker="o", label=name)
    ax.axvline(train_len, color="gray", ls="--", lw=1, label=f"train length {train_len}")
    ax.axhline(1.0 / group_table(group).shape[0], color="gray", ls=":", lw=1, label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("test sequence length")
    ax.set_ylabel("per-token accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{group.upper()} word problem, one layer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--group", default="s3", choices=["s3", "a5", "s5"])
    p.add_argument("--ranks", default="1,2", help="Householder ranks of the FP-RNN models")
    p.add_argument("--d", type=int, default=32, help="model width (d_model = d_inner)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--train-len", type=int, default=16)
    p.add_argument("--test-lens", default="8,16,32,64,128")
    p.add_argument("--test-batch", type=int, default=256)
    p.add_argument("--max-iter", type=int, default=32)
    p.add_argument("--eval-max-iter", type=int, default=256)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for results.json and accuracy_vs_length.png")
    args = p.parse_args(argv)
    args.test_lens = [int(t) for t in args.test_lens.split(",")]
    table = group_table(args.group)
    runs = [("diagonal", "none", 0)] + [(f"fp-householder r={r}", "householder", int(r)) for r in args.ranks.split(",")]
    results = {}
    for name, mixer, rank in runs:
        results[name] = train_and_test(name, mixer, rank, table, args)
        accs = ", ".join(f"T={t}: {v['token_acc']:.3f}" for t, v in results[name]["test"].items())
        print(f"{name}: trained {results[name]['train_seconds']:.0f}s; token accuracy {accs}", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        meta = {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "machine": platform.machine(), "command": "python -m linmix.examples.state_tracking "
                + " ".join(argv if argv is not None else sys.argv[1:])}
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
        plot(results, os.path.join(args.out, "accuracy_vs_length.png"), args.group, args.train_len)
    return results


if __name__ == "__main__":
    main()
