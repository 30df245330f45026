// CUDA selective_state_update: one decoding step, memory-bound on the state (read once, written once).
//
// Block structure (mirrored by tests/test_selective_state_update.py::emulate_kernel): a block of kSsuThreads
// threads serves kSsuThreads / kTPR rows (b, h, j) of one batch row b; the kTPR threads of a row take the n
// states in runs of kSsuVec contiguous elements, thread `lane` the runs starting at lane * kSsuVec,
// lane * kSsuVec + kTPR * kSsuVec, ... (one vector load and store each when the row is aligned, else guarded
// scalar accesses), and the row's C · state is summed over its kTPR lanes with xor shuffles (kTPR/2, ..., 1).
// The flat grid is (batch) x ceil(h p / rows per block); a padding batch row (negative or out-of-range state
// index) only writes zeros to out, uniformly for the whole block, so every shuffle sees the full warp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_check.h"
#include "common/cuda_utils.cuh"
#include "common/dtype.h"
#include "selective_scan/selective_state_update_common.h"
#include "selective_scan/selective_state_update_cuda.h"

namespace linmix {

constexpr int kSsuThreads = 128;
constexpr int kSsuVec = 4;  // contiguous states per thread per pass
// Memory-bound: ask for 8 resident blocks (1024 threads) per SM, i.e. at most 64 registers, so enough
// state loads are in flight to cover DRAM latency.
constexpr int kSsuMinBlocks = 8;

__device__ __forceinline__ float ssu_load(const void* ptr, DType t, int64_t i) {
  switch (t) {
    case DType::kFloat16: return to_float(static_cast<const __half*>(ptr)[i]);
    case DType::kBFloat16: return to_float(static_cast<const __nv_bfloat16*>(ptr)[i]);
    default: return static_cast<const float*>(ptr)[i];
  }
}

template <typename S>
struct alignas(sizeof(S) * kSsuVec) SsuVec {
  S v[kSsuVec];
};

template <typename T, typename S, int kTPR>
__global__ void __launch_bounds__(kSsuThreads, kSsuMinBlocks) linmix_selective_state_update_fwd_kernel(SelectiveStateUpdateParams p) {
  constexpr int kRowsPerBlock = kSsuThreads / kTPR;
  const int64_t rows = p.nheads * p.headdim;
  const int64_t row_blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t b = blockIdx.x / row_blocks;
  const int64_t r = (blockIdx.x % row_blocks) * kRowsPerBlock + threadIdx.x / kTPR;
  const int lane = threadIdx.x % kTPR;
  const bool active = r < rows;
  T* out = static_cast<T*>(p.out) + b * rows + r;
  const int64_t srow = ssu_state_row(p, b);
  if (srow < 0) {  // padding: the same for every thread of the block
    if (active && lane == 0) *out = from_float<T>(0.f);
    return;
  }
  float y = 0.f, xj = 0.f;
  int64_t h = 0, j = 0;
  if (active) {
    h = r / p.headdim, j = r % p.headdim;
    const float bias = p.dt_bias.ptr ? *p.dt_bias.at<const float>(h, j) : 0.f;
    const float delta = ssu_delta(ssu_load(p.dt.ptr, p.dt_dtype, p.dt.offset(b, h, j)), bias,
                                  p.dt_softplus);
    xj = to_float(*p.x.at<const T>(b, h, j));
    const float dx = delta * xj;
    const float* a_row = p.A.at<const float>(h, j);
    const float scalar_decay = p.A.stride[2] == 0 ? ssu_exp(delta * a_row[0]) : 0.f;
    const int64_t b_off = p.B.offset(b, h / (p.nheads / p.B_groups));
    const int64_t c_off = p.C.offset(b, h / (p.nheads / p.C_groups));
    S* s = p.state.at<S>(srow, h, j);
    const bool vec = p.dstate % kSsuVec == 0 && reinterpret_cast<uintptr_t>(s) % sizeof(SsuVec<S>) == 0;
    for (int64_t k0 = int64_t(lane) * kSsuVec; k0 < p.dstate; k0 += int64_t(kTPR) * kSsuVec) {
      SsuVec<S> sv;
      if (vec) {
        sv = *reinterpret_cast<const SsuVec<S>*>(s + k0);
      } else {
#pragma unroll
        for (int i = 0; i < kSsuVec; ++i) sv.v[i] = k0 + i < p.dstate ? s[k0 + i] : from_float<S>(0.f);
      }
#pragma unroll
      for (int i = 0; i < kSsuVec; ++i) {
        const int64_t k = k0 + i;
        if (k < p.dstate) {
          const float decay = p.A.stride[2] == 0 ? scalar_decay : ssu_exp(delta * a_row[k * p.A.stride[2]]);
          const float v = ssu_state_step<S>(to_float(sv.v[i]), decay, dx,
                                            ssu_load(p.B.ptr, p.B_dtype, b_off + k * p.B.stride[2]));
          sv.v[i] = from_float<S>(v);
          y += v * ssu_load(p.C.ptr, p.C_dtype, c_off + k * p.C.stride[2]);
        }
      }
      if (vec) {
        *reinterpret_cast<SsuVec<S>*>(s + k0) = sv;
      } else {
#pragma unroll
        for (int i = 0; i < kSsuVec; ++i) {
          if (k0 + i < p.dstate) s[k0 + i] = sv.v[i];
        }
      }
    }
  }
#pragma unroll
  for (int off = kTPR / 2; off > 0; off >>= 1) y += __shfl_xor_sync(0xffffffffu, y, off);
  if (active && lane == 0) {
    const float dj = p.D.ptr ? *p.D.at<const float>(h, j) : 0.f;
    float gate = 1.f;
    if (p.z.ptr) {
      const float zj = to_float(*p.z.at<const T>(b, h, j));
      gate = ssu_round<T>(ssu_silu(zj));
    }
    *out = from_float<T>(ssu_output(y, dj, xj, gate));
  }
}

// Threads per row: enough runs of kSsuVec to cover n once, 4..32 (a warp); larger n loops.
inline int ssu_threads_per_row(int64_t dstate) {
  int t = 4;
  while (t < 32 && int64_t(t) * kSsuVec < dstate) t *= 2;
  return t;
}

template <typename T, typename S, int kTPR>
void ssu_launch(const SelectiveStateUpdateParams& p, cudaStream_t stream) {
  constexpr int kRowsPerBlock = kSsuThreads / kTPR;
  const int64_t row_blocks = (p.nheads * p.headdim + kRowsPerBlock - 1) / kRowsPerBlock;
  const dim3 grid = checked_grid("selective_state_update", "(b ceil(h p / rows_per_block))", p.batch * row_blocks);
  launch_kernel(linmix_selective_state_update_fwd_kernel<T, S, kTPR>, grid, kSsuThreads, 0, stream, p);
}

template <DType xdt, DType sdt>
void selective_state_update_cuda(const SelectiveStateUpdateParams& p, cudaStream_t stream) {
  using T = cuda_t<xdt>;
  using S = cuda_t<sdt>;
  switch (ssu_threads_per_row(p.dstate)) {
    case 4: return ssu_launch<T, S, 4>(p, stream);
    case 8: return ssu_launch<T, S, 8>(p, stream);
    case 16: return ssu_launch<T, S, 16>(p, stream);
    default: return ssu_launch<T, S, 32>(p, stream);
  }
}

}  // namespace linmix
