// Torch glue for linear_scan: input checks, output allocation, params, and the launch (common/dispatch.h).
#include "common/checks.h"
#include "common/dispatch.h"
#include "linear_scan/linear_scan_cpu.h"
#include "linear_scan/linear_scan_cuda.h"
#include "linear_scan/params.h"

namespace linmix {
namespace {


// Checks shared by forward and backward.
void check_inputs(const Tensor& a, const Tensor& b, const OptTensor& h0, const char* b_name) {
  LINMIX_CHECK(a.dim() == 3, "linmix.linear_scan: a must have shape (B, T, D), got ", shape_str(a.sizes()));
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
Tensor linear_scan_fwd(Tensor a_in, Tensor b_in, OptTensor h0_in, bool reverse) {
  check_inputs(a_in, b_in, h0_in, "b");
  const Tensor a = last_dim_contiguous(a_in), b = last_dim_contiguous(b_in);
  const OptTensor h0 = contiguous_opt(h0_in);
  Tensor h = empty(a, sizes(a));
  if (h.numel() == 0) return h;
  LinearScanParams p;
  p.batch = a.size(0), p.seqlen = a.size(1), p.dim = a.size(2);
  p.reverse = reverse;
  p.a = strided_view<2>(a), p.b = strided_view<2>(b), p.h = strided_view<2>(h);
  p.h0 = opt_ptr(h0);
  launch<backend, LinearScanCudaLaunchers>(
      a, [&](DType dt) { linear_scan_fwd_cpu(p, dt); },
      [&](const LinearScanCudaLaunchers& cuda, DType dt, cudaStream_t stream) { cuda.fwd(dt, p, stream); });
  return h;
}

template <Backend backend>
std::tuple<Tensor, Tensor, Tensor> linear_scan_bwd(Tensor a_in, OptTensor h0_in, Tensor h_in, Tensor dh_in,
                                                   bool reverse) {
  check_inputs(a_in, h_in, h0_in, "h");
  check_shape(dh_in, "dh", {a_in.size(0), a_in.size(1), a_in.size(2)}, "(B, T, D) like a");
  check_same_dtype(dh_in, "dh", a_in, "a");
  check_same_device(dh_in, "dh", a_in, "a");
  const Tensor a = last_dim_contiguous(a_in), h = last_dim_contiguous(h_in), dh = last_dim_contiguous(dh_in);
  const OptTensor h0 = contiguous_opt(h0_in);
  Tensor da = empty(a, sizes(a)), db = empty(a, sizes(a));
  Tensor dh0 = zeros(a, {a.size(0), a.size(2)}, acc_dtype(a));
  if (a.numel() == 0) return {da, db, dh0};
  LinearScanParams p;
  p.batch = a.size(0), p.seqlen = a.size(1), p.dim = a.size(2);
  p.reverse = reverse;
  p.a = strided_view<2>(a), p.h = strided_view<2>(h), p.dh = strided_view<2>(dh);
  p.da = strided_view<2>(da), p.db = strided_view<2>(db);
  p.h0 = opt_ptr(h0);
  p.dh0 = dh0.data_ptr();
  launch<backend, LinearScanCudaLaunchers>(
      a, [&](DType dt) { linear_scan_bwd_cpu(p, dt); },
      [&](const LinearScanCudaLaunchers& cuda, DType dt, cudaStream_t stream) {
        linear_scan_bwd_launch(cuda, dt, p, stream);
      });
  return {da, db, dh0};
}

}  // namespace

// linear_scan: h_t = a_t h_{t-1} + b_t, (B, T, D) channel-last. The backward reads the forward's output h.
LINMIX_OP_SCHEMAS(m) {
  m.def("linear_scan_fwd(Tensor a, Tensor b, Tensor? h0, bool reverse) -> Tensor h");
  m.def("linear_scan_bwd(Tensor a, Tensor? h0, Tensor h, Tensor dh, bool reverse) -> (Tensor da, Tensor db, "
        "Tensor dh0)");
}

LINMIX_OP_IMPLS(m) {
  m.impl("linear_scan_fwd", TORCH_BOX(&linear_scan_fwd<LINMIX_BACKEND>));
  m.impl("linear_scan_bwd", TORCH_BOX(&linear_scan_bwd<LINMIX_BACKEND>));
}

}  // namespace linmix
