// Torch glue for selective_scan: input checks, output allocation, params, and the launch (common/dispatch.h).
#include "common/checks.h"
#include "common/dispatch.h"
#include "selective_scan/params.h"
#include "selective_scan/selective_scan_cpu.h"
#include "selective_scan/selective_scan_cuda.h"

namespace linmix {
namespace {

BCView bc_view(const Tensor& t) {
  BCView v;
  v.ptr = t.data_ptr();
  v.variable = t.dim() == 4;
  if (v.variable) {
    v.n_groups = t.size(1);
    v.batch_stride = t.stride(0), v.group_stride = t.stride(1), v.n_stride = t.stride(2);
  } else {
    v.dim_stride = t.stride(0), v.n_stride = t.stride(1);
  }
  return v;
}

void check_bc(const Tensor& t, const char* name, const Tensor& u, int64_t n) {
  const int64_t b = u.size(0), d = u.size(1), L = u.size(2);
  check_same_device(t, name, u, "u");
  if (t.dim() == 4) {
    check_shape(t, name, {b, -1, n, L}, "(b, g, n, L)");
    LINMIX_CHECK(t.size(1) >= 1 && d % t.size(1) == 0, "linmix.selective_scan: the group count g = ", t.size(1),
                " of ", name, " (b, g, n, L) must divide d = ", d);
    check_same_dtype(t, name, u, "u (variable B/C are in the input dtype)");
  } else {
    LINMIX_CHECK(t.dim() == 2, "linmix.selective_scan: ", name,
                " must have shape (d, n) (fixed) or (b, g, n, L) (variable), got ", shape_str(t.sizes()));
    check_shape(t, name, {d, n}, "(d, n)");
    check_dtype(t, name, acc_dtype(u));
  }
}

void check_opt(const OptTensor& t, const char* name, const Tensor& u, std::vector<int64_t> shape,
               const char* layout, bool input_dtype) {
  if (!t) return;
  check_shape(*t, name, shape, layout);
  check_same_device(*t, name, u, "u");
  if (input_dtype) {
    check_same_dtype(*t, name, u, "u");
  } else {
    check_dtype(*t, name, acc_dtype(u));
  }
}

// Checks shared by forward and backward. Returns the view of cu_seqlens (`keep` holds its offsets) and the number
// of sequences: the batch, or N with cu_seqlens.
std::pair<Varlen, int64_t> check_inputs(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                                        const Tensor& C, const OptTensor& D, const OptTensor& z,
                                        const OptTensor& delta_bias, const OptTensor& initial_state,
                                        const OptTensor& cu_seqlens, OptTensor& keep) {
  LINMIX_CHECK(u.dim() == 3, "linmix.selective_scan: u must have shape (b, d, L), got ", shape_str(u.sizes()));
  const auto [varlen, n_seqs] = varlen_view(cu_seqlens, u, u.size(0), "selective_scan", keep);
  check_float_dtype(u, "u");
  const int64_t b = u.size(0), d = u.size(1), L = u.size(2);
  check_shape(delta, "delta", {b, d, L}, "(b, d, L) like u");
  check_same_dtype(delta, "delta", u, "u");
  check_same_device(delta, "delta", u, "u");
  LINMIX_CHECK(A.dim() == 2 && A.size(0) == d, "linmix.selective_scan: A must have shape (d, n) = (", d,
              ", n), got ", shape_str(A.sizes()));
  check_dtype(A, "A", acc_dtype(u));
  check_same_device(A, "A", u, "u");
  const int64_t n = A.size(1);
  check_bc(B, "B", u, n);
  check_bc(C, "C", u, n);
  check_opt(D, "D", u, {d}, "(d,)", false);
  check_opt(delta_bias, "delta_bias", u, {d}, "(d,)", false);
  check_opt(z, "z", u, {b, d, L}, "(b, d, L) like u", true);
  check_opt(initial_state, "initial_state", u, {n_seqs, d, n}, "(b, d, n), or (N, d, n) with cu_seqlens", false);
  return {varlen, n_seqs};
}

// The checkpoints' chunk count: per batch row, or the packed sequences' slots (common/varlen.h).
int64_t n_checkpoints(int64_t L, const Varlen& varlen, int64_t n_seqs) {
  return varlen.packed() ? packed_chunk_slots(L, n_seqs, kSelectiveScanChunk) : ceil_div(L, kSelectiveScanChunk);
}

SelectiveScanParams make_params(const Tensor& u, const Tensor& delta, const Tensor& A,
                                const Tensor& B, const Tensor& C, const OptTensor& D, const OptTensor& z,
                                const OptTensor& delta_bias, const OptTensor& initial_state, bool delta_softplus,
                                const Varlen& varlen, int64_t n_seqs) {
  SelectiveScanParams p;
  p.batch = n_seqs, p.dim = u.size(1), p.seqlen = u.size(2), p.dstate = A.size(1);
  p.n_chunks = n_checkpoints(p.seqlen, varlen, n_seqs);
  p.varlen = varlen;
  p.delta_softplus = delta_softplus;
  p.u = strided_view<2>(u), p.delta = strided_view<2>(delta), p.z = strided_view<2>(z);
  p.B = bc_view(B), p.C = bc_view(C);
  p.A = A.data_ptr(), p.D = opt_ptr(D), p.delta_bias = opt_ptr(delta_bias), p.initial_state = opt_ptr(initial_state);
  return p;
}

template <Backend backend>
std::tuple<Tensor, Tensor, Tensor> selective_scan_fwd(
    const Tensor& u_in, const Tensor& delta_in, const Tensor& A_in, const Tensor& B_in,
    const Tensor& C_in, const OptTensor& D_in, const OptTensor& z_in, const OptTensor& delta_bias_in,
    const OptTensor& initial_state_in, const OptTensor& cu_seqlens, bool delta_softplus) {
  OptTensor offsets;
  const auto [varlen, n_seqs] = check_inputs(u_in, delta_in, A_in, B_in, C_in, D_in, z_in, delta_bias_in,
                                             initial_state_in, cu_seqlens, offsets);
  const Tensor u = last_dim_contiguous(u_in), delta = last_dim_contiguous(delta_in), A = as_contiguous(A_in);
  const Tensor B = B_in.dim() == 4 ? last_dim_contiguous(B_in) : B_in;
  const Tensor C = C_in.dim() == 4 ? last_dim_contiguous(C_in) : C_in;
  const OptTensor D = contiguous_opt(D_in), z = opt_map(z_in, last_dim_contiguous);
  const OptTensor delta_bias = contiguous_opt(delta_bias_in), h0 = contiguous_opt(initial_state_in);
  SelectiveScanParams p = make_params(u, delta, A, B, C, D, z, delta_bias, h0, delta_softplus, varlen, n_seqs);
  const ScalarType acc = acc_dtype(u);
  Tensor out = empty(u, sizes(u));
  // Packed: the slots no sequence uses (packed_chunk_slots has one spare per sequence) are zeros, not garbage.
  const std::vector<int64_t> ckpt_shape{u.size(0), p.dim, p.n_chunks, p.dstate};
  Tensor ckpt = varlen.packed() ? zeros(u, ckpt_shape, acc) : empty(u, ckpt_shape, acc);
  Tensor final_state = empty(u, {p.batch, p.dim, p.dstate}, acc);
  p.out = strided_view<2>(out), p.checkpoints = ckpt.data_ptr(), p.final_state = final_state.data_ptr();
  if (p.batch * p.dim == 0) return {out, ckpt, final_state};
  launch<backend, SelectiveScanCudaLaunchers>(
      u, [&](DType dt) { selective_scan_fwd_cpu(p, dt); },
      [&](const SelectiveScanCudaLaunchers& cuda, DType dt, cudaStream_t stream) {
        if (const char* warning = selective_scan_fwd_launch(cuda, dt, p, stream)) warn(warning);
      });
  return {out, ckpt, final_state};
}

using BwdResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                             Tensor, Tensor>;  // du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state

template <Backend backend>
BwdResult selective_scan_bwd(const Tensor& u_in, const Tensor& delta_in, const Tensor& A_in,
                             const Tensor& B_in, const Tensor& C_in, const OptTensor& D_in,
                             const OptTensor& z_in, const OptTensor& delta_bias_in, const OptTensor& initial_state_in,
                             const OptTensor& cu_seqlens, const Tensor& checkpoints_in, const Tensor& dout_in,
                             const OptTensor& dfinal_state_in, bool delta_softplus, int64_t deterministic) {
  OptTensor offsets;
  const auto [varlen, n_seqs] = check_inputs(u_in, delta_in, A_in, B_in, C_in, D_in, z_in, delta_bias_in,
                                             initial_state_in, cu_seqlens, offsets);
  const int64_t b = u_in.size(0), d = u_in.size(1), L = u_in.size(2), n = A_in.size(1);
  check_shape(dout_in, "dout", {b, d, L}, "(b, d, L) like u");
  check_same_dtype(dout_in, "dout", u_in, "u");
  check_same_device(dout_in, "dout", u_in, "u");
  check_shape(checkpoints_in, "checkpoints", {b, d, n_checkpoints(L, varlen, n_seqs), n}, "(b, d, n_chunks, n)");
  check_dtype(checkpoints_in, "checkpoints", acc_dtype(u_in));
  check_same_device(checkpoints_in, "checkpoints", u_in, "u");
  check_opt(dfinal_state_in, "dfinal_state", u_in, {n_seqs, d, n}, "(b, d, n), or (N, d, n) with cu_seqlens", false);

  const Tensor u = last_dim_contiguous(u_in), delta = last_dim_contiguous(delta_in), A = as_contiguous(A_in);
  // Variable B/C contiguous: the kernels address their fp32 gradient buffers (contiguous) with B/C's offsets.
  const Tensor B = B_in.dim() == 4 ? as_contiguous(B_in) : B_in;
  const Tensor C = C_in.dim() == 4 ? as_contiguous(C_in) : C_in;
  const OptTensor D = contiguous_opt(D_in), z = opt_map(z_in, last_dim_contiguous);
  const OptTensor delta_bias = contiguous_opt(delta_bias_in), h0 = contiguous_opt(initial_state_in);
  const Tensor ckpt = as_contiguous(checkpoints_in), dout = last_dim_contiguous(dout_in);
  const OptTensor dfinal_state = contiguous_opt(dfinal_state_in);
  SelectiveScanParams p = make_params(u, delta, A, B, C, D, z, delta_bias, h0, delta_softplus, varlen, n_seqs);
  p.checkpoints = ckpt.data_ptr();
  p.dout = strided_view<2>(dout), p.dfinal = opt_ptr(dfinal_state);

  const ScalarType acc = acc_dtype(u);
  Tensor du = empty(u, sizes(u)), ddelta = empty(u, sizes(u));
  Tensor dz = z ? empty(u, sizes(u)) : empty(u, {0});
  // Variable dB/dC are sums over a group's channels (fp32 buffers); fixed ones are per-(sequence, d) partials.
  const int64_t S = n_seqs;
  Tensor dB = B.dim() == 4 ? zeros(u, sizes(B), acc) : empty(u, {S, d, n}, acc);
  Tensor dC = C.dim() == 4 ? zeros(u, sizes(C), acc) : empty(u, {S, d, n}, acc);
  Tensor dA = empty(u, {S, d, n}, acc), dD = empty(u, {S, d}, acc);
  Tensor dbias = empty(u, {S, d}, acc), dh0 = empty(u, {S, d, n}, acc);
  p.du = strided_view<2>(du), p.ddelta = strided_view<2>(ddelta), p.dz = z ? strided_view<2>(dz) : StridedView<2>{};
  p.dB = dB.data_ptr(), p.dC = dC.data_ptr(), p.dA_part = dA.data_ptr(), p.dD_part = dD.data_ptr();
  p.ddelta_bias_part = dbias.data_ptr(), p.dinitial_state = dh0.data_ptr();
  if (S * d > 0) {
    LINMIX_CHECK(deterministic >= 0 && deterministic <= 2,
                 "linmix.selective_scan: the backward's deterministic must be 0, 1 or 2, got ", deterministic);
    launch<backend, SelectiveScanCudaLaunchers>(
        u, [&](DType dt) { selective_scan_bwd_cpu(p, dt); },
        [&](const SelectiveScanCudaLaunchers& cuda, DType dt, cudaStream_t stream) {
          const SelectiveScanBwdPlan plan = selective_scan_bwd_plan(p, deterministic);
          LINMIX_CHECK(plan.error == nullptr, plan.error);
          if (plan.warning) warn(plan.warning);
          const Tensor workspace = empty(u, {plan.workspace_floats()}, ScalarType::Float);
          selective_scan_bwd_launch(cuda, plan, dt, p, static_cast<float*>(workspace.data_ptr()), stream);
        });
  }
  // Deterministic reductions of the per-(sequence, d) partials over the sequences.
  const auto batch_sum = [](const Tensor& t) { return torch::stable::sum(t, std::vector<int64_t>{0}); };
  dB = B.dim() == 4 ? torch::stable::to(dB, B.scalar_type()) : batch_sum(dB);
  dC = C.dim() == 4 ? torch::stable::to(dC, C.scalar_type()) : batch_sum(dC);
  return {du, ddelta, batch_sum(dA), dB, dC, batch_sum(dD), dz, batch_sum(dbias), dh0};
}

}  // namespace

// selective_scan (Mamba-1 S6): u, delta, z (b, d, L); A (d, n); B, C (d, n) or (b, g, n, L). The backward reads
// the forward's checkpoints. cu_seqlens: (N + 1,) offsets of N sequences packed along L (b = 1); states are then
// (N, d, n).
LINMIX_OP_SCHEMAS(m) {
  m.def("selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? delta_bias, Tensor? initial_state, Tensor? cu_seqlens, bool delta_softplus) -> (Tensor out, "
        "Tensor checkpoints, "
        "Tensor final_state)");
  m.def("selective_scan_bwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? delta_bias, Tensor? initial_state, Tensor? cu_seqlens, Tensor checkpoints, Tensor dout, "
        "Tensor? dfinal_state, bool delta_softplus, int deterministic=0) -> (Tensor du, Tensor ddelta, Tensor dA, "
        "Tensor dB, Tensor dC, Tensor dD, Tensor dz, Tensor ddelta_bias, Tensor dinitial_state)");
}

LINMIX_OP_IMPLS(m) {
  m.impl("selective_scan_fwd", TORCH_BOX(&selective_scan_fwd<LINMIX_BACKEND>));
  m.impl("selective_scan_bwd", TORCH_BOX(&selective_scan_bwd<LINMIX_BACKEND>));
}

}  // namespace linmix
