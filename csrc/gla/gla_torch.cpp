// Torch glue for chunk_gla and fused_recurrent_gla: input checks, outputs, params, and the launch
// (common/dispatch.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cpu_blas.h"
#include "common/dispatch.h"
#include "gla/gla_common.h"
#include "gla/gla_cpu.h"
#include "common/kernels.h"
#include "gla/gla_cuda.h"
#include "gla/params.h"

namespace linmix {
namespace {

BTHView bth_view(const at::Tensor& t) { return BTHView{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

// Checks shared by both algorithms and directions.
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                  const std::optional<at::Tensor>& h0, bool cuda_kernels) {
  TORCH_CHECK(q.dim() == 4, "linmix: q must have shape (B, T, H, K), got ", shape_str(q.sizes()));
  check_float_dtype(q, "q");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), K = q.size(3);
  check_shape(k, "k", {B, T, H, K}, "(B, T, H, K) like q");
  check_shape(g, "g", {B, T, H, K}, "(B, T, H, K) like q");
  check_shape(v, "v", {B, T, H, -1}, "(B, T, H, V) with q's B, T, H");
  const int64_t V = v.size(3);
  TORCH_CHECK(K >= 1 && K <= kGlaMaxHeadDim && V >= 1 && V <= kGlaMaxHeadDim, "linmix: head dims K and V must be in [1, ",
              kGlaMaxHeadDim, "], got K = ", K, ", V = ", V);
  for (const auto& [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}, std::pair{&g, "g"}}) {
    check_same_dtype(*t, name, q, "q");
    check_same_device(*t, name, q, "q");
  }
  if (h0) {
    check_shape(*h0, "initial_state", {B, H, K, V}, "(B, H, K, V)");
    check_dtype(*h0, "initial_state", acc_dtype(q));
    check_same_device(*h0, "initial_state", q, "q");
  }
  if (cuda_kernels) {
    TORCH_CHECK_NOT_IMPLEMENTED(K <= kGlaCudaMaxHeadDim && V <= kGlaCudaMaxHeadDim, "linmix: head dims above ",
                                kGlaCudaMaxHeadDim, " run on the CPU only for now (CUDA kernels take K, V <= ",
                                kGlaCudaMaxHeadDim, "), got K = ", K, ", V = ", V);
    TORCH_CHECK(B * H <= int64_t(2147483647), "linmix: B * H too large for the CUDA grid");
    TORCH_CHECK(T <= int64_t(65535) * kGlaChunk, "linmix: T must be at most ", 65535 * kGlaChunk, " on CUDA");
  }
}

GlaParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g, double scale,
                      const std::optional<at::Tensor>& h0) {
  GlaParams p;
  p.batch = q.size(0), p.seqlen = q.size(1), p.heads = q.size(2), p.dim_k = q.size(3), p.dim_v = v.size(3);
  p.scale = scale;
  p.q = bth_view(q), p.k = bth_view(k), p.v = bth_view(v), p.g = bth_view(g);
  p.h0 = h0 ? h0->data_ptr() : nullptr;
  return p;
}

// The GEMM handed to the CPU chunk kernel (common/cpu_blas.h).
constexpr CpuGemm kCpuGemm{&cpu_gemm<float>, &cpu_gemm<double>};

enum class Algo { kChunk, kRecurrent };

// The chunk-parallel CUDA chunk_gla (gla_chunkpar.h), opt-in (LINMIX_KERNELS=gla_chunkpar, common/kernels.h).
void chunkpar_gla_cuda(const GlaCudaLaunchers& cuda, DType dt, const GlaParams& p, bool backward,
                       const at::Tensor& like, cudaStream_t stream) {
  const auto f32 = like.options().dtype(at::kFloat);
  const int64_t BH = p.batch * p.heads, N = gla_chunkpar_n_chunks(p.seqlen), KV = p.dim_k * p.dim_v;
  const at::Tensor states = at::empty({BH, N + 1, KV}, f32), sums = at::empty({BH, N, p.dim_k}, f32);
  const at::Tensor dstates = backward ? at::empty({BH, N, KV}, f32) : at::Tensor();
  const GlaChunkparWorkspace ws{states.data_ptr<float>(), backward ? dstates.data_ptr<float>() : nullptr,
                                sums.data_ptr<float>()};
  (backward ? cuda.chunkpar_bwd : cuda.chunkpar_fwd)(dt, p, ws, stream);
}

template <Backend backend>
std::tuple<at::Tensor, at::Tensor> gla_fwd(Algo algo, const at::Tensor& q_in, const at::Tensor& k_in,
                                           const at::Tensor& v_in, const at::Tensor& g_in, double scale,
                                           const std::optional<at::Tensor>& h0_in) {
  check_inputs(q_in, k_in, v_in, g_in, h0_in, runs_cuda_kernels<backend>(q_in));
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in),
                   g = last_dim_contiguous(g_in);
  const auto h0 = contiguous_opt(h0_in);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), K = q.size(3), V = v.size(3);
  at::Tensor o = at::empty({B, T, H, V}, q.options());
  at::Tensor ht = at::empty({B, H, K, V}, q.options().dtype(acc_dtype(q)));
  if (B * H == 0) return {o, ht};
  GlaParams p = make_params(q, k, v, g, scale, h0);
  p.o = bth_view(o);
  p.ht = ht.data_ptr();
  launch<backend, GlaCudaLaunchers>(
      q,
      [&](DType dt) {
        if (algo == Algo::kChunk)
          chunk_gla_fwd_cpu(p, dt, kCpuGemm);
        else
          fused_recurrent_gla_fwd_cpu(p, dt);
      },
      [&](const GlaCudaLaunchers& cuda, DType dt, cudaStream_t stream) {
        if (algo == Algo::kChunk && kernel_enabled(KernelFamily::kGlaChunkpar))
          chunkpar_gla_cuda(cuda, dt, p, /*backward=*/false, q, stream);
        else
          (algo == Algo::kChunk ? cuda.chunk_fwd : cuda.recurrent_fwd)(dt, p, stream);
      });
  return {o, ht};
}

template <Backend backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gla_bwd(
    Algo algo, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& g_in,
    const at::Tensor& dout_in, const std::optional<at::Tensor>& dht_in, double scale,
    const std::optional<at::Tensor>& h0_in) {
  check_inputs(q_in, k_in, v_in, g_in, h0_in, runs_cuda_kernels<backend>(q_in));
  check_shape(dout_in, "dout", {v_in.size(0), v_in.size(1), v_in.size(2), v_in.size(3)}, "(B, T, H, V) like v");
  check_same_dtype(dout_in, "dout", q_in, "q");
  check_same_device(dout_in, "dout", q_in, "q");
  if (dht_in) {
    check_shape(*dht_in, "dfinal_state", {q_in.size(0), q_in.size(2), q_in.size(3), v_in.size(3)}, "(B, H, K, V)");
    check_dtype(*dht_in, "dfinal_state", acc_dtype(q_in));
    check_same_device(*dht_in, "dfinal_state", q_in, "q");
  }
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in),
                   g = last_dim_contiguous(g_in), dout = last_dim_contiguous(dout_in);
  const auto h0 = contiguous_opt(h0_in), dht = contiguous_opt(dht_in);
  const int64_t B = q.size(0), H = q.size(2), K = q.size(3), V = v.size(3);
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(q.sizes(), q.options());
  at::Tensor dg = at::empty(q.sizes(), q.options()), dv = at::empty(v.sizes(), v.options());
  at::Tensor dh0 = at::empty({B, H, K, V}, q.options().dtype(acc_dtype(q)));
  if (B * H == 0) return {dq, dk, dv, dg, dh0};
  GlaParams p = make_params(q, k, v, g, scale, h0);
  p.dout = bth_view(dout);
  p.dht = dht ? dht->data_ptr() : nullptr;
  p.dq = bth_view(dq), p.dk = bth_view(dk), p.dv = bth_view(dv), p.dg = bth_view(dg);
  p.dh0 = dh0.data_ptr();
  launch<backend, GlaCudaLaunchers>(
      q,
      [&](DType dt) {
        if (algo == Algo::kChunk)
          chunk_gla_bwd_cpu(p, dt, kCpuGemm);
        else
          fused_recurrent_gla_bwd_cpu(p, dt);
      },
      [&](const GlaCudaLaunchers& cuda, DType dt, cudaStream_t stream) {
        if (algo == Algo::kChunk && kernel_enabled(KernelFamily::kGlaChunkpar)) {
          chunkpar_gla_cuda(cuda, dt, p, /*backward=*/true, q, stream);
          return;
        }
        const auto f32 = q.options().dtype(at::kFloat);
        at::Tensor ws0, ws1;  // fp32 workspaces (see GlaParams)
        if (algo == Algo::kChunk) {
          const int64_t n_chunks = (q.size(1) + kGlaChunk - 1) / kGlaChunk;
          ws0 = at::empty({B * H, n_chunks + 1, K, V}, f32);
          ws1 = at::empty({B * H, n_chunks, K, V}, f32);
          p.chunk_states = ws0.data_ptr<float>(), p.chunk_dstates = ws1.data_ptr<float>();
        } else {
          ws0 = at::empty(q.sizes(), f32);
          p.workspace = ws0.data_ptr<float>();
          p.exact_gate_grad = kernel_enabled(KernelFamily::kFusedRecurrentGlaExactDg);
        }
        (algo == Algo::kChunk ? cuda.chunk_bwd : cuda.recurrent_bwd)(dt, p, stream);
      });
  return {dq, dk, dv, dg, dh0};
}

template <Backend backend, Algo algo>
std::tuple<at::Tensor, at::Tensor> fwd_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const at::Tensor& g, const std::optional<at::Tensor>& initial_state,
                                          double scale) {
  return gla_fwd<backend>(algo, q, k, v, g, scale, initial_state);
}

template <Backend backend, Algo algo>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_op(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
    const std::optional<at::Tensor>& initial_state, const at::Tensor& dout,
    const std::optional<at::Tensor>& dfinal_state, double scale) {
  return gla_bwd<backend>(algo, q, k, v, g, dout, dfinal_state, scale, initial_state);
}

}  // namespace

// gla: gated linear attention, q/k/g (B, T, H, K), v (B, T, H, V), state (B, H, K, V); chunked and step by step.
// out and final_state are fla's o and ht (GlaParams's names).
TORCH_LIBRARY_FRAGMENT(linmix, m) {
  m.def("chunk_gla_fwd(Tensor q, Tensor k, Tensor v, Tensor g, Tensor? initial_state, float scale) "
        "-> (Tensor out, Tensor final_state)");
  m.def("chunk_gla_bwd(Tensor q, Tensor k, Tensor v, Tensor g, Tensor? initial_state, Tensor dout, "
        "Tensor? dfinal_state, float scale) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dg, Tensor dinitial_state)");
  m.def("fused_recurrent_gla_fwd(Tensor q, Tensor k, Tensor v, Tensor g, Tensor? initial_state, float scale) "
        "-> (Tensor out, Tensor final_state)");
  m.def("fused_recurrent_gla_bwd(Tensor q, Tensor k, Tensor v, Tensor g, Tensor? initial_state, Tensor dout, "
        "Tensor? dfinal_state, float scale) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dg, Tensor dinitial_state)");
}

TORCH_LIBRARY_IMPL(linmix, CPU, m) {
  m.impl("chunk_gla_fwd", &fwd_op<Backend::kCPU, Algo::kChunk>);
  m.impl("chunk_gla_bwd", &bwd_op<Backend::kCPU, Algo::kChunk>);
  m.impl("fused_recurrent_gla_fwd", &fwd_op<Backend::kCPU, Algo::kRecurrent>);
  m.impl("fused_recurrent_gla_bwd", &bwd_op<Backend::kCPU, Algo::kRecurrent>);
}

#ifdef LINMIX_WITH_CUDA
TORCH_LIBRARY_IMPL(linmix, CUDA, m) {
  m.impl("chunk_gla_fwd", &fwd_op<Backend::kCUDA, Algo::kChunk>);
  m.impl("chunk_gla_bwd", &bwd_op<Backend::kCUDA, Algo::kChunk>);
  m.impl("fused_recurrent_gla_fwd", &fwd_op<Backend::kCUDA, Algo::kRecurrent>);
  m.impl("fused_recurrent_gla_bwd", &bwd_op<Backend::kCUDA, Algo::kRecurrent>);
}
#endif

}  // namespace linmix
