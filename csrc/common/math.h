// Arithmetic shared by the CPU and CUDA backends. Everything here is __host__ __device__ and
// torch-free, so the CPU tests exercise the exact formulas the kernels run.
#pragma once

#include <cmath>
#include <cstdint>

// Kernel source compiles under nvcc, or as host C++ for the CUDA emulator (csrc/emu/, LINMIX_CUDA_EMU).
#if defined(__CUDACC__) || defined(LINMIX_CUDA_EMU)
#define LINMIX_KERNEL_SOURCE 1
#endif

#if defined(__CUDACC__)
#define LINMIX_HD __host__ __device__ __forceinline__
#else
#define LINMIX_HD inline
#endif

// `#pragma unroll` for loops in LINMIX_HD code (nvcc honours it; host compilers would warn on it).
#if defined(__CUDACC__)
#define LINMIX_UNROLL _Pragma("unroll")
#else
#define LINMIX_UNROLL
#endif

namespace linmix {

constexpr float kLog2e = 1.4426950408889634f;

// softplus with the same threshold as torch.nn.functional.softplus (beta=1, threshold=20).
template <typename T>
LINMIX_HD T softplus(T x) {
  return x > T(20) ? x : static_cast<T>(log1p(exp(x)));
}

template <typename T>
LINMIX_HD T sigmoid(T x) {
  return T(1) / (T(1) + static_cast<T>(exp(-x)));
}

template <typename T>
LINMIX_HD T silu(T x) {
  return x * sigmoid(x);
}

// d silu(x) / dx = s (1 + x (1 - s)), s = sigmoid(x)
template <typename T>
LINMIX_HD T silu_grad(T x) {
  const T s = sigmoid(x);
  return s * (T(1) + x * (T(1) - s));
}

// The first-order linear recurrence h = a * h_prev + b as an associative operator on (a, b) pairs:
// applying (a0, b0) then (a1, b1) is (a1 a0, a1 b0 + b1). Every scan in linmix combines with this.
template <typename T>
struct ScanPair {
  T a;
  T b;
};

template <typename T>
LINMIX_HD ScanPair<T> scan_combine(ScanPair<T> first, ScanPair<T> second) {
  return {second.a * first.a, second.a * first.b + second.b};
}

// One step of the recurrence: h_t = a_t h_{t-1} + b_t.
template <typename T>
LINMIX_HD T scan_step(T a, T h_prev, T b) {
  return a * h_prev + b;
}

LINMIX_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace linmix
