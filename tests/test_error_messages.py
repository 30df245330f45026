"""Error messages start with the public name of what raised them: `linmix.chunk_gla: ...`, `linmix.nn.FPMamba: ...`,
`linmix.distributed.linear_scan: ...`, or `linmix: ...` for checks every op shares, so a user can find the
documentation of what they called. Scans the sources in python/ and csrc/."""

from __future__ import annotations

import pathlib
import re

import linmix
import linmix.distributed
import linmix.nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("python/linmix/**/*.py"), *ROOT.glob("csrc/**/*.cpp"), *ROOT.glob("csrc/**/*.h"),
                  *ROOT.glob("csrc/**/*.cuh"), *ROOT.glob("csrc/**/*.cu")])

# A string literal (Python, f-string or C++) that opens with a prefix: linmix[.name...]: followed by the message.
LITERAL = re.compile(r"""(?:^|[^\w])f?["']linmix((?:\.\w+)*):""")
# A prefix completed from an argument: f"linmix.{name}: ..." in Python, std::string("linmix.") + op in C++.
FORMATTED = re.compile(r"""linmix(?:\.\w+)*\.\{\w+\}:|"linmix\.[\w.]*"\s*\+""")
# The helpers whose first argument completes such a prefix, and the prefix it makes.
HELPERS = {"check_backend": "linmix.{}", "check_offsets": "linmix.{}", "_gla": "linmix.{}",
           "_check_slice": "linmix.distributed.{}", "init_dt_proj": "linmix.nn.{}", "checked_grid": "linmix.{}",
           "check_args": "linmix.{}"}
CALL = re.compile(r"\b(" + "|".join(HELPERS) + r")\(\s*\"(\w+)\"")


def public_names() -> set[str]:
    """linmix, its public functions and classes (those of linmix.nn and linmix.distributed too), and the public
    methods of those classes."""
    spaces = {"linmix": (linmix, linmix.__all__), "linmix.nn": (linmix.nn, linmix.nn.__all__),
              "linmix.distributed": (linmix.distributed, [n for n in dir(linmix.distributed) if not n.startswith("_")])}
    names = {"linmix", "linmix.emulation"}  # a command-line module prefixes its messages with its name
    for space, (module, public) in spaces.items():
        for name in public:
            obj = getattr(module, name)
            if callable(obj):
                names.add(f"{space}.{name}")
            if isinstance(obj, type):
                names |= {f"{space}.{name}.{m}" for m in dir(obj) if not m.startswith("_")}
    return names


def prefixes() -> list[tuple[str, str]]:
    """(file:line, prefix) for every literal prefix and every literal argument of a prefix-making helper."""
    found = []
    for path in SOURCES:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{i}"
            found += [(where, "linmix" + m.group(1)) for m in LITERAL.finditer(line)]
            found += [(where, HELPERS[m.group(1)].format(m.group(2))) for m in CALL.finditer(line)]
    return found


def test_error_prefixes_are_public_names():
    public = public_names()
    found = prefixes()
    assert len(found) > 50  # the scan sees the sources (a checkout, not an installed package only)
    bad = [f"{where}: {prefix}" for where, prefix in found if prefix not in public]
    assert not bad, "error prefixes that are not public names:\n" + "\n".join(bad)


def test_formatted_prefixes_come_from_known_helpers():
    # A new helper that completes a prefix from an argument must join HELPERS, so its call sites are checked too.
    definitions = re.compile(r"\b(?:def|dim3|void)\s+(" + "|".join(HELPERS) + r")\(")
    files = {path for path in SOURCES if FORMATTED.search(path.read_text())}
    unknown = [str(path.relative_to(ROOT)) for path in files if not definitions.search(path.read_text())]
    assert not unknown, f"prefixes formatted outside the helpers {sorted(HELPERS)}: {unknown}"
