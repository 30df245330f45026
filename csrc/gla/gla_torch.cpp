// Torch glue for chunk_gla and fused_recurrent_gla: input checks, outputs, params, and the launch
// (common/dispatch.h).
#include "common/checks.h"
#include "common/cpu_blas.h"
#include "common/dispatch.h"
#include "gla/gla_common.h"
#include "gla/gla_cpu.h"
#include "gla/gla_cuda.h"
#include "gla/params.h"

namespace linmix {
namespace {


const char* op_name(GlaAlgo algo) { return algo == GlaAlgo::kChunk ? "chunk_gla" : "fused_recurrent_gla"; }

// Checks shared by both algorithms and directions; the sequences (varlen_view, common/checks.h): their offsets (kept
// alive in `keep`) and number N, which the states' first dim must match.
std::pair<Varlen, int64_t> check_inputs(GlaAlgo algo, const Tensor& q, const Tensor& k, const Tensor& v,
                                        const Tensor& g, const OptTensor& h0, const OptTensor& cu_seqlens,
                                        OptTensor& keep) {
  LINMIX_CHECK(q.dim() == 4, "linmix: q must have shape (B, T, H, K), got ", shape_str(q.sizes()));
  check_float_dtype(q, "q");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), K = q.size(3);
  check_shape(k, "k", {B, T, H, K}, "(B, T, H, K) like q");
  check_shape(g, "g", {B, T, H, K}, "(B, T, H, K) like q");
  check_shape(v, "v", {B, T, H, -1}, "(B, T, H, V) with q's B, T, H");
  const int64_t V = v.size(3);
  LINMIX_CHECK(K >= 1 && K <= kGlaMaxHeadDim && V >= 1 && V <= kGlaMaxHeadDim, "linmix: head dims K and V must be in [1, ",
              kGlaMaxHeadDim, "], got K = ", K, ", V = ", V);
  for (const auto& [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}, std::pair{&g, "g"}}) {
    check_same_dtype(*t, name, q, "q");
    check_same_device(*t, name, q, "q");
  }
  const auto seqs = varlen_view(cu_seqlens, q, B, op_name(algo), keep);
  if (h0) {
    check_shape(*h0, "initial_state", {seqs.second, H, K, V}, cu_seqlens ? "(N, H, K, V) for N sequences" : "(B, H, K, V)");
    check_dtype(*h0, "initial_state", acc_dtype(q));
    check_same_device(*h0, "initial_state", q, "q");
  }
  return seqs;
}

GlaParams make_params(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g, double scale,
                      const OptTensor& h0, int64_t n_seqs) {
  GlaParams p;
  p.batch = n_seqs, p.seqlen = q.size(1), p.heads = q.size(2), p.dim_k = q.size(3), p.dim_v = v.size(3);
  p.scale = scale;
  p.q = strided_view<3>(q), p.k = strided_view<3>(k), p.v = strided_view<3>(v), p.g = strided_view<3>(g);
  p.h0 = opt_ptr(h0);
  return p;
}

// The GEMM handed to the CPU chunk kernel (common/cpu_blas.h).
constexpr CpuGemm kCpuGemm{&cpu_gemm<float>, &cpu_gemm<double>};

// One CUDA call: the family the registry picks, its workspace, the launch (gla_cuda.h).
void gla_cuda(const GlaCudaLaunchers& cuda, DType dt, GlaAlgo algo, bool backward, const GlaParams& p,
              const Varlen& varlen, const Tensor& like, cudaStream_t stream) {
  const GlaPlan plan = gla_plan(p, varlen, algo, backward);
  if (!plan.warning.empty()) warn(plan.warning);
  const Tensor workspace = empty(like, {plan.workspace_floats}, ScalarType::Float);
  gla_launch(cuda, plan, dt, backward, p, varlen, static_cast<float*>(workspace.data_ptr()), stream);
}

template <Backend backend>
std::tuple<Tensor, Tensor> gla_fwd(GlaAlgo algo, const Tensor& q_in, const Tensor& k_in,
                                           const Tensor& v_in, const Tensor& g_in, double scale,
                                           const OptTensor& h0_in, const OptTensor& cu_seqlens) {
  OptTensor offsets;
  const auto seqs = check_inputs(algo, q_in, k_in, v_in, g_in, h0_in, cu_seqlens, offsets);
  const Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in),
               g = last_dim_contiguous(g_in);
  const auto h0 = contiguous_opt(h0_in);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), K = q.size(3), V = v.size(3), N = seqs.second;
  Tensor o = empty(q, {B, T, H, V});
  Tensor ht = empty(q, {N, H, K, V}, acc_dtype(q));
  if (N * H == 0) return {o, ht};
  GlaParams p = make_params(q, k, v, g, scale, h0, N);
  const Varlen varlen = seqs.first;
  p.o = strided_view<3>(o);
  p.ht = ht.data_ptr();
  launch<backend, GlaCudaLaunchers>(
      q,
      [&](DType dt) {
        if (algo == GlaAlgo::kChunk)
          chunk_gla_fwd_cpu(p, varlen, dt, kCpuGemm);
        else
          fused_recurrent_gla_fwd_cpu(p, varlen, dt);
      },
      [&](const GlaCudaLaunchers& cuda, DType dt, cudaStream_t stream) {
        gla_cuda(cuda, dt, algo, /*backward=*/false, p, varlen, q, stream);
      });
  return {o, ht};
}

template <Backend backend>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gla_bwd(
    GlaAlgo algo, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& g_in,
    const Tensor& dout_in, const OptTensor& dht_in, double scale,
    const OptTensor& h0_in, const OptTensor& cu_seqlens) {
  OptTensor offsets;
  const auto seqs = check_inputs(algo, q_in, k_in, v_in, g_in, h0_in, cu_seqlens, offsets);
  const int64_t N = seqs.second;
  check_shape(dout_in, "dout", {v_in.size(0), v_in.size(1), v_in.size(2), v_in.size(3)}, "(B, T, H, V) like v");
  check_same_dtype(dout_in, "dout", q_in, "q");
  check_same_device(dout_in, "dout", q_in, "q");
  if (dht_in) {
    check_shape(*dht_in, "dfinal_state", {N, q_in.size(2), q_in.size(3), v_in.size(3)},
                cu_seqlens ? "(N, H, K, V) for N sequences" : "(B, H, K, V)");
    check_dtype(*dht_in, "dfinal_state", acc_dtype(q_in));
    check_same_device(*dht_in, "dfinal_state", q_in, "q");
  }
  const Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in),
               g = last_dim_contiguous(g_in), dout = last_dim_contiguous(dout_in);
  const auto h0 = contiguous_opt(h0_in), dht = contiguous_opt(dht_in);
  const int64_t H = q.size(2), K = q.size(3), V = v.size(3);
  Tensor dq = empty(q, sizes(q)), dk = empty(q, sizes(q)), dg = empty(q, sizes(q)), dv = empty(v, sizes(v));
  Tensor dh0 = empty(q, {N, H, K, V}, acc_dtype(q));
  if (N * H == 0) return {dq, dk, dv, dg, dh0};
  GlaParams p = make_params(q, k, v, g, scale, h0, N);
  const Varlen varlen = seqs.first;
  p.dout = strided_view<3>(dout);
  p.dht = opt_ptr(dht);
  p.dq = strided_view<3>(dq), p.dk = strided_view<3>(dk), p.dv = strided_view<3>(dv);
  p.dg = strided_view<3>(dg);
  p.dh0 = dh0.data_ptr();
  launch<backend, GlaCudaLaunchers>(
      q,
      [&](DType dt) {
        if (algo == GlaAlgo::kChunk)
          chunk_gla_bwd_cpu(p, varlen, dt, kCpuGemm);
        else
          fused_recurrent_gla_bwd_cpu(p, varlen, dt);
      },
      [&](const GlaCudaLaunchers& cuda, DType dt, cudaStream_t stream) {
        gla_cuda(cuda, dt, algo, /*backward=*/true, p, varlen, q, stream);
      });
  return {dq, dk, dv, dg, dh0};
}

template <Backend backend, GlaAlgo algo>
std::tuple<Tensor, Tensor> fwd_op(Tensor q, Tensor k, Tensor v, Tensor g, OptTensor initial_state,
                                  OptTensor cu_seqlens, double scale) {
  return gla_fwd<backend>(algo, q, k, v, g, scale, initial_state, cu_seqlens);
}

template <Backend backend, GlaAlgo algo>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bwd_op(Tensor q, Tensor k, Tensor v, Tensor g,
                                                          OptTensor initial_state, OptTensor cu_seqlens,
                                                          Tensor dout, OptTensor dfinal_state, double scale) {
  return gla_bwd<backend>(algo, q, k, v, g, dout, dfinal_state, scale, initial_state, cu_seqlens);
}

}  // namespace

// gla: gated linear attention, q/k/g (B, T, H, K), v (B, T, H, V), state (B, H, K, V); chunked and step by step.
// out and final_state are fla's o and ht (GlaParams's names). cu_seqlens: (N + 1,) int32 / int64 offsets of N
// sequences packed in a batch of 1 (read on the inputs' device), whose states are then (N, H, K, V).
LINMIX_OP_SCHEMAS(m) {
  m.def("chunk_gla_fwd(Tensor q, Tensor k, Tensor v, Tensor g, Tensor? initial_state, Tensor? cu_seqlens, "
        "float scale) -> (Tensor out, Tensor final_state)");
  m.def("chunk_gla_bwd(Tensor q, Tensor k, Tensor v, Tensor g, Tensor? initial_state, Tensor? cu_seqlens, "
        "Tensor dout, Tensor? dfinal_state, float scale) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dg, "
        "Tensor dinitial_state)");
  m.def("fused_recurrent_gla_fwd(Tensor q, Tensor k, Tensor v, Tensor g, Tensor? initial_state, "
        "Tensor? cu_seqlens, float scale) -> (Tensor out, Tensor final_state)");
  m.def("fused_recurrent_gla_bwd(Tensor q, Tensor k, Tensor v, Tensor g, Tensor? initial_state, Tensor? cu_seqlens, "
        "Tensor dout, Tensor? dfinal_state, float scale) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dg, "
        "Tensor dinitial_state)");
}

LINMIX_OP_IMPLS(m) {
  m.impl("chunk_gla_fwd", TORCH_BOX((&fwd_op<LINMIX_BACKEND, GlaAlgo::kChunk>)));
  m.impl("chunk_gla_bwd", TORCH_BOX((&bwd_op<LINMIX_BACKEND, GlaAlgo::kChunk>)));
  m.impl("fused_recurrent_gla_fwd", TORCH_BOX((&fwd_op<LINMIX_BACKEND, GlaAlgo::kRecurrent>)));
  m.impl("fused_recurrent_gla_bwd", TORCH_BOX((&bwd_op<LINMIX_BACKEND, GlaAlgo::kRecurrent>)));
}

}  // namespace linmix
