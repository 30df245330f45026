"""The registry of CUDA kernel families (csrc/common/kernels.h, linmix.kernels()): bench/results/README.md mirrors
it row for row, its switches behave, the default of every op is GPU-verified, and the CUDA emulator runs every
kernel it names (so the "emulation-verified" column stays true at every commit CI passes)."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest
import torch

import linmix
from linmix import emulation

import test_emulated_kernels as cases

README = Path(__file__).resolve().parents[1] / "bench" / "results" / "README.md"


def readme_rows() -> dict[str, dict]:
    rows = {}
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = dict(op=cells[1], default=cells[2] == "yes", tier=cells[3],
                                             emulation=cells[5])
    return rows


def test_readme_mirrors_the_registry():
    rows, reg = readme_rows(), {k["name"]: k for k in linmix.kernels()}
    assert set(rows) == set(reg), f"README only: {set(rows) - set(reg)}; registry only: {set(reg) - set(rows)}"
    for name, k in reg.items():
        assert (rows[name]["op"], rows[name]["default"], rows[name]["tier"]) == (k["op"], k["default"], k["tier"]), name
        verified = k["tier"] in ("gpu-verified", "emulation-verified")
        assert (rows[name]["emulation"] != "-") == verified, f"{name}: emulation-verified column"


def test_every_op_defaults_to_gpu_verified_kernels():
    for k in linmix.kernels():
        if k["default"]:
            assert k["tier"] == "gpu-verified", k["name"]
    # every op has a default family, but selective_state_update, whose default CUDA path is selective_scan's
    def ops(ks):  # a family may serve several ops ("chunk_gla, fused_recurrent_gla")
        return {op for k in ks for op in k["op"].split(", ")}
    without = ops(linmix.kernels()) - ops(k for k in linmix.kernels() if k["default"])
    assert without == {"selective_state_update"}


def test_unknown_family_in_switch_is_an_error(monkeypatch):
    monkeypatch.setenv("LINMIX_KERNELS", "gla_fused,no_such_family")
    monkeypatch.setenv("LINMIX_UNVERIFIED_KERNELS", "1")  # checked all the same
    monkeypatch.setenv("LINMIX_EMULATE_CUDA", "1")
    q = torch.randn(1, 3, 1, 4)
    if "plain" not in emulation.builds():
        pytest.skip("the switch is read on the CUDA path; built without LINMIX_CUDA_EMU=ON")
    with pytest.raises(ValueError, match="unknown kernel family 'no_such_family'.*gla_fused"):
        linmix.chunk_gla(q, q, q, -q.abs())


def run_every_op():
    """Each op forward and backward on small shapes that reach every kernel of every family enabled now."""
    for dtype in (torch.float32, torch.bfloat16):
        cases.check(*cases.linear_scan_case(2, 37, 33, True, False), dtype)
        cases.check(*cases.linear_scan_case(1, 12, 33, True, True, lengths=(5, 0, 7)), dtype)  # linear_scan_varlen
        cases.check(*cases.selective_scan_case(1, 4, 8, 37, True, 2), dtype)
        cases.check(*cases.selective_scan_case(1, 4, 8, 37, False, 1), dtype)
        cases.check(*cases.selective_scan_varlen_case(2, 3, [0, 2, 1, 6, 0], True), dtype)
        for op in (linmix.chunk_gla, linmix.fused_recurrent_gla):
            cases.check(*cases.gla_case(op, 1, 70, 1, 20, 33), dtype)
            cases.check(*cases.gla_case(op, 1, 9, 1, 260, 40), dtype)  # K > 256: gla_head512
            cases.check(*cases.gla_case(op, 1, 9, 1, 8, 260), dtype)  # V > 256: gla_head512's dq/dk kernel
            cases.check(*cases.gla_varlen_case(op, [3, 0, 6], 1, 8, 5), dtype)  # cu_seqlens: gla_varlen
            cases.check(*cases.gla_varlen_case(op, [3, 0, 6], 1, 260, 5), dtype)  # its kernels sized for 512
        cases.check(*cases.fixed_point_case(1, 37, 20, 2, "onestep"), dtype)
        for stopping in ("batch", "causal"):
            cases.check(*cases.fixed_point_variants_case(3, 37, 20, 2, stopping, 1e-5), dtype)
        state = torch.zeros(2, 8, 4)
        linmix.selective_state_update(state, torch.randn(2, 8).to(dtype), torch.rand(2, 8), -torch.rand(8, 4),
                                      torch.randn(2, 4), torch.randn(2, 4), dt_softplus=True)


@pytest.mark.skipif("plain" not in emulation.builds(), reason="built without LINMIX_CUDA_EMU=ON")
def test_emulator_runs_every_registered_kernel(monkeypatch):
    monkeypatch.setenv("LINMIX_EMULATE_CUDA", "1")
    monkeypatch.delenv("LINMIX_KERNELS", raising=False)
    for switch in ("0", "1"):  # the defaults, then every opt-in family
        monkeypatch.setenv("LINMIX_UNVERIFIED_KERNELS", switch)
        run_every_op()

    def missing(k):
        ran = emulation.kernels_run()
        return [p for p in k["kernels"] if not any(fnmatch.fnmatchcase(name, p) for name in ran)]

    monkeypatch.setenv("LINMIX_UNVERIFIED_KERNELS", "0")
    for k in linmix.kernels():  # a family another one takes precedence over, alone
        if not k["default"] and missing(k):
            monkeypatch.setenv("LINMIX_KERNELS", k["name"])
            run_every_op()
    for k in linmix.kernels():
        assert not missing(k), (f"{k['name']}: no kernel matching {missing(k)} ran under the emulator; "
                                f"ran: {sorted(emulation.kernels_run())}")
