// CPU fixed-point RNN: parallel over batch elements, or packed sequences (each converges on its own, or, with a
// batch quantile, the batch iterates together); inside an element the iteration is one fused pass over time: per token the
// Householder mix on a row of D channels, then the scan step, then the token's convergence ratio. The
// arithmetic is fixed_point_rnn_common.h's.
#include "fixed_point_rnn/fixed_point_rnn_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "common/cpu_kernel.h"
#include "common/cpu_types.h"
#include "common/parallel.h"
#include "common/static_switch.h"
#include "fixed_point_rnn/fixed_point_rnn_common.h"

namespace linmix {
namespace {

// The first token of sequence n (batch element n, or packed span n) in the (B, T, ...) tensors, and its length.
inline std::pair<int64_t, int64_t> sequence_tokens(const FixedPointRnnVarlenParams& p, int64_t n) {
  const SeqSpan seq = p.varlen.span(n, p.seqlen);
  return {seq.first(p.seqlen), seq.len};
}

// One batch element's (or packed sequence's) inputs, converted on the fly to the accumulation type, and its
// per-token Gram matrices G_ij = u_i · u_j (computed once; every iteration reuses them).
template <typename T, typename acc_t>
struct Element {
  int64_t tok0;      // its first token in the (B, T, ...) tensors
  const T* u;        // (T, D)
  const T* lam;      // (T, D)
  const T* hh_u;     // (T, R, D)
  const T* hh_beta;  // (T, R)
  int64_t T_, D;
  int R;
  std::vector<acc_t> gram;     // (T, R, R)
  std::vector<acc_t> factors;  // (T, D, R): the factors channel-major, so a channel's R values are adjacent
  std::vector<acc_t> h0;       // (D,) the state before token 0

  Element(const FixedPointRnnVarlenParams& p, int64_t n) : Element(p, n, sequence_tokens(p, n)) {}
  Element(const FixedPointRnnVarlenParams& p, int64_t n, std::pair<int64_t, int64_t> tokens)
      : tok0(tokens.first), u(static_cast<const T*>(p.u) + tok0 * p.dim),
        lam(static_cast<const T*>(p.lam) + tok0 * p.dim),
        hh_u(static_cast<const T*>(p.hh_u) + tok0 * p.rank * p.dim),
        hh_beta(static_cast<const T*>(p.hh_beta) + tok0 * p.rank),
        T_(tokens.second), D(p.dim), R(static_cast<int>(p.rank)), gram(T_ * p.rank * p.rank),
        factors(T_ * p.dim * p.rank), h0(p.dim, acc_t(0)) {
    if (p.h0 != nullptr) {
      const T* g_h0 = static_cast<const T*>(p.h0) + n * p.dim;
      for (int64_t d = 0; d < D; ++d) h0[d] = static_cast<acc_t>(g_h0[d]);
    }
    build_factors();
  }

  // The channel-major factors and the Gram matrices (in the AVX clones: with 10 iterations this setup costs
  // about as much as three of them).
  LINMIX_CPU_CLONES void build_factors() {
    for (int64_t t = 0; t < T_; ++t) {
      for (int i = 0; i < R; ++i) {
        const T* ui = factor(t, i);
        acc_t* f = factors.data() + t * D * R + i;
        LINMIX_SIMD
        for (int64_t d = 0; d < D; ++d) f[d * R] = static_cast<acc_t>(ui[d]);
      }
      acc_t* g = gram.data() + t * R * R;
      for (int i = 0; i < R; ++i) {
        for (int j = 0; j <= i; ++j) {
          const T *ui = factor(t, i), *uj = factor(t, j);
          acc_t sum = 0;
          LINMIX_SIMD_SUM(sum)
          for (int64_t d = 0; d < D; ++d) sum += static_cast<acc_t>(ui[d]) * static_cast<acc_t>(uj[d]);
          g[i * R + j] = g[j * R + i] = sum;
        }
      }
    }
  }

  const T* factor(int64_t t, int i) const { return hh_u + (t * R + i) * D; }
  acc_t lam_at(int64_t t, int64_t d) const { return static_cast<acc_t>(lam[t * D + d]); }
  const acc_t* gram_at(int64_t t) const { return gram.data() + t * R * R; }
  LINMIX_CPU_INLINE void betas(int64_t t, acc_t* beta) const {
    for (int i = 0; i < R; ++i) beta[i] = static_cast<acc_t>(hh_beta[t * R + i]);
  }
  // a_i = u_i · v for every factor of token t.
  LINMIX_CPU_INLINE void dots(int64_t t, const acc_t* v, acc_t* a) const {
    for (int i = 0; i < R; ++i) {
      const T* w = factor(t, i);
      acc_t sum = 0;
      LINMIX_SIMD_SUM(sum)
      for (int64_t d = 0; d < D; ++d) sum += static_cast<acc_t>(w[d]) * v[d];
      a[i] = sum;
    }
  }
  // mix[d] = sum_i k_i u_i[d] over the channels of token t, factor by factor (contiguous rows, so it vectorises).
  LINMIX_CPU_INLINE void mix_row(int64_t t, const acc_t* k, acc_t* mix) const {
    std::fill_n(mix, D, acc_t(0));
    for (int i = 0; i < R; ++i) {
      const T* w = factor(t, i);
      const acc_t ki = k[i];
      LINMIX_SIMD
      for (int64_t d = 0; d < D; ++d) mix[d] += ki * static_cast<acc_t>(w[d]);
    }
  }
  // (u_i[d])_i for channel d of token t.
  const acc_t* channel(int64_t t, int64_t d) const { return factors.data() + (t * D + d) * R; }

  // A token's convergence ratio from its new row h and previous row prev: plain max reductions (they vectorise)
  // and NaN flags, the same as nan_max over the channels.
  LINMIX_CPU_INLINE acc_t token_ratio(const acc_t* h, const acc_t* prev) const {
    acc_t diff = 0, norm = 0;
    int diff_nan = 0, h_nan = 0;
#pragma omp simd reduction(max : diff, norm) reduction(| : diff_nan, h_nan)
    for (int64_t d = 0; d < D; ++d) {
      const acc_t dh = std::abs(h[d] - prev[d]);
      diff = std::max(diff, dh);
      norm = std::max(norm, std::abs(h[d]));
      diff_nan |= dh != dh;
      h_nan |= h[d] != h[d];
    }
    if (diff_nan) diff = std::numeric_limits<acc_t>::quiet_NaN();
    if (h_nan) norm = std::numeric_limits<acc_t>::quiet_NaN();
    return fixed_point_rnn_token_ratio(diff, norm);
  }

  // Forward chain coefficients of token t at h_prev row hp; `v` (D) receives u - hp.
  LINMIX_CPU_CLONES void forward_chain(int64_t t, const acc_t* hp, acc_t* v, acc_t* c, acc_t* k) const {
    acc_t a[kFixedPointRnnMaxRank], beta[kFixedPointRnnMaxRank];
    LINMIX_SIMD
    for (int64_t d = 0; d < D; ++d) v[d] = static_cast<acc_t>(u[t * D + d]) - hp[d];
    dots(t, v, a);
    betas(t, beta);
    householder_chain_fwd(R, beta, a, gram_at(t), c, k);
  }

  // out = f(in), one forward iteration over (T, D) rows; returns the residual max_t ratio_t and, if
  // `ratios` is given, writes each token's ratio there. `v` holds 2 D scratch values.
  LINMIX_CPU_CLONES acc_t iterate(const acc_t* in, acc_t* out, acc_t* v, acc_t* ratios = nullptr) const {
    acc_t res = 0;
    acc_t* mix = v + D;
    for (int64_t t = 0; t < T_; ++t) {
      const acc_t* hp = in + t * D;
      acc_t* hn = out + t * D;
      const acc_t* h_before = t > 0 ? out + (t - 1) * D : h0.data();
      acc_t c[kFixedPointRnnMaxRank], k[kFixedPointRnnMaxRank];
      forward_chain(t, hp, v, c, k);
      mix_row(t, k, mix);
      // The step and the residual in two loops: fused, GCC vectorised neither (measured, AVX-512 clone).
      LINMIX_SIMD
      for (int64_t d = 0; d < D; ++d) {
        const acc_t lam_d = lam_at(t, d);
        const acc_t b = fixed_point_rnn_scan_input(lam_d, static_cast<acc_t>(u[t * D + d]), mix[d]);
        hn[d] = scan_step(lam_d, h_before[d], b);
      }
      const acc_t ratio = token_ratio(hn, hp);
      if (ratios != nullptr) ratios[t] = ratio;
      res = nan_max(res, ratio);
    }
    return res;
  }

  // One adjoint iteration s_out = Sᵀ(g + (I - Q)ᵀ((1 - lam) s_in)); returns its residual. `y` holds 2 D scratch
  // values. The mix by rows and the step without per-channel tests, as in iterate, so the loops vectorise.
  LINMIX_CPU_CLONES acc_t adjoint_iterate(const T* g, const acc_t* in, acc_t* out, acc_t* y) const {
    acc_t res = 0;
    acc_t* mix = y + D;
    for (int64_t t = T_ - 1; t >= 0; --t) {
      acc_t a[kFixedPointRnnMaxRank], beta[kFixedPointRnnMaxRank], dd[kFixedPointRnnMaxRank], k[kFixedPointRnnMaxRank];
      LINMIX_SIMD
      for (int64_t d = 0; d < D; ++d) y[d] = fixed_point_rnn_adjoint_pre(lam_at(t, d), in[t * D + d]);
      dots(t, y, a);
      betas(t, beta);
      householder_chain_bwd(R, beta, a, gram_at(t), dd, k);
      mix_row(t, k, mix);
      acc_t* s = out + t * D;
      if (t + 1 < T_) {
        const acc_t* s_after = out + (t + 1) * D;
        LINMIX_SIMD
        for (int64_t d = 0; d < D; ++d)
          s[d] = scan_step(lam_at(t + 1, d), s_after[d],
                           fixed_point_rnn_adjoint_input(static_cast<acc_t>(g[t * D + d]), mix[d]));
      } else {
        LINMIX_SIMD
        for (int64_t d = 0; d < D; ++d)
          s[d] = scan_step(acc_t(0), acc_t(0), fixed_point_rnn_adjoint_input(static_cast<acc_t>(g[t * D + d]), mix[d]));
      }
      res = nan_max(res, token_ratio(s, in + t * D));
    }
    return res;
  }
};

// z <- (1 - damping) z_old + damping z (the damped update; z holds f(z_old) on entry).
template <typename acc_t>
void damp(acc_t damping, const acc_t* z_old, acc_t* z, int64_t n) {
  for (int64_t k = 0; k < n; ++k) z[k] = fixed_point_rnn_damp(damping, z_old[k], z[k]);
}

// One batch element's forward iteration: z^0 = 0, then f_l = f(z^{l-1}) and its residual, z^l the damped
// update. On stopping, h_prev = z^{n-1} and h = f(h_prev) = f_n. Causal (per-token) stopping records token
// t's z^{l-1}_t at the first iteration l whose prefix residual max_{s<=t} ratio_s is below tol (a prefix
// of tokens, growing with l) and the output is f of that record.
template <typename T, typename acc_t>
struct ForwardRun {
  const FixedPointRnnVarlenParams& p;
  Element<T, acc_t> el;
  std::vector<acc_t> buf, v, ratios, rec;  // buf: two (T, D) iterates
  acc_t *cur, *nxt;                        // cur: z^{l-1}; after step(), nxt: f(cur)
  int64_t frozen = 0;                      // causal: tokens recorded so far
  int n = 0;
  acc_t res = std::numeric_limits<acc_t>::infinity();

  ForwardRun(const FixedPointRnnVarlenParams& p_, int64_t n)
      : p(p_), el(p_, n), buf(2 * el.T_ * p_.dim, acc_t(0)), v(2 * p_.dim), ratios(p.causal ? el.T_ : 0),
        rec(p.causal ? el.T_ * p_.dim : 0), cur(buf.data()), nxt(buf.data() + el.T_ * p_.dim) {}

  // One iteration; returns whether this element meets its own stopping rule (or the cap).
  bool step() {
    res = el.iterate(cur, nxt, v.data(), p.causal ? ratios.data() : nullptr);
    ++n;
    bool met = res < p.tol;
    if (p.causal) {
      acc_t prefix = 0;
      for (int64_t t = 0; t < el.T_; ++t) {
        prefix = nan_max(prefix, ratios[t]);
        if (!(prefix < p.tol)) break;
        if (t >= frozen) std::copy(cur + t * el.D, cur + (t + 1) * el.D, rec.data() + t * el.D), frozen = t + 1;
      }
      met = frozen == el.T_;
    }
    return met || n >= p.max_iter;
  }

  // z^l from f_l, ready for the next step().
  void advance() {
    if (p.damping != 1.0) damp(static_cast<acc_t>(p.damping), cur, nxt, el.T_ * el.D);
    std::swap(cur, nxt);
  }

  void finish(int64_t n_seq) {
    const int64_t TD = el.T_ * el.D, off = el.tok0 * el.D;
    const acc_t* hp = cur;
    const acc_t* out = nxt;
    if (p.causal) {  // tokens never recorded take the last iterate; then the output is f(record)
      std::copy(cur + frozen * el.D, cur + TD, rec.data() + frozen * el.D);
      el.iterate(rec.data(), nxt, v.data());
      hp = rec.data();
    }
    T* h = static_cast<T*>(p.h) + off;
    for (int64_t k = 0; k < TD; ++k) h[k] = cpu_cast<T>(out[k]);
    std::copy(hp, hp + TD, static_cast<acc_t*>(p.h_prev) + off);
    p.n_iter[n_seq] = n;
    p.residual[n_seq] = static_cast<float>(res);
  }
};

// The q-quantile of the residuals (fixed_point_rnn_common.h's rule).
template <typename acc_t>
acc_t batch_quantile(std::vector<acc_t> r, double q) {
  for (acc_t& x : r) x = fixed_point_rnn_quantile_key(x, std::numeric_limits<acc_t>::max());
  std::sort(r.begin(), r.end());
  const double pos = fixed_point_rnn_quantile_pos(q, static_cast<int64_t>(r.size()));
  const size_t lo = static_cast<size_t>(pos);
  return fixed_point_rnn_quantile_lerp(r[lo], r[std::min(lo + 1, r.size() - 1)], pos);
}

template <DType dt>
void fwd_impl(const FixedPointRnnVarlenParams& p) {
  using T = cpu_t<dt>;
  using acc_t = cpu_acc_t<dt>;
  using Run = ForwardRun<T, acc_t>;
  const int64_t grain = cpu_grain(p.varlen.mean_len(p.seqlen, p.batch) * p.dim);  // per iteration of a task
  if (p.batch_quantile < 0) {  // every element on its own: a task runs up to max_iter iterations
    parallel_for(0, p.batch, std::max<int64_t>(1, grain / std::max(p.max_iter, 1)), [&](int64_t begin, int64_t end) LINMIX_CPU_CLONES {
      for (int64_t bi = begin; bi < end; ++bi) {
        Run run(p, bi);
        while (!run.step()) run.advance();
        run.finish(bi);
      }
    });
    return;
  }
  // The authors' rule: the batch iterates together until the quantile of its residuals is below tol.
  std::vector<std::unique_ptr<Run>> runs(p.batch);
  parallel_for(0, p.batch, grain, [&](int64_t begin, int64_t end) LINMIX_CPU_CLONES {
    for (int64_t bi = begin; bi < end; ++bi) runs[bi] = std::make_unique<Run>(p, bi);
  });
  std::vector<acc_t> res(p.batch);
  for (int l = 1;; ++l) {
    parallel_for(0, p.batch, grain, [&](int64_t begin, int64_t end) LINMIX_CPU_CLONES {
      for (int64_t bi = begin; bi < end; ++bi) runs[bi]->step(), res[bi] = runs[bi]->res;
    });
    if (l >= p.max_iter || batch_quantile(res, p.batch_quantile) < p.tol) break;
    parallel_for(0, p.batch, grain, [&](int64_t begin, int64_t end) LINMIX_CPU_CLONES {
      for (int64_t bi = begin; bi < end; ++bi) runs[bi]->advance();
    });
  }
  parallel_for(0, p.batch, grain, [&](int64_t begin, int64_t end) LINMIX_CPU_CLONES {
    for (int64_t bi = begin; bi < end; ++bi) runs[bi]->finish(bi);
  });
}

// Gradients of h = f(h_prev) (h_prev detached) with upstream w, where w solves w = g + J_hᵀ w by
// p.max_iter adjoint iterations at most (max_iter = 1: w = g, the one-step gradient).
template <DType dt>
void bwd_impl(const FixedPointRnnVarlenParams& p) {
  using T = cpu_t<dt>;
  using acc_t = cpu_acc_t<dt>;
  const int64_t D = p.dim, R = p.rank;
  // A task recomputes one iteration, runs up to max_iter adjoint iterations and the VJP (about 14 iterations' work).
  const int64_t grain = cpu_grain(p.varlen.mean_len(p.seqlen, p.batch) * p.dim * (p.max_iter + 15));
  parallel_for(0, p.batch, grain, [&](int64_t begin, int64_t end) LINMIX_CPU_CLONES {
    std::vector<acc_t> h_new, s_a, s_b, v(2 * D), e(2 * D);  // e: 2 D for adjoint_iterate, then D
    for (int64_t bi = begin; bi < end; ++bi) {
      const Element<T, acc_t> el(p, bi);
      const int64_t TD = el.T_ * D, off = el.tok0 * D;
      h_new.resize(TD), s_a.resize(TD), s_b.resize(TD);
      const acc_t* hp = static_cast<const acc_t*>(p.h_prev) + off;
      const T* g = static_cast<const T*>(p.dh) + off;
      el.iterate(hp, h_new.data(), v.data());  // h = f(h_prev), recomputed in the accumulation type

      // Adjoint iterations on s (s^0 = 0, so the first one is the plain reverse scan of g).
      acc_t *cur = s_a.data(), *nxt = s_b.data();
      std::fill(cur, cur + TD, acc_t(0));
      for (int it = 1;; ++it) {
        const acc_t res = el.adjoint_iterate(g, cur, nxt, e.data());
        const bool stop = it >= p.max_iter || res < p.tol;
        if (!stop && p.damping != 1.0) damp(static_cast<acc_t>(p.damping), cur, nxt, TD);
        std::swap(cur, nxt);
        if (stop) break;
      }
      const acc_t* s = cur;
      if (p.dh0 != nullptr) {  // h0 enters token 0's scan step with coefficient lam_0 (an empty sequence: no step)
        T* dh0 = static_cast<T*>(p.dh0) + bi * D;
        for (int64_t d = 0; d < D; ++d) dh0[d] = el.T_ > 0 ? cpu_cast<T>(el.lam_at(0, d) * s[d]) : T(0);
      }

      // One step's VJP per token (householder_vjp_channel walks the factors per channel).
      T* du = static_cast<T*>(p.du) + off;
      T* dlam = static_cast<T*>(p.dlam) + off;
      T* dhh_u = static_cast<T*>(p.dhh_u) + el.tok0 * R * D;
      T* dhh_beta = static_cast<T*>(p.dhh_beta) + el.tok0 * R;
      for (int64_t t = 0; t < el.T_; ++t) {
        acc_t c[kFixedPointRnnMaxRank], k[kFixedPointRnnMaxRank], dd[kFixedPointRnnMaxRank], kk[kFixedPointRnnMaxRank],
            ae[kFixedPointRnnMaxRank], beta[kFixedPointRnnMaxRank], dud[kFixedPointRnnMaxRank];
        el.forward_chain(t, hp + t * D, v.data(), c, k);
        for (int64_t d = 0; d < D; ++d) e[d] = fixed_point_rnn_adjoint_pre(el.lam_at(t, d), s[t * D + d]);
        el.dots(t, e.data(), ae);
        el.betas(t, beta);
        householder_chain_bwd(static_cast<int>(R), beta, ae, el.gram_at(t), dd, kk);
        for (int64_t i = 0; i < R; ++i) dhh_beta[t * R + i] = cpu_cast<T>(householder_grad_beta(c[i], dd[i]));
        for (int64_t d = 0; d < D; ++d) {
          const acc_t* ud = el.channel(t, d);
          const acc_t x_tilde = static_cast<acc_t>(el.u[t * D + d]) - householder_mix(static_cast<int>(R), k, ud);
          const acc_t h_before = t > 0 ? h_new[(t - 1) * D + d] : el.h0[d];
          dlam[t * D + d] = cpu_cast<T>(fixed_point_rnn_grad_lam(s[t * D + d], h_before, x_tilde));
          du[t * D + d] = cpu_cast<T>(
              householder_vjp_channel(static_cast<int>(R), ud, beta, c, k, dd, kk, v[d], e[d], dud));
          for (int64_t i = 0; i < R; ++i) dhh_u[(t * R + i) * D + d] = cpu_cast<T>(dud[i]);
        }
      }
    }
  });
}

}  // namespace

void fixed_point_rnn_fwd_cpu(const FixedPointRnnVarlenParams& p, DType dtype) {
  LINMIX_DTYPE_SWITCH(dtype, kDT, [&] { fwd_impl<kDT>(p); });
}

void fixed_point_rnn_bwd_cpu(const FixedPointRnnVarlenParams& p, DType dtype) {
  LINMIX_DTYPE_SWITCH(dtype, kDT, [&] { bwd_impl<kDT>(p); });
}

}  // namespace linmix
