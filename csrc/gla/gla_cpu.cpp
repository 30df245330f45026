// CPU gated linear attention: parallel over (batch, head) with at::parallel_for.
//
// chunk_gla runs the same chunked algorithm as the CUDA kernels (chunks of kGlaChunk, sub-chunks of
// kGlaSubChunk, diagonal sub-blocks elementwise, off-diagonal sub-blocks from rescaled q and k with a
// reference point at the query sub-chunk's first row); fused_recurrent_gla steps the recurrence.
// Rows are staged in accumulation-type buffers so every product and sum is fp32 (fp64 for fp64 inputs).
#include "gla/gla_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/cpu_types.h"
#include "common/static_switch.h"
#include "gla/gla_common.h"

namespace linmix {
namespace {

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

template <typename acc_t>
acc_t dot(const acc_t* x, const acc_t* y, int64_t n) {
  acc_t s = 0;
  for (int64_t c = 0; c < n; ++c) s += x[c] * y[c];
  return s;
}

// Everything one chunk of one (batch, head) needs, in the accumulation type.
template <typename acc_t>
struct ChunkBuffers {
  int64_t K, V;
  std::vector<acc_t> q, k, b, v;  // (C, K) x3, (C, V); b = log2-scaled inclusive cumsum of g in the chunk
  std::vector<acc_t> A;           // (C, C) intra-chunk scores, lower triangle
  std::vector<acc_t> xt, yt;      // (C, K) rescaled rows for the off-diagonal sub-blocks
  std::vector<acc_t> tmp;         // (K)
  ChunkBuffers(int64_t K_, int64_t V_)
      : K(K_), V(V_), q(kGlaChunk * K_), k(kGlaChunk * K_), b(kGlaChunk * K_), v(kGlaChunk * V_),
        A(kGlaChunk * kGlaChunk), xt(kGlaChunk * K_), yt(kGlaChunk * K_), tmp(K_) {}

  template <typename T>
  void load(const GlaParams& p, int64_t bi, int64_t hi, int64_t t0, int64_t L) {
    load_rows<T>(p.q, bi, hi, t0, L, K, q.data());
    load_rows<T>(p.k, bi, hi, t0, L, K, k.data());
    load_rows<T>(p.v, bi, hi, t0, L, V, v.data());
    load_rows<T>(p.g, bi, hi, t0, L, K, b.data());
    for (int64_t i = 0; i < L; ++i)
      for (int64_t c = 0; c < K; ++c)
        b[i * K + c] = (i ? b[(i - 1) * K + c] : acc_t(0)) + gla_log2_gate(b[i * K + c]);
  }

  // dst_i = src_i exp2(r - b_i) (toward_r) or src_i exp2(b_i - r), rows i in [i0, i1). Callers pick r
  // so that the exponent is <= 0: r at or after row i for toward_r, at or before it otherwise.
  void rescale(const std::vector<acc_t>& src, int64_t i0, int64_t i1, const acc_t* r, bool toward_r,
               std::vector<acc_t>& dst) const {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t c = 0; c < K; ++c) {
        const acc_t e = toward_r ? r[c] - b[i * K + c] : b[i * K + c] - r[c];
        dst[i * K + c] = src[i * K + c] * gla_exp2(e);
      }
  }

  // A_ij = sum_c q_ic k_jc exp2(b_ic - b_jc), j <= i < L. Off-diagonal sub-blocks: with r = b at the
  // first row of the query sub-chunk, b_i <= r <= b_j, so q~ = q exp2(b - r) and k~ = k exp2(r - b)
  // both have exponents <= 0 and A = q~ k~^T.
  void scores(int64_t L) {
    for (int64_t i0 = 0; i0 < L; i0 += kGlaSubChunk) {
      const int64_t i1 = std::min<int64_t>(i0 + kGlaSubChunk, L);
      if (i0 > 0) {
        const acc_t* r = &b[i0 * K];
        rescale(q, i0, i1, r, false, xt);
        rescale(k, 0, i0, r, true, yt);
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = 0; j < i0; ++j) A[i * kGlaChunk + j] = dot(&xt[i * K], &yt[j * K], K);
      }
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = i0; j <= i; ++j)
          A[i * kGlaChunk + j] = gla_diag_score(&q[i * K], &k[j * K], &b[i * K], &b[j * K], K);
    }
  }

  // Given dA (lower triangle), accumulates dq_i += sum_{j<=i} dA_ij k_j exp2(b_i - b_j) and
  // dk_j += sum_{i>=j} dA_ij q_i exp2(b_i - b_j), with the same sub-chunk split as scores().
  void scores_backward(int64_t L, const std::vector<acc_t>& dA, acc_t* dq, acc_t* dk) {
    for (int64_t i0 = 0; i0 < L; i0 += kGlaSubChunk) {
      const int64_t i1 = std::min<int64_t>(i0 + kGlaSubChunk, L);
      if (i0 > 0) {
        const acc_t* r = &b[i0 * K];
        rescale(q, i0, i1, r, false, xt);  // q~ (query sub-chunk)
        rescale(k, 0, i0, r, true, yt);    // k~ (all earlier keys)
        for (int64_t i = i0; i < i1; ++i) {
          std::fill(tmp.begin(), tmp.end(), acc_t(0));
          for (int64_t j = 0; j < i0; ++j) {
            const acc_t a = dA[i * kGlaChunk + j];
            for (int64_t c = 0; c < K; ++c) tmp[c] += a * yt[j * K + c];
          }
          for (int64_t c = 0; c < K; ++c) dq[i * K + c] += tmp[c] * gla_exp2(b[i * K + c] - r[c]);
        }
        for (int64_t j = 0; j < i0; ++j) {
          std::fill(tmp.begin(), tmp.end(), acc_t(0));
          for (int64_t i = i0; i < i1; ++i) {
            const acc_t a = dA[i * kGlaChunk + j];
            for (int64_t c = 0; c < K; ++c) tmp[c] += a * xt[i * K + c];
          }
          for (int64_t c = 0; c < K; ++c) dk[j * K + c] += tmp[c] * gla_exp2(r[c] - b[j * K + c]);
        }
      }
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = i0; j <= i; ++j) {
          const acc_t a = dA[i * kGlaChunk + j];
          for (int64_t c = 0; c < K; ++c) {
            const acc_t e = a * gla_exp2(b[i * K + c] - b[j * K + c]);
            dq[i * K + c] += e * k[j * K + c];
            dk[j * K + c] += e * q[i * K + c];
          }
        }
    }
  }

  // S <- diag(exp2 b_last) S + sum_j (k_j exp2(b_last - b_j))^T v_j   (S: (K, V))
  void advance_state(int64_t L, acc_t* S) {
    const acc_t* bl = &b[(L - 1) * K];
    rescale(k, 0, L, bl, true, yt);
    for (int64_t c = 0; c < K; ++c) {
      const acc_t decay = gla_exp2(bl[c]);
      acc_t* Sc = S + c * V;
      for (int64_t e = 0; e < V; ++e) Sc[e] *= decay;
      for (int64_t j = 0; j < L; ++j) {
        const acc_t kc = yt[j * K + c];
        for (int64_t e = 0; e < V; ++e) Sc[e] = gla_state_step(Sc[e], acc_t(1), kc, v[j * V + e]);
      }
    }
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
void chunk_fwd_impl(const GlaParams& p) {
  using T = cpu_t<dt>;
  using acc_t = cpu_acc_t<dt>;
  const int64_t K = p.dim_k, V = p.dim_v, KV = K * V;
  const acc_t scale = static_cast<acc_t>(p.scale);
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    ChunkBuffers<acc_t> cb(K, V);
    std::vector<acc_t> S(KV), o(kGlaChunk * V);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / p.heads, hi = task % p.heads;
      init_state(p.h0, task, KV, S.data());
      for (int64_t t0 = 0; t0 < p.seqlen; t0 += kGlaChunk) {
        const int64_t L = std::min<int64_t>(kGlaChunk, p.seqlen - t0);
        cb.template load<T>(p, bi, hi, t0, L);
        cb.scores(L);
        // o_i = scale (q_i exp2(b_i)) S + scale sum_{j<=i} A_ij v_j
        for (int64_t i = 0; i < L; ++i) {
          acc_t* oi = &o[i * V];
          std::fill_n(oi, V, acc_t(0));
          for (int64_t c = 0; c < K; ++c) {
            const acc_t qc = cb.q[i * K + c] * gla_exp2(cb.b[i * K + c]);
            for (int64_t e = 0; e < V; ++e) oi[e] += qc * S[c * V + e];
          }
          for (int64_t j = 0; j <= i; ++j) {
            const acc_t a = cb.A[i * kGlaChunk + j];
            for (int64_t e = 0; e < V; ++e) oi[e] += a * cb.v[j * V + e];
          }
          for (int64_t e = 0; e < V; ++e) oi[e] *= scale;
        }
        store_rows<T>(p.o, bi, hi, t0, L, V, o.data());
        cb.advance_state(L, S.data());
      }
      std::copy_n(S.data(), KV, static_cast<acc_t*>(p.ht) + task * KV);
    }
  });
}

// Backward of one (batch, head), chunk by chunk in reverse with dS = dL/d(state after the chunk):
//   dA_ij = scale do_i . v_j                       (j <= i)
//   dv_j  = scale sum_{i>=j} A_ij do_i + k^_j dS   (k^_j = k_j exp(b_last - b_j))
//   dq_i  = scale exp(b_i) (S_in do_i) + sum_{j<=i} dA_ij k_j exp(b_i - b_j)
//   dk_j  = sum_{i>=j} dA_ij q_i exp(b_i - b_j) + exp(b_last - b_j) (dS v_j)
//   dg_t  = sum_{s>=t in chunk} (q dq - k dk)_s + sum_v (S_out dS)[:, v]   (closed form)
//   dS_in = exp(b_last) dS + scale sum_i (q_i exp(b_i))^T do_i
// The chunk-entry states are recomputed by a forward state pass at the start of the backward.
template <DType dt>
void chunk_bwd_impl(const GlaParams& p) {
  using T = cpu_t<dt>;
  using acc_t = cpu_acc_t<dt>;
  const int64_t K = p.dim_k, V = p.dim_v, KV = K * V;
  const int64_t n_chunks = ceil_div(p.seqlen, kGlaChunk);
  const acc_t scale = static_cast<acc_t>(p.scale);
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    ChunkBuffers<acc_t> cb(K, V);
    std::vector<acc_t> states((n_chunks + 1) * KV);  // state entering chunk c; the last is the final state
    std::vector<acc_t> dS(KV), dout(kGlaChunk * V), dA(kGlaChunk * kGlaChunk);
    std::vector<acc_t> dq(kGlaChunk * K), dk(kGlaChunk * K), dv(kGlaChunk * V), dg(kGlaChunk * K);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / p.heads, hi = task % p.heads;
      init_state(p.h0, task, KV, states.data());
      for (int64_t c = 0; c < n_chunks; ++c) {
        const int64_t t0 = c * kGlaChunk, L = std::min<int64_t>(kGlaChunk, p.seqlen - t0);
        cb.template load<T>(p, bi, hi, t0, L);
        std::copy_n(&states[c * KV], KV, &states[(c + 1) * KV]);
        cb.advance_state(L, &states[(c + 1) * KV]);
      }
      init_state(p.dht, task, KV, dS.data());
      for (int64_t c = n_chunks - 1; c >= 0; --c) {
        const int64_t t0 = c * kGlaChunk, L = std::min<int64_t>(kGlaChunk, p.seqlen - t0);
        const acc_t* S_in = &states[c * KV];
        const acc_t* S_out = &states[(c + 1) * KV];
        cb.template load<T>(p, bi, hi, t0, L);
        load_rows<T>(p.dout, bi, hi, t0, L, V, dout.data());
        for (acc_t& x : dout) x *= scale;  // rows past L are never read
        cb.scores(L);
        for (int64_t i = 0; i < L; ++i)
          for (int64_t j = 0; j <= i; ++j) dA[i * kGlaChunk + j] = dot(&dout[i * V], &cb.v[j * V], V);
        // dv
        const acc_t* bl = &cb.b[(L - 1) * K];
        cb.rescale(cb.k, 0, L, bl, true, cb.yt);  // k^
        for (int64_t j = 0; j < L; ++j) {
          acc_t* dvj = &dv[j * V];
          std::fill_n(dvj, V, acc_t(0));
          for (int64_t i = j; i < L; ++i) {
            const acc_t a = cb.A[i * kGlaChunk + j];
            for (int64_t e = 0; e < V; ++e) dvj[e] += a * dout[i * V + e];
          }
          for (int64_t kc = 0; kc < K; ++kc) {
            const acc_t kh = cb.yt[j * K + kc];
            for (int64_t e = 0; e < V; ++e) dvj[e] += kh * dS[kc * V + e];
          }
        }
        // inter-chunk parts of dq and dk
        for (int64_t i = 0; i < L; ++i)
          for (int64_t kc = 0; kc < K; ++kc) {
            dq[i * K + kc] = gla_exp2(cb.b[i * K + kc]) * dot(&S_in[kc * V], &dout[i * V], V);
            dk[i * K + kc] = gla_exp2(bl[kc] - cb.b[i * K + kc]) * dot(&dS[kc * V], &cb.v[i * V], V);
          }
        cb.scores_backward(L, dA, dq.data(), dk.data());
        // dg: reverse cumsum within the chunk plus the chunk-boundary term
        for (int64_t kc = 0; kc < K; ++kc) {
          acc_t run = dot(&S_out[kc * V], &dS[kc * V], V);
          for (int64_t i = L - 1; i >= 0; --i) {
            run += gla_dgate_term(cb.q[i * K + kc], dq[i * K + kc], cb.k[i * K + kc], dk[i * K + kc]);
            dg[i * K + kc] = run;
          }
        }
        // dS <- exp(b_last) dS + sum_i (q_i exp(b_i))^T (scale do_i)
        for (int64_t kc = 0; kc < K; ++kc) {
          acc_t* dSc = &dS[kc * V];
          const acc_t decay = gla_exp2(bl[kc]);
          for (int64_t e = 0; e < V; ++e) dSc[e] *= decay;
          for (int64_t i = 0; i < L; ++i) {
            const acc_t qh = cb.q[i * K + kc] * gla_exp2(cb.b[i * K + kc]);
            for (int64_t e = 0; e < V; ++e) dSc[e] += qh * dout[i * V + e];
          }
        }
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
          const acc_t decay = gla_exp2(gla_log2_gate(g[c]));
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
// dg is the closed form over the whole sequence: reverse cumsum of (q dq - k dk) + sum_v S_T dS_T.
template <DType dt>
void recurrent_bwd_impl(const GlaParams& p) {
  using T = cpu_t<dt>;
  using acc_t = cpu_acc_t<dt>;
  const int64_t K = p.dim_k, V = p.dim_v, KV = K * V;
  const acc_t scale = static_cast<acc_t>(p.scale);
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> S(KV), dS(KV), q(K), k(K), g(K), v(V), dout(V), dk(K), dv(V), run(K);
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
          const acc_t decay = gla_exp2(gla_log2_gate(g[c]));
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
          const acc_t decay = gla_exp2(gla_log2_gate(g[c]));
          for (int64_t e = 0; e < V; ++e) dSc[e] *= decay;
        }
        store_rows<T>(p.dk, bi, hi, t, 1, K, dk.data());
        store_rows<T>(p.dv, bi, hi, t, 1, V, dv.data());
        store_rows<T>(p.dg, bi, hi, t, 1, K, run.data());
      }
      std::copy_n(dS.data(), KV, static_cast<acc_t*>(p.dh0) + task * KV);
    }
  });
}

}  // namespace

void chunk_gla_fwd_cpu(const GlaParams& p, DType dtype) {
  LINMIX_DTYPE_SWITCH(dtype, kDT, [&] { chunk_fwd_impl<kDT>(p); });
}
void chunk_gla_bwd_cpu(const GlaParams& p, DType dtype) {
  LINMIX_DTYPE_SWITCH(dtype, kDT, [&] { chunk_bwd_impl<kDT>(p); });
}
void fused_recurrent_gla_fwd_cpu(const GlaParams& p, DType dtype) {
  LINMIX_DTYPE_SWITCH(dtype, kDT, [&] { recurrent_fwd_impl<kDT>(p); });
}
void fused_recurrent_gla_bwd_cpu(const GlaParams& p, DType dtype) {
  LINMIX_DTYPE_SWITCH(dtype, kDT, [&] { recurrent_bwd_impl<kDT>(p); });
}

}  // namespace linmix
