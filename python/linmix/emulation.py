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

The traffic build (also from ``LINMIX_CUDA_EMU_SANITIZERS=ON``; ``--traffic``, or ``LINMIX_EMU_SANITIZER=traffic``)
counts every emulated kernel's global-memory bytes per launch (``csrc/emu/traffic.cpp``); :func:`traffic` reads
them. ``python -m linmix.bench --op chunk_gla --traffic`` reports them per kernel family.

Environment (read at every launch unless noted): ``LINMIX_EMU_SCHEDULE`` = ``forward`` | ``reverse`` |
``shuffle`` (the order of a block's threads between barriers; default shuffle, a fresh order every round),
``LINMIX_EMU_SEED`` (per process; errors print it), ``LINMIX_EMU_WORKERS`` (blocks run at once on that many
threads, in a random order; default 2), ``LINMIX_EMU_ARCH`` = ``80`` | ``90`` (whose launch limits apply;
default 80), ``LINMIX_EMU_SANITIZER`` = ``address`` | ``thread`` | ``traffic`` (which build; fixed once loaded).
"""

from __future__ import annotations

import argparse
import ctypes
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


def traffic(reset: bool = True) -> list[dict]:
    """Global-memory traffic of the launches since the last reset, in the traffic build (``LINMIX_EMU_SANITIZER=traffic``).

    One dict per launch, in order: ``kernel`` (its name with template arguments), ``blocks``, ``read`` and
    ``written`` (bytes of every access), ``unique_read`` and ``unique_written`` (each byte once per launch).
    Only global memory counts: not shared memory, locals or kernel parameters. ``reset`` clears the records.
    """
    if os.environ.get("LINMIX_EMU_SANITIZER") != "traffic":
        raise RuntimeError("linmix.emulation.traffic() needs the traffic build: run with LINMIX_EMU_SANITIZER=traffic "
                           "(python -m linmix.emulation --traffic -- ...)")
    # The extension has loaded the library already (RTLD_LOCAL); dlopen of the same file returns that handle.
    lib = ctypes.CDLL(str(Path(_C.__file__).with_name("liblinmix_cuda_emu_traffic.so")), mode=os.RTLD_LOCAL)
    lib.linmix_emu_traffic.restype = ctypes.c_char_p
    lib.linmix_emu_traffic.argtypes = [ctypes.c_int]
    out = []
    for line in lib.linmix_emu_traffic(int(reset)).decode().splitlines():
        name, *counts = line.split("\t")
        blocks, read, written, unique_read, unique_written = map(int, counts)
        out.append(dict(kernel=name, blocks=blocks, read=read, written=written, unique_read=unique_read,
                        unique_written=unique_written))
    return out


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
                workers: int | None = None, base: dict | None = None, report_dir: str | None = None,
                traffic: bool = False) -> dict:
    """The environment for a process that runs the emulated kernels (and the sanitizer's runtime, preloaded).

    traffic: run the traffic build instead (no sanitizer; :func:`traffic` reads its counts).

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
    if traffic:
        if sanitizer is not None:
            raise ValueError("the traffic build has no sanitizer")
        env["LINMIX_EMU_SANITIZER"] = "traffic"
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
    parser.add_argument("--traffic", action="store_true", help="run the traffic build (global bytes per launch)")
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
        env = environment(args.sanitizer, args.schedule, args.seed, args.workers, report_dir=reports,
                          traffic=args.traffic)
        code = subprocess.call(command, env=env)
        found = sorted(Path(reports).glob("report*"))
        for f in found:
            print(f"\nlinmix.emulation: {args.sanitizer} sanitizer report {f.name}:\n{f.read_text()}", file=sys.stderr)
    return code if code != 0 or not found else 1


if __name__ == "__main__":
    sys.exit(main())
