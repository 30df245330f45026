"""Smoke tests of `python -m linmix.bench`: it runs, writes plausible JSON/CSV/PNG, and its checks pass."""

import csv
import importlib.util
import json
import subprocess
import sys

import pytest

from linmix import emulation
from linmix.bench import varlen
from linmix.bench.__main__ import main


def _run(tmp_path, *args):
    cmd = [sys.executable, "-m", "linmix.bench", "--device", "cpu", "--quick", "--threads", "1", "--out", str(tmp_path), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def _rows(path):
    data = json.loads(path.read_text())
    assert data["env"]["torch"] and data["env"]["linmix_version"] and data["env"]["hardware"]["bytes_per_s"] > 0
    return data["rows"], data["skipped"]


@pytest.mark.slow
@pytest.mark.no_emulation("times the CPU kernels; under the emulator it would time the emulator")
def test_bench_linear_scan(tmp_path):
    out = _run(tmp_path, "--op", "linear_scan")
    assert "linear_scan" in out and "wrote" in out
    rows, _ = _rows(tmp_path / "bench_quick_linear_scan.json")
    impls = {r["impl"] for r in rows}
    assert {"linmix", "torch (doubling scan, fp32)"} <= impls
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    assert {r["dtype"] for r in rows} == {"fp32", "bf16"}
    for r in rows:
        assert 0 < r["p20"] <= r["ms"] <= r["p80"], r
        assert r["check"] == "pass" and r["rel_err"] < {"fp32": 1e-4, "bf16": 1e-2}[r["dtype"]], r
        assert r["gb_per_s"] > 0 and r["tokens_per_s"] > 0 and r["floor_ms"] > 0
    linmix_rows = [r for r in rows if r["impl"] == "linmix"]
    assert all(r["linmix_speedup"] == 1.0 for r in linmix_rows)
    with open(tmp_path / "bench_quick_linear_scan.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "linear_scan_ms_vs_T_quick.png").stat().st_size > 1000
        assert (tmp_path / "linear_scan_speedup_quick.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.no_emulation("times the CPU kernels; under the emulator it would time the emulator")
def test_bench_all_ops(tmp_path):
    _run(tmp_path, "--op", "all", "--no-plot")
    rows, skipped = _rows(tmp_path / "bench_quick.json")
    ops = {r["op"] for r in rows}
    # every op either ran or is skipped with its reason
    for op in ("linear_scan", "selective_scan", "chunk_gla", "fixed_point_rnn"):
        assert op in ops or any(s.startswith(op) for s in skipped), op
    assert all(r["check"].startswith("pass") for r in rows)
    # the FlashAttention-style baseline on the CPU: SDPA's flash kernel and its math backend, both dtypes
    sdpa = {(r["impl"], r["dtype"]) for r in rows if r["op"] == "chunk_gla" and r["impl"].startswith("sdpa")}
    assert sdpa == {(i, d) for i in ("sdpa-flash", "sdpa-math") for d in ("fp32", "bf16")}


@pytest.fixture
def torch_threads():
    """main(["--threads", N]) sets torch's thread count for the whole process: put it back."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.no_emulation("times the CPU kernels; under the emulator it would time the emulator")
def test_cpu_sdpa_rows(tmp_path, torch_threads):
    # The FlashAttention-style baseline on the CPU (issue 24): SDPA pinned to PyTorch's CPU flash kernel and to the
    # math backend, at every chunk_gla configuration, fp32 and bf16, forward and forward+backward, each checked
    # against float64 causal attention (output and dq, dk, dv); no "needs CUDA" skip left.
    import torch

    from linmix.bench import gla
    from linmix.bench.__main__ import shape_str

    args = ["--op", "chunk_gla", "--device", "cpu", "--quick", "--threads", "1", "--clock", "thread", "--impl", "sdpa",
            "--no-plot", "--out", str(tmp_path)]
    assert main(args) == 0
    rows, skipped = _rows(tmp_path / "bench_quick_chunk_gla.json")
    assert not [s for s in skipped if "sdpa" in s], skipped
    cfgs = gla.OP.configs("cpu", True)
    want = {(impl, shape_str(gla.OP, c), {torch.float32: "fp32", torch.bfloat16: "bf16"}[c["dtype"]], mode)
            for impl in ("sdpa-flash", "sdpa-math") for c in cfgs for mode in ("fwd", "fwd+bwd")}
    assert {(r["impl"], r["shape"], r["dtype"], r["mode"]) for r in rows} == want
    for r in rows:
        assert r["check"] == "pass" and r["rel_err"] < {"fp32": 1e-4, "bf16": 3e-2}[r["dtype"]], r
        assert 0 < r["p20"] <= r["ms"] <= r["p80"] and r["x_floor"] > 0, r
        B, T, H, D = (int(r["shape"].split(f"{k}=")[1].split()[0]) for k in ("B", "T", "H", "K"))
        # the attention cost model, not chunk_gla's: 2 B H T^2 D forward flops (the causal half)
        assert r["cost"]["tc_flops"] == 2 * B * H * T * T * D * (1 if r["mode"] == "fwd" else 3.5), r
    assert "thread clock" in json.loads((tmp_path / "bench_quick_chunk_gla.json").read_text())["env"]["hardware"]["name"]


def test_cpu_configs_fp32_and_bf16(torch_threads):
    # Every op's CPU configurations come in fp32 and bf16 at the same shapes, full and --quick; chunk_gla's at
    # H >= 8, K = V in {64, 128}, T up to 8192 (issue 24); --clock thread refuses more than one thread.
    import torch

    from linmix.bench.__main__ import OPS, shape_str

    for op in OPS.values():
        for quick in (True, False):
            shapes = {dt: [shape_str(op, c) for c in op.configs("cpu", quick) if c["dtype"] == dt]
                      for dt in (torch.float32, torch.bfloat16)}
            assert shapes[torch.float32] and sorted(shapes[torch.float32]) == sorted(shapes[torch.bfloat16]), op.name
    gla = OPS["chunk_gla"].configs("cpu", False)
    assert {c["K"] for c in gla} == {64, 128} and all(c["K"] == c["V"] and c["H"] >= 8 for c in gla)
    assert max(c["T"] for c in gla) == 8192
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--threads", "2", "--clock", "thread", "--list"])


def test_varlen_rows(tmp_path):
    # --varlen: per op and mode, the packed call and the one-sequence call on the same tokens, and their ratio
    assert main(["--varlen", "--quick", "--op", "linear_scan", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "varlen_quick.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["fwd", "fwd+bwd"]
    for r in rows:
        assert r["n_seqs"] == 64 and r["ratio"] == r["packed_ms"] / r["one_sequence_ms"] > 0
    assert "fixed_point_rnn" in varlen.supported()


def test_list_and_profile_cmd(capsys):
    assert main(["--list", "--op", "linear_scan", "--device", "cpu"]) == 0
    assert "linear_scan 0: B=" in capsys.readouterr().out
    assert main(["--profile-cmd", "--op", "chunk_gla", "--config", "2"]) == 0
    out = capsys.readouterr().out
    assert "nsys profile" in out and "ncu --kernel-name regex:linmix_" in out and "--only 2" in out


def test_partial_gradient_baseline_checks_and_runs():
    # SDPA has no gate: a baseline that differentiates only q, k, v must check and time without touching g.
    import torch.nn.functional as F

    from linmix.bench import gla
    from linmix.bench.__main__ import check, runner
    from linmix.bench.baselines import Impl, attention_ref

    def sdpa(x):
        o = F.scaled_dot_product_attention(*(x[n].transpose(1, 2) for n in ("q", "k", "v")), is_causal=True)
        return o.transpose(1, 2)

    impl = Impl("sdpa-math", sdpa, ref=attention_ref, grads=("q", "k", "v"))
    cfg = gla.OP.configs("cpu", True)[0]
    res = check(gla.OP, impl, cfg, "cpu")
    assert res["check"] == "pass", res
    grads = runner(impl, gla.OP.make_inputs(gla.OP.small(cfg), "cpu"), "fwd+bwd", impl.grads)()
    assert len(grads) == 3 and all(g is not None for g in grads)


@pytest.mark.no_emulation("runs every documented argument, some without CUDA kernels yet (fixed_point_rnn's)")
def test_sanitize_cases_run_on_cpu():
    # The sanitizer's runs (every op, every argument value, both dtypes), forward and backward, on the CPU: what
    # compute-sanitizer will see on a GPU, less the device.
    import torch

    from linmix.bench.sanitize import SHAPES, run, runs

    seen = set()
    for dtype in (torch.float32, torch.bfloat16):
        for case, label, x in runs("cpu", dtype):
            run(case, x)
            seen.add(case.name)
    assert seen == set(SHAPES)
    assert [label for _, label, _ in runs("cpu", torch.float32, ["chunk_gla"])][0] == "chunk_gla T=1"


@pytest.mark.slow
@pytest.mark.skipif("traffic" not in emulation.builds(),
                    reason="built without LINMIX_CUDA_EMU_SANITIZERS=ON")
def test_traffic_counts_at_least_the_minimum():
    """`--traffic`'s rows: no family moves less than the op's minimum (every input read, every output written), unique
    bytes never exceed requested ones, and the fused forward moves exactly the minimum in unique bytes: q, k, g, v read,
    o and the final state written, nothing else."""
    from linmix.bench import traffic

    shape = dict(B=1, T=70, H=2, K=20, V=33)
    for family in traffic.FAMILIES["chunk_gla"]:
        for mode in traffic.MODES:
            r = traffic.run_one("chunk_gla", family, mode, shape)
            assert r["min_bytes"] <= r["unique_bytes"] <= r["requested_bytes"], (family, mode, r)
            if (family, mode) == ("gla_fused", "fwd"):
                assert r["unique_bytes"] == r["min_bytes"] and len(r["launches"]) == 1, r
