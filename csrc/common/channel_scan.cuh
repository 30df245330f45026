// The channel-per-lane block scan of linear_scan, shared with fixed_point_rnn's scan kernels: inputs are
// channel-last (B, T, D), a warp's 32 lanes hold 32 consecutive channels, and the warps of a block split
// the time axis of a chunk (kItems consecutive steps each), combined through shared memory.
#pragma once

#include <cuda_runtime.h>

#include "common/math.h"

namespace linmix {

template <int kNWarps_, int kItems_>
struct ChannelScanTraits {
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kItems = kItems_;
  static constexpr int kThreads = 32 * kNWarps;
  static constexpr int kChunk = kNWarps * kItems;  // time steps per block iteration
  static_assert(kNWarps >= 1 && kNWarps <= 32, "one aggregate slot per warp in shared memory");
  static_assert(kItems >= 1, "each thread scans at least one step");
};

// Inclusive scan of one chunk for the channel owned by this lane: on entry r_b[k] holds b_k and
// r_a[k] the coefficient a_k of step (warp * kItems + k); on exit r_b[k] holds h_k. `carry` is h just
// before the chunk on entry and h after the chunk's last step on exit. All threads must call it.
template <typename Traits>
__device__ __forceinline__ void block_chunk_scan(const float (&r_a)[Traits::kItems], float (&r_b)[Traits::kItems],
                                                 float& carry, ScanPair<float>* s_agg /* (kNWarps, 32) */) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  ScanPair<float> agg{1.f, 0.f};
#pragma unroll
  for (int k = 0; k < Traits::kItems; ++k) agg = scan_combine(agg, ScanPair<float>{r_a[k], r_b[k]});
  s_agg[warp * 32 + lane] = agg;
  __syncthreads();
  float h = carry;
  for (int w = 0; w < warp; ++w) h = scan_step(s_agg[w * 32 + lane].a, h, s_agg[w * 32 + lane].b);
#pragma unroll
  for (int k = 0; k < Traits::kItems; ++k) {
    h = scan_step(r_a[k], h, r_b[k]);
    r_b[k] = h;
  }
  for (int w = 0; w < Traits::kNWarps; ++w) carry = scan_step(s_agg[w * 32 + lane].a, carry, s_agg[w * 32 + lane].b);
  __syncthreads();  // s_agg is rewritten by the next chunk
}

using ChannelScanDefaultTraits = ChannelScanTraits<8, 8>;

}  // namespace linmix
