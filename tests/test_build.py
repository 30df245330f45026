import os
import pathlib
import re
import shutil
import struct
import subprocess

import pytest
import torch

import linmix


def test_build_info_keys():
    info = linmix.build_info()
    assert info["runtime_torch_version"] == torch.__version__
    assert set(info) >= {"torch_version", "torch_min", "cuda", "cuda_loaded", "cuda_version", "cuda_archs", "cuda_emu"}
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    assert version >= tuple(int(x) for x in info["torch_min"].split("."))
    # the CUDA kernels load exactly where they were built and torch has CUDA
    assert info["cuda_loaded"] == (info["cuda"] and torch.version.cuda is not None)


@pytest.mark.skipif(shutil.which("nvcc") is None or os.environ.get("LINMIX_CUDA") == "OFF",
                    reason="CUDA kernels are expected only when nvcc was present at build time")
def test_cuda_backend_compiled():
    from linmix import _native

    info = linmix.build_info()
    assert info["cuda"], "nvcc is present but the CUDA kernels were not compiled"
    assert "90a" in info["cuda_archs"].split(",")
    # Every cubin embedded in the library is an ELF with e_machine EM_CUDA (190); its e_flags carry the
    # SM number in bits 8..15 (this is what `cuobjdump --list-elf` reads; cuobjdump is not in this toolkit).
    data = open(_native._CUDA_LIBRARY, "rb").read()
    sms, i = [], data.find(b"\x7fELF")
    while i >= 0:
        if struct.unpack_from("<H", data, i + 18)[0] == 190:
            sms.append((struct.unpack_from("<I", data, i + 48)[0] >> 8) & 0xFF)
        i = data.find(b"\x7fELF", i + 1)
    assert 90 in sms, f"no sm_90 cubin in {_native._CUDA_LIBRARY} (found SMs {sorted(set(sms))})"
    assert b"sm_90a" in data


def test_cuda_tensor_without_backend_is_clear(monkeypatch):
    from linmix import _native

    class FakeCudaTensor:
        is_cuda = True

    monkeypatch.setattr(_native, "_HAS_CUDA", False)
    with pytest.raises(RuntimeError, match="linmix.linear_scan: got a CUDA tensor, but (this linmix build has no CUDA "
                                           "kernels|its CUDA kernels did not load)"):
        _native.check_backend("linear_scan", torch.zeros(1), FakeCudaTensor())


def test_wheel_requires_the_minimum_torch():
    # the wheel's requirement and the stable-ABI target are one number (CMakeLists.txt, pyproject.toml)
    root = pathlib.Path(__file__).resolve().parents[1]
    pyproject = (root / "pyproject.toml").read_text()
    assert f'dependencies = ["torch>={linmix.build_info()["torch_min"]}"]' in pyproject
    cmake = (root / "CMakeLists.txt").read_text()
    major, minor = (int(x) for x in linmix.build_info()["torch_min"].split("."))
    assert f'set(LINMIX_TORCH_TARGET "0x{major:02X}{minor:02X}000000000000")' in cmake


def _libraries() -> list[str]:
    from linmix import _native

    return [linmix._C.__file__] + ([_native._CUDA_LIBRARY] if linmix.build_info()["cuda"] else [])


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf")
def test_runtime_libraries_are_shared():
    # A static libstdc++ inside _C (a g++ wrapped with -static-libstdc++) crashes when an error message is
    # formatted; the build must link the shared one that torch uses. Of torch, only libtorch_cpu (its C shim):
    # no c10, c10_cuda, torch_cuda or torch_python, which a CPU-only torch lacks or another torch version breaks.
    for lib in _libraries():
        out = subprocess.run(["readelf", "-d", lib], capture_output=True, text=True, check=True).stdout
        needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out))
        assert "libstdc++.so.6" in needed, (lib, needed)
        torch_libs = {n for n in needed if n.startswith(("libtorch", "libc10", "libcudart", "libshm"))}
        assert torch_libs == {"libtorch_cpu.so"}, (lib, needed)


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm")
def test_only_the_stable_c_shim_is_imported_from_torch():
    # The stable ABI: the libraries call torch only through its C shim (aoti_torch_*, torch_*), never a C++
    # symbol of ATen, c10 or torch, whose mangled names change between torch versions.
    for lib in _libraries():
        out = subprocess.run(["nm", "-D", "--undefined-only", lib], capture_output=True, text=True, check=True).stdout
        cxx = [s for s in out.split() if s.startswith(("_ZN2at", "_ZN3c10", "_ZN5torch", "_ZNK2at", "_ZNK3c10",
                                                       "_ZNK5torch"))]
        assert not cxx, (lib, cxx[:10])
        assert any(s.startswith("aoti_torch_") for s in out.split()), lib  # the scan sees the imports


def test_sources_include_only_torch_stable_headers():
    # Torch's stable ABI, and nothing else of torch, in every source of the extension (the emulator is torch-free).
    root = pathlib.Path(__file__).resolve().parents[1] / "csrc"
    include = re.compile(r"#\s*include\s*[<\"]((?:ATen|c10|torch|caffe2)/[^>\"]+)")
    sources = [p for p in root.rglob("*") if p.suffix in {".h", ".cuh", ".cpp", ".cu"}]
    assert len(sources) > 40
    bad, stable = [], 0
    for path in sources:
        for header in include.findall(path.read_text()):
            if header.startswith(("torch/csrc/stable/", "torch/headeronly/")):
                stable += 1
            else:
                bad.append(f"{path.relative_to(root)}: {header}")
    assert stable > 0
    assert not bad, "headers outside torch's stable ABI:\n" + "\n".join(bad)


def test_error_message_with_numbers():
    # The path that crashed with a static libstdc++: c10::str streaming integers into a TORCH_CHECK message.
    with pytest.raises(RuntimeError, match=r"\(2, 3\)"):
        linmix.linear_scan(torch.rand(2, 3), torch.rand(2, 3))
