// Torch glue for selective_scan: input checks, output allocation, params, and the launch (common/dispatch.h).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/kernels.h"
#include "selective_scan/params.h"
#include "selective_scan/selective_scan_cpu.h"
#include "selective_scan/selective_scan_cuda.h"

namespace linmix {
namespace {

using OptTensor = std::optional<at::Tensor>;

BDLView bdl_view(const at::Tensor& t) { return BDLView{t.data_ptr(), t.stride(0), t.stride(1)}; }

BDLView opt_bdl_view(const OptTensor& t) { return t ? bdl_view(*t) : BDLView{}; }

const void* opt_ptr(const OptTensor& t) { return t ? t->data_ptr() : nullptr; }

OptTensor opt_map(const OptTensor& t, at::Tensor (*f)(const at::Tensor&)) {
  return t ? OptTensor(f(*t)) : std::nullopt;
}

at::Tensor contiguous(const at::Tensor& t) { return t.contiguous(); }

BCView bc_view(const at::Tensor& t) {
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

void check_bc(const at::Tensor& t, const char* name, const at::Tensor& u, int64_t n) {
  const int64_t b = u.size(0), d = u.size(1), L = u.size(2);
  check_same_device(t, name, u, "u");
  if (t.dim() == 4) {
    check_shape(t, name, {b, -1, n, L}, "(b, g, n, L)");
    TORCH_CHECK(t.size(1) >= 1 && d % t.size(1) == 0, "linmix.selective_scan: the group count g = ", t.size(1),
                " of ", name, " (b, g, n, L) must divide d = ", d);
    check_same_dtype(t, name, u, "u (variable B/C are in the input dtype)");
  } else {
    TORCH_CHECK(t.dim() == 2, "linmix.selective_scan: ", name,
                " must have shape (d, n) (fixed) or (b, g, n, L) (variable), got ", shape_str(t.sizes()));
    check_shape(t, name, {d, n}, "(d, n)");
    check_dtype(t, name, acc_dtype(u));
  }
}

void check_opt(const OptTensor& t, const char* name, const at::Tensor& u, std::vector<int64_t> shape,
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

// Checks shared by forward and backward.
void check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& C, const OptTensor& D, const OptTensor& z, const OptTensor& delta_bias,
                  const OptTensor& initial_state) {
  TORCH_CHECK(u.dim() == 3, "linmix.selective_scan: u must have shape (b, d, L), got ", shape_str(u.sizes()));
  check_float_dtype(u, "u");
  const int64_t b = u.size(0), d = u.size(1), L = u.size(2);
  check_shape(delta, "delta", {b, d, L}, "(b, d, L) like u");
  check_same_dtype(delta, "delta", u, "u");
  check_same_device(delta, "delta", u, "u");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == d, "linmix.selective_scan: A must have shape (d, n) = (", d,
              ", n), got ", shape_str(A.sizes()));
  check_dtype(A, "A", acc_dtype(u));
  check_same_device(A, "A", u, "u");
  const int64_t n = A.size(1);
  check_bc(B, "B", u, n);
  check_bc(C, "C", u, n);
  check_opt(D, "D", u, {d}, "(d,)", false);
  check_opt(delta_bias, "delta_bias", u, {d}, "(d,)", false);
  check_opt(z, "z", u, {b, d, L}, "(b, d, L) like u", true);
  check_opt(initial_state, "initial_state", u, {b, d, n}, "(b, d, n)", false);
}

SelectiveScanParams make_params(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                const at::Tensor& B, const at::Tensor& C, const OptTensor& D, const OptTensor& z,
                                const OptTensor& delta_bias, const OptTensor& initial_state, bool delta_softplus) {
  SelectiveScanParams p;
  p.batch = u.size(0), p.dim = u.size(1), p.seqlen = u.size(2), p.dstate = A.size(1);
  p.n_chunks = ceil_div(p.seqlen, kSelectiveScanChunk);
  p.delta_softplus = delta_softplus;
  p.u = bdl_view(u), p.delta = bdl_view(delta), p.z = opt_bdl_view(z);
  p.B = bc_view(B), p.C = bc_view(C);
  p.A = A.data_ptr(), p.D = opt_ptr(D), p.delta_bias = opt_ptr(delta_bias), p.initial_state = opt_ptr(initial_state);
  return p;
}

template <Backend backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_scan_fwd(
    const at::Tensor& u_in, const at::Tensor& delta_in, const at::Tensor& A_in, const at::Tensor& B_in,
    const at::Tensor& C_in, const OptTensor& D_in, const OptTensor& z_in, const OptTensor& delta_bias_in,
    const OptTensor& initial_state_in, bool delta_softplus) {
  check_inputs(u_in, delta_in, A_in, B_in, C_in, D_in, z_in, delta_bias_in, initial_state_in);
  const at::Tensor u = last_dim_contiguous(u_in), delta = last_dim_contiguous(delta_in), A = A_in.contiguous();
  const at::Tensor B = B_in.dim() == 4 ? last_dim_contiguous(B_in) : B_in;
  const at::Tensor C = C_in.dim() == 4 ? last_dim_contiguous(C_in) : C_in;
  const OptTensor D = opt_map(D_in, contiguous), z = opt_map(z_in, last_dim_contiguous);
  const OptTensor delta_bias = opt_map(delta_bias_in, contiguous), h0 = opt_map(initial_state_in, contiguous);
  SelectiveScanParams p = make_params(u, delta, A, B, C, D, z, delta_bias, h0, delta_softplus);
  const auto acc_opts = u.options().dtype(acc_dtype(u));
  at::Tensor out = at::empty(u.sizes(), u.options());
  at::Tensor ckpt = at::empty({p.batch, p.dim, p.n_chunks, p.dstate}, acc_opts);
  at::Tensor final_state = at::empty({p.batch, p.dim, p.dstate}, acc_opts);
  p.out = bdl_view(out), p.checkpoints = ckpt.data_ptr(), p.final_state = final_state.data_ptr();
  if (p.batch * p.dim == 0) return {out, ckpt, final_state};
  launch<backend, SelectiveScanCudaLaunchers>(
      u, [&](DType dt) { selective_scan_fwd_cpu(p, dt); },
      [&](const SelectiveScanCudaLaunchers& cuda, DType dt, cudaStream_t stream) {
        // the warp-per-channel forward is not yet GPU-verified
        (kernel_enabled(KernelFamily::kSelectiveScanFwdWarp) ? cuda.fwd_warp : cuda.fwd)(dt, p, stream);
      });
  return {out, ckpt, final_state};
}

// The atomic-free tiled backward (deterministic with per-tile partials) runs when switched on
// (LINMIX_KERNELS=selective_scan_bwd_tiled, common/kernels.h), or for a deterministic backward with variable B/C,
// which no GPU-verified kernel serves, once it is emulation-verified; the default kernel adds variable dB/dC with
// float atomics (fixed B/C: no atomics, deterministic).
void bwd_cuda(const SelectiveScanCudaLaunchers& cuda, DType dt, SelectiveScanParams& p, bool det,
              bool det_requested, const at::TensorOptions& f32, cudaStream_t stream) {
  const bool variable_bc = p.B.variable || p.C.variable;
  bool use_tiled = kernel_enabled(KernelFamily::kSelectiveScanBwdTiled);
  if (!use_tiled && variable_bc && det) {
    bool warn = false;
    use_tiled = kernel_serves_uncovered_call(KernelFamily::kSelectiveScanBwdTiled, warn);
    if (warn) {
      TORCH_WARN("linmix.selective_scan: a deterministic backward with variable B or C on CUDA runs the atomic-free "
                 "backward kernel, which passes the test suite and sanitizers under the CUDA emulator but has not "
                 "yet run on a GPU (bench/results/README.md)");
    }
  }
  if (!use_tiled) {
    if (variable_bc && det) {
      TORCH_CHECK(!det_requested, "linmix.selective_scan: deterministic=True with variable B or C on CUDA needs the "
                  "atomic-free backward kernel, which has not yet been verified; set "
                  "LINMIX_KERNELS=selective_scan_bwd_tiled to use it (the default backward adds dB/dC with float "
                  "atomics)");
      at::globalContext().alertNotDeterministic(
          "linmix.selective_scan backward with variable B or C on CUDA (float atomics; the deterministic kernel "
          "runs with LINMIX_KERNELS=selective_scan_bwd_tiled)");
    }
    cuda.bwd(dt, p, stream);
    return;
  }
  const SelectiveScanTiling tl = selective_scan_tiling(p);
  at::Tensor sub_states =
      at::empty({p.batch, p.dim, kSelectiveScanChunk / kSelectiveScanSubChunk, p.dstate}, f32);
  at::Tensor dB_tiles, dC_tiles;  // freed after the launches: the caching allocator keeps them stream-ordered
  if (det && p.B.variable) dB_tiles = at::empty({p.batch, tl.n_tiles, p.dstate, p.seqlen}, f32);
  if (det && p.C.variable) dC_tiles = at::empty({p.batch, tl.n_tiles, p.dstate, p.seqlen}, f32);
  p.sub_states = sub_states.data_ptr();
  p.dB_tiles = dB_tiles.defined() ? dB_tiles.data_ptr() : nullptr;
  p.dC_tiles = dC_tiles.defined() ? dC_tiles.data_ptr() : nullptr;
  cuda.bwd_tiled(dt, p, stream);
}

using BwdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                             at::Tensor, at::Tensor>;  // du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state

template <Backend backend>
BwdResult selective_scan_bwd(const at::Tensor& u_in, const at::Tensor& delta_in, const at::Tensor& A_in,
                             const at::Tensor& B_in, const at::Tensor& C_in, const OptTensor& D_in,
                             const OptTensor& z_in, const OptTensor& delta_bias_in, const OptTensor& initial_state_in,
                             const at::Tensor& checkpoints_in, const at::Tensor& dout_in,
                             const OptTensor& dfinal_state_in, bool delta_softplus, bool deterministic) {
  check_inputs(u_in, delta_in, A_in, B_in, C_in, D_in, z_in, delta_bias_in, initial_state_in);
  const int64_t b = u_in.size(0), d = u_in.size(1), L = u_in.size(2), n = A_in.size(1);
  check_shape(dout_in, "dout", {b, d, L}, "(b, d, L) like u");
  check_same_dtype(dout_in, "dout", u_in, "u");
  check_same_device(dout_in, "dout", u_in, "u");
  check_shape(checkpoints_in, "checkpoints", {b, d, ceil_div(L, kSelectiveScanChunk), n}, "(b, d, n_chunks, n)");
  check_dtype(checkpoints_in, "checkpoints", acc_dtype(u_in));
  check_same_device(checkpoints_in, "checkpoints", u_in, "u");
  check_opt(dfinal_state_in, "dfinal_state", u_in, {b, d, n}, "(b, d, n)", false);

  const at::Tensor u = last_dim_contiguous(u_in), delta = last_dim_contiguous(delta_in), A = A_in.contiguous();
  // Variable B/C contiguous: the kernels address their fp32 gradient buffers (contiguous) with B/C's offsets.
  const at::Tensor B = B_in.dim() == 4 ? B_in.contiguous() : B_in;
  const at::Tensor C = C_in.dim() == 4 ? C_in.contiguous() : C_in;
  const OptTensor D = opt_map(D_in, contiguous), z = opt_map(z_in, last_dim_contiguous);
  const OptTensor delta_bias = opt_map(delta_bias_in, contiguous), h0 = opt_map(initial_state_in, contiguous);
  const at::Tensor ckpt = checkpoints_in.contiguous(), dout = last_dim_contiguous(dout_in);
  const OptTensor dfinal_state = opt_map(dfinal_state_in, contiguous);
  SelectiveScanParams p = make_params(u, delta, A, B, C, D, z, delta_bias, h0, delta_softplus);
  p.checkpoints = ckpt.data_ptr();
  p.dout = bdl_view(dout), p.dfinal = opt_ptr(dfinal_state);

  const auto acc_opts = u.options().dtype(acc_dtype(u));
  at::Tensor du = at::empty(u.sizes(), u.options()), ddelta = at::empty(u.sizes(), u.options());
  at::Tensor dz = z ? at::empty(u.sizes(), u.options()) : at::empty({0}, u.options());
  // Variable dB/dC are sums over a group's channels (fp32 buffers); fixed ones are per-(b, d) partials.
  at::Tensor dB = B.dim() == 4 ? at::zeros(B.sizes(), acc_opts) : at::empty({b, d, n}, acc_opts);
  at::Tensor dC = C.dim() == 4 ? at::zeros(C.sizes(), acc_opts) : at::empty({b, d, n}, acc_opts);
  at::Tensor dA = at::empty({b, d, n}, acc_opts), dD = at::empty({b, d}, acc_opts);
  at::Tensor dbias = at::empty({b, d}, acc_opts), dh0 = at::empty({b, d, n}, acc_opts);
  p.du = bdl_view(du), p.ddelta = bdl_view(ddelta), p.dz = z ? bdl_view(dz) : BDLView{};
  p.dB = dB.data_ptr(), p.dC = dC.data_ptr(), p.dA_part = dA.data_ptr(), p.dD_part = dD.data_ptr();
  p.ddelta_bias_part = dbias.data_ptr(), p.dinitial_state = dh0.data_ptr();
  if (b * d > 0) {
    const bool det = deterministic || at::globalContext().deterministicAlgorithms();
    launch<backend, SelectiveScanCudaLaunchers>(
        u, [&](DType dt) { selective_scan_bwd_cpu(p, dt); },
        [&](const SelectiveScanCudaLaunchers& cuda, DType dt, cudaStream_t stream) {
          bwd_cuda(cuda, dt, p, det, deterministic, acc_opts, stream);
        });
  }
  // Deterministic reductions of the per-(b, d) partials over the batch.
  dB = B.dim() == 4 ? dB.to(B.scalar_type()) : dB.sum(0);
  dC = C.dim() == 4 ? dC.to(C.scalar_type()) : dC.sum(0);
  return {du, ddelta, dA.sum(0), dB, dC, dD.sum(0), dz, dbias.sum(0), dh0};
}

}  // namespace

// selective_scan (Mamba-1 S6): u, delta, z (b, d, L); A (d, n); B, C (d, n) or (b, g, n, L). The backward reads
// the forward's checkpoints.
TORCH_LIBRARY_FRAGMENT(linmix, m) {
  m.def("selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? delta_bias, Tensor? initial_state, bool delta_softplus) -> (Tensor out, Tensor checkpoints, "
        "Tensor final_state)");
  m.def("selective_scan_bwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? delta_bias, Tensor? initial_state, Tensor checkpoints, Tensor dout, Tensor? dfinal_state, "
        "bool delta_softplus, bool deterministic=False) -> (Tensor du, Tensor ddelta, Tensor dA, Tensor dB, "
        "Tensor dC, Tensor dD, Tensor dz, Tensor ddelta_bias, Tensor dinitial_state)");
}

TORCH_LIBRARY_IMPL(linmix, CPU, m) {
  m.impl("selective_scan_fwd", &selective_scan_fwd<Backend::kCPU>);
  m.impl("selective_scan_bwd", &selective_scan_bwd<Backend::kCPU>);
}

#ifdef LINMIX_WITH_CUDA
TORCH_LIBRARY_IMPL(linmix, CUDA, m) {
  m.impl("selective_scan_fwd", &selective_scan_fwd<Backend::kCUDA>);
  m.impl("selective_scan_bwd", &selective_scan_bwd<Backend::kCUDA>);
}
#endif

}  // namespace linmix
