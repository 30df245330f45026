// The CPU GEMM that chunked CPU kernels are handed (gla_cpu.h's CpuGemm): BLAS found in libtorch_cpu at run
// time, so the kernels stay torch-free. Implemented in cpu_blas_torch.cpp.
#pragma once

#include <cstdint>

namespace linmix {

// Row-major C (m, n) = alpha op(A) op(B) + beta C on one thread; op(X) = X^T when trans_x, op(A) is (m, k),
// op(B) is (k, n); lda/ldb/ldc are row strides. beta = 0 ignores C's contents. Sizes must fit in int.
template <typename T>
void cpu_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
              const T* b, int64_t ldb, T beta, T* c, int64_t ldc);

extern template void cpu_gemm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t,
                                     const float*, int64_t, float, float*, int64_t);
extern template void cpu_gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t,
                                      const double*, int64_t, double, double*, int64_t);

}  // namespace linmix
