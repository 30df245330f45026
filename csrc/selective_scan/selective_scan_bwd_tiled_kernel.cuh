// CUDA selective scan, backward without per-element atomics (opt-in: LINMIX_KERNELS=selective_scan_bwd_tiled, see
// common/kernels.h).
//
// The default backward (selective_scan_bwd_kernel.cuh) gives each (batch, channel) its own block, so every
// block adds its variable dB_t[n] = Σ_d g δ u and dC_t[n] = Σ_d dy h into the group's (b, g, n, L) buffer
// with one fp32 atomic per element: b·d·n·L of them per tensor. Here a block owns a tile of up to
// kSelectiveScanTile channels of one group (selective_scan_tiling in params.h), one warp per channel, and
// sums the tile's dB/dC over its channels in shared memory, in a fixed order, before one write per element:
// an atomic into dB/dC, or (deterministic) a store into the tile's own slice of a (b, n_tiles, n, L) partial
// buffer that linmix_selective_scan_bwd_reduce_kernel then sums over a group's tiles in a fixed order.
//
// Per warp, lane j owns kItems consecutive steps of a kSelectiveScanSubChunk-step sub-chunk. The forward
// checkpoints the state every kSelectiveScanChunk steps; per chunk (walked in reverse):
//   pass 1: the state at every sub-chunk boundary (a warp scan of the sub-chunk's (exp(δA), δBu) pairs from
//           the checkpoint), kept per (channel, sub-chunk, n) in the fp32 `sub_states` scratch;
//   pass 2: sub-chunks in reverse; per state n, the states inside the sub-chunk are recomputed from its
//           boundary state (warp scan), the adjoint s_t = a_t (C_t dy_t + s_{t+1}) runs backwards (reverse warp
//           scan seeded with the adjoint carried from the later sub-chunk, kept in the dinitial_state row), and
//           every per-step gradient is formed in registers. Every warp of the block steps through the same
//           (chunk, sub-chunk, n) sequence, so the tile's dB/dC at one (n, sub-chunk) meet in shared memory.
// dA and fixed dB/dC are warp-summed and added by lane 0 (their only writer) into per-(b, d) partials; dD and
// ddelta_bias likewise at the end. No float atomics on the deterministic path: bitwise repeatable.
#pragma once

#include "selective_scan/selective_scan_block_scan.cuh"

namespace linmix {

struct SelectiveScanTiledTraits {
  static constexpr int kWarps = int(kSelectiveScanTile);  // channels per block
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kSub = int(kSelectiveScanSubChunk);
  static constexpr int kItems = kSub / 32;
  static constexpr int kNSub = int(kSelectiveScanChunk / kSelectiveScanSubChunk);
  static_assert(kItems == 4, "the dB/dC exchange stores one float4 per lane");
  static_assert(kSelectiveScanChunk % kSelectiveScanSubChunk == 0, "whole sub-chunks per checkpoint chunk");
  // All shared memory is static (no opt-in): the dB/dC exchange, double-buffered.
  static constexpr size_t kSmemBytes = size_t(2) * kWarps * 2 * kSub * sizeof(float);
  static_assert(kSmemBytes <= kDefaultBlockSharedBytes, "static shared memory needs no opt-in");
};

// grid: (b * n_tiles); block: kThreads. Warp w handles channel ch0 + w, ch0 the tile's first (idle past its end).
template <typename T>
__global__ void __launch_bounds__(SelectiveScanTiledTraits::kThreads)
    linmix_selective_scan_bwd_tiled_kernel(SelectiveScanParams p, SelectiveScanTiling tl) {
  using Tr = SelectiveScanTiledTraits;
  constexpr int kItems = Tr::kItems, kSub = Tr::kSub, kNSub = Tr::kNSub;
  LINMIX_SHARED_ALIGNED(16, float, s_ex, [2][Tr::kWarps][2][kSub]);  // [buffer][warp][dB, dC][step of the sub-chunk]
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t N = p.dstate, L = p.seqlen;
  const int64_t bi = blockIdx.x / tl.n_tiles, tile = blockIdx.x % tl.n_tiles;
  const int64_t tile_in_seg = tile % tl.tiles_per_seg;
  const int64_t ch0 = (tile / tl.tiles_per_seg) * tl.seg + tile_in_seg * Tr::kWarps;
  const int n_ch = int(tl.seg - tile_in_seg * Tr::kWarps < Tr::kWarps ? tl.seg - tile_in_seg * Tr::kWarps
                                                                          : Tr::kWarps);
  const bool active = warp < n_ch;
  const int64_t di = ch0 + (active ? warp : 0), bd = bi * p.dim + di, bdn = bd * N;
  const auto [A, bias, Dv, u, delta, z, dout] = ss_bwd_channel<T>(p, bi, di);
  const float* ckpt = static_cast<const float*>(p.checkpoints) + bd * p.n_chunks * N;  // (n_chunks, n)
  const float* h_init = p.initial_state ? static_cast<const float*>(p.initial_state) + bdn : nullptr;
  float* hsub = static_cast<float*>(p.sub_states) + bd * kNSub * N;  // (kNSub, n): state entering a sub-chunk
  float* carry = static_cast<float*>(p.dinitial_state) + bdn;        // (n): adjoint entering from later steps
  float* dA_part = static_cast<float*>(p.dA_part) + bdn;
  float* dB_fixed = p.B.variable ? nullptr : static_cast<float*>(p.dB) + bdn;
  float* dC_fixed = p.C.variable ? nullptr : static_cast<float*>(p.dC) + bdn;
  const bool exchange = p.B.variable || p.C.variable;  // uniform over the block
  // Offsets of B and C at state 0 (the group division done once, not per state).
  const int64_t b_base = ss_bc_offset(p.B, bi, di, 0, p.dim), c_base = ss_bc_offset(p.C, bi, di, 0, p.dim);

  if (active && lane == 0) {  // lane 0 is the only writer of these rows below: program order suffices
    for (int64_t n = 0; n < N; ++n) {
      carry[n] = p.dfinal ? static_cast<const float*>(p.dfinal)[bdn + n] : 0.f;
      dA_part[n] = 0.f;
      if (dB_fixed) dB_fixed[n] = 0.f;
      if (dC_fixed) dC_fixed[n] = 0.f;
    }
  }
  __syncwarp();
  float r_dD = 0.f, r_dbias = 0.f;
  int buf = 0;
  for (int64_t c = p.n_chunks - 1; c >= 0; --c) {
    const int64_t tc = c * kSelectiveScanChunk;
    const int n_sub = int(ceil_div(L - tc, kSub) < kNSub ? ceil_div(L - tc, kSub) : kNSub);
    // State entering sub-chunk s of this chunk, state n.
    auto h_enter = [&](int s, int64_t n) {
      return s > 0 ? hsub[s * N + n] : (c > 0 ? ckpt[(c - 1) * N + n] : (h_init ? h_init[n] : 0.f));
    };
    // Pass 1: boundary states of sub-chunks 1 .. n_sub-1.
    for (int s = 0; active && s + 1 < n_sub; ++s) {
      const int64_t t0 = tc + int64_t(s) * kSub + lane * kItems, n_valid = L - t0;
      float r_u[kItems], r_dl[kItems];
      load_items<kItems>(u + t0, n_valid, r_u, 0.f);
      load_items<kItems>(delta + t0, n_valid, r_dl, 0.f);
#pragma unroll
      for (int k = 0; k < kItems; ++k) r_dl[k] = k < n_valid ? ss_delta(r_dl[k], bias, p.delta_softplus) : 0.f;
      for (int64_t n = 0; n < N; ++n) {
        const float coef = ss_decay_coef(A[n]);
        float r_b[kItems];
        load_bc_items<kItems>(bc_row_at<T>(p.B, b_base, n), t0, L, r_b);
        float r_a[kItems];  // unused here
        ScanPair<float> excl;
        const ScanPair<float> agg =
            warp_scan_pairs<false>(ss_thread_pairs<kItems>(r_dl, coef, r_b, r_u, n_valid, r_a), excl);
        const float h_in = h_enter(s, n);  // written by lane 31 one sub-chunk earlier, before a __syncwarp
        if (lane == 31) hsub[(s + 1) * N + n] = scan_step(agg.a, h_in, agg.b);
      }
      __syncwarp();  // this sub-chunk's boundary states are read by every lane next
    }
    // Pass 2: sub-chunks in reverse.
    for (int s = n_sub - 1; s >= 0; --s) {
      const int64_t ts = tc + int64_t(s) * kSub, t0 = ts + lane * kItems, n_valid = L - t0;
      float r_u[kItems], r_dl[kItems], r_dy[kItems], r_y[kItems], r_du[kItems], r_ddl[kItems];
      if (active) {
        float r_raw[kItems], r_dout[kItems];  // dead after the call: reloaded where needed, to save registers
        bwd_load_steps<kItems>(u, delta, dout, z, t0, n_valid, bias, Dv,
                               p.delta_softplus, r_u, r_raw, r_dout, r_dl, r_dy, r_y, r_du, r_ddl, r_dD);
      }
      for (int64_t n = 0; n < N; ++n) {
        if (active) {
          const float An = A[n], coef = ss_decay_coef(An);
          const BCRow<T> Brow = bc_row_at<T>(p.B, b_base, n), Crow = bc_row_at<T>(p.C, c_base, n);
          float r_a[kItems], r_hp[kItems], r_b[kItems], r_c[kItems];
          load_bc_items<kItems>(Brow, t0, L, r_b);
          load_bc_items<kItems>(Crow, t0, L, r_c);
          // Recompute the states from the sub-chunk's boundary state (r_hp[k] = h before step k).
          ScanPair<float> excl;
          warp_scan_pairs<false>(ss_thread_pairs<kItems>(r_dl, coef, r_b, r_u, n_valid, r_a), excl);
          ss_thread_states<kItems>(scan_step(excl.a, h_enter(s, n), excl.b), r_a, r_b, r_dl, r_u, r_c, r_hp, r_y);
          // Adjoint, backwards in time, seeded with the adjoint entering from the later sub-chunk.
          warp_scan_pairs<true>(bwd_adjoint_pairs<kItems>(r_a, r_c, r_dy), excl);
          float dA = 0.f, dB = 0.f, dC = 0.f, r_dBt[kItems], r_dCt[kItems];
          const float sj = bwd_step_grads<kItems>(scan_step(excl.a, carry[n], excl.b), An, r_a, r_hp, r_dl, r_b, r_u,
                                                  r_c, r_dy, n_valid, r_du, r_ddl, dA, r_dBt, r_dCt);
#pragma unroll
          for (int k = 0; k < kItems; ++k) dB += r_dBt[k], dC += r_dCt[k];
          __syncwarp();  // every lane has read carry[n]
          if (lane == 0) carry[n] = sj;  // the adjoint at the sub-chunk's first step
          if (exchange) {  // one 16-byte store per lane and tensor: no bank conflicts
            *reinterpret_cast<float4*>(&s_ex[buf][warp][0][lane * kItems]) =
                make_float4(r_dBt[0], r_dBt[1], r_dBt[2], r_dBt[3]);
            *reinterpret_cast<float4*>(&s_ex[buf][warp][1][lane * kItems]) =
                make_float4(r_dCt[0], r_dCt[1], r_dCt[2], r_dCt[3]);
          }
          dA = warp_sum(dA);
          if (dB_fixed) dB = warp_sum(dB);
          if (dC_fixed) dC = warp_sum(dC);
          if (lane == 0) {
            dA_part[n] += dA;
            if (dB_fixed) dB_fixed[n] += dB;
            if (dC_fixed) dC_fixed[n] += dC;
          }
        }
        if (exchange) {
          // Sum the tile's channels in warp order, one write per (variable tensor, step). Two buffers: the
          // next (sub-chunk, n) writes the other one, and the one after that follows this step's reads
          // behind the next barrier.
          __syncthreads();
          for (int i = tid; i < 2 * kSub; i += Tr::kThreads) {
            const int which = i / kSub, j = i % kSub;
            const BCView& v = which == 0 ? p.B : p.C;
            if (!v.variable || ts + j >= L) continue;
            float sum = 0.f;
            for (int w = 0; w < n_ch; ++w) sum += s_ex[buf][w][which][j];
            void* tiles = which == 0 ? p.dB_tiles : p.dC_tiles;
            if (tiles) {
              static_cast<float*>(tiles)[((bi * tl.n_tiles + tile) * N + n) * L + ts + j] = sum;
            } else {
              atomicAdd(static_cast<float*>(which == 0 ? p.dB : p.dC) + ss_bc_offset(v, bi, ch0, n, p.dim) + ts + j,
                        sum);
            }
          }
          buf ^= 1;
        }
      }
      if (active) {
        if (z) {
          float r_z[kItems], r_dz[kItems];
          load_items<kItems>(z + t0, n_valid, r_z, 0.f);
          load_items<kItems>(dout + t0, n_valid, r_dz, 0.f);
#pragma unroll
          for (int k = 0; k < kItems; ++k) r_dz[k] = ss_gate_dz(r_dz[k], r_y[k], r_z[k]);
          store_items<kItems>(p.dz.at<T>(bi, di) + t0, n_valid, r_dz);
        }
        float r_raw[kItems];  // reloaded rather than kept live through the state loop
        load_items<kItems>(delta + t0, n_valid, r_raw, 0.f);
#pragma unroll
        for (int k = 0; k < kItems; ++k) {
          r_ddl[k] = k < n_valid ? r_ddl[k] * ss_delta_grad(r_raw[k], bias, p.delta_softplus) : 0.f;
          r_dbias += r_ddl[k];
        }
        store_items<kItems>(p.ddelta.at<T>(bi, di) + t0, n_valid, r_ddl);
        store_items<kItems>(p.du.at<T>(bi, di) + t0, n_valid, r_du);
      }
    }
    __syncwarp();  // pass 2's reads of sub_states precede the next chunk's pass 1 writes
  }
  r_dD = warp_sum(r_dD), r_dbias = warp_sum(r_dbias);
  if (active && lane == 0) {
    static_cast<float*>(p.dD_part)[bd] = r_dD;
    static_cast<float*>(p.ddelta_bias_part)[bd] = r_dbias;
  }
}

// The deterministic second pass: out (b, g, n, L) = Σ over the group's tiles, in tile order, of the partials
// (b, n_tiles, n, L). A group's tiles are contiguous: tiles_per_group = (d / g) / seg · tiles_per_seg.
// grid-stride over b·g·n·L elements (64-bit).
// A template (one instance, kThreads = 256) so each instantiate/*.cu including this header links without clashes.
template <int kThreads>
__global__ void __launch_bounds__(kThreads)
    linmix_selective_scan_bwd_reduce_kernel(const float* __restrict__ tiles, float* __restrict__ out, int64_t batch,
                                            int64_t groups, int64_t n_tiles, int64_t tiles_per_group, int64_t nl) {
  const int64_t total = batch * groups * nl;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = i % nl, bg = i / nl, bi = bg / groups, g = bg % groups;
    const float* src = tiles + (bi * n_tiles + g * tiles_per_group) * nl + e;
    float sum = 0.f;
    for (int64_t j = 0; j < tiles_per_group; ++j) sum += src[j * nl];
    out[i] = sum;
  }
}

template <DType dt>
void selective_scan_bwd_tiled_cuda(const SelectiveScanParams& p, cudaStream_t stream) {
  using Tr = SelectiveScanTiledTraits;
  if (p.batch * p.dim == 0) return;
  const SelectiveScanTiling tl = selective_scan_tiling(p);
  launch_kernel(linmix_selective_scan_bwd_tiled_kernel<cuda_t<dt>>,
                checked_grid("selective_scan", "(b channel_tiles)", p.batch * tl.n_tiles), Tr::kThreads, 0, stream, p,
                tl);
  const int64_t nl = p.dstate * p.seqlen;
  for (int which = 0; which < 2; ++which) {
    const BCView& v = which == 0 ? p.B : p.C;
    const void* tiles = which == 0 ? p.dB_tiles : p.dC_tiles;
    if (!v.variable || tiles == nullptr || nl == 0) continue;
    const int64_t per_group = p.dim / v.n_groups / tl.seg * tl.tiles_per_seg;
    const int64_t total = p.batch * v.n_groups * nl;
    constexpr int kThreads = 256;
    const int64_t blocks = ceil_div(total, kThreads) < 65535 * 16 ? ceil_div(total, kThreads) : 65535 * 16;
    launch_kernel(linmix_selective_scan_bwd_reduce_kernel<kThreads>, dim3(static_cast<unsigned>(blocks)), kThreads, 0,
                  stream, static_cast<const float*>(tiles), static_cast<float*>(which == 0 ? p.dB : p.dC), p.batch,
                  v.n_groups, tl.n_tiles, per_group, nl);
  }
}

}  // namespace linmix
