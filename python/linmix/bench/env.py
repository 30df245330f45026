"""What a run ran on: device, driver, CUDA, torch, Triton, linmix build and commit."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from datetime import datetime, timezone

import torch

import linmix


def _run(cmd: list[str], cwd: str | None = None) -> str | None:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except Exception:
        return None


def checkout_root() -> str | None:
    """The linmix source checkout the current directory is in, if any."""
    root = _run(["git", "rev-parse", "--show-toplevel"])
    return root if root and os.path.isdir(os.path.join(root, "python", "linmix")) else None


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else _cpu_name()


def slug(device: str) -> str:
    """Folder name for results: the GPU name (nvidia-h100-80gb-hbm3) or `cpu`."""
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") if device == "cuda" else "cpu"


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages: CPU timings on a shared machine mean little without them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def collect(device: str) -> dict:
    root = checkout_root()
    commit = _run(["git", "rev-parse", "HEAD"], cwd=root) if root else None
    dirty = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)) if root else None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "device_name": device_name(device),
        "host": platform.node(),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "loadavg": loadavg(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "linmix_version": linmix.__version__,
        "linmix_commit": (commit + ("-dirty" if dirty else "")) if commit else None,
        "linmix_build": linmix.build_info(),
        "driver": None,
    }
    if device == "cuda":
        env["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = {"sms": p.multi_processor_count, "memory_gb": round(p.total_memory / 2**30, 1), "cc": f"{p.major}.{p.minor}"}
    return env
