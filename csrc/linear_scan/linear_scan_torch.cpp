// Torch glue for linear_scan: input checks, output allocation, params, and the launch (common/dispatch.h).
#include <tuple>

#include "common/checks.h"
#include "common/dispatch.h"
#include "linear_scan/linear_scan_cpu.h"
#include "linear_scan/linear_scan_cuda.h"
#include "linear_scan/params.h"

namespace linmix {
namespace {


// Checks shared by forward and backward; fills the sequence fields of p (p.batch: sequences) from cu_seqlens.
void check_inputs(const Tensor& a, const Tensor& b, const OptTensor& h0, const char* b_name, const OptTensor& cu_seqlens,
                  OptTensor& cu_keep, LinearScanParams& p) {
  LINMIX_CHECK(a.dim() == 3, "linmix.linear_scan: a must have shape (B, T, D), got ", shape_str(a.sizes()));
  check_float_dtype(a, "a");
  check_shape(b, b_name, {a.size(0), a.size(1), a.size(2)}, "(B, T, D) like a");
  check_same_dtype(b, b_name, a, "a");
  check_same_device(b, b_name, a, "a");
  std::tie(p.varlen, p.batch) = varlen_view(cu_seqlens, a, a.size(0), "linear_scan", cu_keep);
  p.seqlen = a.size(1), p.dim = a.size(2);
  if (h0) {
    check_shape(*h0, "h0", {p.batch, a.size(2)}, cu_seqlens ? "(N, D), one row per sequence" : "(B, D)");
    check_dtype(*h0, "h0", acc_dtype(a));
    check_same_device(*h0, "h0", a, "a");
  }
}

// Packed sequences on CUDA run the linear_scan_varlen kernels, which no GPU has verified yet: by default, warning
// once per process (common/kernels.h).
void check_cuda_family(const LinearScanParams& p) {
  if (!p.varlen.packed()) return;
  bool first = false;
  if (!kernel_serves_uncovered_call(KernelFamily::kLinearScanVarlen, first))
    throw std::invalid_argument("linmix.linear_scan: cu_seqlens on CUDA needs the linear_scan_varlen kernels, which "
                                "have not been verified; set LINMIX_KERNELS=linear_scan_varlen to use them");
  if (first)
    warn("linmix.linear_scan: cu_seqlens on CUDA runs the linear_scan_varlen kernels, which pass the test suite and "
         "sanitizers under the CUDA emulator but have not yet run on a GPU (bench/results/README.md)");
}

template <Backend backend>
Tensor linear_scan_fwd(Tensor a_in, Tensor b_in, OptTensor h0_in, OptTensor cu_seqlens, bool reverse) {
  LinearScanParams p;
  OptTensor cu_keep;
  check_inputs(a_in, b_in, h0_in, "b", cu_seqlens, cu_keep, p);
  const Tensor a = last_dim_contiguous(a_in), b = last_dim_contiguous(b_in);
  const OptTensor h0 = contiguous_opt(h0_in);
  Tensor h = empty(a, sizes(a));
  if (h.numel() == 0) return h;
  p.reverse = reverse;
  p.a = strided_view<2>(a), p.b = strided_view<2>(b), p.h = strided_view<2>(h);
  p.h0 = opt_ptr(h0);
  launch<backend, LinearScanCudaLaunchers>(
      a, [&](DType dt) { linear_scan_fwd_cpu(p, dt); },
      [&](const LinearScanCudaLaunchers& cuda, DType dt, cudaStream_t stream) {
        check_cuda_family(p);
        cuda.fwd(dt, p, stream);
      });
  return h;
}

template <Backend backend>
std::tuple<Tensor, Tensor, Tensor> linear_scan_bwd(Tensor a_in, OptTensor h0_in, OptTensor cu_seqlens, Tensor h_in,
                                                   Tensor dh_in, bool reverse) {
  LinearScanParams p;
  OptTensor cu_keep;
  check_inputs(a_in, h_in, h0_in, "h", cu_seqlens, cu_keep, p);
  check_shape(dh_in, "dh", {a_in.size(0), a_in.size(1), a_in.size(2)}, "(B, T, D) like a");
  check_same_dtype(dh_in, "dh", a_in, "a");
  check_same_device(dh_in, "dh", a_in, "a");
  const Tensor a = last_dim_contiguous(a_in), h = last_dim_contiguous(h_in), dh = last_dim_contiguous(dh_in);
  const OptTensor h0 = contiguous_opt(h0_in);
  Tensor da = empty(a, sizes(a)), db = empty(a, sizes(a));
  Tensor dh0 = zeros(a, {p.batch, a.size(2)}, acc_dtype(a));
  if (a.numel() == 0) return {da, db, dh0};
  p.reverse = reverse;
  p.a = strided_view<2>(a), p.h = strided_view<2>(h), p.dh = strided_view<2>(dh);
  p.da = strided_view<2>(da), p.db = strided_view<2>(db);
  p.h0 = opt_ptr(h0);
  p.dh0 = dh0.data_ptr();
  launch<backend, LinearScanCudaLaunchers>(
      a, [&](DType dt) { linear_scan_bwd_cpu(p, dt); },
      [&](const LinearScanCudaLaunchers& cuda, DType dt, cudaStream_t stream) {
        check_cuda_family(p);
        linear_scan_bwd_launch(cuda, dt, p, stream);
      });
  return {da, db, dh0};
}

}  // namespace

// linear_scan: h_t = a_t h_{t-1} + b_t, (B, T, D) channel-last, or packed sequences (1, T, D) with cu_seqlens. The
// backward reads the forward's output h.
LINMIX_OP_SCHEMAS(m) {
  m.def("linear_scan_fwd(Tensor a, Tensor b, Tensor? h0, Tensor? cu_seqlens, bool reverse) -> Tensor h");
  m.def("linear_scan_bwd(Tensor a, Tensor? h0, Tensor? cu_seqlens, Tensor h, Tensor dh, bool reverse) -> (Tensor da, "
        "Tensor db, Tensor dh0)");
}

LINMIX_OP_IMPLS(m) {
  m.impl("linear_scan_fwd", TORCH_BOX(&linear_scan_fwd<LINMIX_BACKEND>));
  m.impl("linear_scan_bwd", TORCH_BOX(&linear_scan_bwd<LINMIX_BACKEND>));
}

}  // namespace linmix
