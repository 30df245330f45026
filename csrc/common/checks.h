// Input validation and preparation helpers for the *_torch.cpp files (the only files that see torch types).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <vector>

#include "common/dtype.h"

namespace linmix {

inline std::string shape_str(at::IntArrayRef s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + ")";
}

// Checks `t` has exactly `expected` sizes; -1 matches any size.
inline void check_shape(const at::Tensor& t, const char* name, std::vector<int64_t> expected, const char* layout) {
  bool ok = t.dim() == static_cast<int64_t>(expected.size());
  for (size_t i = 0; ok && i < expected.size(); ++i) ok = expected[i] < 0 || t.size(i) == expected[i];
  TORCH_CHECK(ok, "linmix: ", name, " must have shape ", layout, " = ", shape_str(expected), ", got ",
              shape_str(t.sizes()));
}

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, "linmix: ", name,
              " must be float32, float16, bfloat16 (or float64 on CPU), got ", dt);
  TORCH_CHECK(dt != at::kDouble || t.device().is_cpu(), "linmix: ", name,
              " is float64, which only the CPU backend supports");
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "linmix: ", name, " must have the same dtype as ", ref_name,
              " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType expected) {
  TORCH_CHECK(t.scalar_type() == expected, "linmix: ", name, " must be ", expected, ", got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "linmix: ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; all inputs must be on the same device");
}

inline DType to_linmix_dtype(at::ScalarType dt) {
  switch (dt) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK(false, "linmix: unsupported dtype ", dt);
  }
}

// The dtype of fp32 "state" tensors (initial/final states, checkpoints, fixed A/B/C/D): fp64 when the inputs
// are fp64 (the CPU-only test dtype), fp32 for every activation dtype. The CPU twins' cpu_acc_t matches it.
inline at::ScalarType acc_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

inline std::optional<at::Tensor> contiguous_opt(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// Strides are passed to kernels in elements; a tensor whose last dim is not unit-stride is copied.
inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return (t.numel() == 0 || t.stride(-1) == 1) ? t : t.contiguous();
}

}  // namespace linmix
