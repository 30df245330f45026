// CPU selective_state_update: parallel over (batch, head) rows with at::parallel_for; per row, the B/C group
// rows (staged once per (batch, group) as the accumulation type), then per head-dim element one pass over
// the n states that reads, updates and writes the state in place and accumulates C · state (vectorised with
// `omp simd`; the build passes -fopenmp).
#include "selective_scan/selective_state_update_cpu.h"

#include <ATen/Parallel.h>

#include <vector>

#include "common/cpu_types.h"
#include "common/static_switch.h"

namespace linmix {
namespace {

template <typename acc_t>
acc_t load_as(const void* ptr, DType t, int64_t i) {
  switch (t) {
    case DType::kFloat32: return static_cast<acc_t>(static_cast<const float*>(ptr)[i]);
    case DType::kFloat16: return static_cast<acc_t>(static_cast<const c10::Half*>(ptr)[i]);
    case DType::kBFloat16: return static_cast<acc_t>(static_cast<const c10::BFloat16*>(ptr)[i]);
    case DType::kFloat64: return static_cast<acc_t>(static_cast<const double*>(ptr)[i]);
  }
  return acc_t(0);
}

template <DType xdt, DType sdt>
void impl(const SelectiveStateUpdateParams& p) {
  using T = cpu_t<xdt>;
  using S = cpu_t<sdt>;
  using acc_t = cpu_acc_t<xdt>;
  const int64_t H = p.nheads, P = p.headdim, N = p.dstate;
  const int64_t heads_per_B = H / p.B_groups, heads_per_C = H / p.C_groups;
  const bool has_z = p.z.ptr != nullptr, a_scalar = p.A.s2 == 0;
  T* out = static_cast<T*>(p.out);
  const T* x = static_cast<const T*>(p.x.ptr);
  const T* z = static_cast<const T*>(p.z.ptr);
  const acc_t* A = static_cast<const acc_t*>(p.A.ptr);
  const acc_t* D = static_cast<const acc_t*>(p.D.ptr);
  const acc_t* bias = static_cast<const acc_t*>(p.dt_bias.ptr);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, P * N));
  at::parallel_for(0, p.batch * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(3 * N);  // B row, C row, A row (when A's n stride is not 1)
    acc_t *Bn = buf.data(), *Cn = Bn + N, *An = Cn + N;
    int64_t staged_B = -1, staged_C = -1;  // the (batch, group) rows in Bn / Cn
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, gB = h / heads_per_B, gC = h / heads_per_C;
      T* out_row = out + (b * H + h) * P;
      const int64_t srow = ssu_state_row(p, b);
      if (srow < 0) {  // padding
        for (int64_t j = 0; j < P; ++j) out_row[j] = T(0);
        continue;
      }
      if (staged_B != b * p.B_groups + gB) {
        staged_B = b * p.B_groups + gB;
        for (int64_t k = 0; k < N; ++k) Bn[k] = load_as<acc_t>(p.B.ptr, p.B_dtype, b * p.B.s0 + gB * p.B.s1 + k * p.B.s2);
      }
      if (staged_C != b * p.C_groups + gC) {
        staged_C = b * p.C_groups + gC;
        for (int64_t k = 0; k < N; ++k) Cn[k] = load_as<acc_t>(p.C.ptr, p.C_dtype, b * p.C.s0 + gC * p.C.s1 + k * p.C.s2);
      }
      S* state = static_cast<S*>(p.state) + srow * p.state_s0 + h * p.state_s1;
      for (int64_t j = 0; j < P; ++j) {
        const acc_t bias_j = bias ? bias[h * p.dt_bias.s0 + j * p.dt_bias.s1] : acc_t(0);
        const acc_t delta = ssu_delta(load_as<acc_t>(p.dt.ptr, p.dt_dtype, b * p.dt.s0 + h * p.dt.s1 + j * p.dt.s2),
                                      bias_j, p.dt_softplus);
        const acc_t xj = static_cast<acc_t>(x[b * p.x.s0 + h * p.x.s1 + j * p.x.s2]);
        const acc_t dx = delta * xj;
        const acc_t* a_row = A + h * p.A.s0 + j * p.A.s1;
        S* s = state + j * p.state_s2;
        acc_t y = 0;
        if (a_scalar) {  // A broadcast over n (Mamba-2): one exp per row
          const acc_t decay = ssu_exp(delta * a_row[0]);
#pragma omp simd reduction(+ : y)
          for (int64_t k = 0; k < N; ++k) {
            const acc_t v = ssu_state_step(static_cast<acc_t>(s[k]), decay, dx, Bn[k]);
            s[k] = static_cast<S>(v);
            y += v * Cn[k];
          }
        } else {
          if (p.A.s2 != 1) {
            for (int64_t k = 0; k < N; ++k) An[k] = a_row[k * p.A.s2];
            a_row = An;
          }
#pragma omp simd reduction(+ : y)
          for (int64_t k = 0; k < N; ++k) {
            const acc_t v = ssu_state_step(static_cast<acc_t>(s[k]), ssu_exp(delta * a_row[k]), dx, Bn[k]);
            s[k] = static_cast<S>(v);
            y += v * Cn[k];
          }
        }
        const acc_t dj = D ? D[h * p.D.s0 + j * p.D.s1] : acc_t(0);
        const acc_t zj = has_z ? static_cast<acc_t>(z[b * p.z.s0 + h * p.z.s1 + j * p.z.s2]) : acc_t(0);
        out_row[j] = static_cast<T>(ssu_output(y, dj, xj, has_z, zj));
      }
    }
  });
}

}  // namespace

void selective_state_update_cpu(const SelectiveStateUpdateParams& p, DType x_dtype, DType state_dtype) {
  LINMIX_DTYPE_SWITCH(x_dtype, kX, [&] {
    LINMIX_DTYPE_SWITCH(state_dtype, kS, [&] { impl<kX, kS>(p); });
  });
}

}  // namespace linmix
