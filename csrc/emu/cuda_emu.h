// The CUDA emulator's prelude: force-included (-include) into every kernel translation unit of the emulated build,
// so the kernels' own source compiles as host C++ and runs on the CPU, one fiber per CUDA thread (runtime.cpp).
// It supplies what the kernels use of CUDA: the keywords, the built-in variables, barriers, shuffles, atomics, bit
// casts, the runtime API calls of the launchers, and `linmix::emu::launch` behind common/launch.h. WMMA is in
// wmma.h (reached through <mma.h>). Types, fp16 and bf16 come from the CUDA toolkit's own headers, host-only.
#pragma once

#if !defined(LINMIX_CUDA_EMU)
#error "emu/cuda_emu.h belongs to the emulated build (LINMIX_CUDA_EMU)"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "emu/runtime.h"

// ---- keywords (the toolkit's host_defines.h made __global__, __device__ and __host__ empty for a host compiler)
#undef __launch_bounds__
#define __launch_bounds__(...)
// Shared memory is declared through LINMIX_SHARED / LINMIX_DYNAMIC_SHARED (common/shared_memory.h), which the
// emulator turns into bounds-checked arena slots; a bare __shared__ would be one variable per fiber.
#undef __shared__
#define __shared__ linmix_emu_error_declare_shared_memory_with_LINMIX_SHARED
// Device code paths (#if __CUDA_ARCH__) are what the emulator runs; sm_80 is the smallest architecture we build.
#define __CUDA_ARCH__ 800

// ---- built-in variables
#define threadIdx (::linmix::emu::thread_ctx().thread_idx)
#define blockIdx (::linmix::emu::thread_ctx().block_idx)
#define blockDim (::linmix::emu::thread_ctx().block_dim)
#define gridDim (::linmix::emu::thread_ctx().grid_dim)
#define warpSize 32

// ---- synchronisation; the call site names the barrier in the emulator's error messages
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::linmix::emu::syncthreads(file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::linmix::emu::syncwarp(mask, file, line);
}
inline void __threadfence() { ::linmix::emu::threadfence(); }

namespace linmix::emu {
template <typename T>
T shuffle_value(ShflMode mode, unsigned mask, T var, int b, int width, const char* file, int line) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = shuffle(mode, mask, bits, b, width, file, line);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
}  // namespace linmix::emu

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32, const char* file = __builtin_FILE(),
              int line = __builtin_LINE()) {
  return ::linmix::emu::shuffle_value(::linmix::emu::ShflMode::kIdx, mask, var, src_lane, width, file, line);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                 int line = __builtin_LINE()) {
  return ::linmix::emu::shuffle_value(::linmix::emu::ShflMode::kUp, mask, var, static_cast<int>(delta), width, file,
                                      line);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                   int line = __builtin_LINE()) {
  return ::linmix::emu::shuffle_value(::linmix::emu::ShflMode::kDown, mask, var, static_cast<int>(delta), width,
                                      file, line);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                  int line = __builtin_LINE()) {
  return ::linmix::emu::shuffle_value(::linmix::emu::ShflMode::kBfly, mask, var, lane_mask, width, file, line);
}

// ---- atomics: relaxed, as CUDA's are (ordering comes from __threadfence); real atomics, since blocks run
// concurrently on worker threads, and visible to ThreadSanitizer as atomics.
template <typename T>
inline T linmix_emu_atomic_update(T* addr, T (*f)(T, T), T v) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  static_assert(sizeof(T) == sizeof(Bits), "4- or 8-byte atomics");
  Bits* word = reinterpret_cast<Bits*>(addr);
  Bits seen = __atomic_load_n(word, __ATOMIC_RELAXED);
  for (;;) {
    T old;
    std::memcpy(&old, &seen, sizeof(T));
    const T next = f(old, v);
    Bits want;
    std::memcpy(&want, &next, sizeof(T));
    if (__atomic_compare_exchange_n(word, &seen, want, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return old;
  }
}
inline float atomicAdd(float* a, float v) {
  return linmix_emu_atomic_update<float>(a, [](float x, float y) { return x + y; }, v);
}
inline double atomicAdd(double* a, double v) {
  return linmix_emu_atomic_update<double>(a, [](double x, double y) { return x + y; }, v);
}
inline int atomicAdd(int* a, int v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  return __atomic_fetch_add(a, v, __ATOMIC_RELAXED);
}
inline int atomicMax(int* a, int v) {
  return linmix_emu_atomic_update<int>(a, [](int x, int y) { return x > y ? x : y; }, v);
}
inline unsigned atomicMax(unsigned* a, unsigned v) {
  return linmix_emu_atomic_update<unsigned>(a, [](unsigned x, unsigned y) { return x > y ? x : y; }, v);
}
inline int atomicExch(int* a, int v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }
inline unsigned atomicExch(unsigned* a, unsigned v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }
inline float atomicExch(float* a, float v) {
  return linmix_emu_atomic_update<float>(a, [](float, float y) { return y; }, v);
}

// ---- bit casts
inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(unsigned u) { float x; std::memcpy(&x, &u, 4); return x; }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, 4); return x; }

// ---- the runtime API calls of the launchers
#define cudaGetLastError ::linmix::emu::get_last_error
#define cudaGetErrorString ::linmix::emu::get_error_string
#define cudaGetDevice ::linmix::emu::get_device
#define cudaMemsetAsync ::linmix::emu::memset_async
namespace linmix::emu {
template <typename Kernel>
cudaError_t func_get_attributes(cudaFuncAttributes* attr, Kernel* kernel) {
  return func_get_attributes(attr, reinterpret_cast<const void*>(kernel));
}
template <typename Kernel>
cudaError_t func_set_attribute(Kernel* kernel, cudaFuncAttribute attr, int value) {
  return func_set_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}

// A launch: the arguments are converted to the kernel's parameter types once, as CUDA copies them to the
// parameter buffer; every emulated thread then calls the kernel on its own copy.
template <typename... KArgs, typename... Args>
void launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  struct Ctx {
    void (*kernel)(KArgs...);
    std::tuple<std::decay_t<KArgs>...> params;
  };
  const Ctx ctx{kernel, std::tuple<std::decay_t<KArgs>...>(std::forward<Args>(args)...)};
  const KernelThunk thunk = [](const void* c) {
    const Ctx& x = *static_cast<const Ctx*>(c);
    std::apply(x.kernel, x.params);
  };
  launch(reinterpret_cast<const void*>(kernel), grid, block, smem, thunk, &ctx);
}
}  // namespace linmix::emu
#define cudaFuncGetAttributes ::linmix::emu::func_get_attributes
#define cudaFuncSetAttribute ::linmix::emu::func_set_attribute
