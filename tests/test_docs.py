"""docs/DESIGN.md describes the code as it is: the README links it, and every file, folder and kernel it names
exists (a blockquote marks a part still being written, and is not checked)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "DESIGN.md"


def design_text() -> str:
    return "\n".join(line for line in DESIGN.read_text().splitlines() if not line.startswith(">"))


def test_readme_links_design():
    assert "(docs/DESIGN.md)" in (ROOT / "README.md").read_text()


def test_named_paths_exist():
    paths = set(re.findall(r"`((?:python|csrc|tests|bench|docs)/[\w./*-]*|[\w/]+\.(?:py|cpp|h|cuh|cu|md))`",
                           design_text()))
    assert len(paths) > 20
    sources = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if not {"build", ".git"} & set(p.parts)}
    missing = []
    for p in sorted(paths):
        if "*" in p:
            found = list(ROOT.glob(p))
        else:  # from the root, or the tail of a path (`ops/gla.py`, a bare file name)
            p = p.rstrip("/")
            found = p in sources or any(s.endswith("/" + p) for s in sources)
        if not found:
            missing.append(p)
    assert not missing, f"docs/DESIGN.md names paths that do not exist: {missing}"


def test_named_kernels_exist():
    kernels = set(re.findall(r"\blinmix_[a-z0-9_]+", design_text()))
    source = "\n".join(p.read_text() for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cuh", ".cu", ".h"))
    missing = [k for k in sorted(kernels) if k not in source]
    assert not missing, f"docs/DESIGN.md names kernels that are not in csrc/: {missing}"
