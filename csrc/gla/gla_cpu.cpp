// CPU gated linear attention: parallel over (sequence, head) with parallel_for (common/parallel.h): a sequence is a
// batch row, or one packed sequence (a Varlen), whose chunks start at its own first step.
//
// chunk_gla runs the chunked algorithm of the CUDA kernels (chunks of kGlaChunk) with the intra-chunk scores by
// halving the chunk down to single rows (ChunkBuffers), so every decay factors at a split point into two products
// of the steps' decays. Every product over (chunk x K), (chunk x chunk) or (K x V) tiles is a call
// of the BLAS GEMM the torch glue passes in (CpuGemm); what is left (level factors, small blocks' dot products,
// dg) is elementwise and written so the compiler vectorises it.
// fused_recurrent_gla steps the recurrence. Rows are staged in accumulation-type buffers so every
// product and sum is fp32 (fp64 for fp64 inputs).
#include "gla/gla_cpu.h"

#include <algorithm>
#include <vector>

#include "common/cpu_kernel.h"
#include "common/cpu_types.h"
#include "common/parallel.h"
#include "common/static_switch.h"
#include "common/exp2_cpu.h"
#include "gla/gla_common.h"

namespace linmix {
namespace {

constexpr int64_t C = kGlaChunk;

// One parallel task: head h of sequence task / heads, rows [t0, t0 + len) of batch row b; its states (h0, ht, dht,
// dh0) are row `task` of (N * H, K, V).
struct Task {
  int64_t b, h, t0, len;
};
Task task_of(const GlaParams& p, const Varlen& varlen, int64_t task) {
  const SeqSpan s = varlen.span(task / p.heads, p.seqlen);
  return {s.batch, task % p.heads, s.begin, s.len};
}

// parallel_for's grain for a call's tasks: their mean length times the per-step work.
int64_t task_grain(const GlaParams& p, const Varlen& varlen, int64_t step_work) {
  const int64_t len = varlen.packed() ? ceil_div(p.seqlen, std::max<int64_t>(p.batch, 1)) : p.seqlen;
  return cpu_grain(len * step_work);
}

// Copies rows t0 .. t0+L-1 of (batch b, head h) into dst (L, n) in the accumulation type.
template <typename T, typename acc_t>
LINMIX_CPU_CLONES void load_rows(const StridedView<3>& x, int64_t b, int64_t h, int64_t t0, int64_t L, int64_t n,
                                 acc_t* dst) {
  for (int64_t i = 0; i < L; ++i) {
    const T* src = x.at<const T>(b, t0 + i, h);
    LINMIX_SIMD
    for (int64_t c = 0; c < n; ++c) dst[i * n + c] = static_cast<acc_t>(src[c]);
  }
}

template <typename T, typename acc_t>
LINMIX_CPU_CLONES void store_rows(const StridedView<3>& x, int64_t b, int64_t h, int64_t t0, int64_t L, int64_t n,
                                  const acc_t* src) {
  for (int64_t i = 0; i < L; ++i) {
    T* out = x.at<T>(b, t0 + i, h);
    LINMIX_SIMD
    for (int64_t c = 0; c < n; ++c) out[c] = cpu_cast<T>(src[i * n + c]);
  }
}

// GCC vectorised these loops on their own but not once inlined into the large chunk loops; kept out of line.
#define LINMIX_NOINLINE __attribute__((noinline))

template <typename acc_t>
acc_t dot(const acc_t* x, const acc_t* y, int64_t n) {
  acc_t s = 0;
  LINMIX_SIMD_SUM(s)
  for (int64_t c = 0; c < n; ++c) s += x[c] * y[c];
  return s;
}

template <typename acc_t>
CpuGemmFn<acc_t> pick_gemm(const CpuGemm& g) {
  if constexpr (std::is_same_v<acc_t, double>)
    return g.f64;
  else
    return g.f32;
}

// Everything one chunk of one (batch, head) needs, in the accumulation type.
//
// Intra-chunk scores A_ij = sum_c q_ic k_jc D_c(j, i), j <= i, with D(j, i) = exp2(sum_{j < m <= i} a_m) the decay
// from step j to step i, are built by halving: a block of n rows [r0, r0 + n) splits at m = r0 + n / 2 into two
// diagonal blocks of n / 2 (split again) and one off-diagonal block, rows i >= m against columns j < m, where every
// decay factors at the split: D(j, i) = D(j, m - 1) D(m - 1, i). So that block is one product
// (q_i D(m - 1, i)) (k_j D(j, m - 1))^T: a GEMM for the large blocks, dot products for the small ones, and only the
// n x n diagonal is left (D = 1). Per level each row gets one factor, a running product of the steps' decays
// exp2(a_m) in [0, 1] that starts at the split and moves away from it, so every decay is a product over exactly
// its segment (nothing cancels, never a quotient or a difference of sums: a gate of -inf gives an exact 0), with
// one exp2 per step and channel.
template <typename acc_t>
struct ChunkBuffers {
  static constexpr int kLevels = 6;  // halvings of a chunk: blocks of 64, 32, ..., 2 rows
  static_assert(C == (int64_t(1) << kLevels), "the chunk halves down to single rows");
  static constexpr int64_t kGemmRows = 16;  // off-diagonal blocks of at least this many rows go to the BLAS GEMM

  int64_t K, V, L = 0;
  CpuGemmFn<acc_t> gemm_fn;
  std::vector<acc_t> q, k, log2g, v;  // (C, K) x3, (C, V); log2g = log2 gates
  std::vector<acc_t> decay;           // (C, K): exp2(log2g), each step's decay
  std::vector<acc_t> eq, ek;      // (C, K): decay from the chunk's start to row i (inclusive), from row j to its end
  std::vector<acc_t> etot;        // (K) decay across the whole chunk
  std::vector<acc_t> fac, op;     // (kLevels, C, K): per level, each row's factor to its split, and q or k times it
  std::vector<acc_t> A;           // (C, C) intra-chunk scores, lower triangle; the upper one stays 0
  std::vector<acc_t> tmp;         // (C, max(K, V))
  ChunkBuffers(int64_t K_, int64_t V_, CpuGemmFn<acc_t> gemm)
      : K(K_), V(V_), gemm_fn(gemm), q(C * K_), k(C * K_), log2g(C * K_), v(C * V_), decay(C * K_), eq(C * K_), ek(C * K_), etot(K_),
        fac(kLevels * C * K_), op(kLevels * C * K_), A(C * C), tmp(C * std::max(K_, V_)) {}

  void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t kk, acc_t alpha, const acc_t* a_, int64_t lda,
            const acc_t* bm, int64_t ldb, acc_t beta, acc_t* c, int64_t ldc) const {
    if (m > 0 && n > 0 && kk > 0) gemm_fn(ta, tb, m, n, kk, alpha, a_, lda, bm, ldb, beta, c, ldc);
  }

  // Loads rows t0 .. t0+L-1 with their decays to the chunk's ends; with `scores` also q and the level factors.
  // Rows from L to the chunk's end carry gate 0 and zero q, k, v, so the products over whole blocks are exact.
  template <typename T>
  LINMIX_CPU_CLONES void load(const GlaParams& p, int64_t bi, int64_t hi, int64_t t0, int64_t L_, bool scores = true) {
    L = L_;
    if (scores) load_rows<T>(p.q, bi, hi, t0, L, K, q.data());
    load_rows<T>(p.k, bi, hi, t0, L, K, k.data());
    load_rows<T>(p.v, bi, hi, t0, L, V, v.data());
    load_rows<T>(p.g, bi, hi, t0, L, K, log2g.data());
    LINMIX_SIMD
    for (int64_t x = 0; x < L * K; ++x) log2g[x] = gla_log2_gate(log2g[x]);
    std::fill(log2g.begin() + L * K, log2g.end(), acc_t(0));
    std::fill(k.begin() + L * K, k.end(), acc_t(0));
    std::fill(v.begin() + L * V, v.end(), acc_t(0));
    if (scores) std::fill(q.begin() + L * K, q.end(), acc_t(0));
    LINMIX_SIMD
    for (int64_t x = 0; x < C * K; ++x) decay[x] = exp2_cpu(log2g[x]);  // 1 past row L
    running_factors(0, L, 1, true, eq.data(), nullptr, nullptr);
    running_factors(L - 1, L, -1, false, ek.data(), nullptr, nullptr);
    std::copy_n(tmp.data(), K, etot.data());  // the product over the whole chunk, left by running_factors
    if (scores) level_factors();
  }

  // A running product of the steps' decays over n rows from row i0, moving by dir (+1 or -1), and each row's factor
  // f_i: the query side multiplies in step i's decay first (the decay to row i includes step i), the key side
  // after (the decay from row j excludes step j). With x, also op_i = x_i f_i. The product is left in tmp[0, K).
  // Products of decays in [0, 1], one exp2 per step and channel in all (not one per level): nothing cancels, and
  // a gate of -inf gives exactly 0 from its step on.
  LINMIX_NOINLINE LINMIX_CPU_CLONES void running_factors(int64_t i0, int64_t n, int64_t dir, bool inclusive, acc_t* f,
                                                         const acc_t* x, acc_t* op) {
    acc_t* run = tmp.data();
    std::fill_n(run, K, acc_t(1));
    for (int64_t r = 0; r < n; ++r) {
      const int64_t row = (i0 + r * dir) * K;
      const acc_t* a = &decay[row];
      acc_t* fr = &f[row];
      LINMIX_SIMD
      for (int64_t c = 0; c < K; ++c) {
        const acc_t before = run[c], after = before * a[c];
        fr[c] = inclusive ? after : before;
        run[c] = after;
      }
      if (x) mul_rows(&x[row], fr, 0, 1, &op[row]);
    }
  }

  // Per level and block [r0, r0 + n), split m: rows i >= m get fac = D(m - 1, i) and op = q_i fac, rows j < m get
  // fac = D(j, m - 1) and op = k_j fac.
  void level_factors() {
    for (int lv = 0; lv < kLevels; ++lv) {
      const int64_t n = C >> lv, h = n / 2;
      acc_t *f = &fac[lv * C * K], *o = &op[lv * C * K];
      for (int64_t r0 = 0; r0 < C; r0 += n) {
        running_factors(r0 + h, h, 1, true, f, q.data(), o);
        running_factors(r0 + h - 1, h, -1, false, f, k.data(), o);
      }
    }
  }

  // dst_i = src_i * f_i elementwise over rows [i0, i1) of (C, K) buffers.
  void mul_rows(const acc_t* src, const acc_t* f, int64_t i0, int64_t i1, acc_t* dst) const {
    LINMIX_SIMD
    for (int64_t x = i0 * K; x < i1 * K; ++x) dst[x] = src[x] * f[x];
  }

  // Calls fn(level, r0, m, h) for every off-diagonal block (rows [m, m + h) against columns [r0, m)) that holds
  // a row below L.
  template <typename Fn>
  void for_each_block(Fn&& fn) const {
    for (int lv = 0; lv < kLevels; ++lv) {
      const int64_t n = C >> lv, h = n / 2;
      for (int64_t r0 = 0; r0 + h < L; r0 += n) fn(lv, r0, r0 + h, h);
    }
  }

  // A_ij for j <= i < C (rows at or past L hold zeros).
  LINMIX_CPU_CLONES void scores() {
    std::fill(A.begin(), A.end(), acc_t(0));
    for_each_block([&](int lv, int64_t r0, int64_t m, int64_t h) {
      const acc_t* o = &op[lv * C * K];
      if (h >= kGemmRows) {
        gemm(false, true, h, h, K, 1, &o[m * K], K, &o[r0 * K], K, 0, &A[m * C + r0], C);  // (h, h)
        return;
      }
      for (int64_t i = m; i < m + h; ++i)
        for (int64_t j = r0; j < m; ++j) A[i * C + j] = dot(&o[i * K], &o[j * K], K);
    });
    for (int64_t i = 0; i < L; ++i) A[i * C + i] = dot(&q[i * K], &k[i * K], K);
  }

  // Given dA (lower triangle read), accumulates dq_i += sum_{j<=i} dA_ij k_j D(j, i) and
  // dk_j += sum_{i>=j} dA_ij q_i D(j, i), block by block as scores() builds A.
  LINMIX_CPU_CLONES void scores_backward(const std::vector<acc_t>& dA, acc_t* dq, acc_t* dk) {
    for_each_block([&](int lv, int64_t r0, int64_t m, int64_t h) {
      const acc_t *o = &op[lv * C * K], *f = &fac[lv * C * K];
      acc_t *gq = tmp.data(), *gk = tmp.data() + h * K;  // (h, K) each
      if (h >= kGemmRows) {
        gemm(false, false, h, K, h, 1, &dA[m * C + r0], C, &o[r0 * K], K, 0, gq, K);  // dA_blk (k fac)
        gemm(true, false, h, K, h, 1, &dA[m * C + r0], C, &o[m * K], K, 0, gk, K);   // dA_blk^T (q fac)
      } else {
        std::fill_n(gq, 2 * h * K, acc_t(0));
        for (int64_t i = 0; i < h; ++i)
          for (int64_t j = 0; j < h; ++j) {
            const acc_t d = dA[(m + i) * C + r0 + j];
            axpy(d, &o[(r0 + j) * K], &gq[i * K], K);
            axpy(d, &o[(m + i) * K], &gk[j * K], K);
          }
      }
      fma_rows(gq, &f[m * K], h * K, &dq[m * K]);
      fma_rows(gk, &f[r0 * K], h * K, &dk[r0 * K]);
    });
    for (int64_t i = 0; i < L; ++i) {
      const acc_t d = dA[i * C + i];
      axpy(d, &k[i * K], &dq[i * K], K);
      axpy(d, &q[i * K], &dk[i * K], K);
    }
  }

  // y += alpha x, and y += x f elementwise.
  static void axpy(acc_t alpha, const acc_t* x, acc_t* y, int64_t n) {
    LINMIX_SIMD
    for (int64_t c = 0; c < n; ++c) y[c] += alpha * x[c];
  }
  static void fma_rows(const acc_t* x, const acc_t* f, int64_t n, acc_t* y) {
    LINMIX_SIMD
    for (int64_t c = 0; c < n; ++c) y[c] += x[c] * f[c];
  }

  // out[0:L] (ldo) += alpha A[0:L, 0:L] x[0:L] (x (C, ncol)), in row blocks of kGemmRows so the upper triangle's
  // zeros are mostly skipped.
  void lower_times(acc_t alpha, const acc_t* x, int64_t ncol, acc_t* out) const {
    for (int64_t i0 = 0; i0 < L; i0 += kGemmRows) {
      const int64_t i1 = std::min(i0 + kGemmRows, L);
      gemm(false, false, i1 - i0, ncol, i1, alpha, &A[i0 * C], C, x, ncol, 1, &out[i0 * ncol], ncol);
    }
  }

  // S <- diag(etot) S + sum_j (k_j ek_j)^T v_j   (S: (K, V))
  void advance_state(acc_t* S) {
    for (int64_t c = 0; c < K; ++c)
      for (int64_t x = 0; x < V; ++x) S[c * V + x] *= etot[c];
    mul_rows(k.data(), ek.data(), 0, L, tmp.data());                     // k^ (L, K)
    gemm(true, false, K, V, L, 1, tmp.data(), K, v.data(), V, 1, S, V);  // S += k^T v
  }
};

template <typename acc_t>
void init_state(const void* h0, int64_t task, int64_t KV, acc_t* S) {
  if (h0)
    std::copy_n(static_cast<const acc_t*>(h0) + task * KV, KV, S);
  else
    std::fill_n(S, KV, acc_t(0));
}

template <DType dt>
void chunk_fwd_impl(const GlaParams& p, const Varlen& varlen, const CpuGemm& gemm) {
  using T = cpu_t<dt>;
  using acc_t = cpu_acc_t<dt>;
  const int64_t K = p.dim_k, V = p.dim_v, KV = K * V;
  const acc_t scale = static_cast<acc_t>(p.scale);
  parallel_for(0, p.batch * p.heads, task_grain(p, varlen, KV), [&](int64_t begin, int64_t end) LINMIX_CPU_CLONES {
    ChunkBuffers<acc_t> cb(K, V, pick_gemm<acc_t>(gemm));
    std::vector<acc_t> S(KV), o(C * V), qe(C * K);
    for (int64_t task = begin; task < end; ++task) {
      const auto [bi, hi, seq0, len] = task_of(p, varlen, task);
      init_state(p.h0, task, KV, S.data());
      for (int64_t t0 = seq0; t0 < seq0 + len; t0 += C) {
        const int64_t L = std::min<int64_t>(C, seq0 + len - t0);
        cb.template load<T>(p, bi, hi, t0, L);
        // o = scale (q eq) S + scale A v
        cb.mul_rows(cb.q.data(), cb.eq.data(), 0, L, qe.data());
        cb.gemm(false, false, L, V, K, scale, qe.data(), K, S.data(), V, 0, o.data(), V);
        cb.scores();
        cb.lower_times(scale, cb.v.data(), V, o.data());
        store_rows<T>(p.o, bi, hi, t0, L, V, o.data());
        cb.advance_state(S.data());
      }
      std::copy_n(S.data(), KV, static_cast<acc_t*>(p.ht) + task * KV);
    }
  });
}

// Backward of one (batch, head), chunk by chunk in reverse with dS = dL/d(state after the chunk):
//   dA_ij = scale do_i . v_j                       (j <= i)
// (D(j, i) is the decay from step j to step i of the chunk, eq_i = D(start, i), ek_j = D(j, end), etot = D(start, end))
//   dv_j  = scale sum_{i>=j} A_ij do_i + k^_j dS   (k^_j = k_j ek_j)
//   dq_i  = scale eq_i (S_in do_i) + sum_{j<=i} dA_ij k_j D(j, i)
//   dk_j  = sum_{i>=j} dA_ij q_i D(j, i) + ek_j (dS v_j)
//   dg_t  = sum_{s>=t in chunk} (q dq - k dk)_s + sum_v (S_out dS)[:, v]   (closed form; gla_gate_grad)
//   dS_in = etot dS + scale sum_i (q_i eq_i)^T do_i
// The chunk-entry states are recomputed by a forward state pass at the start of the backward.
template <DType dt>
void chunk_bwd_impl(const GlaParams& p, const Varlen& varlen, const CpuGemm& gemm) {
  using T = cpu_t<dt>;
  using acc_t = cpu_acc_t<dt>;
  const int64_t K = p.dim_k, V = p.dim_v, KV = K * V;
  const int64_t max_chunks = ceil_div(p.seqlen, C);
  constexpr int64_t kRows = ChunkBuffers<acc_t>::kGemmRows;
  const acc_t scale = static_cast<acc_t>(p.scale);
  parallel_for(0, p.batch * p.heads, task_grain(p, varlen, KV), [&](int64_t begin, int64_t end) LINMIX_CPU_CLONES {
    ChunkBuffers<acc_t> cb(K, V, pick_gemm<acc_t>(gemm));
    std::vector<acc_t> states((max_chunks + 1) * KV);  // state entering chunk c; the last is the final state
    std::vector<acc_t> dS(KV), dout(C * V), dA(C * C), run(K);
    std::vector<acc_t> dq(C * K), dk(C * K), dv(C * V), dg(C * K), qe(C * K);
    for (int64_t task = begin; task < end; ++task) {
      const auto [bi, hi, seq0, len] = task_of(p, varlen, task);
      const int64_t n_chunks = ceil_div(len, C);
      init_state(p.h0, task, KV, states.data());
      for (int64_t c = 0; c < n_chunks; ++c) {
        const int64_t t0 = seq0 + c * C, L = std::min<int64_t>(C, seq0 + len - t0);
        cb.template load<T>(p, bi, hi, t0, L, /*scores=*/false);
        std::copy_n(&states[c * KV], KV, &states[(c + 1) * KV]);
        cb.advance_state(&states[(c + 1) * KV]);
      }
      init_state(p.dht, task, KV, dS.data());
      for (int64_t c = n_chunks - 1; c >= 0; --c) {
        const int64_t t0 = seq0 + c * C, L = std::min<int64_t>(C, seq0 + len - t0);
        const acc_t* S_in = &states[c * KV];
        const acc_t* S_out = &states[(c + 1) * KV];
        cb.template load<T>(p, bi, hi, t0, L);
        load_rows<T>(p.dout, bi, hi, t0, L, V, dout.data());
        for (int64_t x = 0; x < L * V; ++x) dout[x] *= scale;
        cb.scores();
        // dA = do v^T and dv = A^T do + k^ dS, in blocks of kGemmRows rows (columns for dv) that cover the lower triangle
        for (int64_t i0 = 0; i0 < L; i0 += kRows) {
          const int64_t i1 = std::min(i0 + kRows, L);
          cb.gemm(false, true, i1 - i0, i1, V, 1, &dout[i0 * V], V, cb.v.data(), V, 0, &dA[i0 * C], C);
          cb.gemm(true, false, i1 - i0, V, L - i0, 1, &cb.A[i0 * C + i0], C, &dout[i0 * V], V, 0, &dv[i0 * V], V);
        }
        cb.mul_rows(cb.k.data(), cb.ek.data(), 0, L, qe.data());  // k^
        cb.gemm(false, false, L, V, K, 1, qe.data(), K, dS.data(), V, 1, dv.data(), V);
        // inter-chunk parts of dq and dk: exp2(b) (do S_in^T), exp2(b_last - b) (v dS^T)
        cb.gemm(false, true, L, K, V, 1, dout.data(), V, S_in, V, 0, dq.data(), K);
        cb.gemm(false, true, L, K, V, 1, cb.v.data(), V, dS.data(), V, 0, dk.data(), K);
        cb.mul_rows(dq.data(), cb.eq.data(), 0, L, dq.data());
        cb.mul_rows(dk.data(), cb.ek.data(), 0, L, dk.data());
        cb.scores_backward(dA, dq.data(), dk.data());
        // dg: reverse cumsum within the chunk plus the chunk-boundary term
        for (int64_t kc = 0; kc < K; ++kc) run[kc] = dot(&S_out[kc * V], &dS[kc * V], V);
        for (int64_t i = L - 1; i >= 0; --i)
          LINMIX_SIMD
          for (int64_t kc = 0; kc < K; ++kc) {
            const int64_t x = i * K + kc;
            run[kc] += gla_dgate_term(cb.q[x], dq[x], cb.k[x], dk[x]);
            dg[x] = gla_gate_grad(run[kc], cb.log2g[x]);
          }
        // dS <- exp(b_last) dS + (q exp(b))^T (scale do)
        for (int64_t kc = 0; kc < K; ++kc)
          for (int64_t e = 0; e < V; ++e) dS[kc * V + e] *= cb.etot[kc];
        cb.mul_rows(cb.q.data(), cb.eq.data(), 0, L, qe.data());
        cb.gemm(true, false, K, V, L, 1, qe.data(), K, dout.data(), V, 1, dS.data(), V);
        store_rows<T>(p.dq, bi, hi, t0, L, K, dq.data());
        store_rows<T>(p.dk, bi, hi, t0, L, K, dk.data());
        store_rows<T>(p.dv, bi, hi, t0, L, V, dv.data());
        store_rows<T>(p.dg, bi, hi, t0, L, K, dg.data());
      }
      std::copy_n(dS.data(), KV, static_cast<acc_t*>(p.dh0) + task * KV);
    }
  });
}

// fused_recurrent_gla forward: the recurrence one step at a time, state (K, V) in the accumulation type.
template <DType dt>
void recurrent_fwd_impl(const GlaParams& p, const Varlen& varlen) {
  using T = cpu_t<dt>;
  using acc_t = cpu_acc_t<dt>;
  const int64_t K = p.dim_k, V = p.dim_v, KV = K * V;
  const acc_t scale = static_cast<acc_t>(p.scale);
  parallel_for(0, p.batch * p.heads, task_grain(p, varlen, KV), [&](int64_t begin, int64_t end) LINMIX_CPU_CLONES {
    std::vector<acc_t> S(KV), q(K), k(K), g(K), v(V), o(V);
    for (int64_t task = begin; task < end; ++task) {
      const auto [bi, hi, seq0, len] = task_of(p, varlen, task);
      init_state(p.h0, task, KV, S.data());
      for (int64_t t = seq0; t < seq0 + len; ++t) {
        load_rows<T>(p.q, bi, hi, t, 1, K, q.data());
        load_rows<T>(p.k, bi, hi, t, 1, K, k.data());
        load_rows<T>(p.g, bi, hi, t, 1, K, g.data());
        load_rows<T>(p.v, bi, hi, t, 1, V, v.data());
        std::fill(o.begin(), o.end(), acc_t(0));
        for (int64_t c = 0; c < K; ++c) {
          const acc_t decay = exp2_cpu(gla_log2_gate(g[c]));
          acc_t* Sc = &S[c * V];
          for (int64_t e = 0; e < V; ++e) {
            Sc[e] = gla_state_step(Sc[e], decay, k[c], v[e]);
            o[e] += q[c] * Sc[e];
          }
        }
        for (acc_t& x : o) x *= scale;
        store_rows<T>(p.o, bi, hi, t, 1, V, o.data());
      }
      std::copy_n(S.data(), KV, static_cast<acc_t*>(p.ht) + task * KV);
    }
  });
}

// fused_recurrent_gla backward: a forward pass recomputes S_t for dq_t = scale S_t do_t; a reverse pass
// carries dS_t = exp(g_{t+1}) dS_{t+1} + scale q_t^T do_t for dk_t = dS_t v_t and dv_t = k_t dS_t;
// dg is the closed form over the whole sequence: reverse cumsum of (q dq - k dk) + sum_v S_T dS_T (gla_gate_grad).
template <DType dt>
void recurrent_bwd_impl(const GlaParams& p, const Varlen& varlen) {
  using T = cpu_t<dt>;
  using acc_t = cpu_acc_t<dt>;
  const int64_t K = p.dim_k, V = p.dim_v, KV = K * V;
  const acc_t scale = static_cast<acc_t>(p.scale);
  parallel_for(0, p.batch * p.heads, task_grain(p, varlen, KV), [&](int64_t begin, int64_t end) LINMIX_CPU_CLONES {
    std::vector<acc_t> S(KV), dS(KV), q(K), k(K), g(K), v(V), dout(V), dk(K), dv(V), run(K), dg(K);
    std::vector<acc_t> dq(p.seqlen * K);  // kept in the accumulation type for the dg sum; row t - t0
    for (int64_t task = begin; task < end; ++task) {
      const auto [bi, hi, t0, len] = task_of(p, varlen, task);
      init_state(p.h0, task, KV, S.data());
      for (int64_t t = 0; t < len; ++t) {
        load_rows<T>(p.k, bi, hi, t0 + t, 1, K, k.data());
        load_rows<T>(p.g, bi, hi, t0 + t, 1, K, g.data());
        load_rows<T>(p.v, bi, hi, t0 + t, 1, V, v.data());
        load_rows<T>(p.dout, bi, hi, t0 + t, 1, V, dout.data());
        for (int64_t c = 0; c < K; ++c) {
          const acc_t decay = exp2_cpu(gla_log2_gate(g[c]));
          acc_t* Sc = &S[c * V];
          for (int64_t e = 0; e < V; ++e) Sc[e] = gla_state_step(Sc[e], decay, k[c], v[e]);
          dq[t * K + c] = scale * dot(Sc, dout.data(), V);
        }
      }
      store_rows<T>(p.dq, bi, hi, t0, len, K, dq.data());
      init_state(p.dht, task, KV, dS.data());
      for (int64_t c = 0; c < K; ++c) run[c] = dot(&S[c * V], &dS[c * V], V);
      for (int64_t t = len - 1; t >= 0; --t) {
        load_rows<T>(p.q, bi, hi, t0 + t, 1, K, q.data());
        load_rows<T>(p.k, bi, hi, t0 + t, 1, K, k.data());
        load_rows<T>(p.g, bi, hi, t0 + t, 1, K, g.data());
        load_rows<T>(p.v, bi, hi, t0 + t, 1, V, v.data());
        load_rows<T>(p.dout, bi, hi, t0 + t, 1, V, dout.data());
        std::fill(dv.begin(), dv.end(), acc_t(0));
        for (int64_t c = 0; c < K; ++c) {
          acc_t* dSc = &dS[c * V];
          const acc_t qs = scale * q[c];
          for (int64_t e = 0; e < V; ++e) {
            dSc[e] = gla_state_step(dSc[e], acc_t(1), qs, dout[e]);
            dv[e] += k[c] * dSc[e];
          }
          dk[c] = dot(dSc, v.data(), V);
          run[c] += gla_dgate_term(q[c], dq[t * K + c], k[c], dk[c]);
          const acc_t log2g = gla_log2_gate(g[c]), decay = exp2_cpu(log2g);
          dg[c] = gla_gate_grad(run[c], log2g);
          for (int64_t e = 0; e < V; ++e) dSc[e] *= decay;
        }
        store_rows<T>(p.dk, bi, hi, t0 + t, 1, K, dk.data());
        store_rows<T>(p.dv, bi, hi, t0 + t, 1, V, dv.data());
        store_rows<T>(p.dg, bi, hi, t0 + t, 1, K, dg.data());
      }
      std::copy_n(dS.data(), KV, static_cast<acc_t*>(p.dh0) + task * KV);
    }
  });
}

}  // namespace

void chunk_gla_fwd_cpu(const GlaParams& p, const Varlen& varlen, DType dtype, const CpuGemm& gemm) {
  LINMIX_DTYPE_SWITCH(dtype, kDT, [&] { chunk_fwd_impl<kDT>(p, varlen, gemm); });
}
void chunk_gla_bwd_cpu(const GlaParams& p, const Varlen& varlen, DType dtype, const CpuGemm& gemm) {
  LINMIX_DTYPE_SWITCH(dtype, kDT, [&] { chunk_bwd_impl<kDT>(p, varlen, gemm); });
}
void fused_recurrent_gla_fwd_cpu(const GlaParams& p, const Varlen& varlen, DType dtype) {
  LINMIX_DTYPE_SWITCH(dtype, kDT, [&] { recurrent_fwd_impl<kDT>(p, varlen); });
}
void fused_recurrent_gla_bwd_cpu(const GlaParams& p, const Varlen& varlen, DType dtype) {
  LINMIX_DTYPE_SWITCH(dtype, kDT, [&] { recurrent_bwd_impl<kDT>(p, varlen); });
}

}  // namespace linmix
