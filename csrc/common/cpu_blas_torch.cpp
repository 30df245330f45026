// The BLAS loader behind cpu_blas.h: a Fortran GEMM looked up once in libtorch_cpu, torch's matmul (stable ABI)
// without one.
#include "common/cpu_blas.h"

#include <torch/csrc/stable/ops.h>

#include <dlfcn.h>

#include <type_traits>

namespace linmix {
namespace {

// ATen's raw-pointer cpublas::gemm is not exported from libtorch, and at::addmm on from_blob tiles costs
// microseconds of dispatch per 64x64 tile, so we call the Fortran BLAS that libtorch_cpu carries (MKL in the
// x86 wheels exports sgemm_/dgemm_), found once with dlsym. Without one, torch's matmul
// on the tiles is the (correct, slower) fallback.
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

}  // namespace

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
  const auto dtype = std::is_same_v<T, double> ? torch::headeronly::ScalarType::Double
                                                : torch::headeronly::ScalarType::Float;
  const torch::stable::Device cpu(torch::headeronly::DeviceType::CPU);
  const auto tile = [&](const T* x, bool t, int64_t rows, int64_t cols, int64_t ld) {  // op(X): (rows, cols)
    return t ? torch::stable::from_blob(const_cast<T*>(x), {rows, cols}, {1, ld}, cpu, dtype)
             : torch::stable::from_blob(const_cast<T*>(x), {rows, cols}, {ld, 1}, cpu, dtype);
  };
  const torch::stable::Tensor r =
      torch::stable::contiguous(torch::stable::matmul(tile(a, trans_a, m, k, lda), tile(b, trans_b, k, n, ldb)));
  const T* rp = static_cast<const T*>(r.data_ptr());
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j)  // beta 0 ignores C's contents
      c[i * ldc + j] = alpha * rp[i * n + j] + (beta == T(0) ? T(0) : beta * c[i * ldc + j]);
}

template void cpu_gemm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*,
                              int64_t, float, float*, int64_t);
template void cpu_gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t,
                               const double*, int64_t, double, double*, int64_t);

}  // namespace linmix
