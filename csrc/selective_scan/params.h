// selective_scan (Mamba-1 S6): the torch-free interface between the glue and the kernels.
#pragma once

#include <cstdint>
#include <numeric>

#include "common/strided.h"
#include "common/varlen.h"

namespace linmix {

// Time steps per state checkpoint. Forward stores the fp32 state at the end of every chunk
// (b, d, n_chunks, n); backward walks chunks in reverse and recomputes the states inside one.
// The CUDA kernels process exactly one chunk per block iteration (kThreads x kItems), and the
// Python fake kernel sizes the checkpoint tensor with the same number (ops/selective_scan.py).
constexpr int64_t kSelectiveScanChunk = 1024;

// B or C. Fixed: (d, n), element strides dim_stride / n_stride, accumulation dtype.
// Variable: (b, g, n, L), unit stride along L, input dtype; channel i uses group i / (d / g).
struct BCView {
  void* ptr = nullptr;
  bool variable = false;
  int64_t n_groups = 1;
  int64_t batch_stride = 0, group_stride = 0, dim_stride = 0, n_stride = 0;
};

struct SelectiveScanParams {
  int64_t batch = 0, dim = 0, seqlen = 0, dstate = 0, n_chunks = 0;
  bool delta_softplus = false;

  // (b, d, L) tensors with unit stride along L: strides of b and d
  StridedView<2> u, delta, z;  // (b, d, L) inputs, input dtype; z.ptr null when absent
  BCView B, C;
  // Accumulation dtype (fp32; fp64 for the CPU-only fp64 path), contiguous:
  const void* A = nullptr;              // (d, n)
  const void* D = nullptr;              // (d,) or null
  const void* delta_bias = nullptr;     // (d,) or null
  const void* initial_state = nullptr;  // (b, d, n) or null (zeros)
  void* checkpoints = nullptr;          // (b, d, n_chunks, n): state after each chunk's last step

  // forward outputs
  StridedView<2> out;           // (b, d, L), input dtype, contiguous
  void* final_state = nullptr;  // (b, d, n), accumulation dtype

  // backward inputs
  StridedView<2> dout;           // (b, d, L), input dtype
  const void* dfinal = nullptr;  // (b, d, n) accumulation dtype, or null
  // backward outputs (accumulation dtype unless noted)
  StridedView<2> du, ddelta, dz;  // (b, d, L), input dtype, contiguous; dz.ptr null when z is absent
  // Variable B/C: (b, g, n, L) contiguous, zero-initialised, summed over the channels of a group.
  // Fixed B/C: per-(batch, channel) partials (b, d, n), summed over batch by the glue.
  void* dB = nullptr;
  void* dC = nullptr;
  void* dA_part = nullptr;      // (b, d, n) partials, summed over batch by the glue
  void* dD_part = nullptr;      // (b, d) partials
  void* ddelta_bias_part = nullptr;  // (b, d) partials
  void* dinitial_state = nullptr;    // (b, d, n)

  // Atomic-free (tiled) backward only, see selective_scan_bwd_tiled_kernel.cuh:
  void* sub_states = nullptr;  // (b, d, kSelectiveScanChunk / kSelectiveScanSubChunk, n) fp32 scratch
  // Per-tile partials of variable dB/dC, (b, n_tiles, n, L) fp32, summed per group by a second, fixed-order
  // pass (deterministic); null: the tile adds its sums into dB/dC with one fp32 atomic per element.
  void* dB_tiles = nullptr;
  void* dC_tiles = nullptr;

  // Packed sequences (cu_seqlens, common/varlen.h; added last so that the dense kernels' parameter layout is
  // unchanged). Then batch is N, the number of sequences, and every per-(batch, channel) tensor above (initial and
  // final state, dfinal, dinitial_state, the partials and fixed dB/dC) is per (sequence, channel), (N, d, ...);
  // the (1, d, L) tensors and variable B/C keep their batch of 1; checkpoints are (1, d, n_chunks, n) with
  // n_chunks = packed_chunk_slots(L, N, kSelectiveScanChunk), sequence s's chunk c at packed_chunk_slot.
  Varlen varlen;
};

// The atomic-free backward's channel tiles. The channels are cut into segments that each lie inside one
// group of B and one of C (seg = gcd of the two group sizes, a fixed B/C counting as one group of d), and each
// segment into tiles of kSelectiveScanTile channels, the last one partial. A tile never straddles a group.
constexpr int64_t kSelectiveScanTile = 16;       // channels per block (one warp each)
constexpr int64_t kSelectiveScanSubChunk = 128;  // steps per warp pass (32 lanes x 4 items)

struct SelectiveScanTiling {
  int64_t seg = 1, tiles_per_seg = 1, n_tiles = 0;  // n_tiles per batch row
};

inline SelectiveScanTiling selective_scan_tiling(const SelectiveScanParams& p) {
  const int64_t sb = p.B.variable ? p.dim / p.B.n_groups : p.dim;
  const int64_t sc = p.C.variable ? p.dim / p.C.n_groups : p.dim;
  SelectiveScanTiling t;
  t.seg = std::gcd(sb, sc);
  t.tiles_per_seg = (t.seg + kSelectiveScanTile - 1) / kSelectiveScanTile;
  t.n_tiles = p.dim / t.seg * t.tiles_per_seg;
  return t;
}

}  // namespace linmix
