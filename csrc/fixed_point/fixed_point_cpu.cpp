// CPU fixed-point RNN: parallel over batch elements (each converges on its own); inside an element the
// iteration is one fused pass over time: per token the Householder mix on a row of D channels, then
// the scan step, then the token's convergence ratio. The arithmetic is fixed_point_common.h's.
#include "fixed_point/fixed_point_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "common/cpu_types.h"
#include "common/static_switch.h"
#include "fixed_point/fixed_point_common.h"

namespace linmix {
namespace {

// One batch element's inputs, converted on the fly to the accumulation type, and its per-token Gram
// matrices G_ij = u_i · u_j (computed once; every iteration reuses them).
template <typename T, typename acc_t>
struct Element {
  const T* u;        // (T, D)
  const T* lam;      // (T, D)
  const T* hh_u;     // (T, R, D)
  const T* hh_beta;  // (T, R)
  int64_t T_, D;
  int R;
  std::vector<acc_t> gram;     // (T, R, R)
  std::vector<acc_t> factors;  // (T, D, R): the factors channel-major, so a channel's R values are adjacent

  Element(const FixedPointParams& p, int64_t bi)
      : u(static_cast<const T*>(p.u) + bi * p.seqlen * p.dim),
        lam(static_cast<const T*>(p.lam) + bi * p.seqlen * p.dim),
        hh_u(static_cast<const T*>(p.hh_u) + bi * p.seqlen * p.rank * p.dim),
        hh_beta(static_cast<const T*>(p.hh_beta) + bi * p.seqlen * p.rank),
        T_(p.seqlen), D(p.dim), R(static_cast<int>(p.rank)), gram(p.seqlen * p.rank * p.rank),
        factors(p.seqlen * p.dim * p.rank) {
    for (int64_t t = 0; t < T_; ++t) {
      for (int i = 0; i < R; ++i) {
        for (int64_t d = 0; d < D; ++d) factors[(t * D + d) * R + i] = static_cast<acc_t>(factor(t, i)[d]);
      }
      acc_t* g = gram.data() + t * R * R;
      for (int i = 0; i < R; ++i) {
        for (int j = 0; j <= i; ++j) {
          const T *ui = factor(t, i), *uj = factor(t, j);
          acc_t sum = 0;
          for (int64_t d = 0; d < D; ++d) sum += static_cast<acc_t>(ui[d]) * static_cast<acc_t>(uj[d]);
          g[i * R + j] = g[j * R + i] = sum;
        }
      }
    }
  }

  const T* factor(int64_t t, int i) const { return hh_u + (t * R + i) * D; }
  acc_t lam_at(int64_t t, int64_t d) const { return static_cast<acc_t>(lam[t * D + d]); }
  const acc_t* gram_at(int64_t t) const { return gram.data() + t * R * R; }
  void betas(int64_t t, acc_t* beta) const {
    for (int i = 0; i < R; ++i) beta[i] = static_cast<acc_t>(hh_beta[t * R + i]);
  }
  // a_i = u_i · v for every factor of token t.
  void dots(int64_t t, const acc_t* v, acc_t* a) const {
    for (int i = 0; i < R; ++i) {
      const T* w = factor(t, i);
      acc_t sum = 0;
      for (int64_t d = 0; d < D; ++d) sum += static_cast<acc_t>(w[d]) * v[d];
      a[i] = sum;
    }
  }
  // (u_i[d])_i for channel d of token t.
  const acc_t* channel(int64_t t, int64_t d) const { return factors.data() + (t * D + d) * R; }

  // Forward chain coefficients of token t at h_prev row hp; `v` (D) receives u - hp.
  void forward_chain(int64_t t, const acc_t* hp, acc_t* v, acc_t* c, acc_t* k) const {
    acc_t a[kFixedPointMaxRank], beta[kFixedPointMaxRank];
    for (int64_t d = 0; d < D; ++d) v[d] = static_cast<acc_t>(u[t * D + d]) - hp[d];
    dots(t, v, a);
    betas(t, beta);
    householder_chain_fwd(R, beta, a, gram_at(t), c, k);
  }

  // out = f(in), one forward iteration over (T, D) rows; returns the residual max_t ratio_t.
  acc_t iterate(const acc_t* in, acc_t* out, acc_t* v) const {
    acc_t res = 0;
    for (int64_t t = 0; t < T_; ++t) {
      const acc_t* hp = in + t * D;
      acc_t* hn = out + t * D;
      const acc_t* h_before = t > 0 ? out + (t - 1) * D : nullptr;
      acc_t c[kFixedPointMaxRank], k[kFixedPointMaxRank];
      forward_chain(t, hp, v, c, k);
      acc_t diff = 0, norm = 0;
      for (int64_t d = 0; d < D; ++d) {
        const acc_t lam_d = lam_at(t, d);
        const acc_t* ud = channel(t, d);
        const acc_t b = fixed_point_scan_input(lam_d, static_cast<acc_t>(u[t * D + d]), householder_mix(R, k, ud));
        const acc_t h = scan_step(lam_d, h_before ? h_before[d] : acc_t(0), b);
        hn[d] = h;
        diff = nan_max(diff, std::abs(h - hp[d]));
        norm = nan_max(norm, std::abs(h));
      }
      res = nan_max(res, fixed_point_token_ratio(diff, norm));
    }
    return res;
  }

  // One adjoint iteration s_out = Sᵀ(g + (I - Q)ᵀ((1 - lam) s_in)); returns its residual.
  acc_t adjoint_iterate(const T* g, const acc_t* in, acc_t* out, acc_t* y) const {
    acc_t res = 0;
    for (int64_t t = T_ - 1; t >= 0; --t) {
      acc_t a[kFixedPointMaxRank], beta[kFixedPointMaxRank], dd[kFixedPointMaxRank], k[kFixedPointMaxRank];
      for (int64_t d = 0; d < D; ++d) y[d] = fixed_point_adjoint_pre(lam_at(t, d), in[t * D + d]);
      dots(t, y, a);
      betas(t, beta);
      householder_chain_bwd(R, beta, a, gram_at(t), dd, k);
      const acc_t* s_after = t + 1 < T_ ? out + (t + 1) * D : nullptr;
      acc_t diff = 0, norm = 0;
      for (int64_t d = 0; d < D; ++d) {
        const acc_t* ud = channel(t, d);
        const acc_t a_next = s_after ? lam_at(t + 1, d) : acc_t(0);
        const acc_t b = fixed_point_adjoint_input(static_cast<acc_t>(g[t * D + d]), householder_mix(R, k, ud));
        const acc_t s = scan_step(a_next, s_after ? s_after[d] : acc_t(0), b);
        out[t * D + d] = s;
        diff = nan_max(diff, std::abs(s - in[t * D + d]));
        norm = nan_max(norm, std::abs(s));
      }
      res = nan_max(res, fixed_point_token_ratio(diff, norm));
    }
    return res;
  }
};

template <DType dt>
void fwd_impl(const FixedPointParams& p) {
  using T = cpu_t<dt>;
  using acc_t = cpu_acc_t<dt>;
  const int64_t TD = p.seqlen * p.dim;
  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(TD), v(p.dim);
    for (int64_t bi = begin; bi < end; ++bi) {
      const Element<T, acc_t> el(p, bi);
      acc_t* slot = static_cast<acc_t*>(p.h_prev) + bi * TD;  // holds h^{n-1} on return
      acc_t *cur = slot, *nxt = scratch.data();
      std::fill(cur, cur + TD, acc_t(0));  // h^0 = 0
      int n = 0;
      acc_t res = std::numeric_limits<acc_t>::infinity();
      while (n < p.max_iter) {
        res = el.iterate(cur, nxt, v.data());
        ++n;
        std::swap(cur, nxt);  // cur: h^n, nxt: h^{n-1}
        if (res < p.tol) break;
      }
      T* h = static_cast<T*>(p.h) + bi * TD;
      for (int64_t k = 0; k < TD; ++k) h[k] = static_cast<T>(cur[k]);
      if (nxt != slot) std::copy(nxt, nxt + TD, slot);
      p.n_iter[bi] = n;
      p.residual[bi] = static_cast<float>(res);
    }
  });
}

// Gradients of h = f(h_prev) (h_prev detached) with upstream w, where w solves w = g + J_hᵀ w by
// p.max_iter adjoint iterations at most (max_iter = 1: w = g, the one-step gradient).
template <DType dt>
void bwd_impl(const FixedPointParams& p) {
  using T = cpu_t<dt>;
  using acc_t = cpu_acc_t<dt>;
  const int64_t TD = p.seqlen * p.dim, D = p.dim, R = p.rank;
  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> h_new(TD), s_a(TD), s_b(TD), v(D), e(D);
    for (int64_t bi = begin; bi < end; ++bi) {
      const Element<T, acc_t> el(p, bi);
      const acc_t* hp = static_cast<const acc_t*>(p.h_prev) + bi * TD;
      const T* g = static_cast<const T*>(p.dh) + bi * TD;
      el.iterate(hp, h_new.data(), v.data());  // h = f(h_prev), recomputed in the accumulation type

      // Adjoint iterations on s (s^0 = 0, so the first one is the plain reverse scan of g).
      acc_t *cur = s_a.data(), *nxt = s_b.data();
      std::fill(cur, cur + TD, acc_t(0));
      for (int it = 0; it < p.max_iter; ++it) {
        const acc_t res = el.adjoint_iterate(g, cur, nxt, e.data());
        std::swap(cur, nxt);
        if (res < p.tol) break;
      }
      const acc_t* s = cur;

      // One step's VJP per token (householder_vjp_channel walks the factors per channel).
      T* du = static_cast<T*>(p.du) + bi * TD;
      T* dlam = static_cast<T*>(p.dlam) + bi * TD;
      T* dhh_u = static_cast<T*>(p.dhh_u) + bi * p.seqlen * R * D;
      T* dhh_beta = static_cast<T*>(p.dhh_beta) + bi * p.seqlen * R;
      for (int64_t t = 0; t < p.seqlen; ++t) {
        acc_t c[kFixedPointMaxRank], k[kFixedPointMaxRank], dd[kFixedPointMaxRank], kk[kFixedPointMaxRank],
            ae[kFixedPointMaxRank], beta[kFixedPointMaxRank], dud[kFixedPointMaxRank];
        el.forward_chain(t, hp + t * D, v.data(), c, k);
        for (int64_t d = 0; d < D; ++d) e[d] = fixed_point_adjoint_pre(el.lam_at(t, d), s[t * D + d]);
        el.dots(t, e.data(), ae);
        el.betas(t, beta);
        householder_chain_bwd(static_cast<int>(R), beta, ae, el.gram_at(t), dd, kk);
        for (int64_t i = 0; i < R; ++i) dhh_beta[t * R + i] = static_cast<T>(householder_grad_beta(c[i], dd[i]));
        for (int64_t d = 0; d < D; ++d) {
          const acc_t* ud = el.channel(t, d);
          const acc_t x_tilde = static_cast<acc_t>(el.u[t * D + d]) - householder_mix(static_cast<int>(R), k, ud);
          const acc_t h_before = t > 0 ? h_new[(t - 1) * D + d] : acc_t(0);
          dlam[t * D + d] = static_cast<T>(fixed_point_grad_lam(s[t * D + d], h_before, x_tilde));
          du[t * D + d] = static_cast<T>(
              householder_vjp_channel(static_cast<int>(R), ud, beta, c, k, dd, kk, v[d], e[d], dud));
          for (int64_t i = 0; i < R; ++i) dhh_u[(t * R + i) * D + d] = static_cast<T>(dud[i]);
        }
      }
    }
  });
}

}  // namespace

void fixed_point_fwd_cpu(const FixedPointParams& p, DType dtype) {
  LINMIX_DTYPE_SWITCH(dtype, kDT, [&] { fwd_impl<kDT>(p); });
}

void fixed_point_bwd_cpu(const FixedPointParams& p, DType dtype) {
  LINMIX_DTYPE_SWITCH(dtype, kDT, [&] { bwd_impl<kDT>(p); });
}

}  // namespace linmix
