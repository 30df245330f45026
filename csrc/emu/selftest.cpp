// The emulator's own tests: small kernels, one with each fault the emulator must catch (and one with none), run by
// name from tests/test_emulator.py through linmix_emu_selftest. Compiled like the kernels (emu/cuda_emu.h
// force-included, the variant's sanitizer on), so the sanitizer builds catch the faults they are for.
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "common/launch.h"
#include "common/shared_memory.h"

namespace linmix::emu_selftest {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 128;

// ---- a correct kernel that uses every feature: block reduction through static shared memory, the four
// shuffles, __syncwarp, atomics, dynamic shared memory, WMMA. out[0] = sum of in; out[1..] per-warp checks.
__global__ void linmix_emu_selftest_ok_kernel(const float* in, int n, float* out, int* count) {
  LINMIX_SHARED(float, s_part, [kThreads / 32]);
  LINMIX_DYNAMIC_SHARED(float, s_dyn);
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  float v = 0.f;
  for (int i = t; i < n; i += blockDim.x) v += in[i];
  s_dyn[t] = v;
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) s_part[warp] = v;
  __syncthreads();
  if (t == 0) {
    float total = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) total += s_part[w];
    out[0] = total;
  }
  // up / down / idx: every lane recovers its neighbours' lane ids
  const int up = __shfl_up_sync(0xffffffffu, lane, 1), down = __shfl_down_sync(0xffffffffu, lane, 1);
  const int idx = __shfl_sync(0xffffffffu, lane, 31 - lane), half = __shfl_xor_sync(0xffffffffu, lane, 16, 32);
  const bool ok = up == (lane > 0 ? lane - 1 : lane) && down == (lane < 31 ? lane + 1 : lane) && idx == 31 - lane &&
                  half == (lane ^ 16) && s_dyn[t] == s_dyn[t];
  __syncwarp();
  if (!ok) atomicAdd(count, 1);
}

// Known global traffic, for the traffic build: every thread reads in[i] and in[(i + 1) % n] (each byte read twice;
// with reread in[(i + 2) % n] too) and writes out[i]; shared memory, locals and the parameters are not global and must not
// count. A 16x16 WMMA tile of `tile` (512 bytes, fp16) is loaded by warp 0 of block 0.
__global__ void linmix_emu_selftest_traffic_kernel(const float* in, float* out, int n, const __half* tile,
                                                   bool reread) {
  LINMIX_SHARED(float, s_in, [kThreads]);
  const int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
  float local[4] = {in[i], 0.f, 0.f, 0.f};
  s_in[t] = local[0];
  __syncthreads();
  float x = s_in[(t + 1) % kThreads] + in[(i + 1) % n];
  if (reread) x += in[(i + 2) % n];
  if (blockIdx.x == 0 && t < 32) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, tile, 16);
    for (int s = 0; s < fa.num_elements; ++s) x += __half2float(fa.x[s]) * 0.f;
  }
  out[i] = x;
}

// D (16x16, fp32) = A B for half A (row-major) and B (col-major), one warp.
__global__ void linmix_emu_selftest_wmma_kernel(const __half* a, const __half* b, float* d, unsigned ldm_a,
                                                bool layout_dependent) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  for (int i = 0; i < acc.num_elements; ++i) acc.x[i] = 0.f;
  wmma::load_matrix_sync(fa, a, ldm_a);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(acc, fa, fb, acc);
  if (layout_dependent) {
    // Feeds the product back as an A operand slot by slot: right only if the accumulator and matrix_a layouts
    // coincide, which CUDA does not promise. Then D = (A B) I.
    for (int i = 0; i < fa.num_elements; ++i) fa.x[i] = __float2half(acc.x[i]);
    for (int i = 0; i < acc.num_elements; ++i) acc.x[i] = 0.f;
    wmma::mma_sync(acc, fa, fb, acc);
  }
  wmma::store_matrix_sync(d, acc, 16, wmma::mem_row_major);
}

// ---- faults
__global__ void linmix_emu_selftest_missing_syncthreads_kernel(const float* in, float* out) {
  LINMIX_SHARED(float, s, [kThreads]);
  const int t = threadIdx.x;
  s[t] = in[t];
  // __syncthreads() belongs here: the next thread's slot may not be written yet
  out[t] = s[(t + 1) % kThreads];
}

__global__ void linmix_emu_selftest_divergent_syncthreads_kernel(float* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

__global__ void linmix_emu_selftest_early_exit_kernel(float* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

__global__ void linmix_emu_selftest_shuffle_lane_missing_kernel(float* out) {
  float v = threadIdx.x;
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void linmix_emu_selftest_shuffle_outside_mask_kernel(float* out) {
  float v = threadIdx.x;
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0x0000ffffu, v, 16);
  out[threadIdx.x] = v;
}

__global__ void linmix_emu_selftest_syncwarp_lane_missing_kernel(float* out) {
  if (threadIdx.x % 32 != 7) __syncwarp();
  out[threadIdx.x] = 1.f;
}

__global__ void linmix_emu_selftest_static_smem_oob_kernel(float* out) {
  LINMIX_SHARED(float, s, [kThreads]);
  s[threadIdx.x] = 1.f;
  if (threadIdx.x == 0) s[kThreads + 3] = 2.f;  // past the end
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

__global__ void linmix_emu_selftest_dynamic_smem_oob_kernel(float* out, int n) {
  LINMIX_DYNAMIC_SHARED(float, s);
  s[threadIdx.x] = 1.f;
  if (threadIdx.x == 0) s[n] = 2.f;  // n floats launched
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

__global__ void linmix_emu_selftest_global_oob_kernel(float* out, int n) {
  out[threadIdx.x] = 1.f;
  if (threadIdx.x == 0) out[n] = 2.f;  // one past the end of out
}

__global__ void linmix_emu_selftest_block_race_kernel(float* out) {
  out[0] = static_cast<float>(blockIdx.x);  // every block writes the same element, unordered
}

// One instance per case: the opt-in is an attribute of the kernel, kept for the process.
template <int kCase>
__global__ void linmix_emu_selftest_big_smem_kernel(float* out, int n) {
  LINMIX_DYNAMIC_SHARED(float, s);
  for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = 1.f;
  __syncthreads();
  if (threadIdx.x == 0) out[0] = s[n - 1];
}

// ---- the cases: 0 = the launch succeeded and the result is right, 1 = the emulator reported an error (message),
// 2 = the launch succeeded with a wrong result (message).
struct Result {
  int code = 0;
  std::string message;
};

template <typename F>
Result run(F&& f) {
  try {
    return f();
  } catch (const std::exception& e) {
    return Result{1, e.what()};
  }
}

Result wrong(const std::string& what) { return Result{2, what}; }

Result case_ok() {
  std::vector<float> in(1000), out(1, 0.f);
  float want = 0.f;
  for (int i = 0; i < 1000; ++i) want += (in[i] = static_cast<float>(i % 7));
  int count = 0;
  launch_kernel(linmix_emu_selftest_ok_kernel, dim3(1), dim3(kThreads), kThreads * sizeof(float), nullptr, in.data(),
                1000, out.data(), &count);
  if (out[0] != want) return wrong("sum " + std::to_string(out[0]) + " != " + std::to_string(want));
  if (count != 0) return wrong(std::to_string(count) + " lanes saw wrong shuffle results");
  return {};
}

Result case_wmma(bool layout_dependent, int offset, unsigned ldm) {
  alignas(32) __half a[16 * 24 + 64], b[256];
  float ref[256];
  alignas(32) float d[256];
  for (int i = 0; i < 16 * 24 + 64; ++i) a[i] = __float2half(static_cast<float>((i * 7) % 5 - 2));
  for (int i = 0; i < 256; ++i) b[i] = __float2half(static_cast<float>((i * 3) % 4 - 1));
  const __half* ap = a + offset;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) {
      float s = 0.f;
      for (int k = 0; k < 16; ++k) s += __half2float(ap[r * ldm + k]) * __half2float(b[c * 16 + k]);
      ref[r * 16 + c] = s;
    }
  if (layout_dependent) {  // (A B) I with I from b: only when b is the identity; make it one
    for (int i = 0; i < 256; ++i) b[i] = __float2half(i / 16 == i % 16 ? 1.f : 0.f);
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c) ref[r * 16 + c] = __half2float(ap[r * ldm + c]);
  }
  launch_kernel(linmix_emu_selftest_wmma_kernel, dim3(1), dim3(32), 0, nullptr, ap, b, d, ldm, layout_dependent);
  for (int i = 0; i < 256; ++i)
    if (d[i] != ref[i])
      return wrong("D[" + std::to_string(i) + "] = " + std::to_string(d[i]) + " != " + std::to_string(ref[i]));
  return {};
}

Result case_missing_syncthreads() {
  std::vector<float> in(kThreads), out(kThreads);
  for (int i = 0; i < kThreads; ++i) in[i] = static_cast<float>(i);
  launch_kernel(linmix_emu_selftest_missing_syncthreads_kernel, dim3(1), dim3(kThreads), 0, nullptr, in.data(),
                out.data());
  for (int i = 0; i < kThreads; ++i)
    if (out[i] != in[(i + 1) % kThreads]) return wrong("thread " + std::to_string(i) + " read an unwritten slot");
  return {};
}

template <typename... Args>
Result simple(void (*kernel)(Args...), dim3 grid, dim3 block, size_t smem, Args... args) {
  launch_kernel(kernel, grid, block, smem, nullptr, args...);
  return {};
}

Result dispatch(const std::string& name) {
  std::vector<float> buf(4096, 0.f);
  float* out = buf.data();
  if (name == "ok") return case_ok();
  if (name == "wmma") return case_wmma(false, 0, 16);
  if (name == "wmma_layout_dependent") return case_wmma(true, 0, 16);
  if (name == "wmma_misaligned") return case_wmma(false, 8, 16);
  if (name == "wmma_bad_ldm") return case_wmma(false, 0, 20);
  if (name == "missing_syncthreads") return case_missing_syncthreads();
  if (name == "divergent_syncthreads")
    return simple(linmix_emu_selftest_divergent_syncthreads_kernel, dim3(1), dim3(kThreads), 0, out);
  if (name == "early_exit") return simple(linmix_emu_selftest_early_exit_kernel, dim3(1), dim3(kThreads), 0, out);
  if (name == "shuffle_lane_missing")
    return simple(linmix_emu_selftest_shuffle_lane_missing_kernel, dim3(1), dim3(kThreads), 0, out);
  if (name == "shuffle_outside_mask")
    return simple(linmix_emu_selftest_shuffle_outside_mask_kernel, dim3(1), dim3(kThreads), 0, out);
  if (name == "syncwarp_lane_missing")
    return simple(linmix_emu_selftest_syncwarp_lane_missing_kernel, dim3(1), dim3(kThreads), 0, out);
  if (name == "static_smem_oob")
    return simple(linmix_emu_selftest_static_smem_oob_kernel, dim3(1), dim3(kThreads), 0, out);
  if (name == "dynamic_smem_oob")
    return simple(linmix_emu_selftest_dynamic_smem_oob_kernel, dim3(1), dim3(kThreads), 200 * sizeof(float), out, 200);
  if (name == "global_oob") {
    std::vector<float> small(kThreads);  // exactly kThreads floats: out[kThreads] is past the allocation
    return simple(linmix_emu_selftest_global_oob_kernel, dim3(1), dim3(kThreads), 0, small.data(), kThreads);
  }
  if (name == "block_race") return simple(linmix_emu_selftest_block_race_kernel, dim3(8), dim3(32), 0, out);
  if (name == "smem_64k_without_opt_in")
    return simple(linmix_emu_selftest_big_smem_kernel<0>, dim3(1), dim3(kThreads), 64 * 1024, out, 16 * 1024);
  if (name == "smem_64k_with_opt_in" || name == "smem_above_sm80") {
    const bool big = name == "smem_above_sm80";
    const auto kernel = big ? linmix_emu_selftest_big_smem_kernel<2> : linmix_emu_selftest_big_smem_kernel<1>;
    const int bytes = (big ? 200 : 64) * 1024;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) != cudaSuccess)
      return Result{1, cudaGetErrorString(cudaGetLastError())};
    return simple(kernel, dim3(1), dim3(kThreads), size_t(bytes), out, bytes / 4);
  }
  if (name == "traffic" || name == "traffic_reread") {
    constexpr int kBlocks = 3, n = kBlocks * kThreads;
    std::vector<float> in(n, 1.f), res(n);
    // on the heap (the launching thread's stack does not count as global memory), 32-byte aligned for WMMA
    std::unique_ptr<__half, decltype(&std::free)> tile(static_cast<__half*>(std::aligned_alloc(32, 512)), &std::free);
    for (int i = 0; i < 256; ++i) tile.get()[i] = __float2half(1.f);
    return simple(linmix_emu_selftest_traffic_kernel, dim3(kBlocks), dim3(kThreads), 0, static_cast<const float*>(in.data()),
                  res.data(), n, static_cast<const __half*>(tile.get()), name == "traffic_reread");
  }
  if (name == "block_too_large")
    return simple(linmix_emu_selftest_early_exit_kernel, dim3(1), dim3(2048), 0, out);
  if (name == "grid_too_large") return simple(linmix_emu_selftest_block_race_kernel, dim3(1, 70000), dim3(32), 0, out);
  return Result{-1, "unknown self-test '" + name + "'"};
}

}  // namespace linmix::emu_selftest

// Runs the named case; returns its code and writes its message (NUL-terminated, truncated to `cap`) to `msg`.
extern "C" __attribute__((visibility("default"))) int linmix_emu_selftest(const char* name, char* msg, size_t cap) {
  const auto r = linmix::emu_selftest::run([&] { return linmix::emu_selftest::dispatch(name); });
  std::snprintf(msg, cap, "%s", r.message.c_str());
  return r.code;
}
