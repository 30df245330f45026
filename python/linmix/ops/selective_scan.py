"""selective_scan: the Mamba-1 S6 selective state-space scan (mamba-ssm compatible, plus states in and out)."""

from __future__ import annotations

import torch

from .. import _C
from .._native import acc_dtype, check_backend, nvtx_range
from ._varlen import check_offsets, n_seqs

# Time steps per state checkpoint: kSelectiveScanChunk in csrc/selective_scan/params.h, exported by _C.
CHUNK = _C.selective_scan_chunk


def _sequences(u, cu_seqlens):
    """The number of sequences and of state checkpoints per channel: the batch and L's chunks, or with cu_seqlens
    N and packed_chunk_slots (csrc/common/varlen.h: one more slot per sequence than the packed length's chunks)."""
    b, _, L = u.shape
    chunks = -(-L // CHUNK)
    if cu_seqlens is None:
        return b, chunks
    n = n_seqs(b, cu_seqlens)
    return n, chunks + n


@torch.library.register_fake("linmix::selective_scan_fwd")
def _fwd_fake(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, delta_softplus):
    b, d, L = u.shape
    n = A.shape[1]
    n_seqs, n_chunks = _sequences(u, cu_seqlens)
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    checkpoints = u.new_empty((b, d, n_chunks, n), dtype=acc_dtype(u))
    final_state = u.new_empty((n_seqs, d, n), dtype=acc_dtype(u))
    return out, checkpoints, final_state


@torch.library.register_fake("linmix::selective_scan_bwd")
def _bwd_fake(u, delta, A, B, C, D, z, delta_bias, initial_state, cu_seqlens, checkpoints, dout, dfinal_state,
              delta_softplus, deterministic=0):
    b, d, L = u.shape
    n = A.shape[1]
    n_seqs, _ = _sequences(u, cu_seqlens)
    acc = acc_dtype(u)
    du = torch.empty_like(u, memory_format=torch.contiguous_format)
    ddelta = torch.empty_like(u, memory_format=torch.contiguous_format)
    dz = torch.empty_like(u, memory_format=torch.contiguous_format) if z is not None else u.new_empty((0,))
    dB = B.new_empty(B.shape)
    dC = C.new_empty(C.shape)
    return (du, ddelta, A.new_empty((d, n), dtype=acc), dB, dC, u.new_empty((d,), dtype=acc), dz,
            u.new_empty((d,), dtype=acc), u.new_empty((n_seqs, d, n), dtype=acc))


def _deterministic_mode(requested: bool) -> int:
    """selective_scan_bwd's ``deterministic``: 2 a deterministic backward is required (the argument, or
    ``torch.use_deterministic_algorithms(True)``), 1 one is preferred and a non-deterministic one warns
    (``warn_only=True``), 0 either will do. torch's global setting is read here, not in the extension, whose
    stable ABI does not reach it."""
    if requested:
        return 2
    if not torch.are_deterministic_algorithms_enabled():
        return 0
    return 1 if torch.is_deterministic_algorithms_warn_only_enabled() else 2


class SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, deterministic, cu_seqlens):
        with nvtx_range("linmix/selective_scan/fwd", u):
            out, checkpoints, final_state = torch.ops.linmix.selective_scan_fwd(
                u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state,
                delta_softplus=delta_softplus, cu_seqlens=cu_seqlens)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints, cu_seqlens)
        ctx.delta_softplus = delta_softplus
        ctx.deterministic = deterministic
        ctx.set_materialize_grads(False)
        return out, final_state

    @staticmethod
    def backward(ctx, dout, dfinal_state):
        u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints, cu_seqlens = ctx.saved_tensors
        dout = torch.zeros_like(u) if dout is None else dout.to(u.dtype)
        with nvtx_range("linmix/selective_scan/bwd", u):
            du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state = torch.ops.linmix.selective_scan_bwd(
                u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state,
                checkpoints=checkpoints, dout=dout, dfinal_state=dfinal_state, delta_softplus=ctx.delta_softplus,
                deterministic=_deterministic_mode(ctx.deterministic), cu_seqlens=cu_seqlens)
        return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
                ddelta_bias if delta_bias is not None else None,
                dinitial_state if initial_state is not None else None, None, None, None)


def _to(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    # Only float tensors are cast; anything else reaches the op's checks and fails there with a clear message.
    return t.to(dtype) if t is not None and t.is_floating_point() else t


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
                   return_final_state=False, cu_seqlens=None, deterministic=False):
    """Selective scan (Mamba-1 S6), fused: discretisation, scan over time, output contraction and gate.

    Per batch b, channel d, state n, with δ = softplus(delta + delta_bias) if ``delta_softplus`` else
    delta + delta_bias::

        h_t = exp(δ_t A[d, n]) h_{t-1} + δ_t B_t[n] u_t        (h_{-1} = initial_state, or 0)
        y_t = Σ_n C_t[n] h_t[n] + D[d] u_t;   out_t = y_t · silu(z_t)   (no gate without z)

    Args:
        u, delta: (b, d, L), float32 / float16 / bfloat16 (float64 on CPU), same dtype.
        A: (d, n), real; cast to float32 (float64 for float64 inputs).
        B, C: each fixed (d, n) (cast to float32), variable (b, n, L) or grouped (b, g, n, L) with d % g == 0
            (channel i uses group i // (d // g)), variable ones in u's dtype.
        D, delta_bias: optional (d,), cast to float32.
        z: optional (b, d, L) gate, u's dtype.
        delta_softplus: apply softplus to delta + delta_bias.
        initial_state: optional (b, d, n) state before the first step, cast to float32.
        return_final_state: also return the state after the last step.
        cu_seqlens: packed variable-length sequences (FlashAttention's convention): batch b = 1, the
            sequences concatenated along L, cu_seqlens (N + 1,) int32 or int64 offsets [0, ..., L] on u's
            device (empty and length-1 sequences allowed, N = 0 too); each sequence starts from its own
            initial_state row ((N, d, n), or zeros) and final_state is (N, d, n), with gradients for both.
            Works with every B/C form, z, D, delta_bias and delta_softplus. One kernel launch per direction
            whatever N, with no host synchronisation (the kernels read the offsets on the device;
            torch.compile traces it, dynamic shapes included). Offsets that do not rise from 0 to L raise
            RuntimeError: at once on CPU, on CUDA through an asynchronous device assert (at the next
            synchronising call; the kernels clamp every offset, so they never touch memory outside their
            tensors). A batch other than 1, or offsets that are not a 1-D integer tensor on u's device, raise
            RuntimeError naming cu_seqlens. On CUDA the packed kernels (the selective_scan_varlen family) have
            not yet run on a GPU: they run by default and warn once per process; the opt-in warp forward and
            tiled backward do not take packed calls, and a deterministic backward with variable B or C raises
            RuntimeError (fixed B/C are deterministic).
        deterministic: bitwise-identical gradients from run to run (also implied by
            ``torch.use_deterministic_algorithms(True)``). The CPU backward is deterministic whatever this flag
            says: no atomics, every sum in a fixed order (one task sums a group's variable dB/dC over its
            channels in order; per-channel partials are summed over the batch by torch).
            On CUDA the default backward adds variable dB/dC with float atomics; the deterministic one sums
            them per 16-channel tile into partials and reduces those in a fixed order (more memory: two fp32
            buffers of (b, d/16, n, L)). That kernel has not yet run on a GPU, so it needs
            ``LINMIX_UNVERIFIED_KERNELS=1``; without it ``deterministic=True`` with variable B or C raises
            RuntimeError (fixed B/C need no atomics and run the default kernel), and under
            ``torch.use_deterministic_algorithms`` torch's own error (or warning, with ``warn_only``) is raised.

    Returns:
        out (b, d, L) in u's dtype, or (out, final_state) with final_state (b, d, n) ((N, d, n) with
        cu_seqlens) float32. The state and
        every accumulation are float32 (float64 for float64 inputs). Differentiable with respect to every
        tensor argument, final_state and initial_state included.
    """
    check_backend("selective_scan", u, delta, A, B, C, D, z, delta_bias, initial_state)
    if A.is_complex():
        raise RuntimeError("linmix.selective_scan: complex A is not supported; A must be real (d, n)")
    acc = acc_dtype(u)
    B = B.unsqueeze(1) if B.dim() == 3 else _to(B, acc) if B.dim() == 2 else B
    C = C.unsqueeze(1) if C.dim() == 3 else _to(C, acc) if C.dim() == 2 else C
    A, D, delta_bias, initial_state = (_to(t, acc) for t in (A, D, delta_bias, initial_state))
    if cu_seqlens is not None:
        check_offsets("selective_scan", cu_seqlens, u.shape[-1])
    out, final_state = SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus,
                                             deterministic, cu_seqlens)
    return (out, final_state) if return_final_state else out


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, deterministic=False):
    """Drop-in for ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` (same signature and returns).

    Returns out (b, d, L), or (out, last_state) with last_state (b, d, n) float32 (differentiable here).
    See :func:`selective_scan` for shapes, dtypes and ``deterministic`` (an addition to mamba's signature).
    """
    return selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                          return_final_state=return_last_state, deterministic=deterministic)


@torch.library.register_fake("linmix::selective_state_update")
def _ssu_fake(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, dt_softplus):
    return x.new_empty(x.shape)


def check_cache_rows(state_batch_indices: torch.Tensor, n_rows: int) -> None:
    """selective_state_update's cache rows checked on their device without a host read (asynchronous asserts,
    RuntimeError at the next synchronising call): every entry below n_rows, and no row named twice (negative
    entries are padding and may repeat). A sort and a comparison of neighbours, so a CUDA graph can capture it."""
    torch._assert_async((state_batch_indices < n_rows).all(),
                        "linmix.selective_state_update: an entry of state_batch_indices is >= the state's row count "
                        "(negative entries mark padding rows)")
    rows = state_batch_indices.sort().values
    torch._assert_async(~((rows[1:] == rows[:-1]) & (rows[1:] >= 0)).any(),
                        "linmix.selective_state_update: state_batch_indices names a state row twice (two batch rows "
                        "would race for it)")


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    """One decoding step of the selective SSM, a drop-in for ``mamba_ssm.ops.triton.selective_state_update``.

    Per batch row i, head h, head-dim element j, state n, with s = state[state_batch_indices[i]] (or
    state[i]) and δ = dt + dt_bias, softplus'd (threshold 20) if ``dt_softplus``::

        s[h, j, n] <- exp(δ A[h, j, n]) s[h, j, n] + δ B[i, g(h), n] x[i, h, j]      (in place)
        out[i, h, j] = (Σ_n C[i, g(h), n] s[h, j, n] + D[h, j] x[i, h, j]) · silu(z[i, h, j])

    (Mamba-1, Gu & Dao 2023, arXiv 2312.00752, zero-order hold for A, Euler for B; g(h) = h // (h_total / g)).

    Layouts, as mamba-ssm's:

    - Mamba-1: state (S, d, n); x, dt, z (b, d); A (d, n); B, C (b, n) or grouped (b, g, n) with d % g == 0
      (channel i uses group i // (d / g)); D, dt_bias (d,).
    - Mamba-2 (heads): state (S, h, p, n); x, dt, z (b, h, p); A (h, p, n); B, C (b, g, n) with h % g == 0;
      D, dt_bias (h, p).

    Any strides, broadcast (stride-0) A / dt / D / dt_bias included, except that ``state`` needs unit stride
    along n (it is updated in place, never copied). S == b without ``state_batch_indices``.

    Dtypes: x float32 / float16 / bfloat16 (float64 on CPU), z like x, out in x's dtype. state, dt, B, C, A,
    D, dt_bias: any of those float dtypes, independently (e.g. float32 parameters and state with bfloat16
    activations). All arithmetic is float32 (float64 for float64 x); the new state is rounded once to
    state's dtype, and, as in mamba-ssm's ``selective_state_update_ref``, the sum over n reads that stored
    (rounded) state and silu(z) is rounded to z's dtype. (CUDA's default path below sums the float32 state:
    with a 16-bit state its outputs can miss mamba's bf16 tolerance at n = 64.)

    state_batch_indices: optional (b,) int32 / int64 on state's device: batch row i updates state row
    state_batch_indices[i] of the cache; a negative entry marks a padding row (out 0, no state touched;
    mamba-ssm's convention). Never read on the host on CUDA (no sync; CUDA-graph capturable): the kernels
    treat an entry >= S as padding too, and such an entry raises RuntimeError through an asynchronous device
    assert (at the next synchronising call). On the CPU entries >= S and repeated entries raise RuntimeError
    at once, before anything is written; on CUDA a repeated entry (two batch rows racing for one state row)
    raises through an asynchronous device assert as well.

    Raises RuntimeError naming the argument, its expected and actual shape / dtype / device, before anything
    is written: the state is untouched on every error.

    CPU: a fused kernel (one pass over the state). CUDA: by default the GPU-verified selective_scan forward with
    L = 1, in float32; the fused kernel (not yet run on a GPU) with LINMIX_UNVERIFIED_KERNELS=1, and by default
    with state_batch_indices, which the GPU-verified path could only serve by reading them back (it warns once).
    """
    check_backend("selective_state_update", state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)
    if state_batch_indices is not None and state_batch_indices.device.type != "cpu" and state.dim() > 0:
        check_cache_rows(state_batch_indices, state.shape[0])
    return torch.ops.linmix.selective_state_update(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                                                   state_batch_indices=state_batch_indices,
                                                   dt_softplus=bool(dt_softplus))
