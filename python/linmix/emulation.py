"""Running linmix's CUDA kernels on the CPU: the CUDA emulator.

linmix builds (with ``LINMIX_CUDA_EMU=ON``) a second copy of its CUDA kernels from the same source, compiled as
host C++ against a small CUDA runtime (``csrc/emu/``) that runs every CUDA thread as a fiber, with barriers,
warp shuffles, shared memory and WMMA checked against CUDA's rules. ``LINMIX_EMULATE_CUDA=1`` then sends the CPU
calls of every op in fp32/fp16/bf16 through the CUDA launchers and kernels instead of the CPU kernels (float64
stays on the CPU kernels), so the whole test suite runs each kernel's own source without a GPU. With
``LINMIX_CUDA_EMU_SANITIZERS=ON`` the kernels are also built with AddressSanitizer (plus UBSan's alignment check)
and with ThreadSanitizer, which need their runtime preloaded into Python; this module's command line does that::

    python -m linmix.emulation -- python -m pytest tests              # emulated CUDA, shuffled schedule
    python -m linmix.emulation --schedule reverse -- python -m pytest tests/test_gla.py
    python -m linmix.emulation --sanitizer thread -- python -m pytest tests/test_emulated_kernels.py

Environment (read at every launch unless noted): ``LINMIX_EMU_SCHEDULE`` = ``forward`` | ``reverse`` |
``shuffle`` (the order of a block's threads between barriers; default shuffle, a fresh order every round),
``LINMIX_EMU_SEED`` (per process; errors print it), ``LINMIX_EMU_WORKERS`` (blocks run at once on that many
threads, in a random order; default 2), ``LINMIX_EMU_ARCH`` = ``80`` | ``90`` (whose launch limits apply;
default 80), ``LINMIX_EMU_SANITIZER`` = ``address`` | ``thread`` (which build; fixed once loaded).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from . import _C

SANITIZERS = ("address", "thread")
SCHEDULES = ("forward", "reverse", "shuffle")


def enabled() -> bool:
    """Whether this process sends CPU calls through the emulated CUDA kernels (``LINMIX_EMULATE_CUDA=1``)."""
    return os.environ.get("LINMIX_EMULATE_CUDA") == "1"


def builds() -> list[str]:
    """The emulated builds installed beside the extension: a subset of ``["plain", "address", "thread"]``."""
    info = _C.build_info()["cuda_emu"]
    return info.split(",") if info else []


def kernels_run() -> set[str]:
    """Names (without template arguments) of the CUDA kernels the emulator has run in this process."""
    return {line for line in _C.emulated_kernels_run().splitlines() if line}


def selftest(name: str) -> tuple[int, str]:
    """Run one of the emulator's own test kernels (``csrc/emu/selftest.cpp``) in the selected build.

    Returns ``(code, message)``: 0 ran with the right result, 1 the emulator reported an error (message),
    2 ran with a wrong result (message). Faults only a sanitizer catches return 0 in the plain build.
    """
    return tuple(_C.emulator_selftest(name))


def sanitizer_runtimes(sanitizer: str) -> list[str]:
    """The shared libraries to preload for ``sanitizer``: the runtime the emulated build was compiled against."""
    table = Path(__file__).with_name("emu_sanitizer_runtimes.txt")
    if not table.exists():
        raise RuntimeError("this linmix build has no sanitizer builds of the emulated kernels; rebuild with "
                           "LINMIX_CUDA_EMU=ON LINMIX_CUDA_EMU_SANITIZERS=ON")
    for line in table.read_text().splitlines():
        key, _, libs = line.partition("=")
        if key == sanitizer:
            return libs.split(":")
    raise ValueError(f"unknown sanitizer {sanitizer!r}; expected one of {SANITIZERS}")


def environment(sanitizer: str | None = None, schedule: str | None = None, seed: int | None = None,
                workers: int | None = None, base: dict | None = None, report_dir: str | None = None) -> dict:
    """The environment for a process that runs the emulated kernels (and the sanitizer's runtime, preloaded).

    report_dir: where the sanitizers write their reports (``report.<pid>`` files) instead of stderr, which a
    test runner may capture and lose when the report ends the process.
    """
    env = dict(os.environ if base is None else base)
    env["LINMIX_EMULATE_CUDA"] = "1"
    if schedule is not None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        env["LINMIX_EMU_SCHEDULE"] = schedule
    if seed is not None:
        env["LINMIX_EMU_SEED"] = str(seed)
    if workers is not None:
        env["LINMIX_EMU_WORKERS"] = str(workers)
    if sanitizer is not None:
        env["LINMIX_EMU_SANITIZER"] = sanitizer
        env["LD_PRELOAD"] = ":".join(sanitizer_runtimes(sanitizer))  # one sanitizer per process
        # Python and torch are not instrumented: leaks at exit, their allocator pairs and their own threads are
        # not ours to report. A report ends the process with a non-zero status.
        log = f":log_path={os.path.join(report_dir, 'report')}" if report_dir else ""
        env["ASAN_OPTIONS"] = "detect_leaks=0:alloc_dealloc_mismatch=0:detect_odr_violation=0:halt_on_error=1" + log
        env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1" + log
        suppressions = Path(__file__).with_name("emu_tsan_suppressions.txt")
        env["TSAN_OPTIONS"] = ("halt_on_error=1:exitcode=66:suppress_equal_addresses=0:ignore_noninstrumented_modules=1"
                               f":report_signal_unsafe=0:suppressions={suppressions}" + log)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m linmix.emulation",
        description="Run a command with linmix's CUDA kernels emulated on the CPU (LINMIX_EMULATE_CUDA=1), "
                    "optionally under AddressSanitizer or ThreadSanitizer.")
    parser.add_argument("--sanitizer", choices=SANITIZERS, help="run the kernels' sanitizer build")
    parser.add_argument("--schedule", choices=SCHEDULES, help="thread order between barriers (default shuffle)")
    parser.add_argument("--seed", type=int, help="LINMIX_EMU_SEED")
    parser.add_argument("--workers", type=int, help="blocks run at once (default 2)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the command to run after --, e.g. python -m pytest tests")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    if "plain" not in builds():
        print("linmix.emulation: this build has no emulated kernels; rebuild with LINMIX_CUDA_EMU=ON", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="linmix-emu-") as reports:
        env = environment(args.sanitizer, args.schedule, args.seed, args.workers, report_dir=reports)
        code = subprocess.call(command, env=env)
        found = sorted(Path(reports).glob("report*"))
        for f in found:
            print(f"\nlinmix.emulation: {args.sanitizer} sanitizer report {f.name}:\n{f.read_text()}", file=sys.stderr)
    return code if code != 0 or not found else 1


if __name__ == "__main__":
    sys.exit(main())
