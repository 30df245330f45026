"""State tracking on group word problems: one fixed-point layer against one diagonal layer.

The paper's headline (Movahedi et al., "Fixed-Point RNNs", arXiv 2503.10799, Sec. 5 / Fig. 4): a single
fixed-point layer with a Householder channel mixer tracks the state of the A5 / S5 word problems past its
training length, where diagonal (Mamba-like) layers fail. Task: tokens g_1..g_T are group elements drawn
uniformly; the label at position t is the prefix product g_1 g_2 ⋯ g_t (one class per group element). Train
at --train-len, then test per-token accuracy at every length in --test-lens.

Models (--models, each: embedding -> one layer -> LayerNorm -> MLP head):
  diagonal   linmix.nn.FixedPointRNN(mixer="none"): the diagonal RNN h_t = lam_t h_{t-1} + (1 - lam_t) u_t;
  mamba      one linmix.nn.Mamba block (the paper's diagonal baseline);
  fp-mamba   linmix.nn.FPMamba with a rank-r Householder mixer, one model per rank in --ranks (the paper's
             A5/S5 model: the mixer, B and C read the previous iterate's y_{t-1}, LayerNorm in the loop);
  fp-rnn     linmix.nn.FixedPointRNN(state_dependent=True), the vector-state FP-RNN, per rank in --ranks;
  fp-rnn-c   the same with contractive=True (lam in (1/2, 1)): given h_{t-1} each token's map is then a
             contraction, so the iteration converges token after token (at most T times the per-token count).
The fixed point is iterated at most --max-iter times in training (tol --tol) and --eval-max-iter times at
test (the authors evaluate with a larger cap than they train with); both are recorded.

    python -m linmix.examples.state_tracking --group s3 --out bench/results/cpu/state_tracking

(the defaults: diagonal against fp-rnn-c at ranks 1 and 2, 3000 steps; about 15 minutes on one CPU core).
Results and what they show: bench/results/cpu/state_tracking/README.md.

writes results.json and accuracy_vs_length.png under --out; with --append, models trained by separate
commands (or processes) accumulate in the same results.json and plot.
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

from ..nn import FixedPointRNN, FPMamba, Mamba


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
    """embedding -> one sequence-mixing layer (`kind`, see the module docstring) -> LayerNorm -> MLP head."""

    def __init__(self, n: int, d: int, kind: str, rank: int, args):
        super().__init__()
        self.embed = nn.Embedding(n, d)
        fp = dict(max_iter=args.max_iter, tol=args.tol, grad_mode=args.grad_mode)
        if kind == "diagonal":
            self.layer = FixedPointRNN(d, d_inner=2 * d, mixer="none")
        elif kind == "mamba":
            self.layer = Mamba(d, d_state=args.d_state)
        elif kind == "fp-mamba":
            self.layer = FPMamba(d, d_state=args.d_state, mixer_rank=rank, **fp)
        elif kind in ("fp-rnn", "fp-rnn-c"):
            self.layer = FixedPointRNN(d, d_inner=2 * d, rank=rank, state_dependent=True, on_nonconvergence="ignore",
                                       contractive=kind == "fp-rnn-c", **fp)
        else:
            raise ValueError(f"state_tracking: unknown model {kind!r}; expected one of {KINDS}")
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, n))

    def set_max_iter(self, max_iter: int):
        if hasattr(self.layer, "max_iter"):
            self.layer.max_iter = max_iter

    def forward(self, x):
        """logits (B, T, n) and the fixed point's (n_iter (B,), residual (B,)), or None for a plain layer."""
        e = self.embed(x)
        if isinstance(self.layer, FPMamba):
            h, info = self.layer(e, return_info=True)
            info = (info["n_iter"], info["residual"])
        else:
            h = self.layer(e)
            info = getattr(self.layer, "last_info", None)
        return self.head(h), info


KINDS = ("diagonal", "mamba", "fp-mamba", "fp-rnn", "fp-rnn-c")


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


def evaluate(model: Model, table: torch.Tensor, args, max_iter: int) -> dict:
    """Per-token and last-token accuracy, mean iterations and converged fraction at every test length."""
    model.eval()
    model.set_max_iter(max_iter)
    test, gen = {}, torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for T in args.test_lens:
            x, y = batch(table, args.test_batch, T, gen)
            logits, info = model(x)
            pred = logits.argmax(-1)
            test[T] = {
                "token_acc": (pred == y).float().mean().item(),
                "last_token_acc": (pred[:, -1] == y[:, -1]).float().mean().item(),
                "mean_iters": info[0].float().mean().item() if info is not None else None,
                "converged_frac": (info[1] < args.tol).float().mean().item() if info is not None else None,
            }
    model.set_max_iter(args.max_iter)
    model.train()
    return test


def train_and_test(name: str, kind: str, rank: int, table: torch.Tensor, args) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    n = table.shape[0]
    model = Model(n, args.d, kind, rank, args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.1)
    bar = Progress(args.steps, name)
    t0, iters, losses = time.time(), [], []
    for step in range(1, args.steps + 1):
        x, y = batch(table, args.batch, args.train_len, gen)
        logits, info = model(x)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if info is not None:
            iters.append(info[0].float().mean().item())
        if step % 10 == 0 or step == args.steps:
            bar.update(step, f"loss {sum(losses[-10:]) / len(losses[-10:]):.3f}")
    train_s = time.time() - t0
    t0 = time.time()
    test = evaluate(model, table, args, args.eval_max_iter)
    test_train_cap = evaluate(model, table, args, args.max_iter) if kind.startswith("fp") else None
    return {"kind": kind, "rank": rank, "params": sum(p.numel() for p in model.parameters()),
            "train_seconds": train_s, "test_seconds": time.time() - t0,
            "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
            "mean_train_iters": sum(iters) / len(iters) if iters else None, "test": test,
            "test_at_train_max_iter": test_train_cap}


def plot(results: dict, path: str, group: str, train_len: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        lens = sorted(int(t) for t in r["test"])
        ax.plot(lens, [r["test"][t]["token_acc"] for t in lens], marker="o", label=name,
                ls="-" if name.startswith("fp") else "--")
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


def save(results: dict, args, argv) -> None:
    """Write results.json and the plot under args.out (merged with the folder's other models if --append)."""
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    run = {"command": "python -m linmix.examples.state_tracking " + " ".join(argv if argv is not None else sys.argv[1:]),
           "args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "machine": platform.machine()}
    merged = {}
    if args.append and os.path.exists(path):  # read now, not at the start: another process may have written
        with open(path) as f:
            old = json.load(f)
        if (old["group"], old["train_len"]) != (args.group, args.train_len):
            raise SystemExit(f"state_tracking: {path} holds {old['group']} at T={old['train_len']}, not "
                             f"{args.group} at T={args.train_len}; use another --out")
        merged = {k: dict(v, test={int(t): a for t, a in v["test"].items()}) for k, v in old["results"].items()}
    merged.update({k: dict(v, run=run) for k, v in results.items()})
    with open(path, "w") as f:
        json.dump({"group": args.group, "train_len": args.train_len, "results": merged}, f, indent=1)
    plot(merged, os.path.join(args.out, "accuracy_vs_length.png"), args.group, args.train_len)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--group", default="s3", choices=["s3", "a5", "s5"])
    p.add_argument("--models", default="diagonal,fp-rnn-c", help=f"comma-separated, from {KINDS}")
    p.add_argument("--ranks", default="1,2", help="Householder ranks of the fixed-point models")
    p.add_argument("--d", type=int, default=32, help="d_model (d_inner = 2 d_model)")
    p.add_argument("--d-state", type=int, default=16, help="state size of mamba / fp-mamba")
    p.add_argument("--grad-mode", default="onestep", help="gradient of the fixed-point models (the authors': onestep)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--train-len", type=int, default=16)
    p.add_argument("--test-lens", default="8,16,24,32,48,64,128")
    p.add_argument("--test-batch", type=int, default=256)
    p.add_argument("--max-iter", type=int, default=16)
    p.add_argument("--eval-max-iter", type=int, default=128)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for results.json and accuracy_vs_length.png")
    p.add_argument("--append", action="store_true",
                   help="keep the other models of an existing --out/results.json (same group and train length)")
    args = p.parse_args(argv)
    args.test_lens = [int(t) for t in args.test_lens.split(",")]
    table = group_table(args.group)
    runs = []
    for kind in args.models.split(","):
        if kind.startswith("fp"):
            runs += [(f"{kind} r={r}", kind, int(r)) for r in args.ranks.split(",")]
        else:
            runs.append((kind, kind, 0))
    results = {}
    for name, kind, rank in runs:
        results[name] = train_and_test(name, kind, rank, table, args)
        accs = ", ".join(f"T={t}: {v['token_acc']:.3f}" for t, v in results[name]["test"].items())
        print(f"{name}: trained {results[name]['train_seconds']:.0f}s; token accuracy {accs}", flush=True)
        if args.out:  # after every model, so a run stopped early keeps the models it finished
            save(results, args, argv)
    return results


if __name__ == "__main__":
    main()
