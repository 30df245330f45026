// Schemas: each op's sit beside its implementation, in a TORCH_LIBRARY_FRAGMENT(linmix) in its *_torch.cpp.
// Order: input tensors, forward outputs the backward reuses, output grads d<name>, then scalars; named returns.
// This file owns the namespace (the one STABLE_TORCH_LIBRARY) and the pybind11 module `linmix._C`, which only
// exposes build facts and constants: importing it runs the registrations of the CPU library. The CUDA library
// (liblinmix_cuda.so) registers the CUDA implementations when linmix/_native.py loads it.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/stable/library.h>

#include <algorithm>
#include <string>

#include "common/emulation.h"
#include "common/kernels.h"
#include "gla/gla_common.h"
#include "gla/params.h"
#include "selective_scan/params.h"

STABLE_TORCH_LIBRARY(linmix, m) {}

#ifndef LINMIX_CUDA_VERSION
#define LINMIX_CUDA_VERSION ""
#endif
#ifndef LINMIX_CUDA_ARCHS
#define LINMIX_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "linmix native extension (ops are registered under torch.ops.linmix)";
  mod.def("build_info", [] {
    pybind11::dict info;
    info["torch_version"] = LINMIX_TORCH_VERSION;  // built against
    info["torch_min"] = LINMIX_TORCH_MIN;          // the oldest torch the stable-ABI build runs on
#ifdef LINMIX_CUDA_LIBRARY_BUILT
    info["cuda"] = true;  // the CUDA library was built beside this one
#else
    info["cuda"] = false;
#endif
    info["cuda_version"] = LINMIX_CUDA_VERSION;
    info["cuda_archs"] = LINMIX_CUDA_ARCHS;
    // The emulated builds of the CUDA kernels beside the extension (common/emulation.h): "plain", "address",
    // "thread", "traffic", comma-separated; "" when built without LINMIX_CUDA_EMU.
    info["cuda_emu"] = linmix::emulated_builds();
    return info;
  });
  mod.def("kernel_registry", [] {
    pybind11::list out;
    for (const linmix::KernelRecord& k : linmix::kKernels) {
      pybind11::dict d;
      d["name"] = k.name;
      d["op"] = k.op;
      pybind11::list patterns;
      const std::string all = k.kernels;
      for (size_t start = 0; start < all.size();) {
        const size_t end = std::min(all.find("; ", start), all.size());
        patterns.append(all.substr(start, end - start));
        start = end + 2;
      }
      d["kernels"] = patterns;
      d["tier"] = k.tier == linmix::Tier::kGpuVerified         ? "gpu-verified"
                  : k.tier == linmix::Tier::kEmulationVerified ? "emulation-verified"
                                                               : "unverified";
      d["default"] = k.is_default;
      d["what"] = k.what;
      out.append(d);
    }
    return out;
  }, "The registry of CUDA kernel families (csrc/common/kernels.h).");
  mod.def("emulated_kernels_run", [] { return linmix::emulated_kernels_run(); },
          "Names of the CUDA kernels the emulator has run in this process, one per line.");
  mod.def("emulator_selftest", [](const std::string& name) { return linmix::emulator_selftest(name); },
          "Runs one of the CUDA emulator's self-tests: (code, message); code 0 ran correctly, 1 the emulator "
          "reported an error, 2 ran with a wrong result.");
  // Constants the Python layer needs (fake kernels, benches), from the headers that define them.
  mod.attr("selective_scan_chunk") = linmix::kSelectiveScanChunk;
  mod.attr("gla_chunk") = linmix::kGlaChunk;
  mod.attr("gla_max_head_dim") = linmix::kGlaMaxHeadDim;
  mod.attr("gla_cuda_max_head_dim") = linmix::kGlaCudaMaxHeadDim;
}
