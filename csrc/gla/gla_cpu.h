#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/varlen.h"
#include "gla/params.h"

namespace linmix {

// Row-major GEMM on contiguous accumulation-type tiles: C (m, n) = alpha op(A) op(B) + beta C, where
// op(X) = X^T when trans_x, op(A) is (m, k) and op(B) is (k, n); lda/ldb/ldc are row strides of the
// stored matrices. The torch glue passes its BLAS (MKL here), so gla_cpu.cpp stays torch-free and the
// chunk products run at the machine's GEMM rate.
template <typename T>
using CpuGemmFn = void (*)(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                           int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc);
struct CpuGemm {
  CpuGemmFn<float> f32 = nullptr;
  CpuGemmFn<double> f64 = nullptr;
};

// varlen: packed sequences (p.batch of them in the tensors' one row), or dense.
void chunk_gla_fwd_cpu(const GlaParams& p, const Varlen& varlen, DType dtype, const CpuGemm& gemm);
void chunk_gla_bwd_cpu(const GlaParams& p, const Varlen& varlen, DType dtype, const CpuGemm& gemm);
void fused_recurrent_gla_fwd_cpu(const GlaParams& p, const Varlen& varlen, DType dtype);
void fused_recurrent_gla_bwd_cpu(const GlaParams& p, const Varlen& varlen, DType dtype);

}  // namespace linmix
