"""Fingerprints of every CUDA kernel in a built extension, to show that a source change left nvcc's output alone.

    python tools/kernel_fingerprint.py OLD.so NEW.so        # compare: per (arch, kernel) SASS and resources
    python tools/kernel_fingerprint.py NEW.so --json OUT    # write the fingerprints

Per (arch, kernel): a hash of its SASS instructions (`cuobjdump -sass`, the instruction words only: line tables
and addresses of other kernels do not enter) and its resources (`cuobjdump -res-usage`: registers, stack, shared,
local, constant bytes). cuobjdump and nvdisasm are not in every CUDA toolkit; `pip install nvidia-cuda-cuobjdump
nvidia-cuda-nvdisasm` brings them (found on PATH, in $CUDA_HOME/bin or in that wheel's nvidia/cu*/bin).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig


def tool(name: str) -> str:
    found = shutil.which(name) or next(iter(glob.glob(os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"),
                                                                       "bin", name))), None)
    if not found:
        found = next(iter(glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu*", "bin", name))),
                     None)
    if not found:
        sys.exit(f"{name} not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    return found


def run(args: list[str]) -> str:
    cuobjdump = tool("cuobjdump")
    env = dict(os.environ, PATH=os.path.dirname(tool("nvdisasm")) + os.pathsep + os.environ.get("PATH", ""))
    return subprocess.run([cuobjdump, *args], capture_output=True, text=True, check=True, env=env).stdout


def fingerprints(so: str) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    arch = None
    for line in run(["-res-usage", so]).splitlines():
        if m := re.search(r"arch = (sm_\w+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            fn = m.group(1)
        elif line.strip().startswith("REG:") and arch:
            out.setdefault(f"{arch} {fn}", {})["resources"] = " ".join(line.split())
    arch, fn, words = None, None, []

    def flush():
        if fn and arch:
            out.setdefault(f"{arch} {fn}", {})["sass"] = hashlib.sha256("\n".join(words).encode()).hexdigest()[:16]

    for line in run(["-sass", so]).splitlines():
        if m := re.search(r"arch = (sm_\w+)", line):
            flush()
            arch, fn, words = m.group(1), None, []
        elif m := re.match(r"\s*Function : (\S+)", line):
            flush()
            fn, words = m.group(1), []
        elif m := re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;?\s*/\* (0x[0-9a-f]+) \*/", line):
            words.append(f"{m.group(1)} {m.group(2)}")
        elif m := re.match(r"\s+/\* (0x[0-9a-f]+) \*/", line):
            words.append(m.group(1))
    flush()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old")
    p.add_argument("new", nargs="?")
    p.add_argument("--json", help="write the fingerprints of OLD (one file given) here")
    args = p.parse_args()
    old = fingerprints(args.old)
    if args.new is None:
        text = json.dumps(old, indent=1, sort_keys=True)
        (open(args.json, "w").write(text) if args.json else print(text))
        return 0
    new = fingerprints(args.new)
    changed = sorted(k for k in old.keys() & new.keys() if old[k] != new[k])
    for k in changed:
        print(f"changed  {k}\n  old {old[k]}\n  new {new[k]}")
    for k in sorted(old.keys() - new.keys()):
        print(f"removed  {k}")
    for k in sorted(new.keys() - old.keys()):
        print(f"added    {k}")
    same = len(old.keys() & new.keys()) - len(changed)
    print(f"{same} kernels identical (SASS and resources), {len(changed)} changed, "
          f"{len(old.keys() - new.keys())} removed, {len(new.keys() - old.keys())} added")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
