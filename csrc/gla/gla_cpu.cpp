// CPU gated linear attention: parallel over (batch, head) with at::parallel_for.
//
// chunk_gla runs the chunked algorithm of the CUDA kernels with the segment-sum decays of the chunk-parallel ones
// (chunks of kGlaChunk, sub-chunks of kGlaSubChunk, diagonal sub-blocks elementwise from direct segment sums,
// off-diagonal sub-blocks from q and k rescaled by sub-chunk prefix and suffix sums, split at the query
// sub-chunk's first row; see gla_common.h). Every product over (chunk x K), (chunk x chunk)
// or (K x V) tiles is one call of the BLAS GEMM the torch glue passes in (CpuGemm); what is left is
// elementwise (gate rescaling, the diagonal sub-blocks, dg) and written so the compiler vectorises it.
// fused_recurrent_gla steps the recurrence. Rows are staged in accumulation-type buffers so every
// product and sum is fp32 (fp64 for fp64 inputs).
#include "gla/gla_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/cpu_types.h"
#include "common/static_switch.h"
#include "common/exp2_cpu.h"
#include "gla/gla_common.h"

namespace linmix {
namespace {

constexpr int64_t C = kGlaChunk;

// Copies rows t0 .. t0+L-1 of (batch b, head h) into dst (L, n) in the accumulation type.
template <typename T, typename acc_t>
void load_rows(const BTHView& x, int64_t b, int64_t h, int64_t t0, int64_t L, int64_t n, acc_t* dst) {
  for (int64_t i = 0; i < L; ++i) {
    const T* src = gla_row<const T>(x, b, t0 + i, h);
    for (int64_t c = 0; c < n; ++c) dst[i * n + c] = static_cast<acc_t>(src[c]);
  }
}

template <typename T, typename acc_t>
void store_rows(const BTHView& x, int64_t b, int64_t h, int64_t t0, int64_t L, int64_t n, const acc_t* src) {
  for (int64_t i = 0; i < L; ++i) {
    T* out = gla_row<T>(x, b, t0 + i, h);
    for (int64_t c = 0; c < n; ++c) out[c] = static_cast<T>(src[i * n + c]);
  }
}

// The hot elementwise loops carry `omp simd` (the build passes -fopenmp): it lets the
// compiler vectorise the float sums (a reordering it may not do on its own) and the inlined exp2_cpu.
#define LINMIX_SIMD _Pragma("omp simd")
#define LINMIX_SIMD_SUM(s) _Pragma("omp simd reduction(+ : s)")
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

// One row i of a diagonal sub-block, j from i down to the sub-chunk's first row j0: with the running
// per-channel segment sum e = sum_{j < m <= i} a_m (Mamba-2's segsum, never a difference of running sums),
// A_row[j] = sum_c q_ic k_jc exp2(e_c). e (K) is scratch.
template <typename acc_t>
LINMIX_NOINLINE void diag_scores_row(const acc_t* q_i, const acc_t* k, const acc_t* a, int64_t i, int64_t j0, int64_t K,
                                     acc_t* e, acc_t* A_row) {
  std::fill_n(e, K, acc_t(0));
  for (int64_t j = i; j >= j0; --j) {
    const acc_t *kj = &k[j * K], *aj = &a[j * K];
    acc_t s = 0;
    LINMIX_SIMD_SUM(s)
    for (int64_t c = 0; c < K; ++c) {
      s += q_i[c] * kj[c] * exp2_cpu(e[c]);
      e[c] += aj[c];
    }
    A_row[j] = s;
  }
}

// The backward of diag_scores_row: dq_i += sum_j dA_ij k_j exp2(e), dk_j += dA_ij q_i exp2(e).
template <typename acc_t>
LINMIX_NOINLINE void diag_scores_row_backward(const acc_t* q_i, const acc_t* k, const acc_t* a, const acc_t* dA_row,
                                              int64_t i, int64_t j0, int64_t K, acc_t* e, acc_t* dq_i, acc_t* dk) {
  std::fill_n(e, K, acc_t(0));
  for (int64_t j = i; j >= j0; --j) {
    const acc_t *kj = &k[j * K], *aj = &a[j * K];
    acc_t* dkj = &dk[j * K];
    const acc_t d = dA_row[j];
    LINMIX_SIMD
    for (int64_t c = 0; c < K; ++c) {
      const acc_t w = d * exp2_cpu(e[c]);
      dq_i[c] += w * kj[c];
      dkj[c] += w * q_i[c];
      e[c] += aj[c];
    }
  }
}

// Everything one chunk of one (batch, head) needs, in the accumulation type. Decays come from segment sums
// (gla_common.h): per sub-chunk J of kGlaSubChunk rows, pre (inclusive prefix from the sub-chunk's start),
// suf (exclusive suffix to its end) and tot (its total); a decay across several sub-chunks adds the totals
// of the whole ones between. No decay is a difference of sums, so a gate of -inf gives an exact 0.
template <typename acc_t>
struct ChunkBuffers {
  int64_t K, V, L = 0, n_sub = 0;
  CpuGemmFn<acc_t> gemm_fn;
  std::vector<acc_t> q, k, a, v;   // (C, K) x3, (C, V); a = log2 gates, zero past row L to the sub-chunk's end
  std::vector<acc_t> pre, suf;     // (C, K) sub-chunk prefix / suffix sums of a
  std::vector<acc_t> tot, before;  // (C / 16, K) sub-chunk totals; totals of all earlier sub-chunks
  std::vector<acc_t> etot;         // (K) exp2(chunk total): the decay across the whole chunk
  std::vector<acc_t> eq, ek;       // (C, K): exp2 of the decay from the chunk's start to row i, from row j to its end
  std::vector<acc_t> epre, xq;     // (C, K): exp2(pre) and q exp2(pre), the query side of off-diagonal sub-blocks
  std::vector<acc_t> fk, yt;       // (C, K): key-side factors of off-diagonal sub-blocks, and k fk
  std::vector<acc_t> A;            // (C, C) intra-chunk scores, lower triangle; the upper one stays 0
  std::vector<acc_t> tmp, e;       // (C, K), (K)
  ChunkBuffers(int64_t K_, int64_t V_, CpuGemmFn<acc_t> gemm)
      : K(K_), V(V_), gemm_fn(gemm), q(C * K_), k(C * K_), a(C * K_), v(C * V_), pre(C * K_), suf(C * K_),
        tot(kGlaSubChunks * K_), before(kGlaSubChunks * K_), etot(K_), eq(C * K_), ek(C * K_), epre(C * K_),
        xq(C * K_), fk(C * K_), yt(C * K_), A(C * C), tmp(C * K_), e(K_) {}

  void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t kk, acc_t alpha, const acc_t* a_, int64_t lda,
            const acc_t* bm, int64_t ldb, acc_t beta, acc_t* c, int64_t ldc) const {
    if (m > 0 && n > 0 && kk > 0) gemm_fn(ta, tb, m, n, kk, alpha, a_, lda, bm, ldb, beta, c, ldc);
  }

  // Loads rows t0 .. t0+L-1 and the gate sums and factors. Only the rows the kernel reads are written.
  template <typename T>
  void load(const GlaParams& p, int64_t bi, int64_t hi, int64_t t0, int64_t L_, bool with_q = true) {
    L = L_;
    n_sub = ceil_div(L, int64_t(kGlaSubChunk));
    if (with_q) load_rows<T>(p.q, bi, hi, t0, L, K, q.data());
    load_rows<T>(p.k, bi, hi, t0, L, K, k.data());
    load_rows<T>(p.v, bi, hi, t0, L, V, v.data());
    load_rows<T>(p.g, bi, hi, t0, L, K, a.data());
    for (int64_t x = 0; x < L * K; ++x) a[x] = gla_log2_gate(a[x]);
    std::fill(a.begin() + L * K, a.begin() + n_sub * kGlaSubChunk * K, acc_t(0));
    for (int64_t J = 0; J < n_sub; ++J) {
      const int64_t r0 = J * kGlaSubChunk * K;
      for (int64_t c = 0; c < K; ++c)
        tot[J * K + c] = gla_subchunk_sums(&a[r0 + c], K, kGlaSubChunk, &pre[r0 + c], &suf[r0 + c]);
    }
    for (int64_t c = 0; c < K; ++c) {
      for (int64_t J = 0; J < n_sub; ++J) before[J * K + c] = gla_span(&tot[c], K, 0, int(J));
      etot[c] = exp2_cpu(gla_span(&tot[c], K, 0, int(n_sub)));
    }
    for (int64_t J = 0; J < n_sub; ++J) {
      for (int64_t c = 0; c < K; ++c) tmp[c] = gla_span(&tot[c], K, int(J) + 1, int(n_sub));  // after sub-chunk J
      const acc_t *bef = &before[J * K], *aft = tmp.data();
      for (int64_t i = J * kGlaSubChunk; i < std::min<int64_t>((J + 1) * kGlaSubChunk, L); ++i) {
        LINMIX_SIMD
        for (int64_t c = 0; c < K; ++c) {
          const int64_t x = i * K + c;
          eq[x] = exp2_cpu(bef[c] + pre[x]);
          ek[x] = exp2_cpu(suf[x] + aft[c]);
          epre[x] = exp2_cpu(pre[x]);
        }
      }
    }
    if (with_q) mul_rows(q.data(), epre.data(), 0, L, xq.data());
  }

  // dst_i = src_i * f_i elementwise over rows [i0, i1) of (C, K) buffers.
  void mul_rows(const acc_t* src, const acc_t* f, int64_t i0, int64_t i1, acc_t* dst) const {
    LINMIX_SIMD
    for (int64_t x = i0 * K; x < i1 * K; ++x) dst[x] = src[x] * f[x];
  }

  // Key side of the off-diagonal sub-blocks of query sub-chunk I: for every row j before it (in sub-chunk J),
  // fk_j = exp2(suf_j + totals of sub-chunks J+1 .. I-1), the decay from j to the end of row 16 I - 1; yt = k fk.
  LINMIX_NOINLINE void key_factors(int64_t I) {
    for (int64_t J = 0; J < I; ++J) {
      for (int64_t c = 0; c < K; ++c) tmp[c] = gla_span(&tot[c], K, int(J) + 1, int(I));
      const acc_t* mid = tmp.data();
      for (int64_t j = J * kGlaSubChunk; j < (J + 1) * kGlaSubChunk; ++j) {
        LINMIX_SIMD
        for (int64_t c = 0; c < K; ++c) {
          const int64_t x = j * K + c;
          fk[x] = exp2_cpu(suf[x] + mid[c]);
          yt[x] = k[x] * fk[x];
        }
      }
    }
  }

  // A_ij = sum_c q_ic k_jc (decay from j to i), j <= i < L. Off-diagonal sub-blocks: the decay splits at
  // row 16 I into exp2(pre_i) exp2(fk_j), so A[i0:i1, :i0] = xq yt^T, one GEMM per sub-chunk; diagonal
  // sub-blocks elementwise from direct segment sums.
  void scores() {
    std::fill(A.begin(), A.end(), acc_t(0));
    for (int64_t I = 0; I < n_sub; ++I) {
      const int64_t i0 = I * kGlaSubChunk, i1 = std::min<int64_t>(i0 + kGlaSubChunk, L);
      if (I > 0) {
        key_factors(I);
        gemm(false, true, i1 - i0, i0, K, 1, &xq[i0 * K], K, yt.data(), K, 0, &A[i0 * C], C);  // (i1-i0, i0)
      }
      for (int64_t i = i0; i < i1; ++i) diag_scores_row(&q[i * K], k.data(), a.data(), i, i0, K, e.data(), &A[i * C]);
    }
  }

  // Given dA (lower triangle read), accumulates dq_i += sum_{j<=i} dA_ij k_j (decay j -> i) and
  // dk_j += sum_{i>=j} dA_ij q_i (decay j -> i), with the same sub-chunk split as scores().
  void scores_backward(const std::vector<acc_t>& dA, acc_t* dq, acc_t* dk) {
    for (int64_t I = 0; I < n_sub; ++I) {
      const int64_t i0 = I * kGlaSubChunk, i1 = std::min<int64_t>(i0 + kGlaSubChunk, L), n = i1 - i0;
      if (I > 0) {
        key_factors(I);
        // dq[i0:i1] += (dA[i0:i1, :i0] yt) exp2(pre)
        gemm(false, false, n, K, i0, 1, &dA[i0 * C], C, yt.data(), K, 0, tmp.data(), K);  // (n, K)
        LINMIX_SIMD
        for (int64_t x = 0; x < n * K; ++x) dq[i0 * K + x] += tmp[x] * epre[i0 * K + x];
        // dk[:i0] += (dA[i0:i1, :i0]^T xq) fk
        gemm(true, false, i0, K, n, 1, &dA[i0 * C], C, &xq[i0 * K], K, 0, tmp.data(), K);  // (i0, K)
        LINMIX_SIMD
        for (int64_t x = 0; x < i0 * K; ++x) dk[x] += tmp[x] * fk[x];
      }
      for (int64_t i = i0; i < i1; ++i)
        diag_scores_row_backward(&q[i * K], k.data(), a.data(), &dA[i * C], i, i0, K, e.data(), &dq[i * K], dk);
    }
  }

  // S <- diag(etot) S + sum_j (k_j ek_j)^T v_j   (S: (K, V))
  void advance_state(acc_t* S) {
    for (int64_t c = 0; c < K; ++c)
      for (int64_t x = 0; x < V; ++x) S[c * V + x] *= etot[c];
    mul_rows(k.data(), ek.data(), 0, L, yt.data());                     // k^ (L, K)
    gemm(true, false, K, V, L, 1, yt.data(), K, v.data(), V, 1, S, V);  // S += k^T v
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
void chunk_fwd_impl(const GlaParams& p, const CpuGemm& gemm) {
  using T = cpu_t<dt>;
  using acc_t = cpu_acc_t<dt>;
  const int64_t K = p.dim_k, V = p.dim_v, KV = K * V;
  const acc_t scale = static_cast<acc_t>(p.scale);
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    ChunkBuffers<acc_t> cb(K, V, pick_gemm<acc_t>(gemm));
    std::vector<acc_t> S(KV), o(C * V), qe(C * K);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / p.heads, hi = task % p.heads;
      init_state(p.h0, task, KV, S.data());
      for (int64_t t0 = 0; t0 < p.seqlen; t0 += C) {
        const int64_t L = std::min<int64_t>(C, p.seqlen - t0);
        cb.template load<T>(p, bi, hi, t0, L);
        // o = scale (q eq) S + scale A v
        cb.mul_rows(cb.q.data(), cb.eq.data(), 0, L, qe.data());
        cb.gemm(false, false, L, V, K, scale, qe.data(), K, S.data(), V, 0, o.data(), V);
        cb.scores();
        cb.gemm(false, false, L, V, L, scale, cb.A.data(), C, cb.v.data(), V, 1, o.data(), V);
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
void chunk_bwd_impl(const GlaParams& p, const CpuGemm& gemm) {
  using T = cpu_t<dt>;
  using acc_t = cpu_acc_t<dt>;
  const int64_t K = p.dim_k, V = p.dim_v, KV = K * V;
  const int64_t n_chunks = ceil_div(p.seqlen, C);
  const acc_t scale = static_cast<acc_t>(p.scale);
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    ChunkBuffers<acc_t> cb(K, V, pick_gemm<acc_t>(gemm));
    std::vector<acc_t> states((n_chunks + 1) * KV);  // state entering chunk c; the last is the final state
    std::vector<acc_t> dS(KV), dout(C * V), dA(C * C), run(K);
    std::vector<acc_t> dq(C * K), dk(C * K), dv(C * V), dg(C * K), qe(C * K);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / p.heads, hi = task % p.heads;
      init_state(p.h0, task, KV, states.data());
      for (int64_t c = 0; c < n_chunks; ++c) {
        const int64_t t0 = c * C, L = std::min<int64_t>(C, p.seqlen - t0);
        cb.template load<T>(p, bi, hi, t0, L, /*with_q=*/false);
        std::copy_n(&states[c * KV], KV, &states[(c + 1) * KV]);
        cb.advance_state(&states[(c + 1) * KV]);
      }
      init_state(p.dht, task, KV, dS.data());
      for (int64_t c = n_chunks - 1; c >= 0; --c) {
        const int64_t t0 = c * C, L = std::min<int64_t>(C, p.seqlen - t0);
        const acc_t* S_in = &states[c * KV];
        const acc_t* S_out = &states[(c + 1) * KV];
        cb.template load<T>(p, bi, hi, t0, L);
        load_rows<T>(p.dout, bi, hi, t0, L, V, dout.data());
        for (int64_t x = 0; x < L * V; ++x) dout[x] *= scale;
        cb.scores();
        cb.gemm(false, true, L, L, V, 1, dout.data(), V, cb.v.data(), V, 0, dA.data(), C);  // (L, L); lower read
        // dv = A^T do + k^ dS
        cb.mul_rows(cb.k.data(), cb.ek.data(), 0, L, cb.yt.data());  // k^
        cb.gemm(true, false, L, V, L, 1, cb.A.data(), C, dout.data(), V, 0, dv.data(), V);
        cb.gemm(false, false, L, V, K, 1, cb.yt.data(), K, dS.data(), V, 1, dv.data(), V);
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
            dg[x] = gla_gate_grad(run[kc], cb.a[x]);
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
void recurrent_fwd_impl(const GlaParams& p) {
  using T = cpu_t<dt>;
  using acc_t = cpu_acc_t<dt>;
  const int64_t K = p.dim_k, V = p.dim_v, KV = K * V;
  const acc_t scale = static_cast<acc_t>(p.scale);
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> S(KV), q(K), k(K), g(K), v(V), o(V);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / p.heads, hi = task % p.heads;
      init_state(p.h0, task, KV, S.data());
      for (int64_t t = 0; t < p.seqlen; ++t) {
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
void recurrent_bwd_impl(const GlaParams& p) {
  using T = cpu_t<dt>;
  using acc_t = cpu_acc_t<dt>;
  const int64_t K = p.dim_k, V = p.dim_v, KV = K * V;
  const acc_t scale = static_cast<acc_t>(p.scale);
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> S(KV), dS(KV), q(K), k(K), g(K), v(V), dout(V), dk(K), dv(V), run(K), dg(K);
    std::vector<acc_t> dq(p.seqlen * K);  // kept in the accumulation type for the dg sum
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / p.heads, hi = task % p.heads;
      init_state(p.h0, task, KV, S.data());
      for (int64_t t = 0; t < p.seqlen; ++t) {
        load_rows<T>(p.k, bi, hi, t, 1, K, k.data());
        load_rows<T>(p.g, bi, hi, t, 1, K, g.data());
        load_rows<T>(p.v, bi, hi, t, 1, V, v.data());
        load_rows<T>(p.dout, bi, hi, t, 1, V, dout.data());
        for (int64_t c = 0; c < K; ++c) {
          const acc_t decay = exp2_cpu(gla_log2_gate(g[c]));
          acc_t* Sc = &S[c * V];
          for (int64_t e = 0; e < V; ++e) Sc[e] = gla_state_step(Sc[e], decay, k[c], v[e]);
          dq[t * K + c] = scale * dot(Sc, dout.data(), V);
        }
      }
      store_rows<T>(p.dq, bi, hi, 0, p.seqlen, K, dq.data());
      init_state(p.dht, task, KV, dS.data());
      for (int64_t c = 0; c < K; ++c) run[c] = dot(&S[c * V], &dS[c * V], V);
      for (int64_t t = p.seqlen - 1; t >= 0; --t) {
        load_rows<T>(p.q, bi, hi, t, 1, K, q.data());
        load_rows<T>(p.k, bi, hi, t, 1, K, k.data());
        load_rows<T>(p.g, bi, hi, t, 1, K, g.data());
        load_rows<T>(p.v, bi, hi, t, 1, V, v.data());
        load_rows<T>(p.dout, bi, hi, t, 1, V, dout.data());
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
          const acc_t a = gla_log2_gate(g[c]), decay = exp2_cpu(a);
          dg[c] = gla_gate_grad(run[c], a);
          for (int64_t e = 0; e < V; ++e) dSc[e] *= decay;
        }
        store_rows<T>(p.dk, bi, hi, t, 1, K, dk.data());
        store_rows<T>(p.dv, bi, hi, t, 1, V, dv.data());
        store_rows<T>(p.dg, bi, hi, t, 1, K, dg.data());
      }
      std::copy_n(dS.data(), KV, static_cast<acc_t*>(p.dh0) + task * KV);
    }
  });
}

}  // namespace

void chunk_gla_fwd_cpu(const GlaParams& p, DType dtype, const CpuGemm& gemm) {
  LINMIX_DTYPE_SWITCH(dtype, kDT, [&] { chunk_fwd_impl<kDT>(p, gemm); });
}
void chunk_gla_bwd_cpu(const GlaParams& p, DType dtype, const CpuGemm& gemm) {
  LINMIX_DTYPE_SWITCH(dtype, kDT, [&] { chunk_bwd_impl<kDT>(p, gemm); });
}
void fused_recurrent_gla_fwd_cpu(const GlaParams& p, DType dtype) {
  LINMIX_DTYPE_SWITCH(dtype, kDT, [&] { recurrent_fwd_impl<kDT>(p); });
}
void fused_recurrent_gla_bwd_cpu(const GlaParams& p, DType dtype) {
  LINMIX_DTYPE_SWITCH(dtype, kDT, [&] { recurrent_bwd_impl<kDT>(p); });
}

}  // namespace linmix
