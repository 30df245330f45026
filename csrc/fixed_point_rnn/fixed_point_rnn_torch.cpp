// Torch glue for fixed_point_rnn: input checks, outputs, params, and the launch (common/dispatch.h).
#include <tuple>

#include "common/checks.h"
#include "common/dispatch.h"
#include "fixed_point_rnn/fixed_point_rnn_common.h"
#include "fixed_point_rnn/fixed_point_rnn_cpu.h"
#include "fixed_point_rnn/fixed_point_rnn_cuda.h"
#include "fixed_point_rnn/params.h"

namespace linmix {
namespace {

// Returns the number of sequences: the batch, or cu_seqlens' N (then `varlen` views it, `cu_keep` holds it).
int64_t check_inputs(const Tensor& u, const Tensor& lam, const Tensor& hh_u, const Tensor& hh_beta,
                     const OptTensor& h0, const OptTensor& cu_seqlens, int64_t max_iter, double tol, double damping,
                     double batch_quantile, bool causal, Varlen& varlen, OptTensor& cu_keep) {
  LINMIX_CHECK(u.dim() == 3, "linmix.fixed_point_rnn: u must have shape (B, T, D), got ", shape_str(u.sizes()));
  check_float_dtype(u, "u");
  const int64_t B = u.size(0), T = u.size(1), D = u.size(2);
  check_shape(lam, "lam", {B, T, D}, "(B, T, D) like u");
  LINMIX_CHECK(hh_u.dim() == 4, "linmix.fixed_point_rnn: hh_u must have shape (B, T, R, D), got ",
              shape_str(hh_u.sizes()));
  const int64_t R = hh_u.size(2);
  check_shape(hh_u, "hh_u", {B, T, R, D}, "(B, T, R, D)");
  LINMIX_CHECK(R >= 1 && R <= kFixedPointRnnMaxRank,
              "linmix.fixed_point_rnn: hh_u's rank R = hh_u.size(2) must be in [1, ", kFixedPointRnnMaxRank,
              "], got ", R);
  check_shape(hh_beta, "hh_beta", {B, T, R}, "(B, T, R)");
  for (auto [t, name] : {std::pair{&lam, "lam"}, std::pair{&hh_u, "hh_u"}, std::pair{&hh_beta, "hh_beta"}}) {
    check_same_dtype(*t, name, u, "u");
    check_same_device(*t, name, u, "u");
  }
  LINMIX_CHECK(max_iter >= 1 && max_iter <= (int64_t(1) << 30), "linmix.fixed_point_rnn: max_iter must be >= 1, got ",
              max_iter);
  LINMIX_CHECK(tol >= 0, "linmix.fixed_point_rnn: tol must be >= 0, got ", tol);
  int64_t n_seqs = B;
  std::tie(varlen, n_seqs) = varlen_view(cu_seqlens, u, B, "fixed_point_rnn", cu_keep);
  if (h0.has_value()) {
    check_shape(*h0, "initial_state", {n_seqs, D}, cu_seqlens ? "(N, D), one row per sequence" : "(B, D)");
    check_same_dtype(*h0, "initial_state", u, "u");
    check_same_device(*h0, "initial_state", u, "u");
  }
  LINMIX_CHECK(damping > 0 && damping <= 1, "linmix.fixed_point_rnn: damping must be in (0, 1], got ", damping);
  LINMIX_CHECK(batch_quantile < 0 || batch_quantile <= 1,
              "linmix.fixed_point_rnn: quantile must be in [0, 1], got ", batch_quantile);
  LINMIX_CHECK(!(causal && batch_quantile >= 0),
              "linmix.fixed_point_rnn: causal (per-token) stopping and a batch quantile exclude each other");
  return n_seqs;
}

// The CUDA launch of either direction: the family fixed_point_rnn_plan picks, with the workspace it carves up.
void launch_cuda(const Tensor& u, FixedPointRnnVarlenParams& p, bool backward, DType dt, cudaStream_t stream,
                 const FixedPointRnnCudaLaunchers& cuda) {
  const FixedPointRnnPlan plan = fixed_point_rnn_plan(p);
  LINMIX_CHECK(plan.error == nullptr, plan.error);
  if (plan.warning) warn(plan.warning);
  const FixedPointRnnWorkspace ws = fixed_point_rnn_workspace(p, backward, p.varlen.packed());
  const Tensor work = empty(u, {ws.work_floats}, ScalarType::Float);
  const Tensor flags = empty(u, {ws.flag_ints}, ScalarType::Int);
  p.work = work.data_ptr(), p.flags = flags.data_ptr();
  if (plan.variants) {
    (backward ? cuda.variants_bwd : cuda.variants_fwd)(dt, p, stream);
  } else {
    (backward ? cuda.bwd : cuda.fwd)(dt, p, stream);
  }
}

FixedPointRnnVarlenParams make_params(const Tensor& u, const Tensor& lam, const Tensor& hh_u, const Tensor& hh_beta,
                                int64_t max_iter, double tol, const OptTensor& h0, double damping, int64_t n_seqs,
                                Varlen varlen) {
  FixedPointRnnVarlenParams p;
  p.batch = n_seqs, p.seqlen = u.size(1), p.dim = u.size(2), p.rank = hh_u.size(2);
  p.varlen = varlen;
  p.max_iter = static_cast<int>(max_iter), p.tol = tol;
  p.u = u.data_ptr(), p.lam = lam.data_ptr(), p.hh_u = hh_u.data_ptr(), p.hh_beta = hh_beta.data_ptr();
  p.h0 = opt_ptr(h0);
  p.damping = damping;
  return p;
}

template <Backend backend>
std::tuple<Tensor, Tensor, Tensor, Tensor> fixed_point_rnn_fwd(Tensor u_in, Tensor lam_in, Tensor hh_u_in,
                                                             Tensor hh_beta_in, OptTensor h0_in, OptTensor cu_seqlens,
                                                             int64_t max_iter, double tol, double damping,
                                                             double batch_quantile, bool causal) {
  Varlen varlen;
  OptTensor cu_keep;
  const int64_t n_seqs = check_inputs(u_in, lam_in, hh_u_in, hh_beta_in, h0_in, cu_seqlens, max_iter, tol, damping,
                                      batch_quantile, causal, varlen, cu_keep);
  const Tensor u = as_contiguous(u_in), lam = as_contiguous(lam_in), hh_u = as_contiguous(hh_u_in),
               hh_beta = as_contiguous(hh_beta_in);
  const OptTensor h0 = contiguous_opt(h0_in);
  Tensor h = empty(u, sizes(u));
  Tensor h_prev = empty(u, sizes(u), acc_dtype(u));
  Tensor n_iter = zeros(u, {n_seqs}, ScalarType::Int);
  Tensor residual = zeros(u, {n_seqs}, ScalarType::Float);
  if (u.numel() == 0) {  // nothing to iterate: every residual is 0, so the first iteration meets any tol > 0;
    // tol = 0 runs max_iter iterations, except that causal stopping with no token has nothing left to stop
    torch::stable::fill_(n_iter, (tol > 0 || (causal && u.size(1) == 0)) ? 1 : max_iter);
    torch::stable::zero_(h_prev);
    return {h, h_prev, n_iter, residual};
  }
  FixedPointRnnVarlenParams p = make_params(u, lam, hh_u, hh_beta, max_iter, tol, h0, damping, n_seqs, varlen);
  p.batch_quantile = batch_quantile, p.causal = causal;
  p.h = h.data_ptr(), p.h_prev = h_prev.data_ptr(), p.n_iter = static_cast<int32_t*>(n_iter.data_ptr());
  p.residual = static_cast<float*>(residual.data_ptr());
  launch<backend, FixedPointRnnCudaLaunchers>(
      u, [&](DType dt) { fixed_point_rnn_fwd_cpu(p, dt); },
      [&](const FixedPointRnnCudaLaunchers& cuda, DType dt, cudaStream_t stream) {
        launch_cuda(u, p, /*backward=*/false, dt, stream, cuda);
      });
  return {h, h_prev, n_iter, residual};
}

template <Backend backend>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> fixed_point_rnn_bwd(Tensor u_in, Tensor lam_in, Tensor hh_u_in,
                                                                     Tensor hh_beta_in, OptTensor h0_in,
                                                                     OptTensor cu_seqlens, Tensor h_prev_in,
                                                                     Tensor dh_in, int64_t max_iter, double tol,
                                                                     double damping) {
  Varlen varlen;
  OptTensor cu_keep;
  const int64_t n_seqs = check_inputs(u_in, lam_in, hh_u_in, hh_beta_in, h0_in, cu_seqlens, max_iter, tol, damping,
                                      -1.0, false, varlen, cu_keep);
  check_shape(dh_in, "dh", {u_in.size(0), u_in.size(1), u_in.size(2)}, "(B, T, D) like u");
  check_same_dtype(dh_in, "dh", u_in, "u");
  check_same_device(dh_in, "dh", u_in, "u");
  check_shape(h_prev_in, "h_prev", {u_in.size(0), u_in.size(1), u_in.size(2)}, "(B, T, D) like u");
  check_dtype(h_prev_in, "h_prev", acc_dtype(u_in));
  check_same_device(h_prev_in, "h_prev", u_in, "u");
  const Tensor u = as_contiguous(u_in), lam = as_contiguous(lam_in), hh_u = as_contiguous(hh_u_in),
               hh_beta = as_contiguous(hh_beta_in), dh = as_contiguous(dh_in), h_prev = as_contiguous(h_prev_in);
  const OptTensor h0 = contiguous_opt(h0_in);
  Tensor du = empty(u, sizes(u)), dlam = empty(u, sizes(u));
  Tensor dhh_u = zeros(u, sizes(hh_u)), dhh_beta = zeros(u, sizes(hh_beta));
  // dh0 = lam_0 * s_0; with no tokens the initial state passes straight through: zero gradient
  Tensor dh0 = h0 ? zeros(u, sizes(*h0)) : empty(u, {0});
  if (u.numel() == 0) return {du, dlam, dhh_u, dhh_beta, dh0};
  FixedPointRnnVarlenParams p = make_params(u, lam, hh_u, hh_beta, max_iter, tol, h0, damping, n_seqs, varlen);
  p.dh0 = h0 ? dh0.data_ptr() : nullptr;
  p.h_prev = h_prev.data_ptr();
  p.dh = dh.data_ptr(), p.du = du.data_ptr(), p.dlam = dlam.data_ptr(), p.dhh_u = dhh_u.data_ptr();
  p.dhh_beta = dhh_beta.data_ptr();
  launch<backend, FixedPointRnnCudaLaunchers>(
      u, [&](DType dt) { fixed_point_rnn_bwd_cpu(p, dt); },
      [&](const FixedPointRnnCudaLaunchers& cuda, DType dt, cudaStream_t stream) {
        launch_cuda(u, p, /*backward=*/true, dt, stream, cuda);
      });
  return {du, dlam, dhh_u, dhh_beta, dh0};
}

}  // namespace

// fixed_point_rnn: dense linear RNN as the fixed point of (Householder mix, diagonal scan); u, lam (B, T, D).
// The backward reads the forward's h_prev; its max_iter and tol bound the adjoint iteration.
LINMIX_OP_SCHEMAS(m) {
  m.def("fixed_point_rnn_fwd(Tensor u, Tensor lam, Tensor hh_u, Tensor hh_beta, Tensor? initial_state, "
        "Tensor? cu_seqlens, int max_iter, float tol, float damping=1.0, float batch_quantile=-1.0, bool causal=False) "
        "-> (Tensor h, Tensor h_prev, Tensor n_iter, Tensor residual)");
  m.def("fixed_point_rnn_bwd(Tensor u, Tensor lam, Tensor hh_u, Tensor hh_beta, Tensor? initial_state, "
        "Tensor? cu_seqlens, Tensor h_prev, Tensor dh, int max_iter, float tol, float damping=1.0) -> (Tensor du, "
        "Tensor dlam, Tensor dhh_u, Tensor dhh_beta, Tensor dinitial_state)");
}

LINMIX_OP_IMPLS(m) {
  m.impl("fixed_point_rnn_fwd", TORCH_BOX(&fixed_point_rnn_fwd<LINMIX_BACKEND>));
  m.impl("fixed_point_rnn_bwd", TORCH_BOX(&fixed_point_rnn_bwd<LINMIX_BACKEND>));
}

}  // namespace linmix
