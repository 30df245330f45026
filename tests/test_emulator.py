"""The CUDA emulator's own checks (csrc/emu/). Each fault the emulator exists to catch is injected into a small
kernel (csrc/emu/selftest.cpp) and must be caught: by the emulator itself under every thread schedule, or by the
AddressSanitizer / ThreadSanitizer build of the kernels it is meant for; a correct kernel that uses every feature
(shared memory, barriers, the four shuffles, __syncwarp, atomics, WMMA) passes everywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from linmix import emulation

pytestmark = pytest.mark.skipif("plain" not in emulation.builds(), reason="built without LINMIX_CUDA_EMU=ON")

# In-process cases use the plain build; a run of the whole suite under a sanitizer loads that build instead, and
# the faults here would end the process.
plain_build = pytest.mark.skipif(bool(os.environ.get("LINMIX_EMU_SANITIZER")), reason="a sanitizer build is loaded")
sanitizer_builds = pytest.mark.skipif(set(emulation.SANITIZERS) - set(emulation.builds()) != set(),
                                      reason="built without LINMIX_CUDA_EMU_SANITIZERS=ON")

CORRECT = ["ok", "wmma", "smem_64k_with_opt_in"]

# fault -> what the emulator's error names (besides the kernel)
REPORTED = {
    "divergent_syncthreads": "divergent __syncthreads",
    "early_exit": "reached by 127 of 128 threads: thread (5, 0, 0) exited without reaching it",
    "shuffle_lane_missing": "lane 16 named in the mask never arrives (it exited)",
    "shuffle_outside_mask": "reads lane 16, which is not in the mask 0x0000ffff",
    "syncwarp_lane_missing": "lane 7 named in the mask never arrives (it exited)",
    "static_smem_oob": "at byte 524 of a static __shared__ variable of 512 bytes, past its end",
    "dynamic_smem_oob": "at byte 800 of dynamic shared memory, past its end (800 bytes launched)",
    "wmma_misaligned": "the pointer is not 32-byte (256-bit) aligned",
    "wmma_bad_ldm": "ldm = 20 is not a multiple of 8 elements",
    "smem_64k_without_opt_in": "65536 bytes of dynamic shared memory exceed the kernel's limit of 49152",
    "smem_above_sm80": "cudaFuncSetAttribute(MaxDynamicSharedMemorySize, 204800) exceeds",
    "block_too_large": "block (2048, 1, 1) exceeds the limits",
    "grid_too_large": "grid (1, 70000, 1) exceeds the limits",
}

# faults whose kernel completes with a wrong result: a missing barrier reads shared memory not yet written (NaN
# at block start), and code that assumes WMMA's fragment layout meets a random one
WRONG_RESULT = ["missing_syncthreads", "wmma_layout_dependent"]


@plain_build
@pytest.mark.parametrize("schedule", emulation.SCHEDULES)
@pytest.mark.parametrize("case", CORRECT)
def test_correct_kernel_passes(case, schedule, monkeypatch):
    monkeypatch.setenv("LINMIX_EMU_SCHEDULE", schedule)
    code, message = emulation.selftest(case)
    assert code == 0, message


@plain_build
@pytest.mark.parametrize("schedule", emulation.SCHEDULES)
@pytest.mark.parametrize("case", sorted(REPORTED))
def test_fault_is_reported(case, schedule, monkeypatch):
    monkeypatch.setenv("LINMIX_EMU_SCHEDULE", schedule)
    code, message = emulation.selftest(case)
    assert code == 1, f"not caught: {message!r}"
    assert REPORTED[case] in message
    # through cudaGetLastError and LINMIX_CHECK_LAUNCH, naming the kernel
    assert "linmix_emu_selftest_" in message


@plain_build
@pytest.mark.parametrize("schedule", emulation.SCHEDULES)
@pytest.mark.parametrize("case", WRONG_RESULT)
def test_fault_gives_a_wrong_result(case, schedule, monkeypatch):
    monkeypatch.setenv("LINMIX_EMU_SCHEDULE", schedule)
    code, message = emulation.selftest(case)
    assert code == 2, f"not caught: code {code}, {message!r}"


@plain_build
def test_unknown_case_is_an_error():
    code, message = emulation.selftest("no_such_case")
    assert code == -1 and "no_such_case" in message


def run_under(sanitizer: str, case: str) -> subprocess.CompletedProcess:
    script = ("import sys; from linmix import emulation; code, msg = emulation.selftest(%r); print(code, msg); "
              "sys.exit(code)" % case)
    return subprocess.run([sys.executable, "-c", script], env=emulation.environment(sanitizer),
                          capture_output=True, text=True, timeout=600)


# (case, sanitizer) -> what the sanitizer's report says. The plain build cannot see a global out-of-bounds write
# or a race between blocks; the sanitizer builds report them at the faulting access.
SANITIZED = {
    ("global_oob", "address"): "heap-buffer-overflow",
    ("static_smem_oob", "address"): "unknown-crash|use-after-poison|heap-buffer-overflow",
    ("dynamic_smem_oob", "address"): "unknown-crash|use-after-poison|heap-buffer-overflow",
    ("missing_syncthreads", "thread"): "data race",
    ("block_race", "thread"): "data race",
}


@sanitizer_builds
@pytest.mark.parametrize("case, sanitizer", sorted(SANITIZED))
def test_sanitizer_catches(case, sanitizer):
    p = run_under(sanitizer, case)
    report = p.stderr
    assert p.returncode != 0, f"{sanitizer} sanitizer did not stop {case}:\n{p.stdout}\n{report[-3000:]}"
    assert any(w in report for w in SANITIZED[case, sanitizer].split("|")), report[-3000:]
    assert f"linmix_emu_selftest_{case}_kernel" in report, report[-3000:]


@sanitizer_builds
@pytest.mark.parametrize("sanitizer", emulation.SANITIZERS)
@pytest.mark.parametrize("case", CORRECT)
def test_sanitizers_quiet_on_correct_kernels(case, sanitizer):
    p = run_under(sanitizer, case)
    assert p.returncode == 0, f"{p.stdout}\n{p.stderr[-3000:]}"


# Bugs the emulator found in kernels on main, each pinned: the kernel, the fault, and the run that shows it.
LINEAR_SCAN_BWD = ("import torch, linmix\n"
                   "a, b = torch.rand(2, 70, 40, requires_grad=True), torch.randn(2, 70, 40, requires_grad=True)\n"
                   "h0 = torch.randn(2, 40, requires_grad=True)\n"
                   "linmix.linear_scan(a, b, h0).sum().backward()\n")


@sanitizer_builds
def test_linear_scan_bwd_dh0_race():
    """linmix_linear_scan_bwd_kernel: every warp of a block wrote dh0 (the same value), a write-write race that
    ThreadSanitizer reports in the GPU-verified instance; the one-writer instance is race-free."""
    env = emulation.environment("thread")
    unsuppressed = dict(env, TSAN_OPTIONS=":".join(o for o in env["TSAN_OPTIONS"].split(":")
                                                   if not o.startswith("suppressions=")))
    p = subprocess.run([sys.executable, "-c", LINEAR_SCAN_BWD], env=unsuppressed, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode != 0 and "data race" in p.stderr, p.stderr[-3000:]
    assert "linmix_linear_scan_bwd_kernel<linmix::ChannelScanTraits<8, 8>, float, false>" in p.stderr
    fixed = dict(unsuppressed, LINMIX_KERNELS="linear_scan_bwd_one_writer")
    p = subprocess.run([sys.executable, "-c", LINEAR_SCAN_BWD], env=fixed, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]


traffic_build = pytest.mark.skipif("traffic" not in emulation.builds(), reason="built without LINMIX_CUDA_EMU_SANITIZERS=ON")


def traffic_of(case: str) -> list[dict]:
    script = ("import json, sys; from linmix import emulation; code, msg = emulation.selftest(%r); "
              "assert code == 0, msg; print(json.dumps(emulation.traffic()))" % case)
    p = subprocess.run([sys.executable, "-c", script], env=emulation.environment(traffic=True), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.splitlines()[-1])


@traffic_build
def test_traffic_counts_global_bytes_exactly():
    """linmix_emu_selftest_traffic_kernel: 3 blocks of 128 threads, each thread reads in[i] and in[i + 1] (4 bytes
    each) and writes out[i]; warp 0 of block 0 loads one 16x16 fp16 WMMA tile (512 bytes). Shared memory, the
    threads' locals and the kernel's parameters do not count. With reread, every thread reads in[i + 2] too: more
    requests, the same unique bytes."""
    n = 3 * 128
    (base,) = traffic_of("traffic")
    assert base["kernel"] == "emu_selftest::linmix_emu_selftest_traffic_kernel" and base["blocks"] == 3
    assert (base["read"], base["unique_read"]) == (2 * 4 * n + 512, 4 * n + 512)
    assert (base["written"], base["unique_written"]) == (4 * n, 4 * n)
    (more,) = traffic_of("traffic_reread")
    assert (more["read"], more["unique_read"]) == (3 * 4 * n + 512, 4 * n + 512)
    assert (more["written"], more["unique_written"]) == (4 * n, 4 * n)
