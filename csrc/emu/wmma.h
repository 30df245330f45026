// nvcuda::wmma for the CUDA emulator (16x16x16, fp16/bf16 operands, fp32 accumulator): what the kernels use.
// CUDA leaves the mapping of matrix elements to a lane's fragment slots unspecified; here each fragment kind gets
// a fresh random mapping at every launch, so code that assumes one (touching x[i] as a known row or column, or
// mixing the slots of different fragment kinds) gives wrong results instead of passing by luck. Loads and stores
// are warp-wide rendezvous with CUDA's preconditions checked (runtime.cpp); each lane then moves its own slots,
// here, so the sanitizers see those accesses as the lane's.
#pragma once

#include <type_traits>

#include "emu/cuda_emu.h"

namespace nvcuda::wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator implements the m16n16k16 shape");
  static_assert(std::is_same_v<Use, accumulator> ? std::is_same_v<T, float>
                                                 : std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>,
                "fp16/bf16 operands with an fp32 accumulator");
  using element_type = T;
  static constexpr int num_elements = ::linmix::emu::kWmmaSlots;
  T x[num_elements];
};

}  // namespace nvcuda::wmma

namespace linmix::emu {

template <typename Use, typename T, typename Layout>
constexpr int wmma_kind() {
  namespace w = nvcuda::wmma;
  if constexpr (std::is_same_v<Use, w::accumulator>) {
    return kWmmaAccF32;
  } else {
    constexpr bool a = std::is_same_v<Use, w::matrix_a>, row = std::is_same_v<Layout, w::row_major>;
    constexpr int base = std::is_same_v<T, __half> ? kWmmaAF16Row : kWmmaABf16Row;
    return base + (a ? 0 : 2) + (row ? 0 : 1);
  }
}

template <typename T>
constexpr WmmaElem wmma_elem() {
  return std::is_same_v<T, float> ? kElemF32 : std::is_same_v<T, __half> ? kElemF16 : kElemBf16;
}

// Element (r, c) of a 16x16 tile at p with leading dimension ldm.
template <typename T>
T& wmma_at(T* p, unsigned ldm, bool row_major, int pos) {
  const int r = pos / 16, c = pos % 16;
  return row_major ? p[r * ldm + c] : p[c * ldm + r];
}

}  // namespace linmix::emu

namespace nvcuda::wmma {

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm,
                      const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(!std::is_same_v<Use, accumulator>, "an accumulator load names its memory layout");
  namespace e = ::linmix::emu;
  const bool row = std::is_same_v<Layout, row_major>;
  e::wmma_memory_op(e::WmmaOp::kLoad, p, ldm, row, sizeof(T), file, line);
  const uint8_t* pos = e::wmma_positions(e::wmma_kind<Use, T, Layout>());
  for (int i = 0; i < e::kWmmaSlots; ++i) f.x[i] = e::wmma_at(p, ldm, row, pos[i]);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  namespace e = ::linmix::emu;
  const bool row = layout == mem_row_major;
  e::wmma_memory_op(e::WmmaOp::kLoad, p, ldm, row, sizeof(float), file, line);
  const uint8_t* pos = e::wmma_positions(e::kWmmaAccF32);
  for (int i = 0; i < e::kWmmaSlots; ++i) f.x[i] = e::wmma_at(p, ldm, row, pos[i]);
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  namespace e = ::linmix::emu;
  const bool row = layout == mem_row_major;
  e::wmma_memory_op(e::WmmaOp::kStore, p, ldm, row, sizeof(float), file, line);
  const uint8_t* pos = e::wmma_positions(e::kWmmaAccF32);
  for (int i = 0; i < e::kWmmaSlots; ++i) e::wmma_at(p, ldm, row, pos[i]) = f.x[i];
}

template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, T v) {
  for (int i = 0; i < ::linmix::emu::kWmmaSlots; ++i) f.x[i] = v;
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c,
              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  namespace e = ::linmix::emu;
  e::wmma_mma(e::WmmaMmaArgs{a.x, b.x, c.x, d.x, e::wmma_kind<matrix_a, T, LA>(), e::wmma_kind<matrix_b, T, LB>(),
                             e::wmma_elem<T>()},
              file, line);
}

}  // namespace nvcuda::wmma
