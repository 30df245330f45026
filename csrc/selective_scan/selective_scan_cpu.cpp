// CPU selective scan, forward and backward. Same decomposition as the CUDA kernels: per (sequence,
// channel) (a sequence is a batch row, or a span of row 0 with cu_seqlens: ss_seq), chunks of
// kSelectiveScanChunk steps with fp32 (fp64) checkpoints per chunk, and a backward that walks chunks in reverse
// and recomputes the states of one chunk at a time. Within a chunk the work is laid out per state and step
// (ChunkScan), so that only the recurrences themselves run step by step.
#include "selective_scan/selective_scan_cpu.h"

#include <algorithm>
#include <numeric>
#include <vector>

#include "common/cpu_kernel.h"
#include "common/cpu_types.h"
#include "common/exp2_cpu.h"
#include "common/parallel.h"
#include "common/static_switch.h"
#include "selective_scan/selective_scan_common.h"
#include "selective_scan/selective_state_update_common.h"

namespace linmix {
namespace {

// One task owns whole groups of B and C, so the variable dB/dC rows it accumulates into are its own.
int64_t channels_per_task(const SelectiveScanParams& p) {
  const int64_t sb = p.B.variable ? p.dim / p.B.n_groups : 1;
  const int64_t sc = p.C.variable ? p.dim / p.C.n_groups : 1;
  return std::lcm(sb, sc);
}

// The row of B or C of (batch bi, channel di, state n) for a sequence starting at `begin`: variable rows start there.
int64_t bc_row(const BCView& v, int64_t bi, int64_t di, int64_t n, int64_t dim, int64_t begin) {
  return ss_bc_offset(v, bi, di, n, dim) + (v.variable ? begin : 0);
}

// exp(δ A) from δ and ss_decay_coef(A): fp32 by the polynomial exp2 (a vector loop, where libm's exp2 is a call
// per element); fp64 (the test path) by exp, as ss_decay.
inline float decay_cpu(float dl, float coef) { return exp2_cpu(dl * coef); }
inline double decay_cpu(double dl, double coef) { return ss_decay(dl, coef); }

// δ and the gate with their gradients, for the vector loops over a chunk's steps: fp32 by the polynomial exp and
// log1p of selective_state_update_common.h (libm's are a call per element), fp64 by libm, as selective_scan_common.h.
float sigmoid_cpu(float x) { return 1.f / (1.f + ssu_exp(-x)); }
double sigmoid_cpu(double x) { return sigmoid(x); }
template <typename acc_t>
acc_t delta_grad_cpu(acc_t raw, acc_t bias, bool use_softplus) {  // ss_delta_grad
  const acc_t x = raw + bias;
  return (use_softplus && !(x > acc_t(20))) ? sigmoid_cpu(x) : acc_t(1);
}
template <typename acc_t>
acc_t silu_grad_cpu(acc_t z) {  // silu_grad
  const acc_t s = sigmoid_cpu(z);
  return s * (acc_t(1) + z * (acc_t(1) - s));
}

// Σ x[0 .. n), in 16 partial sums so that it vectorises: gcc leaves an `omp simd` reduction scalar in these
// cloned functions.
template <typename acc_t>
LINMIX_CPU_INLINE acc_t sum_cpu(const acc_t* x, int64_t n) {
  constexpr int64_t W = 16;
  acc_t part[W] = {};
  int64_t i = 0;
  for (; i + W <= n; i += W)
    for (int64_t j = 0; j < W; ++j) part[j] += x[i + j];
  acc_t s = 0;
  for (; i < n; ++i) s += x[i];
  for (int64_t j = 0; j < W; ++j) s += part[j];
  return s;
}

// Runs r_j <- step(n + j, i, r_j) for the W states n .. n + W - 1 over the steps i of a chunk (kReverse: last to
// first), interleaved: each state's chain waits on its own previous step, so W of them overlap.
template <int64_t W, bool kReverse, typename acc_t, typename Step>
LINMIX_CPU_INLINE void chains(int64_t n, int64_t len, acc_t* carry, const Step& step) {
  acc_t r[W];
  for (int64_t j = 0; j < W; ++j) r[j] = carry[n + j];
  for (int64_t k = 0; k < len; ++k) {
    const int64_t i = kReverse ? len - 1 - k : k;
    LINMIX_PRAGMA(GCC unroll 4)
    for (int64_t j = 0; j < W; ++j) r[j] = step(n + j, i, r[j]);
  }
  for (int64_t j = 0; j < W; ++j) carry[n + j] = r[j];
}

// The recurrence of every state n over a chunk, four states at a time; carry[n]: the value before the first step,
// after the last on return.
template <bool kReverse, typename acc_t, typename Step>
LINMIX_CPU_INLINE void state_chains(int64_t N, int64_t len, acc_t* carry, const Step& step) {
  int64_t n = 0;
  for (; n + 4 <= N; n += 4) chains<4, kReverse>(n, len, carry, step);
  for (; n < N; ++n) chains<1, kReverse>(n, len, carry, step);
}

// One thread's work on one chunk of one (sequence, channel). Only the recurrences run step by step: the decays,
// the rows of B and C and every sum over states are vector loops over the chunk's steps, and the recurrences of
// the states interleave (state_chains).
template <DType dt>
struct ChunkScan {
  using T = cpu_t<dt>;
  using acc_t = cpu_acc_t<dt>;
  const SelectiveScanParams& p;
  const int64_t N, K;  // states; the longest chunk of this call, the stride of the per-state rows
  // Per step: δ, δ u, u, dy (gated), y (before the gate), the du and dδ sums.
  std::vector<acc_t> dl, dlu, uu, dy, y, du, ddl;
  // Per state n and step i (row n at n * K): the decays, B, C, the adjoints g (backward), and for one state at a
  // time the dA, dB and dC terms; the states with one more column (row n at n * (K + 1)): h_{i-1} at i.
  std::vector<acc_t> a, b, c, g, ga, gb, gc, h;

  explicit ChunkScan(const SelectiveScanParams& p_)
      : p(p_), N(p_.dstate), K(std::min(kSelectiveScanChunk, p_.seqlen)), dl(K), dlu(K), uu(K), dy(K), y(K),
        du(K), ddl(K), a(N * K), b(N * K), c(N * K), g(N * K), ga(K), gb(K), gc(K), h(N * (K + 1)) {}

  // Rows n = 0 .. N-1 of B or C over the chunk's steps [t0, t0 + len) into dst (row n at n * K).
  LINMIX_CPU_CLONES void load_bc(const BCView& v, const SsSeq& sq, int64_t di, int64_t t0, int64_t len,
                                 acc_t* dst) const {
    for (int64_t n = 0; n < N; ++n) {
      const int64_t row = bc_row(v, sq.bi, di, n, p.dim, sq.begin);
      acc_t* out = dst + n * K;
      if (v.variable) {
        const T* src = static_cast<const T*>(v.ptr) + row + t0;
        LINMIX_SIMD
        for (int64_t i = 0; i < len; ++i) out[i] = static_cast<acc_t>(src[i]);
      } else {
        std::fill(out, out + len, static_cast<const acc_t*>(v.ptr)[row]);
      }
    }
  }

  // a, B and C of the chunk, then its states from h_{-1} = start (zeros for null) into h; carry: the last state
  // (may be start).
  LINMIX_CPU_CLONES void states(const SsSeq& sq, int64_t di, int64_t t0, int64_t len, const acc_t* start,
                                acc_t* carry) {
    const acc_t* A = static_cast<const acc_t*>(p.A) + di * N;
    for (int64_t n = 0; n < N; ++n) {
      const acc_t coef = ss_decay_coef(A[n]);
      acc_t* an = a.data() + n * K;
      LINMIX_SIMD
      for (int64_t i = 0; i < len; ++i) an[i] = decay_cpu(dl[i], coef);
      carry[n] = h[n * (K + 1)] = start ? start[n] : acc_t(0);
    }
    load_bc(p.B, sq, di, t0, len, b.data());
    load_bc(p.C, sq, di, t0, len, c.data());
    state_chains<false>(N, len, carry, [&](int64_t n, int64_t i, acc_t r) {
      r = scan_step(a[n * K + i], r, b[n * K + i] * dlu[i]);
      h[n * (K + 1) + i + 1] = r;
      return r;
    });
  }

  // y += Σ_n C_n h_n over the chunk.
  LINMIX_CPU_CLONES void readout(int64_t len) {
    for (int64_t n = 0; n < N; ++n) {
      const acc_t* cn = c.data() + n * K;
      const acc_t* hn = h.data() + n * (K + 1) + 1;
      LINMIX_SIMD
      for (int64_t i = 0; i < len; ++i) y[i] += cn[i] * hn[i];
    }
  }

  // The chunk [t0, t0 + len) of the forward; state: h before it in, after it out.
  LINMIX_CPU_CLONES void forward(const SsSeq& sq, int64_t di, int64_t t0, int64_t len, acc_t* state) {
    const T* u = p.u.at<const T>(sq.bi, di) + sq.begin + t0;
    const T* delta = p.delta.at<const T>(sq.bi, di) + sq.begin + t0;
    const T* z = p.z.ptr ? p.z.at<const T>(sq.bi, di) + sq.begin + t0 : nullptr;
    T* out = p.out.at<T>(sq.bi, di) + sq.begin + t0;
    const acc_t bias = p.delta_bias ? static_cast<const acc_t*>(p.delta_bias)[di] : acc_t(0);
    const acc_t Dv = p.D ? static_cast<const acc_t*>(p.D)[di] : acc_t(0);
    LINMIX_SIMD
    for (int64_t i = 0; i < len; ++i) {
      const acc_t uv = static_cast<acc_t>(u[i]);
      dl[i] = ssu_delta(static_cast<acc_t>(delta[i]), bias, p.delta_softplus);
      dlu[i] = dl[i] * uv;
      y[i] = Dv * uv;
    }
    states(sq, di, t0, len, state, state);
    readout(len);
    if (z) {
      LINMIX_SIMD
      for (int64_t i = 0; i < len; ++i) y[i] *= ssu_silu(static_cast<acc_t>(z[i]));
    }
    LINMIX_SIMD
    for (int64_t i = 0; i < len; ++i) out[i] = cpu_cast<T>(y[i]);
  }

  // The chunk [t0, t0 + len) of the backward, from h_{-1} = start (null: zeros); s: the adjoint after the chunk in,
  // before it out. Adds the chunk's dA, dB, dC (rows of the constant ones: n at dB/dC + bdn + n), dD, dδ bias.
  LINMIX_CPU_CLONES void backward(const SsSeq& sq, int64_t di, int64_t t0, int64_t len, const acc_t* start,
                                  acc_t* s, acc_t* carry, acc_t& dD, acc_t& dbias) {
    const T* u = p.u.at<const T>(sq.bi, di) + sq.begin + t0;
    const T* delta = p.delta.at<const T>(sq.bi, di) + sq.begin + t0;
    const T* z = p.z.ptr ? p.z.at<const T>(sq.bi, di) + sq.begin + t0 : nullptr;
    const T* dout = p.dout.at<const T>(sq.bi, di) + sq.begin + t0;
    const acc_t bias = p.delta_bias ? static_cast<const acc_t*>(p.delta_bias)[di] : acc_t(0);
    const acc_t Dv = p.D ? static_cast<const acc_t*>(p.D)[di] : acc_t(0);
    for (int64_t i = 0; i < len; ++i) dy[i] = static_cast<acc_t>(dout[i]);
    if (z) {
      LINMIX_SIMD
      for (int64_t i = 0; i < len; ++i) dy[i] *= ssu_silu(static_cast<acc_t>(z[i]));  // ss_gate_dy
    }
    LINMIX_SIMD
    for (int64_t i = 0; i < len; ++i) {
      uu[i] = static_cast<acc_t>(u[i]);
      dl[i] = ssu_delta(static_cast<acc_t>(delta[i]), bias, p.delta_softplus);
      dlu[i] = dl[i] * uu[i];
      y[i] = Dv * uu[i];
      du[i] = dy[i] * Dv;
      ddl[i] = 0;
      ga[i] = dy[i] * uu[i];
    }
    dD += sum_cpu(ga.data(), len);
    states(sq, di, t0, len, start, carry);
    if (z) readout(len);
    for (int64_t n = 0; n < N; ++n) {
      const acc_t* cn = c.data() + n * K;
      acc_t* gn = g.data() + n * K;
      LINMIX_SIMD
      for (int64_t i = 0; i < len; ++i) gn[i] = cn[i] * dy[i];
    }
    // g_i = C_i dy_i + s_{i+1} (the gradient of h_i), s_i = a_i g_i.
    state_chains<true>(N, len, s, [&](int64_t n, int64_t i, acc_t sn) {
      const acc_t gi = g[n * K + i] + sn;
      g[n * K + i] = gi;
      return a[n * K + i] * gi;
    });
    const acc_t* A = static_cast<const acc_t*>(p.A) + di * N;
    acc_t* dA = static_cast<acc_t*>(p.dA_part) + sq.bd * N;
    for (int64_t n = 0; n < N; ++n) {
      const acc_t An = A[n];
      const acc_t *an = a.data() + n * K, *bn = b.data() + n * K, *gn = g.data() + n * K;
      const acc_t* hn = h.data() + n * (K + 1);  // h_{i-1} at i
      // No `omp simd` here: gcc vectorises the loop only once it has scalarised the struct ss_step_grad returns,
      // which it does not do for a simd loop's private copies.
      LINMIX_PRAGMA(GCC ivdep)
      for (int64_t i = 0; i < len; ++i) {
        const SSStepGrad<acc_t> gr = ss_step_grad(gn[i], hn[i], an[i], dl[i], An, bn[i], uu[i]);
        du[i] += gr.du;
        ddl[i] += gr.ddelta;
        ga[i] = gr.dA;
        gb[i] = gr.dB;
        gc[i] = dy[i] * hn[i + 1];
      }
      dA[n] += sum_cpu(ga.data(), len);
      add_bc_grad(p.B, static_cast<acc_t*>(p.dB), sq, di, n, t0, len, gb.data());
      add_bc_grad(p.C, static_cast<acc_t*>(p.dC), sq, di, n, t0, len, gc.data());
    }
    T* du_out = p.du.at<T>(sq.bi, di) + sq.begin + t0;
    T* ddelta_out = p.ddelta.at<T>(sq.bi, di) + sq.begin + t0;
    T* dz_out = z ? p.dz.at<T>(sq.bi, di) + sq.begin + t0 : nullptr;
    if (z) {
      LINMIX_SIMD
      for (int64_t i = 0; i < len; ++i)  // ss_gate_dz, in y
        y[i] *= static_cast<acc_t>(dout[i]) * silu_grad_cpu(static_cast<acc_t>(z[i]));
      LINMIX_SIMD
      for (int64_t i = 0; i < len; ++i) dz_out[i] = cpu_cast<T>(y[i]);
    }
    LINMIX_SIMD
    for (int64_t i = 0; i < len; ++i) ddl[i] *= delta_grad_cpu(static_cast<acc_t>(delta[i]), bias, p.delta_softplus);
    dbias += sum_cpu(ddl.data(), len);
    LINMIX_SIMD
    for (int64_t i = 0; i < len; ++i) {
      ddelta_out[i] = cpu_cast<T>(ddl[i]);
      du_out[i] = cpu_cast<T>(du[i]);
    }
  }

  // Adds state n's gradient terms d[i] of B or C over the chunk: to its variable row, or summed to its constant entry.
  LINMIX_CPU_CLONES void add_bc_grad(const BCView& v, acc_t* grad, const SsSeq& sq, int64_t di, int64_t n,
                                     int64_t t0, int64_t len, const acc_t* d) const {
    if (v.variable) {
      acc_t* row = grad + bc_row(v, sq.bi, di, n, p.dim, sq.begin) + t0;
      LINMIX_SIMD
      for (int64_t i = 0; i < len; ++i) row[i] += d[i];
    } else {
      grad[sq.bd * N + n] += sum_cpu(d, len);
    }
  }
};

template <DType dt>
void fwd_impl(const SelectiveScanParams& p) {
  using acc_t = cpu_acc_t<dt>;
  const int64_t N = p.dstate, K = kSelectiveScanChunk;
  // A packed call's tasks have unequal lengths: its grain assumes the mean, L / N steps per task.
  const int64_t steps = p.varlen.packed() ? ceil_div(p.seqlen, std::max<int64_t>(p.batch, 1)) : p.seqlen;
  parallel_for(0, p.batch * p.dim, cpu_grain(steps * N), [&](int64_t begin, int64_t end) {
    ChunkScan<dt> cs(p);
    std::vector<acc_t> h(N);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t di = task % p.dim;
      const SsSeq sq = ss_seq(p, task / p.dim, di);
      const int64_t bdn = sq.bd * N;
      for (int64_t n = 0; n < N; ++n)
        h[n] = p.initial_state ? static_cast<const acc_t*>(p.initial_state)[bdn + n] : acc_t(0);
      for (int64_t c = 0; c < sq.n_chunks; ++c) {
        cs.forward(sq, di, c * K, std::min(K, sq.len - c * K), h.data());
        std::copy(h.begin(), h.end(), static_cast<acc_t*>(p.checkpoints) + sq.ckpt + c * N);
      }
      std::copy(h.begin(), h.end(), static_cast<acc_t*>(p.final_state) + bdn);
    }
  });
}

template <DType dt>
void bwd_impl(const SelectiveScanParams& p) {
  using acc_t = cpu_acc_t<dt>;
  const int64_t N = p.dstate, K = kSelectiveScanChunk;
  const int64_t per_task = channels_per_task(p);
  const int64_t tasks_per_batch = p.dim / per_task;
  // Packed: tasks of different sequences write disjoint time ranges of variable dB/dC and their own partials.
  const int64_t steps = p.varlen.packed() ? ceil_div(p.seqlen, std::max<int64_t>(p.batch, 1)) : p.seqlen;
  parallel_for(0, p.batch * tasks_per_batch, cpu_grain(per_task * steps * N), [&](int64_t begin, int64_t end) {
    ChunkScan<dt> cs(p);
    std::vector<acc_t> s(N), carry(N);  // the adjoint reaching h_{-1} of the chunk; its last state (unused)
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = task / tasks_per_batch;
      for (int64_t di = (task % tasks_per_batch) * per_task, dend = di + per_task; di < dend; ++di) {
        const SsSeq sq = ss_seq(p, seq, di);
        const acc_t* ckpt = static_cast<const acc_t*>(p.checkpoints) + sq.ckpt;  // (n_chunks, n)
        const acc_t* h0 = p.initial_state ? static_cast<const acc_t*>(p.initial_state) + sq.bd * N : nullptr;
        const int64_t bdn = sq.bd * N;
        acc_t dD = 0, dbias = 0;
        for (int64_t n = 0; n < N; ++n) {
          s[n] = p.dfinal ? static_cast<const acc_t*>(p.dfinal)[bdn + n] : acc_t(0);
          static_cast<acc_t*>(p.dA_part)[bdn + n] = 0;
          if (!p.B.variable) static_cast<acc_t*>(p.dB)[bdn + n] = 0;
          if (!p.C.variable) static_cast<acc_t*>(p.dC)[bdn + n] = 0;
        }
        for (int64_t c = sq.n_chunks - 1; c >= 0; --c)
          cs.backward(sq, di, c * K, std::min(K, sq.len - c * K), c > 0 ? ckpt + (c - 1) * N : h0, s.data(),
                      carry.data(), dD, dbias);
        static_cast<acc_t*>(p.dD_part)[sq.bd] = dD;
        static_cast<acc_t*>(p.ddelta_bias_part)[sq.bd] = dbias;
        std::copy(s.begin(), s.end(), static_cast<acc_t*>(p.dinitial_state) + bdn);
      }
    }
  });
}

}  // namespace

void selective_scan_fwd_cpu(const SelectiveScanParams& p, DType dtype) {
  LINMIX_DTYPE_SWITCH(dtype, kDT, [&] { fwd_impl<kDT>(p); });
}

void selective_scan_bwd_cpu(const SelectiveScanParams& p, DType dtype) {
  LINMIX_DTYPE_SWITCH(dtype, kDT, [&] { bwd_impl<kDT>(p); });
}

}  // namespace linmix
