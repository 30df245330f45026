"""A PyTorch replay of the chunk-parallel CUDA chunk_gla kernels (csrc/gla/gla_chunkpar_*.cuh): fwd and bwd.

It follows the kernels' block structure: the same chunk (64), sub-chunk (16), K and V tiles, the same phases in
the same order, the same segment-sum decays and the same dg closed form. Every loop over blocks of a grid
dimension (chunks, batch, heads) is vectorised; loops over tiles and sub-chunks that a block walks are explicit.
`op` is the tensor-core operand type (the input dtype for fp16/bf16; float32 for the fp32 path), `acc` the
accumulation type (float32 as in the kernels; float64 checks the algebra exactly).

Decays are exp2 of log2-scaled gate sums taken over exactly the segment they span:
  query side  P(i; r) = sum_{s=r}^{i} g_s   (prefix from a sub-chunk's or the chunk's start r, inclusive)
  key side    S(j; e) = sum_{s=j+1}^{e-1} g_s  (suffix to the end e of the span, exclusive of j)
  diagonal    seg(i, j) = sum_{s=j+1}^{i} g_s (pairwise, within a 16-row sub-chunk)
so a -inf gate makes exactly the decays that cross it 0 and nothing else changes.
"""

from __future__ import annotations

import math

import torch

C, SUB = 64, 16  # chunk and sub-chunk rows
LOG2E = 1.4426950408889634
# Tiles (key channels x value columns) of each kernel, as in gla_chunkpar_common.cuh.
STATE_BK, STATE_BV = 64, 64  # fwd phase 1 (local chunk states) and bwd phase 1 (local state gradients)
OUT_BK, OUT_BV = 32, 64  # fwd phase 3 and bwd dv: K walked in OUT_BK slices, one OUT_BV tile of V per block
DQK_BK, DQK_BV = 32, 64  # bwd dq/dk/dg: one DQK_BK slice of K per block, V walked in DQK_BV slices


def _chunked(x, acc):
    """(B, T, H, D) -> (B, H, N, C, D) in acc, zero-padded to whole chunks."""
    B, T, H, D = x.shape
    n = max(1, math.ceil(T / C))
    out = x.new_zeros(B, n * C, H, D, dtype=acc)
    out[:, :T] = x.to(acc)
    return out.view(B, n, C, H, D).permute(0, 3, 1, 2, 4)


def _unchunked(x, T):
    B, H, N, Cc, D = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(B, N * Cc, H, D)[:, :T]


def _rnd(x, op):
    """Round to the tensor-core operand type and back (identity for the fp32 path)."""
    return x if op in (torch.float32, torch.float64) else x.to(op).to(x.dtype)


def gate_grad(closed, gl):
    """gla_gate_grad: the closed-form dg, exactly 0 where the decay exp2(gl) is below the smallest normal number of
    the accumulation type (log2 gate below -126 in fp32, -1022 in fp64)."""
    floor = -1022.0 if gl.dtype == torch.float64 else -126.0
    return torch.where(gl < floor, torch.zeros_like(closed), closed)


def prefix_from(gl, r0, r1):
    """P(i; r0) = sum_{s=r0}^{i} gl_s for rows i in [r0, r1): a cumulative sum that starts at r0."""
    return torch.cumsum(gl[..., r0:r1, :], dim=-2)


def suffix_to(gl, end):
    """S(j; end) = sum_{s=j+1}^{end-1} gl_s for rows j in [0, end): a reverse cumulative sum from end - 1."""
    part = gl[..., :end, :]
    incl = torch.flip(torch.cumsum(torch.flip(part, [-2]), dim=-2), [-2])  # sum_{s=j}^{end-1}
    return torch.cat([incl[..., 1:, :], torch.zeros_like(incl[..., :1, :])], dim=-2)


def diag_segsum(gl, I):
    """seg[i, j, c] = sum_{s=j+1}^{i} gl_s for i >= j inside sub-chunk I (-inf above the diagonal)."""
    sub = gl[..., SUB * I : SUB * (I + 1), :]
    seg = torch.full(sub.shape[:-2] + (SUB, SUB, sub.shape[-1]), -math.inf, dtype=gl.dtype)
    for j in range(SUB):
        seg[..., j, j, :] = 0
        if j + 1 < SUB:
            seg[..., j + 1 :, j, :] = torch.cumsum(sub[..., j + 1 :, :], dim=-2)
    return seg


def scores(qc, kc, glc, op, bk):
    """The chunk's score matrix A (.., C, C), lower triangle, accumulated over K slices of width bk."""
    A = qc.new_zeros(qc.shape[:-2] + (C, C))
    for c0 in range(0, qc.shape[-1], bk):
        q, k, gl = qc[..., c0 : c0 + bk], kc[..., c0 : c0 + bk], glc[..., c0 : c0 + bk]
        for I in range(1, C // SUB):  # off-diagonal sub-blocks A[I, J < I] on tensor cores
            r = SUB * I
            x = _rnd(q[..., r : r + SUB, :] * torch.exp2(prefix_from(gl, r, r + SUB)), op)
            y = _rnd(k[..., :r, :] * torch.exp2(suffix_to(gl, r)), op)
            A[..., r : r + SUB, :r] += x @ y.transpose(-1, -2)
        for I in range(C // SUB):  # diagonal sub-blocks elementwise in acc
            s = slice(SUB * I, SUB * (I + 1))
            w = torch.exp2(diag_segsum(gl, I))  # (.., i, j, c)
            A[..., s, s] += (q[..., s, None, :] * k[..., None, s, :] * w).sum(-1)
    return A


def fwd_states(kc, vc, glc, h0, op):
    """Phases 1 and 2: local chunk states, then the sequential pass. Returns states (.., N + 1, K, V): the state
    entering each chunk, then the final one, and the chunk gate sums (.., N, K) (log2)."""
    K, V = kc.shape[-1], vc.shape[-1]
    local = kc.new_zeros(kc.shape[:-2] + (K, V))
    for c0 in range(0, K, STATE_BK):
        y = _rnd(kc[..., c0 : c0 + STATE_BK] * torch.exp2(suffix_to(glc[..., c0 : c0 + STATE_BK], C)), op)
        for e0 in range(0, V, STATE_BV):
            local[..., c0 : c0 + STATE_BK, e0 : e0 + STATE_BV] = y.transpose(-1, -2) @ _rnd(vc[..., e0 : e0 + STATE_BV], op)
    gsum = glc.sum(-2)  # (.., N, K): each chunk's own gates, summed directly
    B, H, N = kc.shape[:3]
    states = kc.new_zeros(B, H, N + 1, K, V)
    h = kc.new_zeros(B, H, K, V) if h0 is None else h0.to(kc.dtype).clone()
    for n in range(N):  # phase 2: one fp32 pass over the chunks
        states[:, :, n] = h
        h = torch.exp2(gsum[:, :, n])[..., None] * h + local[:, :, n]
    states[:, :, N] = h
    return states, gsum


def _inputs(q, k, v, g, acc):
    qc, kc, vc = _chunked(q, acc), _chunked(k, acc), _chunked(v, acc)
    glc = _chunked(g, acc) * LOG2E
    return qc, kc, vc, glc


def fwd(q, k, v, g, scale, h0=None, acc=torch.float32):
    """Forward: o (B, T, H, V) in q's dtype, final state (B, H, K, V) in acc."""
    op = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else acc
    T = q.shape[1]
    qc, kc, vc, glc = _inputs(q, k, v, g, acc)
    states, _ = fwd_states(kc, vc, glc, h0, op)
    K, V = qc.shape[-1], vc.shape[-1]
    o = vc.new_zeros(vc.shape)
    for e0 in range(0, V, OUT_BV):  # phase 3: one block per (chunk, V tile, batch * head)
        vt = _rnd(vc[..., e0 : e0 + OUT_BV], op)
        acc_o = vt.new_zeros(vt.shape)
        for c0 in range(0, K, OUT_BK):
            x = _rnd(qc[..., c0 : c0 + OUT_BK] * torch.exp2(prefix_from(glc[..., c0 : c0 + OUT_BK], 0, C)), op)
            acc_o += x @ _rnd(states[:, :, :-1, c0 : c0 + OUT_BK, e0 : e0 + OUT_BV], op)
        A = scores(qc, kc, glc, op, OUT_BK)
        acc_o += _rnd(torch.tril(A), op) @ vt
        o[..., e0 : e0 + OUT_BV] = scale * acc_o
    return _unchunked(o, T).to(q.dtype), states[:, :, -1]


def bwd(q, k, v, g, do, dht, scale, h0=None, acc=torch.float32):
    """Backward: dq, dk, dv, dg in q's dtype and dh0 in acc."""
    op = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else acc
    T, out_dtype = q.shape[1], q.dtype
    qc, kc, vc, glc = _inputs(q, k, v, g, acc)
    doc = _chunked(do, acc)
    states, gsum = fwd_states(kc, vc, glc, h0, op)  # recomputed
    K, V = qc.shape[-1], vc.shape[-1]
    B, H, N = qc.shape[:3]
    # bwd phase 1: each chunk's own contribution to the gradient of the state entering it
    local = qc.new_zeros(B, H, N, K, V)
    for c0 in range(0, K, STATE_BK):
        x = _rnd(qc[..., c0 : c0 + STATE_BK] * torch.exp2(prefix_from(glc[..., c0 : c0 + STATE_BK], 0, C)), op)
        for e0 in range(0, V, STATE_BV):
            local[..., c0 : c0 + STATE_BK, e0 : e0 + STATE_BV] = scale * (x.transpose(-1, -2) @ _rnd(doc[..., e0 : e0 + STATE_BV], op))
    # bwd phase 2: reverse pass; dH[n] is the gradient of the state leaving chunk n
    dH = qc.new_zeros(B, H, N, K, V)
    gst = qc.new_zeros(B, H, K, V) if dht is None else dht.to(acc).clone()
    for n in reversed(range(N)):
        dH[:, :, n] = gst
        gst = torch.exp2(gsum[:, :, n])[..., None] * gst + local[:, :, n]
    dh0 = gst
    # bwd dq/dk/dg: one block per (chunk, K slice); dA over all of V
    dq, dk, dg = (qc.new_zeros(qc.shape) for _ in range(3))
    dA = qc.new_zeros(B, H, N, C, C)
    for e0 in range(0, V, DQK_BV):
        dA += _rnd(doc[..., e0 : e0 + DQK_BV], op) @ _rnd(vc[..., e0 : e0 + DQK_BV], op).transpose(-1, -2)
    dA = scale * torch.tril(dA)
    for c0 in range(0, K, DQK_BK):
        sl = slice(c0, c0 + DQK_BK)
        q, k, gl = qc[..., sl], kc[..., sl], glc[..., sl]
        dqt, dkt = q.new_zeros(q.shape), q.new_zeros(q.shape)
        for e0 in range(0, V, DQK_BV):  # inter-chunk terms, V walked in slices
            ev = slice(e0, e0 + DQK_BV)
            dqt += _rnd(doc[..., ev], op) @ _rnd(states[:, :, :-1, sl, ev], op).transpose(-1, -2)
            dkt += _rnd(vc[..., ev], op) @ _rnd(dH[..., sl, ev], op).transpose(-1, -2)
        dqt = scale * torch.exp2(prefix_from(gl, 0, C)) * dqt
        dkt = torch.exp2(suffix_to(gl, C)) * dkt
        for I in range(1, C // SUB):  # off-diagonal sub-blocks
            r = SUB * I
            pq, sk = torch.exp2(prefix_from(gl, r, r + SUB)), torch.exp2(suffix_to(gl, r))
            dAo = _rnd(dA[..., r : r + SUB, :r], op)
            dqt[..., r : r + SUB, :] += pq * (dAo @ _rnd(k[..., :r, :] * sk, op))
            dkt[..., :r, :] += sk * (dAo.transpose(-1, -2) @ _rnd(q[..., r : r + SUB, :] * pq, op))
        for I in range(C // SUB):  # diagonal sub-blocks elementwise
            s = slice(SUB * I, SUB * (I + 1))
            w = torch.exp2(diag_segsum(gl, I)) * dA[..., s, s, None]  # (.., i, j, c)
            dqt[..., s, :] += (w * k[..., None, s, :]).sum(-2)
            dkt[..., s, :] += (w * q[..., s, None, :]).sum(-3)
        # dg: reverse cumulative sum within the chunk of q dq - k dk, plus the boundary term sum_v h_{n+1} dH_n
        d = q * dqt - k * dkt
        rev = torch.flip(torch.cumsum(torch.flip(d, [-2]), dim=-2), [-2])
        bound = (states[:, :, 1:, sl, :] * dH[..., sl, :]).sum(-1)  # (.., N, bk)
        dgt = rev + bound[..., None, :]
        dg[..., sl] = gate_grad(dgt, gl)
        dq[..., sl], dk[..., sl] = dqt, dkt
    # bwd dv: one block per (chunk, V tile); A over all of K
    dv = vc.new_zeros(vc.shape)
    A = scores(qc, kc, glc, op, OUT_BK)
    At = _rnd(scale * torch.tril(A), op).transpose(-1, -2)
    for e0 in range(0, V, OUT_BV):
        ev = slice(e0, e0 + OUT_BV)
        acc_v = At @ _rnd(doc[..., ev], op)
        for c0 in range(0, K, OUT_BK):
            y = _rnd(kc[..., c0 : c0 + OUT_BK] * torch.exp2(suffix_to(glc[..., c0 : c0 + OUT_BK], C)), op)
            acc_v += y @ _rnd(dH[..., c0 : c0 + OUT_BK, ev], op)
        dv[..., ev] = acc_v
    out = [_unchunked(x, T).to(out_dtype) for x in (dq, dk, dv, dg)]
    return (*out, dh0)
