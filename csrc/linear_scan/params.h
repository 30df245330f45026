// linear_scan: h_t = a_t * h_{t-1} + b_t over (B, T, D) channel-last tensors.
#pragma once

#include <cstdint>

#include "common/math.h"

namespace linmix {

// A (B, T, D) tensor with unit stride along D; element strides for B and T (64-bit).
struct BTDView {
  void* ptr = nullptr;
  int64_t batch_stride = 0;
  int64_t t_stride = 0;
};

struct LinearScanParams {
  int64_t batch = 0, seqlen = 0, dim = 0;
  bool reverse = false;  // scan from t = T-1 down to 0
  // forward
  BTDView a, b;            // (B, T, D) inputs
  BTDView h;               // (B, T, D) output (forward) / saved output (backward)
  const void* h0 = nullptr;  // (B, D) contiguous, accumulation type, or null for zeros
  // backward
  BTDView dh;               // (B, T, D) incoming gradient
  BTDView da, db;           // (B, T, D) outputs
  void* dh0 = nullptr;      // (B, D) contiguous, accumulation type
};

// Row t of batch b of a (B, T, D) view, for the CPU and CUDA backends; T may be const-qualified.
template <typename T>
LINMIX_HD T* btd_row(const BTDView& v, int64_t b, int64_t t) {
  return static_cast<T*>(v.ptr) + b * v.batch_stride + t * v.t_stride;
}

// Scan position s (0 = first step of the recurrence) -> time index.
inline constexpr int64_t scan_time(int64_t s, int64_t T, bool reverse) { return reverse ? T - 1 - s : s; }

}  // namespace linmix
