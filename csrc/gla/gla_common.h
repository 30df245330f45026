// Arithmetic of gated linear attention shared by the CPU and CUDA kernels (__host__ __device__).
//
// Gates enter as log2 gates log2g_t = log2(e) g_t <= 0; the decay from step j to step i >= j is
// exp2(sum_{j < m <= i} log2g_m). Two ways to form that sum:
//  - segment sums (the CPU twin and the fused CUDA kernels, gla_fused_common.cuh): every decay is exp2 of a sum
//    taken directly over the segment it spans: the CUDA kernels build it from per-sub-chunk prefix sums (query
//    side), suffix sums (key side), whole-sub-chunk totals, and pairwise running sums on the diagonal sub-blocks
//    (Mamba-2's segsum); the CPU twin from running sums that start at the split points of a chunk halved down to
//    single rows (gla_cpu.cpp). Every summand is <= 0, so nothing cancels: a decay is accurate to a few ulp
//    whatever the other gates are, and a gate of -inf anywhere in the segment gives exactly 0 (never -inf - -inf).
//  - differences of the chunk's running cumsum log2g_cum_i = sum_{m <= i} log2g_m (the GPU-verified chunk
//    kernels, gla_chunk_common.cuh, the CUDA default until a GPU session verifies the fused kernels):
//    exp2(log2g_cum_i - log2g_cum_j).
//    It cancels catastrophically after a large gate (NaN for -inf, the decay dropped for -3.4e37, 2.7e-4
//    relative error for -1e4 in fp32).
// Gate gradients come from the closed form (gla_dgate_term), exactly 0 where the decay underflows (gla_gate_grad).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/math.h"
#include "gla/params.h"

namespace linmix {

constexpr int kGlaChunk = 64;     // time steps per chunk (inter-chunk state pass)
constexpr int kGlaSubChunk = 16;  // CUDA sub-chunk: diagonal blocks in fp32 elementwise, the rest as matmuls
static_assert(kGlaChunk % kGlaSubChunk == 0, "a chunk is a whole number of sub-chunks");

// exp2 for the kernels; exp2(-inf) = 0. (The CPU loops use exp2_cpu, common/exp2_cpu.h.)
LINMIX_HD float gla_exp2(float x) {
#if defined(__CUDA_ARCH__)
  return exp2f(x);
#else
  return std::exp2(x);
#endif
}
LINMIX_HD double gla_exp2(double x) { return std::exp2(x); }

// log gate -> log2 gate, so decays become exp2 of sums of log2 gates.
template <typename acc_t>
LINMIX_HD acc_t gla_log2_gate(acc_t g) {
  return g * static_cast<acc_t>(1.4426950408889634);
}

// One diagonal-block score, log2g_cum form (the GPU-verified CUDA path):
// A_ij = sum_k q_ik k_jk exp2(log2g_cum_ik - log2g_cum_jk), i >= j in the same sub-chunk. Evaluated elementwise
// (never factorised into rescaled q and k) because exp2(log2g_cum_s - log2g_cum_j) for a shared reference s could
// overflow inside a sub-chunk under harsh gates. q, k, log2g_cum are rows of length K.
template <typename acc_t, typename Q, typename Kt>
LINMIX_HD acc_t gla_diag_score(const Q* q_i, const Kt* k_j, const acc_t* log2g_cum_i, const acc_t* log2g_cum_j,
                               int64_t K) {
  acc_t s = 0;
  for (int64_t c = 0; c < K; ++c) {
    s += static_cast<acc_t>(q_i[c]) * static_cast<acc_t>(k_j[c]) * gla_exp2(log2g_cum_i[c] - log2g_cum_j[c]);
  }
  return s;
}

// One state element over one step of the recurrence: S <- decay S + k v, decay = exp2(log2g) of the
// key channel (computed once per channel and step, not per element).
template <typename acc_t>
LINMIX_HD acc_t gla_state_step(acc_t S, acc_t decay, acc_t k, acc_t v) {
  return decay * S + k * v;
}

// Per-key-channel contribution to the gradient of the cumulative log gate at one step:
// every q-term of the output carries exp(+cumsum_t), every k-term exp(-cumsum_t), hence q dq - k dk.
template <typename acc_t>
LINMIX_HD acc_t gla_dgate_term(acc_t q, acc_t dq, acc_t k, acc_t dk) {
  return q * dq - k * dk;
}

// The gradient of the log gate g_t of one key channel, given `closed`, the closed form (the reverse cumsum of
// gla_dgate_term plus the boundary term). Exactly, d loss / d g_t = exp(g_t) (h_{t-1} . dH_t); the closed form's
// terms cancel, so it leaves a rounding residue where that product is 0. Where the decay exp2(log2_gate) is below
// the smallest normal acc_t (2^-126 in fp32, 2^-1022 in fp64; a gate of -inf, -1e30 or -1e4 included) the
// gradient is smaller than that times |h_{t-1} . dH_t| and is returned as exactly 0.
template <typename acc_t>
LINMIX_HD acc_t gla_gate_grad(acc_t closed, acc_t log2_gate) {
  constexpr acc_t kMinNormalLog2 = sizeof(acc_t) == sizeof(double) ? acc_t(-1022) : acc_t(-126);
  return log2_gate < kMinNormalLog2 ? acc_t(0) : closed;
}

}  // namespace linmix
