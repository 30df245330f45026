"""A replay of the CUDA selective_state_update kernel (selective_state_update_kernel.cuh): fwd, in numpy float64,
thread by thread, with the kernel's block geometry (THREADS per block, VEC states per access)."""

import numpy as np

THREADS, VEC = 128, 4


def threads_per_row(n):
    t = 4
    while t < 32 and t * VEC < n:
        t *= 2
    return t


def fwd(state, x, dt, A, B, C, D, z, dt_bias, softplus, idx):
    """linmix_selective_state_update_fwd_kernel in numpy float64, thread by thread: flat grid (batch x row blocks), kTPR threads per row,
    runs of VEC states at lane * VEC + k * kTPR * VEC, xor-shuffle sum over the row's lanes. Heads layout.
    Returns out and the new state, and asserts every live state element is written exactly once."""
    S, h, p, n = state.shape
    b = x.shape[0]
    tpr = threads_per_row(n)
    rpb, rows = THREADS // tpr, h * p
    row_blocks = -(-rows // rpb)
    state, out = state.copy(), np.full((b, h, p), np.nan)
    writes = np.zeros(state.shape, dtype=np.int64)
    for block in range(b * row_blocks):
        bb, rb = divmod(block, row_blocks)
        srow = bb if idx is None else idx[bb]
        srow = -1 if srow < 0 or srow >= S else srow
        y = np.zeros(THREADS)
        for t in range(THREADS):
            r, lane = rb * rpb + t // tpr, t % tpr
            if r >= rows:
                continue
            hh, j = divmod(r, p)
            if srow < 0:
                if lane == 0:
                    out[bb, hh, j] = 0.0
                continue
            gB, gC = hh // (h // B.shape[1]), hh // (h // C.shape[1])
            delta = dt[bb, hh, j] + (0.0 if dt_bias is None else dt_bias[hh, j])
            delta = np.log1p(np.exp(delta)) if softplus and delta <= 20 else delta
            for k0 in range(lane * VEC, n, tpr * VEC):
                for k in range(k0, min(k0 + VEC, n)):
                    v = np.exp(delta * A[hh, j, k]) * state[srow, hh, j, k] + delta * x[bb, hh, j] * B[bb, gB, k]
                    state[srow, hh, j, k] = v
                    writes[srow, hh, j, k] += 1
                    y[t] += v * C[bb, gC, k]
        if srow < 0:
            continue
        off = tpr // 2
        while off:
            y = y + y[np.arange(THREADS) ^ off]  # __shfl_xor_sync: all lanes read before any writes
            off //= 2
        for t in range(0, THREADS, tpr):
            r = rb * rpb + t // tpr
            if r < rows:
                hh, j = divmod(r, p)
                o = y[t] + (0.0 if D is None else D[hh, j] * x[bb, hh, j])
                out[bb, hh, j] = o * (z[bb, hh, j] / (1 + np.exp(-z[bb, hh, j]))) if z is not None else o
    live = sorted({int(i) for i in (range(b) if idx is None else idx) if 0 <= i < S})
    assert (writes[live] == 1).all() and writes.sum() == len(live) * h * p * n
    return out, state
