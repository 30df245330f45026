// Torch glue for chunk_gla and fused_recurrent_gla: input checks, outputs, params, dispatch.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <dlfcn.h>

#include "common/checks.h"
#include "common/static_switch.h"
#include "common/torch_stream.h"
#include "common/unverified.h"
#include "gla/gla_common.h"
#include "gla/gla_cpu.h"
#include "gla/params.h"
#ifdef LINMIX_WITH_CUDA
#include "gla/gla_cuda.h"
#endif

namespace linmix {
namespace {

constexpr int64_t kMaxHeadDim = 256;

BTHView bth_view(const at::Tensor& t) { return BTHView{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

at::ScalarType acc_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Checks shared by both algorithms and directions.
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                  const std::optional<at::Tensor>& h0) {
  TORCH_CHECK(q.dim() == 4, "linmix.gla: q must have shape (B, T, H, K), got ", shape_str(q.sizes()));
  check_float_dtype(q, "q");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), K = q.size(3);
  check_shape(k, "k", {B, T, H, K}, "(B, T, H, K) like q");
  check_shape(g, "g", {B, T, H, K}, "(B, T, H, K) like q");
  check_shape(v, "v", {B, T, H, -1}, "(B, T, H, V) with q's B, T, H");
  const int64_t V = v.size(3);
  TORCH_CHECK(K >= 1 && K <= kMaxHeadDim && V >= 1 && V <= kMaxHeadDim, "linmix.gla: head dims K and V must be in [1, ",
              kMaxHeadDim, "], got K = ", K, ", V = ", V);
  for (const auto& [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}, std::pair{&g, "g"}}) {
    check_same_dtype(*t, name, q, "q");
    check_same_device(*t, name, q, "q");
  }
  if (h0) {
    check_shape(*h0, "initial_state", {B, H, K, V}, "(B, H, K, V)");
    check_dtype(*h0, "initial_state", acc_dtype(q));
    check_same_device(*h0, "initial_state", q, "q");
  }
  if (q.is_cuda()) {
    TORCH_CHECK(B * H <= int64_t(2147483647), "linmix.gla: B * H too large for the CUDA grid");
    TORCH_CHECK(T <= int64_t(65535) * kGlaChunk, "linmix.gla: T must be at most ", 65535 * kGlaChunk, " on CUDA");
  }
}

std::optional<at::Tensor> contiguous_opt(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

GlaParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g, double scale,
                      const std::optional<at::Tensor>& h0) {
  GlaParams p;
  p.batch = q.size(0), p.seqlen = q.size(1), p.heads = q.size(2), p.dim_k = q.size(3), p.dim_v = v.size(3);
  p.scale = scale;
  p.q = bth_view(q), p.k = bth_view(k), p.v = bth_view(v), p.g = bth_view(g);
  p.h0 = h0 ? h0->data_ptr() : nullptr;
  p.segment_decays = unverified_kernels_enabled();  // CUDA chunk kernels exact for any gate: not yet GPU-run
  return p;
}

// The GEMM handed to the CPU chunk kernel (see CpuGemm). ATen's raw-pointer cpublas::gemm is not exported
// from libtorch, and at::addmm on from_blob tiles costs microseconds of dispatch per 64x64 tile, so we call
// the Fortran BLAS that libtorch_cpu carries (MKL in the x86 wheels exports sgemm_/dgemm_), found once with
// dlsym. Without one, at::addmm_ on the tiles is the (correct, slower) fallback.
using FortranGemm = void (*)(const char*, const char*, const int*, const int*, const int*, const void*, const void*,
                             const int*, const void*, const int*, const void*, void*, const int*);

void* find_blas_symbol(const char* name) {
  for (const char* lib : {"libtorch_cpu.so", "libtorch_cpu.dylib"}) {
    if (void* h = dlopen(lib, RTLD_LAZY | RTLD_NOLOAD)) {
      void* f = dlsym(h, name);
      dlclose(h);
      if (f) return f;
    }
  }
  return dlsym(RTLD_DEFAULT, name);
}

// MKL opens a nested thread team for every call, even inside at::parallel_for's region; on tiles this
// small that is pure synchronisation (measured: 2 threads slower than 1). Each call runs on one thread.
using MklSetLocalThreads = int (*)(int);  // MKL_Set_Num_Threads_Local, the C entry (by value)

// Row-major C = alpha op(A) op(B) + beta C is column-major C^T = alpha op(B)^T op(A)^T + beta C^T, so BLAS
// gets the operands swapped. Tile sizes here are at most 256, far inside BLAS's 32-bit ints.
template <typename T>
void cpu_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
              const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  static const auto blas = reinterpret_cast<FortranGemm>(find_blas_symbol(std::is_same_v<T, double> ? "dgemm_" : "sgemm_"));
  static const auto mkl_local = reinterpret_cast<MklSetLocalThreads>(find_blas_symbol("MKL_Set_Num_Threads_Local"));
  if (blas) {
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    const int M = int(m), N = int(n), Kd = int(k), la = int(lda), lb = int(ldb), lc = int(ldc);
    const int prev = mkl_local ? mkl_local(1) : 0;
    blas(&tb, &ta, &N, &M, &Kd, &alpha, b, &lb, a, &la, &beta, c, &lc);
    if (mkl_local) mkl_local(prev);
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto tile = [&](const T* x, bool t, int64_t rows, int64_t cols, int64_t ld) {  // op(X): (rows, cols)
    return t ? at::from_blob(const_cast<T*>(x), {cols, rows}, {ld, 1}, opts).t()
             : at::from_blob(const_cast<T*>(x), {rows, cols}, {ld, 1}, opts);
  };
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  C.addmm_(tile(a, trans_a, m, k, lda), tile(b, trans_b, k, n, ldb), beta, alpha);  // beta 0 ignores C's contents
}
constexpr CpuGemm kCpuGemm{&cpu_gemm<float>, &cpu_gemm<double>};

enum class Algo { kChunk, kRecurrent };

std::tuple<at::Tensor, at::Tensor> gla_fwd(Algo algo, const at::Tensor& q_in, const at::Tensor& k_in,
                                           const at::Tensor& v_in, const at::Tensor& g_in, double scale,
                                           const std::optional<at::Tensor>& h0_in) {
  check_inputs(q_in, k_in, v_in, g_in, h0_in);
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
  const DType dt = to_linmix_dtype(q.scalar_type());
  if (q.is_cpu()) {
    if (algo == Algo::kChunk)
      chunk_gla_fwd_cpu(p, dt, kCpuGemm);
    else
      fused_recurrent_gla_fwd_cpu(p, dt);
  } else {
#ifdef LINMIX_WITH_CUDA
    const c10::cuda::CUDAGuard guard(q.device());
    LINMIX_DTYPE_SWITCH(dt, kDT, [&] {
      if constexpr (kDT != DType::kFloat64)
        (algo == Algo::kChunk ? chunk_gla_fwd_cuda<kDT> : fused_recurrent_gla_fwd_cuda<kDT>)(p, current_stream());
    });
#endif
  }
  return {o, ht};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gla_bwd(
    Algo algo, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& g_in,
    const at::Tensor& dout_in, const std::optional<at::Tensor>& dht_in, double scale,
    const std::optional<at::Tensor>& h0_in) {
  check_inputs(q_in, k_in, v_in, g_in, h0_in);
  check_shape(dout_in, "dout", {v_in.size(0), v_in.size(1), v_in.size(2), v_in.size(3)}, "(B, T, H, V) like v");
  check_same_dtype(dout_in, "dout", q_in, "q");
  check_same_device(dout_in, "dout", q_in, "q");
  if (dht_in) {
    check_shape(*dht_in, "dht", {q_in.size(0), q_in.size(2), q_in.size(3), v_in.size(3)}, "(B, H, K, V)");
    check_dtype(*dht_in, "dht", acc_dtype(q_in));
    check_same_device(*dht_in, "dht", q_in, "q");
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
  const DType dt = to_linmix_dtype(q.scalar_type());
  if (q.is_cpu()) {
    if (algo == Algo::kChunk)
      chunk_gla_bwd_cpu(p, dt, kCpuGemm);
    else
      fused_recurrent_gla_bwd_cpu(p, dt);
  } else {
#ifdef LINMIX_WITH_CUDA
    const c10::cuda::CUDAGuard guard(q.device());
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
    }
    LINMIX_DTYPE_SWITCH(dt, kDT, [&] {
      if constexpr (kDT != DType::kFloat64)
        (algo == Algo::kChunk ? chunk_gla_bwd_cuda<kDT> : fused_recurrent_gla_bwd_cuda<kDT>)(p, current_stream());
    });
#endif
  }
  return {dq, dk, dv, dg, dh0};
}

template <Algo algo>
std::tuple<at::Tensor, at::Tensor> fwd_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const at::Tensor& g, double scale, const std::optional<at::Tensor>& h0) {
  return gla_fwd(algo, q, k, v, g, scale, h0);
}

template <Algo algo>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_op(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g, const at::Tensor& dout,
    const std::optional<at::Tensor>& dht, double scale, const std::optional<at::Tensor>& h0) {
  return gla_bwd(algo, q, k, v, g, dout, dht, scale, h0);
}

}  // namespace

TORCH_LIBRARY_IMPL(linmix, CPU, m) {
  m.impl("chunk_gla_fwd", &fwd_op<Algo::kChunk>);
  m.impl("chunk_gla_bwd", &bwd_op<Algo::kChunk>);
  m.impl("fused_recurrent_gla_fwd", &fwd_op<Algo::kRecurrent>);
  m.impl("fused_recurrent_gla_bwd", &bwd_op<Algo::kRecurrent>);
}

#ifdef LINMIX_WITH_CUDA
TORCH_LIBRARY_IMPL(linmix, CUDA, m) {
  m.impl("chunk_gla_fwd", &fwd_op<Algo::kChunk>);
  m.impl("chunk_gla_bwd", &bwd_op<Algo::kChunk>);
  m.impl("fused_recurrent_gla_fwd", &fwd_op<Algo::kRecurrent>);
  m.impl("fused_recurrent_gla_bwd", &bwd_op<Algo::kRecurrent>);
}
#endif

}  // namespace linmix
