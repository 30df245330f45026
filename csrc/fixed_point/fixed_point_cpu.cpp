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

// One batch element's inputs, converted on the fly to the accumulation type.
template <typename T, typename acc_t>
struct Element {
  const T* u;        // (T, D)
  const T* lam;      // (T, D)
  const T* hh_u;     // (T, R, D)
  const T* hh_beta;  // (T, R)
  int64_t T_, D, R;

  Element(const FixedPointParams& p, int64_t bi)
      : u(static_cast<const T*>(p.u) + bi * p.seqlen * p.dim),
        lam(static_cast<const T*>(p.lam) + bi * p.seqlen * p.dim),
        hh_u(static_cast<const T*>(p.hh_u) + bi * p.seqlen * p.rank * p.dim),
        hh_beta(static_cast<const T*>(p.hh_beta) + bi * p.seqlen * p.rank),
        T_(p.seqlen), D(p.dim), R(p.rank) {}

  const T* factor(int64_t t, int64_t i) const { return hh_u + (t * R + i) * D; }
  acc_t beta(int64_t t, int64_t i) const { return static_cast<acc_t>(hh_beta[t * R + i]); }
  acc_t lam_at(int64_t t, int64_t d) const { return static_cast<acc_t>(lam[t * D + d]); }

  acc_t dot(const T* a, const acc_t* v) const {
    acc_t s = 0;
    for (int64_t d = 0; d < D; ++d) s += static_cast<acc_t>(a[d]) * v[d];
    return s;
  }
  // v <- H_i v for one factor; returns u_i · v (before the update).
  acc_t apply_factor(int64_t t, int64_t i, acc_t* v) const {
    const T* w = factor(t, i);
    const acc_t c = dot(w, v);
    const acc_t coef = householder_coef(beta(t, i), c);
    for (int64_t d = 0; d < D; ++d) v[d] = householder_update(v[d], coef, static_cast<acc_t>(w[d]));
    return c;
  }

  // out = f(in), one forward iteration over (T, D) rows; returns the residual max_t ratio_t.
  // `v` is a D-row scratch.
  acc_t iterate(const acc_t* in, acc_t* out, acc_t* v) const {
    acc_t res = 0;
    for (int64_t t = 0; t < T_; ++t) {
      const acc_t* hp = in + t * D;
      acc_t* hn = out + t * D;
      const acc_t* h_before = t > 0 ? out + (t - 1) * D : nullptr;
      for (int64_t d = 0; d < D; ++d) v[d] = static_cast<acc_t>(u[t * D + d]) - hp[d];
      for (int64_t i = 0; i < R; ++i) apply_factor(t, i, v);
      acc_t diff = 0, norm = 0;
      for (int64_t d = 0; d < D; ++d) {
        const acc_t lam_d = lam_at(t, d);
        const acc_t h = scan_step(lam_d, h_before ? h_before[d] : acc_t(0), fixed_point_scan_input(lam_d, hp[d], v[d]));
        hn[d] = h;
        diff = std::max(diff, std::abs(h - hp[d]));
        norm = std::max(norm, std::abs(h));
      }
      res = std::max(res, fixed_point_token_ratio(diff, norm));
    }
    return res;
  }

  // One adjoint iteration s_out = Sᵀ(g + (I - Q)ᵀ((1 - lam) s_in)); returns its residual.
  // `y`, `qty` are D-row scratch.
  acc_t adjoint_iterate(const T* g, const acc_t* in, acc_t* out, acc_t* y, acc_t* qty) const {
    acc_t res = 0;
    for (int64_t t = T_ - 1; t >= 0; --t) {
      for (int64_t d = 0; d < D; ++d) qty[d] = y[d] = fixed_point_adjoint_pre(lam_at(t, d), in[t * D + d]);
      for (int64_t i = R - 1; i >= 0; --i) apply_factor(t, i, qty);
      const acc_t* s_after = t + 1 < T_ ? out + (t + 1) * D : nullptr;
      acc_t diff = 0, norm = 0;
      for (int64_t d = 0; d < D; ++d) {
        const acc_t a_next = s_after ? lam_at(t + 1, d) : acc_t(0);
        const acc_t b = fixed_point_adjoint_input(static_cast<acc_t>(g[t * D + d]), y[d], qty[d]);
        const acc_t s = scan_step(a_next, s_after ? s_after[d] : acc_t(0), b);
        out[t * D + d] = s;
        diff = std::max(diff, std::abs(s - in[t * D + d]));
        norm = std::max(norm, std::abs(s));
      }
      res = std::max(res, fixed_point_token_ratio(diff, norm));
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
    std::vector<acc_t> h_new(TD), s_a(TD), s_b(TD), y(D), e(D), vs((R + 1) * D);
    for (int64_t bi = begin; bi < end; ++bi) {
      const Element<T, acc_t> el(p, bi);
      const acc_t* hp = static_cast<const acc_t*>(p.h_prev) + bi * TD;
      const T* g = static_cast<const T*>(p.dh) + bi * TD;
      el.iterate(hp, h_new.data(), y.data());  // h = f(h_prev), recomputed in the accumulation type

      // Adjoint iterations on s (s^0 = 0, so the first one is the plain reverse scan of g).
      acc_t *cur = s_a.data(), *nxt = s_b.data();
      std::fill(cur, cur + TD, acc_t(0));
      for (int k = 0; k < p.max_iter; ++k) {
        const acc_t res = el.adjoint_iterate(g, cur, nxt, y.data(), e.data());
        std::swap(cur, nxt);
        if (res < p.tol) break;
      }
      const acc_t* s = cur;

      // One step's VJP per token: replay the factors keeping their inputs v_0..v_{R-1}, then walk back.
      T* du = static_cast<T*>(p.du) + bi * TD;
      T* dlam = static_cast<T*>(p.dlam) + bi * TD;
      T* dhh_u = static_cast<T*>(p.dhh_u) + bi * p.seqlen * R * D;
      T* dhh_beta = static_cast<T*>(p.dhh_beta) + bi * p.seqlen * R;
      for (int64_t t = 0; t < p.seqlen; ++t) {
        const acc_t* hp_t = hp + t * D;
        acc_t* v = vs.data();  // row i = input of factor i; row R = Q v
        for (int64_t d = 0; d < D; ++d) v[d] = static_cast<acc_t>(el.u[t * D + d]) - hp_t[d];
        for (int64_t i = 0; i < R; ++i) {
          std::copy(v + i * D, v + (i + 1) * D, v + (i + 1) * D);
          el.apply_factor(t, i, v + (i + 1) * D);
        }
        for (int64_t d = 0; d < D; ++d) {
          const acc_t lam_d = el.lam_at(t, d), s_d = s[t * D + d];
          const acc_t h_before = t > 0 ? h_new[(t - 1) * D + d] : acc_t(0);
          dlam[t * D + d] = static_cast<T>(fixed_point_grad_lam(s_d, h_before, hp_t[d] + v[R * D + d]));
          e[d] = fixed_point_adjoint_pre(lam_d, s_d);  // dx~ = (1 - lam) s
        }
        for (int64_t i = R - 1; i >= 0; --i) {
          const T* w = el.factor(t, i);
          const acc_t* vi = v + i * D;
          const acc_t beta = el.beta(t, i), c = el.dot(w, vi), dd = el.dot(w, e.data());
          dhh_beta[t * R + i] = static_cast<T>(householder_grad_beta(c, dd));
          T* dw = dhh_u + (t * R + i) * D;
          const acc_t coef = householder_coef(beta, dd);
          for (int64_t d = 0; d < D; ++d) {
            dw[d] = static_cast<T>(householder_grad_u(beta, c, dd, e[d], vi[d]));
            e[d] = householder_update(e[d], coef, static_cast<acc_t>(w[d]));
          }
        }
        for (int64_t d = 0; d < D; ++d) du[t * D + d] = static_cast<T>(e[d]);
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
