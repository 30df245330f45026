// Schemas: each op's sit beside its implementation, in a TORCH_LIBRARY_FRAGMENT(linmix) in its *_torch.cpp.
// Order: input tensors, forward outputs the backward reuses, output grads d<name>, then scalars; named returns.
// This file owns the namespace (the one TORCH_LIBRARY) and the pybind11 module `linmix._C`, which only exposes
// build facts and constants: importing it runs the registrations.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "gla/gla_common.h"
#include "gla/params.h"
#include "selective_scan/params.h"

TORCH_LIBRARY(linmix, m) {}

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
    info["torch_version"] = LINMIX_TORCH_VERSION;
#ifdef LINMIX_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    info["cuda_version"] = LINMIX_CUDA_VERSION;
    info["cuda_archs"] = LINMIX_CUDA_ARCHS;
    return info;
  });
  // Constants the Python layer needs (fake kernels, benches), from the headers that define them.
  mod.attr("selective_scan_chunk") = linmix::kSelectiveScanChunk;
  mod.attr("gla_chunk") = linmix::kGlaChunk;
  mod.attr("gla_max_head_dim") = linmix::kGlaMaxHeadDim;
}
