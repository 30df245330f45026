// What the CPU kernel files share, torch-free: the instruction sets their hot loops are compiled for, and the
// smallest piece of work worth a second thread.
#pragma once

#include <algorithm>
#include <cstdint>

// The extension is built for baseline x86-64 (SSE2, no FMA), so a plain loop runs 4 fp32 lanes wide without FMA.
// A function carrying LINMIX_CPU_CLONES is also compiled for x86-64-v3 (AVX2 + FMA) and x86-64-v4 (AVX-512), and
// the loader picks the best one the CPU has (GCC function multiversioning through an ifunc). It goes on the
// parallel_for lambdas (common/parallel.h) and on the out-of-line helpers they call; code inlined into them is
// compiled with them.
// FMA contraction in the wider clones rounds differently from the baseline, within every fp32 tolerance.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define LINMIX_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LINMIX_CPU_CLONES
#endif
// A helper that must be compiled into its cloned caller (a call to it would run baseline code).
#if defined(__GNUC__)
#define LINMIX_CPU_INLINE __attribute__((always_inline)) inline
#else
#define LINMIX_CPU_INLINE inline
#endif

// The hot elementwise loops carry `omp simd` (the build passes -fopenmp-simd): it lets the compiler vectorise float
// sums (a reordering it may not do on its own) and inlined helpers such as exp2_cpu.
#define LINMIX_PRAGMA(x) _Pragma(#x)
#define LINMIX_SIMD LINMIX_PRAGMA(omp simd)
#define LINMIX_SIMD_SUM(s) LINMIX_PRAGMA(omp simd reduction(+ : s))

namespace linmix {

// Below about this many elementary steps per thread, waking a second OpenMP thread costs more than it saves, and
// on a busy machine a descheduled worker stalls the whole call for a scheduler tick (measured: 12 ms for a
// 0.03 ms scan).
constexpr int64_t kMinThreadWork = int64_t(1) << 16;

// parallel_for's grain for tasks of `work` steps each: a call with fewer than kMinThreadWork steps per thread
// runs on the calling thread alone.
inline int64_t cpu_grain(int64_t work) {
  return std::max<int64_t>(1, kMinThreadWork / std::max<int64_t>(work, 1));
}

}  // namespace linmix
