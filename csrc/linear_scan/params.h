// linear_scan: h_t = a_t * h_{t-1} + b_t over (B, T, D) channel-last tensors.
#pragma once

#include <cstdint>

#include "common/math.h"
#include "common/strided.h"
#include "common/varlen.h"

namespace linmix {

struct LinearScanParams {
  int64_t batch = 0, seqlen = 0, dim = 0;
  bool reverse = false;  // scan from t = T-1 down to 0
  // forward
  // (B, T, D) tensors with unit stride along D: strides of B and T
  StridedView<2> a, b;       // (B, T, D) inputs
  StridedView<2> h;          // (B, T, D) output (forward) / saved output (backward)
  const void* h0 = nullptr;  // (B, D) contiguous, accumulation type, or null for zeros
  // backward
  StridedView<2> dh;         // (B, T, D) incoming gradient
  StridedView<2> da, db;     // (B, T, D) outputs
  void* dh0 = nullptr;       // (B, D) contiguous, accumulation type
  // Packed sequences (common/varlen.h): batch is then the number of sequences N (h0, dh0 (N, D)), the tensors
  // are (1, T, D) and sequence n is the span varlen.span(n, T) of their row 0. Null offsets: dense.
  Varlen varlen;
};

// Scan position s (0 = first step of the recurrence) -> time index, in a sequence of T steps.
inline constexpr int64_t scan_time(int64_t s, int64_t T, bool reverse) { return reverse ? T - 1 - s : s; }

}  // namespace linmix
