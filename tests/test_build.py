import os
import shutil
import struct
import subprocess

import pytest
import torch

import linmix


def test_build_info_keys():
    info = linmix.build_info()
    assert info["torch_version"] == torch.__version__
    assert set(info) >= {"torch_version", "cuda", "cuda_version", "cuda_archs"}


@pytest.mark.skipif(
    shutil.which("nvcc") is None or torch.version.cuda is None or os.environ.get("LINMIX_CUDA") == "OFF",
    reason="CUDA backend is expected only when nvcc and a CUDA torch were present at build time",
)
def test_cuda_backend_compiled():
    info = linmix.build_info()
    assert info["cuda"], "nvcc and a CUDA torch are present but the CUDA backend was not compiled"
    assert "90a" in info["cuda_archs"].split(",")
    # Every cubin embedded in the module is an ELF with e_machine EM_CUDA (190); its e_flags carry the
    # SM number in bits 8..15 (this is what `cuobjdump --list-elf` reads; cuobjdump is not in this toolkit).
    data = open(linmix._C.__file__, "rb").read()
    sms, i = [], data.find(b"\x7fELF")
    while i >= 0:
        if struct.unpack_from("<H", data, i + 18)[0] == 190:
            sms.append((struct.unpack_from("<I", data, i + 48)[0] >> 8) & 0xFF)
        i = data.find(b"\x7fELF", i + 1)
    assert 90 in sms, f"no sm_90 cubin in {linmix._C.__file__} (found SMs {sorted(set(sms))})"
    assert b"sm_90a" in data


def test_cuda_tensor_without_backend_is_clear(monkeypatch):
    from linmix import _native

    class FakeCudaTensor:
        is_cuda = True

    monkeypatch.setattr(_native, "_HAS_CUDA", False)
    with pytest.raises(RuntimeError, match="no CUDA backend"):
        _native.check_backend("linear_scan", torch.zeros(1), FakeCudaTensor())


@pytest.mark.skipif(shutil.which("ldd") is None, reason="needs ldd")
def test_runtime_libraries_are_shared():
    # A static libstdc++ inside _C (a g++ wrapped with -static-libstdc++) crashes when an error message is
    # formatted; the build must link the shared one that torch uses.
    out = subprocess.run(["ldd", linmix._C.__file__], capture_output=True, text=True, check=True).stdout
    assert "libstdc++" in out, out
    assert "libgomp" in out, out  # the OpenMP runtime at::parallel_for runs on, shared with torch


def test_error_message_with_numbers():
    # The path that crashed with a static libstdc++: c10::str streaming integers into a TORCH_CHECK message.
    with pytest.raises(RuntimeError, match=r"\(2, 3\)"):
        linmix.linear_scan(torch.rand(2, 3), torch.rand(2, 3))
