// CPU selective scan, forward and backward. Same decomposition as the CUDA kernels: per (sequence,
// channel) (a sequence is a batch row, or a span of row 0 with cu_seqlens: ss_seq), chunks of
// kSelectiveScanChunk steps, a loop over states inside the chunk with the time loop innermost (variable B/C
// rows are contiguous in time), fp32 (fp64) checkpoints per chunk, and a backward that walks chunks in reverse
// and recomputes the states of one chunk at a time.
#include "selective_scan/selective_scan_cpu.h"

#include <algorithm>
#include <numeric>
#include <vector>

#include "common/cpu_kernel.h"
#include "common/cpu_types.h"
#include "common/parallel.h"
#include "common/static_switch.h"
#include "selective_scan/selective_scan_common.h"

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

// B or C at time t of the row starting at `row` (a bc_row), as the accumulation type.
template <typename T, typename acc_t>
acc_t bc_at(const BCView& v, int64_t row, int64_t t) {
  return v.variable ? static_cast<acc_t>(static_cast<const T*>(v.ptr)[row + t])
                    : static_cast<const acc_t*>(v.ptr)[row];
}

template <DType dt>
void fwd_impl(const SelectiveScanParams& p) {
  using T = cpu_t<dt>;
  using acc_t = cpu_acc_t<dt>;
  const int64_t N = p.dstate, K = kSelectiveScanChunk;
  const auto* A = static_cast<const acc_t*>(p.A);
  // A packed call's tasks have unequal lengths: its grain assumes the mean, L / N steps per task.
  const int64_t steps = p.varlen.packed() ? ceil_div(p.seqlen, std::max<int64_t>(p.batch, 1)) : p.seqlen;
  parallel_for(0, p.batch * p.dim, cpu_grain(steps * N), [&](int64_t begin, int64_t end) LINMIX_CPU_CLONES {
    std::vector<acc_t> dl(K), dlu(K), y(K), h(N);  // δ, δ u, y over the chunk; the state
    for (int64_t task = begin; task < end; ++task) {
      const int64_t di = task % p.dim;
      const SsSeq sq = ss_seq(p, task / p.dim, di);
      const int64_t bi = sq.bi, L = sq.len;
      const T* u = p.u.at<const T>(bi, di) + sq.begin;  // (len) rows of this sequence
      const T* delta = p.delta.at<const T>(bi, di) + sq.begin;
      const T* z = p.z.ptr ? p.z.at<const T>(bi, di) + sq.begin : nullptr;
      T* out = p.out.at<T>(bi, di) + sq.begin;
      const acc_t bias = p.delta_bias ? static_cast<const acc_t*>(p.delta_bias)[di] : acc_t(0);
      const acc_t Dv = p.D ? static_cast<const acc_t*>(p.D)[di] : acc_t(0);
      const int64_t bdn = sq.bd * N;
      for (int64_t n = 0; n < N; ++n)
        h[n] = p.initial_state ? static_cast<const acc_t*>(p.initial_state)[bdn + n] : acc_t(0);
      for (int64_t c = 0; c < sq.n_chunks; ++c) {
        const int64_t t0 = c * K, len = std::min(K, L - t0);
        for (int64_t i = 0; i < len; ++i) {
          const acc_t uv = static_cast<acc_t>(u[t0 + i]);
          dl[i] = ss_delta(static_cast<acc_t>(delta[t0 + i]), bias, p.delta_softplus);
          dlu[i] = dl[i] * uv;
          y[i] = Dv * uv;
        }
        for (int64_t n = 0; n < N; ++n) {
          const acc_t coef = ss_decay_coef(A[di * N + n]);
          const int64_t rb = bc_row(p.B, bi, di, n, p.dim, sq.begin), rc = bc_row(p.C, bi, di, n, p.dim, sq.begin);
          acc_t hn = h[n];
          for (int64_t i = 0; i < len; ++i) {
            const ScanPair<acc_t> st = ss_forward_pair(dl[i], coef, bc_at<T, acc_t>(p.B, rb, t0 + i), dlu[i]);
            hn = scan_step(st.a, hn, st.b);
            y[i] += bc_at<T, acc_t>(p.C, rc, t0 + i) * hn;
          }
          h[n] = hn;
        }
        for (int64_t i = 0; i < len; ++i)
          out[t0 + i] = static_cast<T>(z ? y[i] * silu(static_cast<acc_t>(z[t0 + i])) : y[i]);
        std::copy(h.begin(), h.end(), static_cast<acc_t*>(p.checkpoints) + sq.ckpt + c * N);
      }
      std::copy(h.begin(), h.end(), static_cast<acc_t*>(p.final_state) + bdn);
    }
  });
}

template <DType dt>
void bwd_impl(const SelectiveScanParams& p) {
  using T = cpu_t<dt>;
  using acc_t = cpu_acc_t<dt>;
  const int64_t N = p.dstate, K = kSelectiveScanChunk;
  const auto* A = static_cast<const acc_t*>(p.A);
  const int64_t per_task = channels_per_task(p);
  const int64_t tasks_per_batch = p.dim / per_task;
  // Packed: tasks of different sequences write disjoint time ranges of variable dB/dC and their own partials.
  const int64_t steps = p.varlen.packed() ? ceil_div(p.seqlen, std::max<int64_t>(p.batch, 1)) : p.seqlen;
  parallel_for(0, p.batch * tasks_per_batch, cpu_grain(per_task * steps * N), [&](int64_t begin, int64_t end) LINMIX_CPU_CLONES {
    // Per chunk: δ, δ u, u, dy, y (pre-gate), a_t and h_{t-1} of the current state, du and dδ accumulators.
    std::vector<acc_t> dl(K), dlu(K), uu(K), dy(K), y(K), a(K), hp(K), du(K), ddl(K), s(N);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = task / tasks_per_batch;
      for (int64_t di = (task % tasks_per_batch) * per_task, dend = di + per_task; di < dend; ++di) {
        const SsSeq sq = ss_seq(p, seq, di);
        const int64_t bi = sq.bi, L = sq.len, b0 = sq.begin;
        const T* u = p.u.at<const T>(bi, di) + b0;  // (len) rows of this sequence
        const T* delta = p.delta.at<const T>(bi, di) + b0;
        const T* z = p.z.ptr ? p.z.at<const T>(bi, di) + b0 : nullptr;
        const T* dout = p.dout.at<const T>(bi, di) + b0;
        T* du_out = p.du.at<T>(bi, di) + b0;
        T* ddelta_out = p.ddelta.at<T>(bi, di) + b0;
        T* dz_out = z ? p.dz.at<T>(bi, di) + b0 : nullptr;
        const acc_t* ckpt = static_cast<const acc_t*>(p.checkpoints) + sq.ckpt;  // (n_chunks, n)
        const acc_t bias = p.delta_bias ? static_cast<const acc_t*>(p.delta_bias)[di] : acc_t(0);
        const acc_t Dv = p.D ? static_cast<const acc_t*>(p.D)[di] : acc_t(0);
        const int64_t bd = sq.bd, bdn = bd * N;
        acc_t* dA = static_cast<acc_t*>(p.dA_part) + bdn;
        acc_t* dB = static_cast<acc_t*>(p.dB);
        acc_t* dC = static_cast<acc_t*>(p.dC);
        acc_t dD = 0, dbias = 0;
        for (int64_t n = 0; n < N; ++n) {
          s[n] = p.dfinal ? static_cast<const acc_t*>(p.dfinal)[bdn + n] : acc_t(0);
          dA[n] = 0;
          if (!p.B.variable) dB[bdn + n] = 0;
          if (!p.C.variable) dC[bdn + n] = 0;
        }
        for (int64_t c = sq.n_chunks - 1; c >= 0; --c) {
          const int64_t t0 = c * K, len = std::min(K, L - t0);
          for (int64_t i = 0; i < len; ++i) {
            uu[i] = static_cast<acc_t>(u[t0 + i]);
            dl[i] = ss_delta(static_cast<acc_t>(delta[t0 + i]), bias, p.delta_softplus);
            dlu[i] = dl[i] * uu[i];
            y[i] = Dv * uu[i];
            dy[i] = static_cast<acc_t>(dout[t0 + i]);
            if (z) dy[i] = ss_gate_dy(dy[i], static_cast<acc_t>(z[t0 + i]));
            du[i] = dy[i] * Dv;
            ddl[i] = 0;
            dD += dy[i] * uu[i];
          }
          for (int64_t n = 0; n < N; ++n) {
            const acc_t An = A[di * N + n], coef = ss_decay_coef(An);
            const int64_t rb = bc_row(p.B, bi, di, n, p.dim, b0), rc = bc_row(p.C, bi, di, n, p.dim, b0);
            acc_t h = c > 0 ? ckpt[(c - 1) * N + n]
                            : (p.initial_state ? static_cast<const acc_t*>(p.initial_state)[bdn + n] : acc_t(0));
            for (int64_t i = 0; i < len; ++i) {  // recompute the chunk's states from its checkpoint
              const ScanPair<acc_t> st = ss_forward_pair(dl[i], coef, bc_at<T, acc_t>(p.B, rb, t0 + i), dlu[i]);
              hp[i] = h;
              a[i] = st.a;
              h = scan_step(st.a, h, st.b);
              y[i] += bc_at<T, acc_t>(p.C, rc, t0 + i) * h;
            }
            acc_t sn = s[n], dA_n = 0, dB_n = 0, dC_n = 0;
            for (int64_t i = len - 1; i >= 0; --i) {
              const acc_t b_val = bc_at<T, acc_t>(p.B, rb, t0 + i), c_val = bc_at<T, acc_t>(p.C, rc, t0 + i);
              const acc_t g = c_val * dy[i] + sn;
              sn = a[i] * g;  // = ss_adjoint_pair(a, C dy) applied to s_{t+1}
              const SSStepGrad<acc_t> gr = ss_step_grad(g, hp[i], a[i], dl[i], An, b_val, uu[i]);
              const acc_t dc = dy[i] * scan_step(a[i], hp[i], b_val * dlu[i]);
              du[i] += gr.du;
              ddl[i] += gr.ddelta;
              dA_n += gr.dA;
              if (p.B.variable) dB[rb + t0 + i] += gr.dB; else dB_n += gr.dB;
              if (p.C.variable) dC[rc + t0 + i] += dc; else dC_n += dc;
            }
            s[n] = sn;
            dA[n] += dA_n;
            if (!p.B.variable) dB[bdn + n] += dB_n;
            if (!p.C.variable) dC[bdn + n] += dC_n;
          }
          for (int64_t i = 0; i < len; ++i) {
            if (z) {
              const acc_t dz = ss_gate_dz(static_cast<acc_t>(dout[t0 + i]), y[i], static_cast<acc_t>(z[t0 + i]));
              dz_out[t0 + i] = static_cast<T>(dz);
            }
            const acc_t dd = ddl[i] * ss_delta_grad(static_cast<acc_t>(delta[t0 + i]), bias, p.delta_softplus);
            dbias += dd;
            ddelta_out[t0 + i] = static_cast<T>(dd);
            du_out[t0 + i] = static_cast<T>(du[i]);
          }
        }
        static_cast<acc_t*>(p.dD_part)[bd] = dD;
        static_cast<acc_t*>(p.ddelta_bias_part)[bd] = dbias;
        std::copy(s.begin(), s.begin() + N, static_cast<acc_t*>(p.dinitial_state) + bdn);
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
