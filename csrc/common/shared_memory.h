// Shared-memory declarations in kernels go through these macros, so the CUDA emulator (csrc/emu/) can give each
// declaration a bounds-checked slot of its per-block arena; under nvcc they are the plain declarations.
//   LINMIX_SHARED(float, s_red, [kNWarps]);            __shared__ float s_red[kNWarps];
//   LINMIX_SHARED_ALIGNED(16, float, s_x, [2][64]);    __shared__ __align__(16) float s_x[2][64];
//   LINMIX_SHARED(bool, s_last);                       __shared__ bool s_last;
//   LINMIX_DYNAMIC_SHARED(float, s_h);                 extern __shared__ float s_h[];
//   LINMIX_DYNAMIC_SHARED_ALIGNED(128, unsigned char, smem_raw);
#pragma once

#include <cstddef>

namespace linmix {
// A block's shared memory without an opt-in (static plus dynamic), and the most any kernel here opts in to: what
// an sm_80 block may take (163 KiB; sm_90 allows 227 KiB), so every kernel runs on both architectures.
inline constexpr size_t kDefaultBlockSharedBytes = 48 * 1024;
inline constexpr size_t kMaxBlockSharedBytes = 160 * 1024;
}  // namespace linmix

#if defined(LINMIX_CUDA_EMU)
// One slot per declaration and instantiation of the enclosing function (the tag is a function-local static),
// shared by the threads of a block, as CUDA's static shared variables are.
#define LINMIX_SHARED_ALIGNED(align, T, name, ...)                                                    \
  static constexpr char linmix_shared_tag_##name = 0;                                                 \
  T(&name) __VA_ARGS__ = *static_cast<T(*) __VA_ARGS__>(::linmix::emu::static_shared(                \
      &linmix_shared_tag_##name, sizeof(T __VA_ARGS__),                                               \
      (align) > alignof(T __VA_ARGS__) ? (align) : alignof(T __VA_ARGS__), #name))
#define LINMIX_SHARED(T, name, ...) LINMIX_SHARED_ALIGNED(1, T, name, __VA_ARGS__)
#define LINMIX_DYNAMIC_SHARED_ALIGNED(align, T, name) \
  T* const name = static_cast<T*>(::linmix::emu::dynamic_shared(align))
#define LINMIX_DYNAMIC_SHARED(T, name) LINMIX_DYNAMIC_SHARED_ALIGNED(alignof(T), T, name)
#else
#define LINMIX_SHARED_ALIGNED(align, T, name, ...) __shared__ __align__(align) T name __VA_ARGS__
#define LINMIX_SHARED(T, name, ...) __shared__ T name __VA_ARGS__
#define LINMIX_DYNAMIC_SHARED_ALIGNED(align, T, name) extern __shared__ __align__(align) T name[]
#define LINMIX_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif
