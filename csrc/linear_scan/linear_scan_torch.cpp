// Torch glue for linear_scan: input checks, output allocation, params, and the launch (common/dispatch.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/kernels.h"
#include "linear_scan/linear_scan_cpu.h"
#include "linear_scan/linear_scan_cuda.h"
#include "linear_scan/params.h"

namespace linmix {
namespace {

BTDView btd_view(const at::Tensor& t) {
  return BTDView{t.data_ptr(), t.stride(0), t.stride(1)};
}

// Checks shared by forward and backward; returns (B, T, D).
void check_inputs(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& h0, const char* b_name) {
  TORCH_CHECK(a.dim() == 3, "linmix.linear_scan: a must have shape (B, T, D), got ", shape_str(a.sizes()));
  check_float_dtype(a, "a");
  check_shape(b, b_name, {a.size(0), a.size(1), a.size(2)}, "(B, T, D) like a");
  check_same_dtype(b, b_name, a, "a");
  check_same_device(b, b_name, a, "a");
  if (h0) {
    check_shape(*h0, "h0", {a.size(0), a.size(2)}, "(B, D)");
    check_dtype(*h0, "h0", acc_dtype(a));
    check_same_device(*h0, "h0", a, "a");
  }
}

template <Backend backend>
at::Tensor linear_scan_fwd(const at::Tensor& a_in, const at::Tensor& b_in, const std::optional<at::Tensor>& h0_in,
                           bool reverse) {
  check_inputs(a_in, b_in, h0_in, "b");
  const at::Tensor a = last_dim_contiguous(a_in), b = last_dim_contiguous(b_in);
  const std::optional<at::Tensor> h0 = contiguous_opt(h0_in);
  at::Tensor h = at::empty(a.sizes(), a.options());
  LinearScanParams p;
  p.batch = a.size(0), p.seqlen = a.size(1), p.dim = a.size(2);
  p.reverse = reverse;
  p.a = btd_view(a), p.b = btd_view(b), p.h = btd_view(h);
  p.h0 = h0 ? h0->data_ptr() : nullptr;
  if (h.numel() == 0) return h;
  launch<backend, LinearScanCudaLaunchers>(
      a, [&](DType dt) { linear_scan_fwd_cpu(p, dt); },
      [&](const auto& cuda, DType dt, cudaStream_t stream) { cuda.fwd(dt, p, stream); });
  return h;
}

template <Backend backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_scan_bwd(const at::Tensor& a_in,
                                                               const std::optional<at::Tensor>& h0_in,
                                                               const at::Tensor& h_in, const at::Tensor& dh_in,
                                                               bool reverse) {
  check_inputs(a_in, h_in, h0_in, "h");
  check_shape(dh_in, "dh", {a_in.size(0), a_in.size(1), a_in.size(2)}, "(B, T, D) like a");
  check_same_dtype(dh_in, "dh", a_in, "a");
  check_same_device(dh_in, "dh", a_in, "a");
  const at::Tensor a = last_dim_contiguous(a_in), h = last_dim_contiguous(h_in), dh = last_dim_contiguous(dh_in);
  const std::optional<at::Tensor> h0 = contiguous_opt(h0_in);
  at::Tensor da = at::empty(a.sizes(), a.options());
  at::Tensor db = at::empty(a.sizes(), a.options());
  at::Tensor dh0 = at::zeros({a.size(0), a.size(2)}, a.options().dtype(acc_dtype(a)));
  if (a.numel() == 0) return {da, db, dh0};
  LinearScanParams p;
  p.batch = a.size(0), p.seqlen = a.size(1), p.dim = a.size(2);
  p.reverse = reverse;
  p.a = btd_view(a), p.h = btd_view(h), p.dh = btd_view(dh), p.da = btd_view(da), p.db = btd_view(db);
  p.h0 = h0 ? h0->data_ptr() : nullptr;
  p.dh0 = dh0.data_ptr();
  launch<backend, LinearScanCudaLaunchers>(
      a, [&](DType dt) { linear_scan_bwd_cpu(p, dt); },
      [&](const auto& cuda, DType dt, cudaStream_t stream) {
        (kernel_enabled(KernelFamily::kLinearScanBwdOneWriter) ? cuda.bwd_one_writer : cuda.bwd)(dt, p, stream);
      });
  return {da, db, dh0};
}

}  // namespace

// linear_scan: h_t = a_t h_{t-1} + b_t, (B, T, D) channel-last. The backward reads the forward's output h.
TORCH_LIBRARY_FRAGMENT(linmix, m) {
  m.def("linear_scan_fwd(Tensor a, Tensor b, Tensor? h0, bool reverse) -> Tensor h");
  m.def("linear_scan_bwd(Tensor a, Tensor? h0, Tensor h, Tensor dh, bool reverse) -> (Tensor da, Tensor db, "
        "Tensor dh0)");
}

TORCH_LIBRARY_IMPL(linmix, CPU, m) {
  m.impl("linear_scan_fwd", &linear_scan_fwd<Backend::kCPU>);
  m.impl("linear_scan_bwd", &linear_scan_bwd<Backend::kCPU>);
}

#ifdef LINMIX_WITH_CUDA
TORCH_LIBRARY_IMPL(linmix, CUDA, m) {
  m.impl("linear_scan_fwd", &linear_scan_fwd<Backend::kCUDA>);
  m.impl("linear_scan_bwd", &linear_scan_bwd<Backend::kCUDA>);
}
#endif

}  // namespace linmix
