// Torch glue for selective_state_update (one decoding step, mamba-ssm's contract): the schema, checks that
// name the public argument in the caller's layout, the Mamba-1 -> heads mapping, and the CPU / CUDA dispatch.
// Every check runs before anything is written, so the state is untouched on every error.
#include <numeric>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/kernels.h"
#include "selective_scan/selective_state_update_common.h"
#include "selective_scan/selective_state_update_cpu.h"
#include "selective_scan/selective_state_update_cuda.h"

namespace linmix {
namespace {

constexpr const char* kOp = "linmix.selective_state_update: ";

void check_operand(const Tensor& t, const char* name, const Tensor& state) {
  check_same_device(t, name, state, "state");
  check_float_dtype(t, name);
}

// t with dim `dim` split into `parts` (a view, as Tensor.unflatten).
Tensor unflatten(const Tensor& t, int64_t dim, const std::vector<int64_t>& parts) {
  std::vector<int64_t> shape = sizes(t);
  shape.erase(shape.begin() + dim);
  shape.insert(shape.begin() + dim, parts.begin(), parts.end());
  return torch::stable::view(t, shape);
}

// B or C: (b, g, n), or (b, n) for one group; g must divide `units` (heads, or channels in Mamba-1's layout).
Tensor check_bc(const Tensor& t, const char* name, int64_t b, int64_t units, const char* unit_name,
                    int64_t n, const Tensor& state) {
  LINMIX_CHECK(t.dim() == 2 || t.dim() == 3, "linmix: ", name, " must have shape (b, n) or (b, g, n) = (", b,
              ", g, ", n, "), got ", shape_str(t.sizes()));
  if (t.dim() == 2) {
    check_shape(t, name, {b, n}, "(b, n)");
  } else {
    check_shape(t, name, {b, -1, n}, "(b, g, n)");
  }
  const Tensor v = t.dim() == 2 ? torch::stable::unsqueeze(t, 1) : t;
  LINMIX_CHECK(v.size(1) >= 1 && units % v.size(1) == 0, kOp, "the group count g = ", v.size(1), " of ", name,
              " ", shape_str(t.sizes()), " must divide the ", unit_name, " count ", units);
  check_operand(v, name, state);
  return v;
}

// The layout-specific shapes, named as the caller wrote them, then the heads view of every tensor.
struct Canonical {
  Tensor state, x, dt, A, B, C;
  OptTensor D, z, dt_bias;
};

Canonical canonicalise(const Tensor& state, const Tensor& x, const Tensor& dt, const Tensor& A,
                       const Tensor& B, const Tensor& C, const OptTensor& D, const OptTensor& z,
                       const OptTensor& dt_bias, const OptTensor& idx) {
  LINMIX_CHECK(state.dim() == 3 || state.dim() == 4, kOp,
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
    auto heads = [&](const OptTensor& t, int64_t dim) { return t ? OptTensor(unflatten(*t, dim, hp)) : std::nullopt; };
    c.state = unflatten(state, 1, hp), c.x = unflatten(x, 1, hp), c.dt = unflatten(dt, 1, hp);
    c.A = unflatten(A, 0, hp);
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
  LINMIX_CHECK(n <= 1 || state.stride(-1) == 1, kOp,
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

// state_batch_indices' dtype, device and shape; on the CPU also their values (range and uniqueness), which costs
// nothing there. On CUDA the values are never read on the host (no sync): the kernels treat an out-of-range entry as
// padding, and the Python layer asserts the range on the device (ops/selective_scan.py).
void check_indices(const Tensor& idx, int64_t b, const Tensor& state) {
  check_same_device(idx, "state_batch_indices", state, "state");
  LINMIX_CHECK(idx.scalar_type() == ScalarType::Int || idx.scalar_type() == ScalarType::Long,
               "linmix: state_batch_indices must be int32 or int64, got ", idx.scalar_type());
  check_shape(idx, "state_batch_indices", {b}, "(b,) like x's first dim");
  if (!idx.is_cpu()) return;
  const Tensor v64 = as_contiguous(torch::stable::to(idx, ScalarType::Long));
  const int64_t* v = static_cast<const int64_t*>(v64.data_ptr());
  const int64_t S = state.size(0);
  std::vector<int64_t> owner(S, -1);
  for (int64_t i = 0; i < b; ++i) {
    if (v[i] < 0) continue;
    LINMIX_CHECK(v[i] < S, kOp, "state_batch_indices[", i, "] = ", v[i], " is out of range for a state of ", S,
                 " rows (valid: 0..", S - 1, ", or negative for a padding row)");
    LINMIX_CHECK(owner[v[i]] < 0, kOp, "state_batch_indices[", i, "] = ", v[i], " repeats state_batch_indices[",
                 owner[v[i]], "]: two batch rows cannot update one state row in place");
    owner[v[i]] = i;
  }
}

// The GPU-verified default without state_batch_indices: selective_scan's forward with L = 1 from the state, in
// fp32. It never syncs (CUDA-graph capturable).
void update_via_selective_scan(const Canonical& c, bool dt_softplus, Tensor& out) {
  const int64_t h = c.x.size(1), p = c.x.size(2), n = c.A.size(2), bl = c.x.size(0);
  const auto f32 = [](const Tensor& t) { return torch::stable::to(t, ScalarType::Float); };
  const Tensor u = torch::stable::reshape(f32(c.x), {bl, h * p, 1});
  const Tensor delta = torch::stable::reshape(f32(c.dt), {bl, h * p, 1});
  const Tensor B = torch::stable::unsqueeze(f32(c.B), -1), C = torch::stable::unsqueeze(f32(c.C), -1);
  const Tensor A = torch::stable::reshape(f32(c.A), {h * p, n});
  const auto flat = [&](const OptTensor& t) { return t ? OptTensor(torch::stable::reshape(f32(*t), {h * p})) : std::nullopt; };
  const OptTensor z = c.z ? OptTensor(torch::stable::reshape(f32(*c.z), {bl, h * p, 1})) : std::nullopt;
  const Tensor h0 = torch::stable::reshape(f32(c.state), {bl, h * p, n});
  const auto [y, checkpoints, final_state] =
      call_op<3>("linmix::selective_scan_fwd", "", u, delta, A, B, C, flat(c.D), z, flat(c.dt_bias), OptTensor(h0),
                 OptTensor(), dt_softplus);
  const Tensor new_state = torch::stable::to(torch::stable::view(final_state, {bl, h, p, n}), c.state.scalar_type());
  Tensor state = c.state;  // a handle: the caller's state is written
  torch::stable::copy_(state, new_state);
  torch::stable::copy_(out, torch::stable::to(torch::stable::view(y, {bl, h, p}), out.scalar_type()));
}

template <Backend backend>
Tensor selective_state_update(Tensor state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, OptTensor D,
                              OptTensor z, OptTensor dt_bias, OptTensor state_batch_indices, bool dt_softplus) {
  const Canonical c = canonicalise(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices);
  const int64_t b = c.x.size(0);
  if (state_batch_indices) check_indices(*state_batch_indices, b, state);
  Tensor out = empty(c.x, sizes(c.x));
  const Tensor public_out = state.dim() == 3 ? torch::stable::flatten(out, 1) : out;
  if (b == 0 || out.numel() == 0) return public_out;
  if (runs_cuda_kernels<backend>(c.x) && !kernel_enabled(KernelFamily::kSelectiveStateUpdate)) {
    if (!state_batch_indices) {
      update_via_selective_scan(c, dt_softplus, out);
      return public_out;
    }
    // With state_batch_indices the GPU-verified path would have to read them back (a sync) to gather the rows:
    // the fused kernel, which reads them on the device, runs by default and warns once while emulation-verified.
    bool first = false;
    LINMIX_CHECK(kernel_serves_uncovered_call(KernelFamily::kSelectiveStateUpdate, first), kOp,
                 "state_batch_indices on CUDA need the fused decode kernel; set LINMIX_KERNELS=selective_state_update");
    if (first)
      warn("linmix.selective_state_update: state_batch_indices on CUDA run the fused decode kernel "
           "(selective_state_update), which reads them on the device (no host sync) and passes the test suite and "
           "sanitizers under the CUDA emulator but has not yet run on a GPU (bench/results/README.md)");
  }
  // Parameters in the accumulation dtype (no-ops for the usual fp32 parameters).
  const ScalarType acc = acc_dtype(c.x);
  const Tensor A_acc = torch::stable::to(c.A, acc);
  const OptTensor D_acc = c.D ? OptTensor(torch::stable::to(*c.D, acc)) : std::nullopt;
  const OptTensor bias_acc = c.dt_bias ? OptTensor(torch::stable::to(*c.dt_bias, acc)) : std::nullopt;
  SelectiveStateUpdateParams p;
  p.batch = b, p.nheads = c.x.size(1), p.headdim = c.x.size(2), p.dstate = c.A.size(2);
  p.B_groups = c.B.size(1), p.C_groups = c.C.size(1);
  p.state_rows = state.size(0), p.dt_softplus = dt_softplus;
  p.state = strided_view<3>(c.state);
  if (state_batch_indices) {
    p.state_batch_indices = state_batch_indices->data_ptr();
    p.indices_int64 = state_batch_indices->scalar_type() == ScalarType::Long;
  }
  p.x = strided_view<3>(c.x), p.dt = strided_view<3>(c.dt), p.A = strided_view<3>(A_acc);
  p.B = strided_view<3>(c.B), p.C = strided_view<3>(c.C), p.z = strided_view<3>(c.z);
  p.D = strided_view<3>(D_acc), p.dt_bias = strided_view<3>(bias_acc);
  p.dt_dtype = to_linmix_dtype(c.dt.scalar_type());
  p.B_dtype = to_linmix_dtype(c.B.scalar_type()), p.C_dtype = to_linmix_dtype(c.C.scalar_type());
  p.out = out.data_ptr();
  const DType sdt = to_linmix_dtype(state.scalar_type());
  launch<backend, SelectiveStateUpdateCudaLaunchers>(
      c.x, [&](DType xdt) { selective_state_update_cpu(p, xdt, sdt); },
      [&](const SelectiveStateUpdateCudaLaunchers& cuda, DType xdt, cudaStream_t stream) {
        LINMIX_CHECK(sdt != DType::kFloat64, kOp, "a float64 state runs on the CPU backend only");
        cuda.update(xdt, sdt, p, stream);
      });
  return public_out;
}

}  // namespace

LINMIX_OP_SCHEMAS(m) {
  // One decoding step; state (b, d, n) or (b, h, p, n) is updated in place. See ops/selective_scan.py.
  m.def("selective_state_update(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, "
        "Tensor? z, Tensor? dt_bias, Tensor? state_batch_indices, bool dt_softplus) -> Tensor out");
}

LINMIX_OP_IMPLS(m) { m.impl("selective_state_update", TORCH_BOX(&selective_state_update<LINMIX_BACKEND>)); }

}  // namespace linmix
