// Packed variable-length batches (FlashAttention's cu_seqlens convention) as the kernels see them: N sequences
// concatenated along time in batch row 0, sequence n at [cu_seqlens[n], cu_seqlens[n + 1]). Kernels and CPU loops
// iterate over "sequences" where they iterate over batch rows: a dense call is N = B rows of the full length, a
// packed call N spans of row 0. The offsets stay on the kernel's device and are read there; every read is clamped
// into [0, seqlen] and a span never runs backwards, so a malformed offset never makes a kernel touch memory outside
// its tensors (the Python layer raises on it with an asynchronous device assert, ops/_varlen.py). Torch-free.
#pragma once

#include <cstdint>

#include "common/math.h"

namespace linmix {

// One sequence: the batch row it lives in, its first time index there and its length.
struct SeqSpan {
  int64_t batch = 0, begin = 0, len = 0;

  // Its first step in the batch rows flattened, (B T) with rows seqlen long.
  LINMIX_HD int64_t first(int64_t seqlen) const { return batch * seqlen + begin; }
};

struct Varlen {
  const void* offsets = nullptr;  // (N + 1,) int32 or int64 on the kernel's device; null: a dense batch
  bool int64 = false;

  LINMIX_HD bool packed() const { return offsets != nullptr; }

  // Offset i clamped into [0, seqlen].
  LINMIX_HD int64_t offset(int64_t i, int64_t seqlen) const {
    const int64_t raw = int64 ? static_cast<const int64_t*>(offsets)[i] : static_cast<const int32_t*>(offsets)[i];
    return raw < 0 ? 0 : raw > seqlen ? seqlen : raw;
  }

  // Sequence n of a call whose rows are seqlen long: row n whole when dense, span n of row 0 when packed.
  LINMIX_HD SeqSpan span(int64_t n, int64_t seqlen) const {
    if (!packed()) return {n, 0, seqlen};
    const int64_t b = offset(n, seqlen), e = offset(n + 1, seqlen);
    return {0, b, e > b ? e - b : 0};
  }

  // The packed sequence (of n_seqs >= 1) that holds step t of row 0: the last n with offset(n) <= t, found by
  // bisection. Any offsets give an n in [0, n_seqs) (each read clamped), so a malformed tensor stays in bounds.
  LINMIX_HD int64_t sequence_of(int64_t t, int64_t n_seqs, int64_t seqlen) const {
    int64_t lo = 0, hi = n_seqs - 1;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo + 1) / 2;
      if (offset(mid, seqlen) <= t) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    return lo;
  }

  // The mean length of the n_seqs sequences of a call with rows seqlen long (a CPU task's expected work).
  LINMIX_HD int64_t mean_len(int64_t seqlen, int64_t n_seqs) const {
    return packed() && n_seqs > 0 ? ceil_div(seqlen, n_seqs) : seqlen;
  }
};

// Per-chunk storage (checkpoints, chunk states) for packed sequences without knowing their lengths on the host:
// chunk c of sequence n, which starts at `begin`, goes to slot begin / chunk + n + c. Slots of different sequences
// never collide (sequence n's last slot, begin / chunk + n + ceil(len / chunk) - 1, is below sequence n + 1's
// first, (begin + len) / chunk + n + 1), and every slot is below packed_chunk_slots.
LINMIX_HD int64_t packed_chunk_slot(int64_t n, int64_t begin, int64_t chunk, int64_t c) {
  return begin / chunk + n + c;
}
LINMIX_HD int64_t packed_chunk_slots(int64_t total, int64_t n_seqs, int64_t chunk) {
  return ceil_div(total, chunk) + n_seqs;
}

}  // namespace linmix
