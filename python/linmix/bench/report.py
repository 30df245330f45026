"""Results out: the table on stdout, JSON and CSV files, PNG plots (when matplotlib is importable)."""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict

COLUMNS = [
    "op", "impl", "shape", "dtype", "mode", "ms", "p20", "p80", "tokens_per_s", "gb_per_s", "floor_ms", "floor_bound",
    "x_floor", "linmix_speedup", "check", "max_err", "rel_err", "ms_per_iter", "iter_vs_scan", "sweep", "config",
]


def add_speedups(rows: list[dict]) -> None:
    """linmix_speedup on every row: this row's ms / linmix's ms at the same op, shape, dtype, mode and variant."""
    def key(r):
        return r["op"], r["shape"], r["dtype"], r["mode"], r["variant"]

    linmix_ms = {key(r): r["ms"] for r in rows if r["impl_name"] == "linmix"}
    for r in rows:
        k = key(r)  # linmix.<other op> rows (fixed_point_rnn's linear_scan pass) are yardsticks, not competitors
        ok = k in linmix_ms and not r["impl_name"].startswith("linmix.")
        r["linmix_speedup"] = r["ms"] / linmix_ms[k] if ok else None


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict], skipped: list[str]) -> str:
    head = f"{'op':<14} {'impl':<30} {'shape':<34} {'dtype':<5} {'mode':<7} {'ms [p20, p80]':>26} {'Mtok/s':>9} " \
           f"{'GB/s':>8} {'x floor':>8} {'linmix x':>8}  check"
    lines = [head, "-" * len(head)]
    for r in rows:
        ms = f"{r['ms']:.4g} [{r['p20']:.4g}, {r['p80']:.4g}]"
        check = r["check"] if r["rel_err"] is None else f"{r['check']} ({r['rel_err']:.1e})"
        extra = f"  {r['ms_per_iter']:.4g} ms/iter" if r.get("ms_per_iter") else ""
        extra += f", {r['iter_vs_scan']:.2f}x scan pass" if r.get("iter_vs_scan") else ""
        lines.append(
            f"{r['op']:<14} {r['impl'][:30]:<30} {r['shape']:<34} {r['dtype']:<5} {r['mode']:<7} {ms:>26} "
            f"{r['tokens_per_s'] / 1e6:>9.3g} {r['gb_per_s']:>8.3g} {_fmt(r['x_floor'], '8.2f')} "
            f"{_fmt(r['linmix_speedup'], '8.2f')}  {check}{extra}"
        )
    if skipped:
        lines += ["", "skipped:"] + [f"  {s}" for s in skipped]
    return "\n".join(lines)


def write_json_csv(out_dir: str, name: str, payload: dict, rows: list[dict], columns: list[str] | None = None) -> list[str]:
    """out_dir/<name>.json (the payload) and out_dir/<name>.csv (the rows: `columns`, or the first row's keys)."""
    os.makedirs(out_dir, exist_ok=True)
    jpath, cpath = os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.csv")
    with open(jpath, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    with open(cpath, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns or list(rows[0]), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return [jpath, cpath]


def write(out_dir: str, meta: dict, rows: list[dict], skipped: list[str], tag: str) -> list[str]:
    return write_json_csv(out_dir, f"bench_{tag}", {"env": meta, "rows": rows, "skipped": skipped}, rows, COLUMNS)


def plots(out_dir: str, rows: list[dict], title: str, tag: str) -> list[str]:
    """Per op: ms vs the swept length (one line per implementation, fwd and fwd+bwd side by side), and
    linmix's speed-up over each other implementation. Returns the files written ([] without matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_op = defaultdict(list)
    for r in rows:
        if r["sweep"] is not None:
            by_op[r["op"]].append(r)
    for op, rs in by_op.items():
        for kind in ("ms", "speedup"):
            modes = sorted({r["mode"] for r in rs}, key=len)
            fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.2), squeeze=False)
            drawn = False
            for ax, mode in zip(axes[0], modes):
                lines = defaultdict(list)
                for r in rs:
                    if r["mode"] != mode:
                        continue
                    if kind == "ms":
                        lines[r["impl"]].append((r["sweep"], r["ms"]))
                    elif r["impl_name"] != "linmix" and r["linmix_speedup"]:
                        lines[f"vs {r['impl']}"].append((r["sweep"], r["linmix_speedup"]))
                for name, pts in sorted(lines.items()):
                    pts.sort()
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
                    drawn = True
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel(rs[0]["sweep_key"])
                ax.set_ylabel("ms (median)" if kind == "ms" else "linmix speed-up (x)")
                if kind == "speedup":
                    ax.axhline(1.0, color="grey", lw=0.8)
                ax.set_title(f"{op} {mode}")
                ax.grid(True, which="both", alpha=0.3)
                if lines:
                    ax.legend(fontsize=7)
            fig.suptitle(title, fontsize=9)
            fig.tight_layout()
            if drawn:
                path = os.path.join(out_dir, f"{op}_{'ms_vs_T' if kind == 'ms' else 'speedup'}_{tag}.png")
                fig.savefig(path, dpi=110)
                written.append(path)
            plt.close(fig)
    return written
