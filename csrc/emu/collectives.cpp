// Barriers and warp collectives for the CUDA emulator (runtime.h): __syncthreads, __syncwarp, shuffles, WMMA,
// __threadfence. A collective completes when the last lane its mask names arrives; that lane does the exchange for
// the whole group (the values moved and the fragments multiplied never look like memory accesses of the emulated
// threads to a sanitizer). Happens-before edges for ThreadSanitizer come only from barriers and __syncwarp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <span>
#include <string>
#include <vector>

#include "emu/internal.h"

namespace linmix::emu {
namespace {

// Counts `f`'s arrival in its warp's group for (op, mask); true when that was the last lane the mask names.
bool arrive(Block& B, const Fiber& f) {
  std::vector<WarpGroup>& groups = B.pending[f.tc.warp];
  for (size_t i = 0; i < groups.size(); ++i) {
    WarpGroup& g = groups[i];
    if (g.op != f.op || g.mask != f.mask) continue;
    if (++g.arrived < g.expected) return false;
    groups.erase(groups.begin() + static_cast<std::ptrdiff_t>(i));
    return true;
  }
  const int expected = __builtin_popcount(f.mask);
  if (expected == 1) return true;
  groups.push_back(WarpGroup{f.op, f.mask, 1, expected});
  return false;
}

int shuffle_source(const Fiber& g) {
  const int lane = g.tc.lane, bval = g.b & 31;
  const int segmask = (32 - g.width) & 31;
  const int cval = g.mode == ShflMode::kUp ? 0 : 31;
  const int max_lane = (lane & segmask) | (cval & ~segmask), min_lane = lane & segmask;
  int j = lane;
  bool ok = false;
  switch (g.mode) {
    case ShflMode::kUp: j = lane - bval, ok = j >= max_lane; break;
    case ShflMode::kDown: j = lane + bval, ok = j <= max_lane; break;
    case ShflMode::kBfly: j = lane ^ bval, ok = j <= max_lane; break;
    case ShflMode::kIdx: j = min_lane | (bval & ~segmask), ok = j <= max_lane; break;
  }
  return ok ? j : lane;
}

float elem_to_float(const void* base, int i, WmmaElem e) {
  switch (e) {
    case kElemF32: return static_cast<const float*>(base)[i];
    case kElemF16: return __half2float(static_cast<const __half*>(base)[i]);
    case kElemBf16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
  }
  return 0.f;
}

// The last lane to arrive completes the collective for the whole group (in fiber context).
void complete_group(Launch& L, Block& B, Fiber& last) {
  const int warp = last.tc.warp;
  Fiber* lane_list[32];
  int n_lanes = 0;
  for (int l = 0; l < 32; ++l)
    if (last.mask >> l & 1u) lane_list[n_lanes++] = &B.fibers[warp * 32 + l];
  const std::span<Fiber*> lanes(lane_list, n_lanes);
  const Fiber& f0 = *lanes.front();
  switch (last.op) {
    case WarpOp::kSyncwarp:
      ++B.syncwarp_gen[warp];
      break;
    case WarpOp::kShuffle:
      for (Fiber* g : lanes) {
        if (g->width <= 0 || g->width > 32 || (g->width & (g->width - 1)) != 0)
          fault(std::string(warp_op_name(g->op, g->mode)) + ": width " + std::to_string(g->width) +
                " is not a power of 2 in [1, 32]");
        const int src = shuffle_source(*g);
        if (!(last.mask >> src & 1u))
          fault(std::string(warp_op_name(g->op, g->mode)) + " at " + site(*g) + ": lane " +
                std::to_string(g->tc.lane) + " reads lane " + std::to_string(src) + ", which is not in the mask " +
                hex(last.mask) + " (the value is undefined)");
        g->out = B.fibers[warp * 32 + src].in;
      }
      break;
    case WarpOp::kWmmaLoad:
    case WarpOp::kWmmaStore:
      for (const Fiber* g : lanes)
        if (g->ptr != f0.ptr || g->ldm != f0.ldm || g->row != f0.row)
          fault(std::string(warp_op_name(last.op, last.mode)) + " at " + site(*g) +
                ": the lanes of a warp pass different pointers, ldm or layouts");
      break;
    case WarpOp::kWmmaMma: {
      float A[256], Bm[256], C[256];
      for (const Fiber* g : lanes) {
        const WmmaMmaArgs& a = *g->mma;
        const int l = g->tc.lane;
        if (a.kind_a != f0.mma->kind_a || a.kind_b != f0.mma->kind_b)
          fault("wmma::mma_sync: the lanes of a warp pass fragments of different types");
        for (int i = 0; i < kWmmaSlots; ++i) {
          A[L.wmma_pos[a.kind_a][l][i]] = elem_to_float(a.a, i, a.elem);
          Bm[L.wmma_pos[a.kind_b][l][i]] = elem_to_float(a.b, i, a.elem);
          C[L.wmma_pos[kWmmaAccF32][l][i]] = a.c[i];
        }
      }
      float D[256];
      for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c) {
          float acc = C[r * 16 + c];
          for (int k = 0; k < 16; ++k) acc += A[r * 16 + k] * Bm[k * 16 + c];
          D[r * 16 + c] = acc;
        }
      for (const Fiber* g : lanes)
        for (int i = 0; i < kWmmaSlots; ++i) g->mma->d[i] = D[L.wmma_pos[kWmmaAccF32][g->tc.lane][i]];
      break;
    }
  }
  for (Fiber* g : lanes) g->state = State::kRunnable;
}

// Arrive at a warp collective (in fiber context); returns when the group completed.
void warp_collective(Fiber& f, WarpOp op, unsigned mask, const char* file, int line) {
  Worker& w = *f.worker;
  Block& B = w.block;
  Launch& L = *B.launch;
  f.op = op;
  f.mask = mask;
  f.file = file;
  f.line = line;
  if (!(mask >> f.tc.lane & 1u))
    fault(std::string(warp_op_name(op, f.mode)) + " at " + site(f) + ": the calling lane " +
          std::to_string(f.tc.lane) + " is not in its mask " + hex(mask));
  const int warp_lanes = std::min(32, L.threads - f.tc.warp * 32);
  if (warp_lanes < 32 && (mask >> warp_lanes) != 0)
    fault(std::string(warp_op_name(op, f.mode)) + " at " + site(f) + ": the mask " + hex(mask) +
          " names lanes past the end of the block (this warp has " + std::to_string(warp_lanes) + " threads)");
  f.warp_gen = B.syncwarp_gen[f.tc.warp];
  if (op == WarpOp::kSyncwarp) hb_release(B.warp_sync(f.tc.warp, f.warp_gen));
  f.state = State::kWarp;
  if (arrive(B, f)) {
    complete_group(L, B, f);
  } else {
    w.yield(f);
  }
  if (op == WarpOp::kSyncwarp) hb_acquire(B.warp_sync(f.tc.warp, f.warp_gen));
}

}  // namespace

// ---------------------------------------------------------------- runtime.h
void syncthreads(const char* file, int line) {
  Fiber& f = self();
  Worker& w = *f.worker;
  f.state = State::kBarrier;
  f.file = file;
  f.line = line;
  f.barrier_gen = w.block.barrier_gen;
  hb_release(w.block.barrier_sync(f.barrier_gen));
  w.yield(f);
  hb_acquire(w.block.barrier_sync(f.barrier_gen));
}

void syncwarp(unsigned mask, const char* file, int line) {
  warp_collective(self(), WarpOp::kSyncwarp, mask, file, line);
}

uint64_t shuffle(ShflMode mode, unsigned mask, uint64_t bits, int b, int width, const char* file, int line) {
  Fiber& f = self();
  f.mode = mode;
  f.in = bits;
  f.b = b;
  f.width = width;
  warp_collective(f, WarpOp::kShuffle, mask, file, line);
  return f.out;
}

namespace {
int g_fence = 0;
}
void threadfence() {
  // Ordering through a fence is what CUDA's relaxed atomics rely on; ThreadSanitizer does not model fences, so
  // every fence both releases and acquires one object: an over-approximation that never reports a false race.
  hb_release(&g_fence);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  hb_acquire(&g_fence);
}

const uint8_t* wmma_positions(int kind) {
  const Fiber& f = self();
  return f.worker->block.launch->wmma_pos[kind][f.tc.lane];
}

void wmma_memory_op(WmmaOp op, const void* ptr, unsigned ldm, bool row_major, size_t elem_bytes, const char* file,
                    int line) {
  Fiber& f = self();
  const std::string name = op == WmmaOp::kLoad ? "wmma::load_matrix_sync" : "wmma::store_matrix_sync";
  f.file = file;
  f.line = line;
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0)
    fault(name + " at " + site(f) + ": the pointer is not 32-byte (256-bit) aligned");
  if ((ldm * elem_bytes) % 16 != 0)
    fault(name + " at " + site(f) + ": ldm = " + std::to_string(ldm) + " is not a multiple of " +
          std::to_string(16 / elem_bytes) + " elements");
  f.ptr = ptr;
  f.ldm = ldm;
  f.row = row_major;
  warp_collective(f, op == WmmaOp::kLoad ? WarpOp::kWmmaLoad : WarpOp::kWmmaStore, 0xffffffffu, file, line);
}

void wmma_mma(const WmmaMmaArgs& args, const char* file, int line) {
  Fiber& f = self();
  f.mma = &args;
  warp_collective(f, WarpOp::kWmmaMma, 0xffffffffu, file, line);
}

}  // namespace linmix::emu
