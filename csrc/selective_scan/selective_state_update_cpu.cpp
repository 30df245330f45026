// CPU selective_state_update: parallel over (batch, head, tile of head-dim rows) with parallel_for (common/parallel.h). Per
// task: the B/C group rows (staged once per (batch, group) as the accumulation type); δ = softplus(dt + bias)
// and δx (and with A tied over n the decay) for the tile in one vector pass; per row one pass over the n states
// that reads, steps and writes the state in place and keeps C_n · state_n; their sums for the tile; the D x term
// and the silu(z) gate for the tile in one vector pass.
// Loops carry `omp simd` (the build passes -fopenmp); exp and log1p are the polynomial host versions.
#include "selective_scan/selective_state_update_cpu.h"

#include <algorithm>
#include <vector>

#include "common/cpu_kernel.h"
#include "common/cpu_types.h"
#include "common/parallel.h"
#include "common/static_switch.h"

namespace linmix {
namespace {

template <typename acc_t>
acc_t load_as(const void* ptr, DType t, int64_t i) {
  switch (t) {
    case DType::kFloat32: return static_cast<acc_t>(static_cast<const float*>(ptr)[i]);
    case DType::kFloat16: return static_cast<acc_t>(static_cast<const torch::headeronly::Half*>(ptr)[i]);
    case DType::kBFloat16: return static_cast<acc_t>(static_cast<const torch::headeronly::BFloat16*>(ptr)[i]);
    case DType::kFloat64: return static_cast<acc_t>(static_cast<const double*>(ptr)[i]);
  }
  return acc_t(0);
}

// y_r = Σ_n prod_rn for the tile's rows. With n a power of two known at compile time: pairwise in halves, each
// level one vector pass over the tile. The `omp simd` sum per row combined its 16 lanes one after another (16
// dependent adds per row), which with the per-row exp bound the Mamba-2 step.
template <int kN, typename acc_t>
LINMIX_CPU_INLINE void row_sums(acc_t* prod, int64_t rows, int64_t n, acc_t* y) {
  if constexpr (kN > 0 && (kN & (kN - 1)) == 0) {
#pragma GCC unroll 8
    for (int w = kN / 2; w > 0; w /= 2)
      for (int64_t r = 0; r < rows; ++r)
#pragma GCC unroll 64
        for (int k = 0; k < w; ++k) prod[r * kN + k] += prod[r * kN + k + w];
    for (int64_t r = 0; r < rows; ++r) y[r] = prod[r * kN];
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      acc_t sum = 0;
      LINMIX_SIMD_SUM(sum)
      for (int64_t k = 0; k < n; ++k) sum += prod[r * n + k];
      y[r] = sum;
    }
  }
}

constexpr int64_t kRowTile = 64;  // head-dim rows whose δ, δx and outputs are computed in one vector pass

// kN: the state size fixed at compile time (the state loop fully unrolled), or 0 for any.
template <DType xdt, DType sdt, int kN>
void impl(const SelectiveStateUpdateParams& p) {
  using T = cpu_t<xdt>;
  using S = cpu_t<sdt>;
  using acc_t = cpu_acc_t<xdt>;
  const int64_t H = p.nheads, P = p.headdim, N = kN ? kN : p.dstate;
  const int64_t heads_per_B = H / p.B_groups, heads_per_C = H / p.C_groups;
  const bool has_z = p.z.ptr != nullptr, a_scalar = p.A.stride[2] == 0;
  T* out = static_cast<T*>(p.out);
  const T* x = static_cast<const T*>(p.x.ptr);
  const T* z = static_cast<const T*>(p.z.ptr);
  const acc_t* A = static_cast<const acc_t*>(p.A.ptr);
  const acc_t* D = static_cast<const acc_t*>(p.D.ptr);
  const acc_t* bias = static_cast<const acc_t*>(p.dt_bias.ptr);
  // Tasks are (batch, head, tile of kRowTile head-dim rows); about 16K state elements per parallel grain.
  const int64_t tiles = (P + kRowTile - 1) / kRowTile;
  const int64_t grain = std::max<int64_t>(1, 16384 / (std::min(P, kRowTile) * std::max<int64_t>(N, 1)));
  parallel_for(0, p.batch * H * tiles, grain, [&](int64_t begin, int64_t end) LINMIX_CPU_CLONES {
    std::vector<acc_t> buf((3 + kRowTile) * N + 7 * kRowTile);
    acc_t *Bn = buf.data(), *Cn = Bn + N, *An = Cn + N;                   // B, C rows; A row if strided
    acc_t* prod = An + N;                                                 // (tile rows, n): C_n s'_n
    acc_t *delta = prod + kRowTile * N, *xv = delta + kRowTile, *dx = xv + kRowTile;  // per row of the tile
    acc_t *y = dx + kRowTile, *zv = y + kRowTile, *Dv = zv + kRowTile, *decay = Dv + kRowTile;
    int64_t staged_B = -1, staged_C = -1;  // the (batch, group) rows in Bn / Cn
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / tiles, j0 = (task % tiles) * kRowTile, rows = std::min(kRowTile, P - j0);
      const int64_t b = bh / H, h = bh % H, gB = h / heads_per_B, gC = h / heads_per_C;
      T* out_row = out + (b * H + h) * P + j0;
      const int64_t srow = ssu_state_row(p, b);
      if (srow < 0) {  // padding
        for (int64_t j = 0; j < rows; ++j) out_row[j] = T(0);
        continue;
      }
      if (staged_B != b * p.B_groups + gB) {
        staged_B = b * p.B_groups + gB;
        for (int64_t k = 0; k < N; ++k) Bn[k] = load_as<acc_t>(p.B.ptr, p.B_dtype, p.B.offset(b, gB, k));
      }
      if (staged_C != b * p.C_groups + gC) {
        staged_C = b * p.C_groups + gC;
        for (int64_t k = 0; k < N; ++k) Cn[k] = load_as<acc_t>(p.C.ptr, p.C_dtype, p.C.offset(b, gC, k));
      }
      // Gather the tile's per-row inputs (any strides and dtypes), then δ and δx in one vector pass.
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t j = j0 + r;
        delta[r] = load_as<acc_t>(p.dt.ptr, p.dt_dtype, p.dt.offset(b, h, j)) +
                   (bias ? bias[p.dt_bias.offset(h, j)] : acc_t(0));
        xv[r] = static_cast<acc_t>(x[p.x.offset(b, h, j)]);
      }
      if (p.dt_softplus) {
#pragma omp simd
        for (int64_t r = 0; r < rows; ++r) delta[r] = ssu_softplus(delta[r]);
      }
#pragma omp simd
      for (int64_t r = 0; r < rows; ++r) dx[r] = delta[r] * xv[r];
      if (a_scalar) {  // A broadcast over n (Mamba-2): one exp per row, for the tile in one vector pass
        for (int64_t r = 0; r < rows; ++r) decay[r] = A[p.A.offset(h, j0 + r)];
#pragma omp simd
        for (int64_t r = 0; r < rows; ++r) decay[r] = ssu_exp(delta[r] * decay[r]);
      }
      // The state pass: read, step and write each state element once; y = C · s' (s' as stored).
      S* state = p.state.at<S>(srow, h);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t j = j0 + r;
        const acc_t* a_row = A + p.A.offset(h, j);
        S* s = state + j * p.state.stride[2];
        const acc_t d = delta[r], dxr = dx[r];
        if (a_scalar) {  // A broadcast over n (Mamba-2): the row's decay from the tile pass
          const acc_t decay_r = decay[r];
          LINMIX_SIMD
          for (int64_t k = 0; k < N; ++k) {
            const acc_t v = ssu_state_step<S>(static_cast<acc_t>(s[k]), decay_r, dxr, Bn[k]);
            s[k] = cpu_cast<S>(v);
            prod[r * N + k] = v * Cn[k];
          }
        } else {
          if (p.A.stride[2] != 1) {
            for (int64_t k = 0; k < N; ++k) An[k] = a_row[k * p.A.stride[2]];
            a_row = An;
          }
          LINMIX_SIMD
          for (int64_t k = 0; k < N; ++k) {
            const acc_t v = ssu_state_step<S>(static_cast<acc_t>(s[k]), ssu_exp(d * a_row[k]), dxr, Bn[k]);
            s[k] = cpu_cast<S>(v);
            prod[r * N + k] = v * Cn[k];
          }
        }
      }
      row_sums<kN>(prod, rows, N, y);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t j = j0 + r;
        Dv[r] = D ? D[p.D.offset(h, j)] : acc_t(0);
        zv[r] = has_z ? static_cast<acc_t>(z[p.z.offset(b, h, j)]) : acc_t(1);
      }
      if (has_z) {  // the gate: silu, then its rounding to T, in two passes (gcc vectorises neither fused)
#pragma omp simd
        for (int64_t r = 0; r < rows; ++r) zv[r] = ssu_silu(zv[r]);
        for (int64_t r = 0; r < rows; ++r) zv[r] = ssu_round<T>(zv[r]);
      }
#pragma omp simd
      for (int64_t r = 0; r < rows; ++r) y[r] = ssu_output(y[r], Dv[r], xv[r], zv[r]);
      for (int64_t r = 0; r < rows; ++r) out_row[r] = cpu_cast<T>(y[r]);
    }
  });
}

}  // namespace

void selective_state_update_cpu(const SelectiveStateUpdateParams& p, DType x_dtype, DType state_dtype) {
  LINMIX_DTYPE_SWITCH(x_dtype, kX, [&] {
    LINMIX_DTYPE_SWITCH(state_dtype, kS, [&] { p.dstate == 16 ? impl<kX, kS, 16>(p) : impl<kX, kS, 0>(p); });
  });
}

}  // namespace linmix
