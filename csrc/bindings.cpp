// Every linmix op schema, in one TORCH_LIBRARY; the per-op *_torch.cpp files add CPU/CUDA impls.
// The pybind11 module `linmix._C` only exposes build facts: importing it runs the registrations.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "gla/gla_common.h"
#include "gla/params.h"
#include "selective_scan/params.h"

TORCH_LIBRARY(linmix, m) {
  // linear_scan: h_t = a_t h_{t-1} + b_t, (B, T, D) channel-last
  m.def("linear_scan_fwd(Tensor a, Tensor b, Tensor? h0, bool reverse) -> Tensor");
  m.def("linear_scan_bwd(Tensor a, Tensor h, Tensor dh, Tensor? h0, bool reverse) -> (Tensor, Tensor, Tensor)");
  // selective_scan (Mamba-1 S6): u, delta, z (b, d, L); A (d, n); B, C (d, n) or (b, g, n, L)
  m.def("selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? delta_bias, Tensor? initial_state, bool delta_softplus) -> (Tensor out, Tensor checkpoints, "
        "Tensor final_state)");
  m.def("selective_scan_bwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? delta_bias, Tensor? initial_state, Tensor checkpoints, Tensor dout, Tensor? dfinal_state, "
        "bool delta_softplus, bool deterministic=False) -> (Tensor du, Tensor ddelta, Tensor dA, Tensor dB, Tensor dC, Tensor dD, Tensor dz, "
        "Tensor ddelta_bias, Tensor dinitial_state)");
  // gla: gated linear attention, q/k/g (B, T, H, K), v (B, T, H, V), state (B, H, K, V); chunked and step-by-step
  m.def("chunk_gla_fwd(Tensor q, Tensor k, Tensor v, Tensor g, float scale, Tensor? initial_state) -> (Tensor, Tensor)");
  m.def("chunk_gla_bwd(Tensor q, Tensor k, Tensor v, Tensor g, Tensor dout, Tensor? dht, float scale, "
        "Tensor? initial_state) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("fused_recurrent_gla_fwd(Tensor q, Tensor k, Tensor v, Tensor g, float scale, Tensor? initial_state) "
        "-> (Tensor, Tensor)");
  m.def("fused_recurrent_gla_bwd(Tensor q, Tensor k, Tensor v, Tensor g, Tensor dout, Tensor? dht, float scale, "
        "Tensor? initial_state) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // fixed_point_rnn: dense linear RNN as the fixed point of (Householder mix, diagonal scan); u, lam (B, T, D)
  m.def("fixed_point_rnn_fwd(Tensor u, Tensor lam, Tensor hh_u, Tensor hh_beta, int max_iter, float tol, "
        "Tensor? h0=None, float damping=1.0, float batch_quantile=-1.0, bool causal=False) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("fixed_point_rnn_bwd(Tensor dh, Tensor u, Tensor lam, Tensor hh_u, Tensor hh_beta, Tensor h_prev, int max_iter, "
        "float tol, Tensor? h0=None, float damping=1.0) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

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
