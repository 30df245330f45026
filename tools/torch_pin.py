"""scikit-build-core metadata provider: pin the wheel to the torch it is being built against.

linmix's extension links the classic torch C++ ABI, which only loads on the torch version it was
compiled with; the pin turns a silent import-time crash into a clear pip resolution error.
"""

from __future__ import annotations


def dynamic_metadata(field: str, settings: dict | None = None) -> list[str]:
    if field != "dependencies":
        raise ValueError(f"torch_pin only provides 'dependencies', not {field!r}")
    import torch

    version = torch.__version__.split("+")[0]
    return [f"torch=={version}"]
