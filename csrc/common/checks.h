// Input validation and preparation helpers for the *_torch.cpp files (the only files that see torch types). Torch's
// stable ABI only (torch/csrc/stable, torch/headeronly): the extension loads with every torch of its supported range.
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/stableivalue_conversions.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#if !defined(LINMIX_CUDA_LIBRARY) && defined(__linux__)
#include <sys/mman.h>
#endif

#include <array>
#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common/dtype.h"
#include "common/strided.h"
#include "common/varlen.h"

namespace linmix {

using Tensor = torch::stable::Tensor;
using OptTensor = std::optional<torch::stable::Tensor>;
using ScalarType = torch::headeronly::ScalarType;

namespace detail {
template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw std::runtime_error(os.str());
}
}  // namespace detail

}  // namespace linmix

// A failed check raises RuntimeError in Python with exactly this message (the arguments streamed together).
#define LINMIX_CHECK(cond, ...)                              \
  do {                                                       \
    if (!(cond)) ::linmix::detail::fail(__VA_ARGS__);        \
  } while (false)

namespace linmix {

inline std::string shape_str(torch::headeronly::IntHeaderOnlyArrayRef s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + ")";
}

inline std::string device_str(const Tensor& t) {
  if (t.is_cpu()) return "cpu";
  return std::string(t.is_cuda() ? "cuda" : "device") + ":" + std::to_string(t.get_device_index());
}

// Checks `t` has exactly `expected` sizes; -1 matches any size.
inline void check_shape(const Tensor& t, const char* name, std::vector<int64_t> expected, const char* layout) {
  bool ok = t.dim() == static_cast<int64_t>(expected.size());
  for (size_t i = 0; ok && i < expected.size(); ++i) ok = expected[i] < 0 || t.size(i) == expected[i];
  LINMIX_CHECK(ok, "linmix: ", name, " must have shape ", layout, " = ", shape_str(expected), ", got ",
               shape_str(t.sizes()));
}

inline void check_float_dtype(const Tensor& t, const char* name) {
  const ScalarType dt = t.scalar_type();
  LINMIX_CHECK(dt == ScalarType::Float || dt == ScalarType::Half || dt == ScalarType::BFloat16 ||
                   dt == ScalarType::Double,
               "linmix: ", name, " must be float32, float16, bfloat16 (or float64 on CPU), got ", dt);
  LINMIX_CHECK(dt != ScalarType::Double || t.is_cpu(), "linmix: ", name,
               " is float64, which only the CPU backend supports");
}

inline void check_same_dtype(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  LINMIX_CHECK(t.scalar_type() == ref.scalar_type(), "linmix: ", name, " must have the same dtype as ", ref_name,
               " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_dtype(const Tensor& t, const char* name, ScalarType expected) {
  LINMIX_CHECK(t.scalar_type() == expected, "linmix: ", name, " must be ", expected, ", got ", t.scalar_type());
}

inline void check_same_device(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  LINMIX_CHECK(t.is_cpu() == ref.is_cpu() && t.is_cuda() == ref.is_cuda() &&
                   t.get_device_index() == ref.get_device_index(),
               "linmix: ", name, " is on ", device_str(t), " but ", ref_name, " is on ", device_str(ref),
               "; all inputs must be on the same device");
}

inline DType to_linmix_dtype(ScalarType dt) {
  switch (dt) {
    case ScalarType::Float: return DType::kFloat32;
    case ScalarType::Half: return DType::kFloat16;
    case ScalarType::BFloat16: return DType::kBFloat16;
    case ScalarType::Double: return DType::kFloat64;
    default: detail::fail("linmix: unsupported dtype ", dt);
  }
}

// The dtype of fp32 "state" tensors (initial/final states, checkpoints, fixed A/B/C/D): fp64 when the inputs
// are fp64 (the CPU-only test dtype), fp32 for every activation dtype. The CPU twins' cpu_acc_t matches it.
inline ScalarType acc_dtype(const Tensor& x) {
  return x.scalar_type() == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

// The CPU library's allocations: one of 4 MB or more is a fresh mapping from glibc (above its mmap threshold) whose
// 4 KB pages fault in one at a time at the kernel's first write, about 15 ms per 32 MB measured on the bench's
// 2-core EPYC, more than a linear_scan pass over it. Advising transparent huge pages before that write (as
// torch's allocator does under THP_MEM_ALLOC_ENABLE=1) faults the 2 MB-aligned interior in 2 MB at a time. It is
// advice: without THP nothing changes, and pages already touched (a reused heap block) stay as they are.
inline void advise_huge_pages([[maybe_unused]] const Tensor& t) {
#if !defined(LINMIX_CUDA_LIBRARY) && defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t bytes = uintptr_t(t.numel()) * t.element_size();
  if (bytes < 2 * kHuge) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + bytes) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

// Allocation on `like`'s device: uninitialised, or zero-filled; in `like`'s dtype unless one is given.
inline Tensor empty(const Tensor& like, std::vector<int64_t> sizes, std::optional<ScalarType> dtype = std::nullopt) {
  Tensor t = torch::stable::new_empty(like, sizes, dtype ? dtype : std::optional<ScalarType>(like.scalar_type()));
  advise_huge_pages(t);
  return t;
}
inline Tensor zeros(const Tensor& like, std::vector<int64_t> sizes, std::optional<ScalarType> dtype = std::nullopt) {
  Tensor t = empty(like, std::move(sizes), dtype);
  torch::stable::zero_(t);
  return t;
}
inline std::vector<int64_t> sizes(const Tensor& t) {
  const auto s = t.sizes();
  return {s.begin(), s.end()};
}

inline Tensor as_contiguous(const Tensor& t) { return torch::stable::contiguous(t); }
// f applied to an optional tensor when it is present.
inline OptTensor opt_map(const OptTensor& t, Tensor (*f)(const Tensor&)) { return t ? OptTensor(f(*t)) : std::nullopt; }
inline OptTensor contiguous_opt(const OptTensor& t) { return opt_map(t, as_contiguous); }

// Strides are passed to kernels in elements; a tensor whose last dim is not unit-stride is copied.
inline Tensor last_dim_contiguous(const Tensor& t) {
  return (t.numel() == 0 || t.stride(t.dim() - 1) == 1) ? t : as_contiguous(t);
}

inline const void* opt_ptr(const OptTensor& t) { return t ? t->data_ptr() : nullptr; }

// The kernels' view of t: its pointer and the strides of its first N dims (0 past its last dim); an absent
// optional tensor gives a null view.
template <int N>
StridedView<N> strided_view(const Tensor& t) {
  StridedView<N> v;
  v.ptr = t.data_ptr();
  for (int d = 0; d < N; ++d) v.stride[d] = d < t.dim() ? t.stride(d) : 0;
  return v;
}
template <int N>
StridedView<N> strided_view(const OptTensor& t) {
  return t ? strided_view<N>(*t) : StridedView<N>{};
}

// The kernels' view of an op's optional cu_seqlens (FlashAttention's packed batch, common/varlen.h), checked
// without reading the offsets (their values are the kernels' to clamp and the Python layer's to assert on the
// device): a contiguous 1-D int32 / int64 tensor of N + 1 >= 1 offsets on x's device, and x's batch is 1. `op` names
// the op in the errors. Returns the view (null when cu_seqlens is absent) and the number of sequences N (x's batch
// when dense); `keep` holds the contiguous copy the view points into.
inline std::pair<Varlen, int64_t> varlen_view(const OptTensor& cu_seqlens, const Tensor& x, int64_t batch,
                                              const char* op, OptTensor& keep) {
  if (!cu_seqlens) return {Varlen{}, batch};
  const Tensor& c = *cu_seqlens;
  LINMIX_CHECK(c.dim() == 1 && c.size(0) >= 1, "linmix.", op, ": cu_seqlens must be 1-D (N + 1,) offsets, got shape ",
               shape_str(c.sizes()));
  LINMIX_CHECK(c.scalar_type() == ScalarType::Int || c.scalar_type() == ScalarType::Long, "linmix.", op,
               ": cu_seqlens must be int32 or int64, got ", c.scalar_type());
  check_same_device(c, "cu_seqlens", x, "the inputs");
  LINMIX_CHECK(batch == 1, "linmix.", op, ": with cu_seqlens the batch size must be 1 (sequences packed along time), "
               "got ", batch);
  keep = as_contiguous(c);
  Varlen v;
  v.offsets = keep->data_ptr();
  v.int64 = c.scalar_type() == ScalarType::Long;
  return {v, c.size(0) - 1};
}

// An op that torch/csrc/stable has no wrapper for, called through the stable dispatcher by its schema name (e.g.
// "aten::index_copy_", ""): its first `Outputs` outputs.
template <size_t Outputs, typename... Args>
std::array<Tensor, Outputs> call_op(const char* name, const char* overload, const Args&... args) {
  constexpr size_t kSlots = sizeof...(Args) > Outputs ? sizeof...(Args) : Outputs;
  std::array<StableIValue, kSlots> stack{torch::stable::detail::from(args)...};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  std::array<Tensor, Outputs> out;
  for (size_t i = 0; i < Outputs; ++i) out[i] = torch::stable::detail::to<Tensor>(stack[i]);
  return out;
}

}  // namespace linmix
