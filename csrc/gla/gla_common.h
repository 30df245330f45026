// Arithmetic of gated linear attention shared by the CPU and CUDA kernels (__host__ __device__).
//
// Gates enter as log2-scaled cumulative sums: within a chunk, b_i = log2(e) * sum_{s <= i} g_s, so every
// decay is one exp2 of a difference. With g <= 0, b is non-increasing in i, so exp2(b_i - b_j) <= 1 for
// i >= j: every exponent the kernels evaluate is <= 0 and nothing overflows, however harsh the gate.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/math.h"
#include "gla/params.h"

namespace linmix {

constexpr int kGlaChunk = 64;     // time steps per chunk (inter-chunk state pass)
constexpr int kGlaSubChunk = 16;  // sub-chunk: diagonal blocks in fp32 elementwise, the rest as matmuls
static_assert(kGlaChunk % kGlaSubChunk == 0, "a chunk is a whole number of sub-chunks");

// Row t of (batch b, head h) of a (B, T, H, X) view; T may be const-qualified.
template <typename T>
LINMIX_HD T* gla_row(const BTHView& x, int64_t b, int64_t t, int64_t h) {
  return static_cast<T*>(x.ptr) + b * x.batch_stride + t * x.t_stride + h * x.head_stride;
}

// Host fp32 exp2 as straight-line arithmetic (Cephes' exp2f polynomial, relative error about 2e-7), so the
// CPU loops that evaluate one per (row, channel) vectorise instead of calling libm per element. Arguments
// are clamped to [-126, 126], so 2^n is always a normal float: exponents below -126 (harsh gates) give
// 2^-126 instead of a denormal or 0, an absolute error under 1.2e-38; NaN propagates.
inline float gla_exp2_poly(float x) {
  x = x < -126.f ? -126.f : x;
  x = x > 126.f ? 126.f : x;
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: x + kRound holds round(x) in its low mantissa bits
  const float t = x + kRound;
  const float n = t - kRound;
  const float f = x - n;  // in [-0.5, 0.5]
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.f;
  int32_t ti, ki;
  std::memcpy(&ti, &t, sizeof ti);
  std::memcpy(&ki, &kRound, sizeof ki);
  const int32_t e = (ti - ki + 127) << 23;  // the float 2^round(x)
  float two_n;
  std::memcpy(&two_n, &e, sizeof two_n);
  return p * two_n;
}

LINMIX_HD float gla_exp2(float x) {
#if defined(__CUDA_ARCH__)
  return exp2f(x);
#else
  return gla_exp2_poly(x);
#endif
}
LINMIX_HD double gla_exp2(double x) { return std::exp2(x); }

// log gate -> log2 gate, so decays become exp2 of cumulative-sum differences.
template <typename acc_t>
LINMIX_HD acc_t gla_log2_gate(acc_t g) {
  return g * static_cast<acc_t>(1.4426950408889634);
}

// One diagonal-block score: A_ij = sum_k q_ik k_jk exp2(b_ik - b_jk), i >= j in the same sub-chunk.
// Evaluated elementwise (never factorised into rescaled q and k) because exp2(b_s - b_j) for a shared
// reference s could overflow inside a sub-chunk under harsh gates. q, k, b are rows of length K.
template <typename acc_t, typename Q, typename Kt>
LINMIX_HD acc_t gla_diag_score(const Q* q_i, const Kt* k_j, const acc_t* b_i, const acc_t* b_j, int64_t K) {
  acc_t s = 0;
  for (int64_t c = 0; c < K; ++c) s += static_cast<acc_t>(q_i[c]) * static_cast<acc_t>(k_j[c]) * gla_exp2(b_i[c] - b_j[c]);
  return s;
}

// One state element over one step of the recurrence: S <- decay S + k v, decay = exp2(g2) of the
// key channel (computed once per channel and step, not per element).
template <typename acc_t>
LINMIX_HD acc_t gla_state_step(acc_t S, acc_t decay, acc_t k, acc_t v) {
  return decay * S + k * v;
}

// Per-key-channel contribution to d b_t (the log2-free cumulative gate) at one step:
// every q-term of the output carries exp(+b_t), every k-term exp(-b_t), hence q dq - k dk.
template <typename acc_t>
LINMIX_HD acc_t gla_dgate_term(acc_t q, acc_t dq, acc_t k, acc_t dk) {
  return q * dq - k * dk;
}

}  // namespace linmix
