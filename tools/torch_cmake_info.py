"""Print the facts CMake needs about the installed torch, as `KEY=VALUE` lines.

We do not use torch's own CMake package: it runs the deprecated FindCUDA, insists on nvrtc and adds
-gencode flags for architectures nvcc 13 rejects (see README, "Toolchain pitfalls").
"""

import os

import torch
from torch.utils import cpp_extension

lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
print(f"INCLUDE_DIRS={','.join(cpp_extension.include_paths())}")
print(f"LIB_DIR={lib_dir}")
print(f"CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
print(f"VERSION={torch.__version__}")
print(f"CUDA_VERSION={torch.version.cuda or ''}")
