"""Loading the compiled extension and the checks every op shares."""

from __future__ import annotations

import os
import warnings

import torch

from . import _C  # noqa: F401  (importing registers the ops and their CPU implementations)

# The CUDA implementations live in a second library, built against torch's stable ABI like _C and loaded only
# where torch has CUDA, so one wheel imports and runs on a CPU-only torch and on a CUDA torch.
_CUDA_LIBRARY = os.path.join(os.path.dirname(__file__), "liblinmix_cuda.so")


def _load_cuda_library() -> bool:
    if torch.version.cuda is None or not os.path.exists(_CUDA_LIBRARY):
        return False
    try:
        torch.ops.load_library(_CUDA_LIBRARY)
    except OSError as e:  # e.g. a driver too old for the CUDA this build targets: the CPU ops still work
        warnings.warn(f"linmix: the CUDA kernels could not be loaded ({e}); CUDA tensors will raise", stacklevel=2)
        return False
    return True


_HAS_CUDA = _load_cuda_library()


def build_info() -> dict:
    """What this linmix build was compiled against, and what is running now.

    Keys: ``torch_version`` (built against), ``torch_min`` (the oldest torch this build runs on: it uses torch's
    stable ABI only), ``runtime_torch_version`` (running now), ``cuda`` (CUDA kernels compiled), ``cuda_loaded`` (and loaded
    into this process: torch has CUDA), ``cuda_version``, ``cuda_archs`` (comma-separated, e.g. ``"80,90a"``),
    ``cuda_emu`` (the emulated builds of the CUDA kernels, see :mod:`linmix.emulation`).
    """
    info = dict(_C.build_info())
    info["cuda_loaded"] = _HAS_CUDA
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


def check_backend(op: str, *tensors: torch.Tensor | None) -> None:
    """Raise a clear error when a CUDA tensor reaches a build without the CUDA backend."""
    for t in tensors:
        if t is not None and t.is_cuda and not _HAS_CUDA:
            why = ("its CUDA kernels did not load" if _C.build_info()["cuda"] else
                   "this linmix build has no CUDA kernels (built without nvcc); rebuild on a machine with nvcc: "
                   "`pip install --no-build-isolation .` (see README)")
            raise RuntimeError(f"linmix.{op}: got a CUDA tensor, but {why}.")


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
