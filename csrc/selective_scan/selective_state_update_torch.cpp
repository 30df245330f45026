// Torch glue for selective_state_update (one decoding step, mamba-ssm's contract): the schema, checks that
// name the public argument in the caller's layout, the Mamba-1 -> heads mapping, and the CPU / CUDA dispatch.
// Every check runs before anything is written, so the state is untouched on every error.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <numeric>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/kernels.h"
#include "selective_scan/selective_state_update_common.h"
#include "selective_scan/selective_state_update_cpu.h"
#include "selective_scan/selective_state_update_cuda.h"
#ifdef LINMIX_WITH_CUDA
#include <c10/cuda/CUDAGraphsC10Utils.h>
#endif

namespace linmix {
namespace {

using OptTensor = std::optional<at::Tensor>;
constexpr const char* kOp = "linmix.selective_state_update: ";


Strided3 strided3(const at::Tensor& t) {
  Strided3 v;
  v.ptr = t.data_ptr();
  v.s0 = t.stride(0), v.s1 = t.stride(1), v.s2 = t.dim() > 2 ? t.stride(2) : 0;
  return v;
}

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& state) {
  check_same_device(t, name, state, "state");
  check_float_dtype(t, name);
}

// B or C: (b, g, n), or (b, n) for one group; g must divide `units` (heads, or channels in Mamba-1's layout).
at::Tensor check_bc(const at::Tensor& t, const char* name, int64_t b, int64_t units, const char* unit_name,
                    int64_t n, const at::Tensor& state) {
  TORCH_CHECK(t.dim() == 2 || t.dim() == 3, "linmix: ", name, " must have shape (b, n) or (b, g, n) = (", b,
              ", g, ", n, "), got ", shape_str(t.sizes()));
  if (t.dim() == 2) {
    check_shape(t, name, {b, n}, "(b, n)");
  } else {
    check_shape(t, name, {b, -1, n}, "(b, g, n)");
  }
  const at::Tensor v = t.dim() == 2 ? t.unsqueeze(1) : t;
  TORCH_CHECK(v.size(1) >= 1 && units % v.size(1) == 0, kOp, "the group count g = ", v.size(1), " of ", name,
              " ", shape_str(t.sizes()), " must divide the ", unit_name, " count ", units);
  check_operand(v, name, state);
  return v;
}

// The layout-specific shapes, named as the caller wrote them, then the heads view of every tensor.
struct Canonical {
  at::Tensor state, x, dt, A, B, C;
  OptTensor D, z, dt_bias;
};

Canonical canonicalise(const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                       const at::Tensor& B, const at::Tensor& C, const OptTensor& D, const OptTensor& z,
                       const OptTensor& dt_bias, const OptTensor& idx) {
  TORCH_CHECK(state.dim() == 3 || state.dim() == 4, kOp,
              "state must have shape (b, d, n) (Mamba-1) or (b, h, p, n) (Mamba-2 heads), got ",
              shape_str(state.sizes()));
  check_float_dtype(state, "state");
  const int64_t S = state.size(0), n = state.size(-1);
  const int64_t bx = idx ? -1 : S;  // with state_batch_indices, x's batch is the indices' length
  Canonical c;
  if (state.dim() == 3) {  // Mamba-1: h = lcm(g_B, g_C) heads of d / h channels (a view of every tensor)
    const int64_t d = state.size(1);
    check_shape(x, "x", {bx, d}, "(b, d) with d from state (b, d, n)");
    const int64_t b = x.size(0);
    check_shape(dt, "dt", {b, d}, "(b, d) like x");
    check_shape(A, "A", {d, n}, "(d, n)");
    if (D) check_shape(*D, "D", {d}, "(d,)");
    if (dt_bias) check_shape(*dt_bias, "dt_bias", {d}, "(d,)");
    if (z) check_shape(*z, "z", {b, d}, "(b, d) like x");
    c.B = check_bc(B, "B", b, d, "channel", n, state);
    c.C = check_bc(C, "C", b, d, "channel", n, state);
    const int64_t h = std::lcm(c.B.size(1), c.C.size(1));
    const std::vector<int64_t> hp{h, d / h};
    auto heads = [&](const OptTensor& t, int64_t dim) { return t ? OptTensor(t->unflatten(dim, hp)) : std::nullopt; };
    c.state = state.unflatten(1, hp), c.x = x.unflatten(1, hp), c.dt = dt.unflatten(1, hp), c.A = A.unflatten(0, hp);
    c.D = heads(D, 0), c.z = heads(z, 1), c.dt_bias = heads(dt_bias, 0);
  } else {
    const int64_t h = state.size(1), p = state.size(2);
    check_shape(x, "x", {bx, h, p}, "(b, h, p) with h, p from state (b, h, p, n)");
    const int64_t b = x.size(0);
    check_shape(dt, "dt", {b, h, p}, "(b, h, p) like x");
    check_shape(A, "A", {h, p, n}, "(h, p, n)");
    if (D) check_shape(*D, "D", {h, p}, "(h, p)");
    if (dt_bias) check_shape(*dt_bias, "dt_bias", {h, p}, "(h, p)");
    if (z) check_shape(*z, "z", {b, h, p}, "(b, h, p) like x");
    c.B = check_bc(B, "B", b, h, "head", n, state);
    c.C = check_bc(C, "C", b, h, "head", n, state);
    c.state = state, c.x = x, c.dt = dt, c.A = A, c.D = D, c.z = z, c.dt_bias = dt_bias;
  }
  TORCH_CHECK(n <= 1 || state.stride(-1) == 1, kOp,
              "state must have unit stride along n (it is updated in place, never copied), got strides ",
              shape_str(state.strides()));
  check_operand(x, "x", state);
  check_operand(dt, "dt", state);
  check_operand(A, "A", state);
  for (auto [t, name] : {std::pair{&D, "D"}, std::pair{&dt_bias, "dt_bias"}}) {
    if (*t) check_operand(**t, name, state);
  }
  if (z) {
    check_same_device(*z, "z", state, "state");
    check_same_dtype(*z, "z", x, "x");
  }
  return c;
}

// Range and uniqueness of state_batch_indices (negative entries are padding). On CUDA this reads the indices
// back (one sync); under CUDA graph capture it cannot, and the kernels treat an out-of-range entry as padding.
void check_indices(const at::Tensor& idx, int64_t b, const at::Tensor& state) {
  check_same_device(idx, "state_batch_indices", state, "state");
  TORCH_CHECK(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong,
              "linmix: state_batch_indices must be int32 or int64, got ", idx.scalar_type());
  check_shape(idx, "state_batch_indices", {b}, "(b,) like x's first dim");
#ifdef LINMIX_WITH_CUDA
  if (idx.is_cuda() && c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return;
#endif
  const at::Tensor host = idx.to(at::kCPU, at::kLong).contiguous();
  const int64_t* v = host.data_ptr<int64_t>();
  const int64_t S = state.size(0);
  std::vector<int64_t> owner(S, -1);
  for (int64_t i = 0; i < b; ++i) {
    if (v[i] < 0) continue;
    TORCH_CHECK(v[i] < S, kOp, "state_batch_indices[", i, "] = ", v[i], " is out of range for a state of ", S,
                " rows (valid: 0..", S - 1, ", or negative for a padding row)");
    TORCH_CHECK(owner[v[i]] < 0, kOp, "state_batch_indices[", i, "] = ", v[i], " repeats state_batch_indices[",
                owner[v[i]], "]: two batch rows cannot update one state row in place");
    owner[v[i]] = i;
  }
}

// The GPU-verified default: selective_scan's forward with L = 1 from the state rows, in fp32. Without
// state_batch_indices it never syncs (CUDA-graph capturable); with them it selects the live rows (one sync).
void update_via_selective_scan(const Canonical& c, bool dt_softplus, const OptTensor& idx, at::Tensor& out) {
  const int64_t h = c.x.size(1), p = c.x.size(2), n = c.A.size(2);
  OptTensor rows, live;
  if (idx) {
    const at::Tensor all = idx->to(at::kLong);
    live = all.ge(0).logical_and(all.lt(c.state.size(0))).nonzero().squeeze(1);
    rows = all.index_select(0, *live);
  }
  auto f32 = [](const at::Tensor& t) { return t.to(at::kFloat); };
  auto sel = [&](const at::Tensor& t) { return f32(live ? t.index_select(0, *live) : t); };
  const int64_t bl = live ? live->size(0) : c.x.size(0);
  const at::Tensor u = sel(c.x).reshape({bl, h * p, 1}), delta = sel(c.dt).reshape({bl, h * p, 1});
  const at::Tensor B = sel(c.B).unsqueeze(-1), C = sel(c.C).unsqueeze(-1);
  const at::Tensor A = f32(c.A).reshape({h * p, n});
  auto flat = [&](const OptTensor& t) { return t ? OptTensor(f32(*t).reshape({h * p})) : std::nullopt; };
  const OptTensor z = c.z ? OptTensor(sel(*c.z).reshape({bl, h * p, 1})) : std::nullopt;
  const at::Tensor h0 = f32(rows ? c.state.index_select(0, *rows) : c.state).reshape({bl, h * p, n});
  static auto fwd = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("linmix::selective_scan_fwd", "")
                        .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                            const OptTensor&, bool)>();
  auto [y, ckpt, fin] = fwd.call(u, delta, A, B, C, flat(c.D), z, flat(c.dt_bias), h0, dt_softplus);
  const at::Tensor new_state = fin.view({bl, h, p, n}).to(c.state.scalar_type());
  const at::Tensor y_out = y.view({bl, h, p}).to(out.scalar_type());
  if (rows) {
    c.state.index_copy_(0, *rows, new_state);
    out.zero_().index_copy_(0, *live, y_out);
  } else {
    c.state.copy_(new_state);
    out.copy_(y_out);
  }
}

template <Backend backend>
at::Tensor selective_state_update(const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                                  const at::Tensor& A, const at::Tensor& B, const at::Tensor& C, const OptTensor& D,
                                  const OptTensor& z, const OptTensor& dt_bias, const OptTensor& state_batch_indices,
                                  bool dt_softplus) {
  const Canonical c = canonicalise(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices);
  const int64_t b = c.x.size(0);
  if (state_batch_indices) check_indices(*state_batch_indices, b, state);
  at::Tensor out = at::empty(c.x.sizes(), c.x.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor public_out = state.dim() == 3 ? out.flatten(1) : out;
  if (b == 0 || out.numel() == 0) return public_out;
  if (runs_cuda_kernels<backend>(c.x) && !kernel_enabled(KernelFamily::kSelectiveStateUpdate)) {
    update_via_selective_scan(c, dt_softplus, state_batch_indices, out);
    return public_out;
  }
  // Parameters in the accumulation dtype (no-ops for the usual fp32 parameters).
  const auto acc = acc_dtype(c.x);
  const at::Tensor A_acc = c.A.to(acc);
  const OptTensor D_acc = c.D ? OptTensor(c.D->to(acc)) : std::nullopt;
  const OptTensor bias_acc = c.dt_bias ? OptTensor(c.dt_bias->to(acc)) : std::nullopt;
  SelectiveStateUpdateParams p;
  p.batch = b, p.nheads = c.x.size(1), p.headdim = c.x.size(2), p.dstate = c.A.size(2);
  p.B_groups = c.B.size(1), p.C_groups = c.C.size(1);
  p.state_rows = state.size(0), p.dt_softplus = dt_softplus;
  p.state = c.state.data_ptr(), p.state_s0 = c.state.stride(0), p.state_s1 = c.state.stride(1);
  p.state_s2 = c.state.stride(2);
  if (state_batch_indices) {
    p.state_batch_indices = state_batch_indices->data_ptr();
    p.indices_int64 = state_batch_indices->scalar_type() == at::kLong;
  }
  p.x = strided3(c.x), p.dt = strided3(c.dt), p.A = strided3(A_acc), p.B = strided3(c.B), p.C = strided3(c.C);
  if (c.z) p.z = strided3(*c.z);
  if (D_acc) p.D = strided3(*D_acc);
  if (bias_acc) p.dt_bias = strided3(*bias_acc);
  p.dt_dtype = to_linmix_dtype(c.dt.scalar_type());
  p.B_dtype = to_linmix_dtype(c.B.scalar_type()), p.C_dtype = to_linmix_dtype(c.C.scalar_type());
  p.out = out.data_ptr();
  const DType sdt = to_linmix_dtype(state.scalar_type());
  launch<backend, SelectiveStateUpdateCudaLaunchers>(
      c.x, [&](DType xdt) { selective_state_update_cpu(p, xdt, sdt); },
      [&](const SelectiveStateUpdateCudaLaunchers& cuda, DType xdt, cudaStream_t stream) {
        TORCH_CHECK(sdt != DType::kFloat64, kOp, "a float64 state runs on the CPU backend only");
        cuda.update(xdt, sdt, p, stream);
      });
  return public_out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(linmix, m) {
  // One decoding step; state (b, d, n) or (b, h, p, n) is updated in place. See ops/selective_scan.py.
  m.def("selective_state_update(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, "
        "Tensor? z, Tensor? dt_bias, Tensor? state_batch_indices, bool dt_softplus) -> Tensor out");
}

TORCH_LIBRARY_IMPL(linmix, CPU, m) { m.impl("selective_state_update", &selective_state_update<Backend::kCPU>); }

#ifdef LINMIX_WITH_CUDA
TORCH_LIBRARY_IMPL(linmix, CUDA, m) { m.impl("selective_state_update", &selective_state_update<Backend::kCUDA>); }
#endif

}  // namespace linmix
