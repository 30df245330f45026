"""Loading the compiled extension and the checks every op shares."""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)


def build_info() -> dict:
    """What this linmix build was compiled against, and what is running now.

    Keys: ``torch_version`` (built against), ``cuda`` (CUDA backend compiled), ``cuda_version``,
    ``cuda_archs`` (comma-separated, e.g. ``"80,90a"``), ``runtime_torch_version``.
    """
    info = dict(_C.build_info())
    info["runtime_torch_version"] = torch.__version__
    return info


def kernels() -> list[dict]:
    """The CUDA kernel families linmix can run, and how far each is verified.

    One dict per family: ``name`` (its switch: ``LINMIX_KERNELS=name[,name...]``; ``LINMIX_UNVERIFIED_KERNELS=1``
    switches on all), ``op``, ``kernels`` (the kernels' names as Nsight shows them, a list of fnmatch patterns),
    ``tier`` (``"gpu-verified"``: tests and compute-sanitizer passed on a GPU at the commit
    bench/results/README.md records; ``"emulation-verified"``: the tests and the AddressSanitizer / ThreadSanitizer
    runs pass under the CUDA emulator, see :mod:`linmix.emulation`; ``"unverified"``), ``default`` (the op's
    default path) and ``what``. The default of every op is GPU-verified.
    """
    return list(_C.kernel_registry())


_HAS_CUDA = bool(_C.build_info()["cuda"])


def check_backend(op: str, *tensors: torch.Tensor | None) -> None:
    """Raise a clear error when a CUDA tensor reaches a build without the CUDA backend."""
    for t in tensors:
        if t is not None and t.is_cuda and not _HAS_CUDA:
            raise RuntimeError(
                f"linmix.{op}: got a CUDA tensor, but this linmix build has no CUDA backend "
                f"(built without nvcc or against a CPU-only torch). Rebuild on a machine with nvcc and a "
                f"CUDA torch: `pip install --no-build-isolation .` (see README)."
            )


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """The accumulation / state dtype paired with activations of x's dtype."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class nvtx_range:
    """NVTX range `linmix/<op>/<phase>` around a kernel call, for Nsight (`nsys`/`ncu --nvtx`).

    Active only for CUDA tensors outside torch.compile tracing (the range is host-side bookkeeping).
    """

    def __init__(self, name: str, x: torch.Tensor):
        self.name = name
        self.active = x.is_cuda and not torch.compiler.is_compiling()

    def __enter__(self):
        if self.active:
            torch.cuda.nvtx.range_push(self.name)
        return self

    def __exit__(self, *exc):
        if self.active:
            torch.cuda.nvtx.range_pop()
        return False
