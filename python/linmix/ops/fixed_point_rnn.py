"""fixed_point_rnn: a dense linear RNN as the fixed point of a Householder channel mix and a diagonal scan."""

from __future__ import annotations

import warnings

import torch

from .._native import acc_dtype, check_backend, nvtx_range
from ._varlen import check_offsets, n_seqs

# The values of the arguments of the same names, shared by the layers and linmix.distributed.
GRAD_MODES = ("onestep", "implicit")
STOPPING = ("element", "batch", "causal")
ON_NONCONVERGENCE = ("ignore", "warn", "raise")


class FixedPointConvergenceWarning(RuntimeWarning):
    """The fixed-point iteration of linmix.fixed_point_rnn stopped at max_iter without meeting its rule."""


class FixedPointConvergenceError(RuntimeError):
    """Raised instead of FixedPointConvergenceWarning with on_nonconvergence="raise"."""


@torch.library.register_fake("linmix::fixed_point_rnn_fwd")
def _fwd_fake(u, lam, hh_u, hh_beta, initial_state, cu_seqlens, max_iter, tol, damping=1.0, batch_quantile=-1.0,
              causal=False):
    h = torch.empty_like(u, memory_format=torch.contiguous_format)
    h_prev = torch.empty_like(u, dtype=acc_dtype(u), memory_format=torch.contiguous_format)
    n = n_seqs(u.shape[0], cu_seqlens)
    n_iter = u.new_empty((n,), dtype=torch.int32)
    residual = u.new_empty((n,), dtype=torch.float32)
    return h, h_prev, n_iter, residual


@torch.library.register_fake("linmix::fixed_point_rnn_bwd")
def _bwd_fake(u, lam, hh_u, hh_beta, initial_state, cu_seqlens, h_prev, dh, max_iter, tol, damping=1.0):
    def like(x):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    dinitial_state = like(initial_state) if initial_state is not None else u.new_empty((0,))
    return like(u), like(lam), like(hh_u), like(hh_beta), dinitial_state


def _report(what: str, on_nonconvergence: str) -> None:
    if on_nonconvergence == "raise":
        raise FixedPointConvergenceError(what)
    warnings.warn(what, FixedPointConvergenceWarning, stacklevel=4)


def _can_check(x: torch.Tensor) -> bool:
    """Reading a result on the host is possible (not while tracing or capturing a CUDA graph)."""
    if torch.compiler.is_compiling():
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def check_args(name: str, grad_mode: str, stopping: str, on_nonconvergence: str) -> None:
    """ValueError for a grad_mode / stopping / on_nonconvergence outside its values, prefixed linmix.<name>."""
    for arg, value, allowed in (("grad_mode", grad_mode, GRAD_MODES), ("stopping", stopping, STOPPING),
                                ("on_nonconvergence", on_nonconvergence, ON_NONCONVERGENCE)):
        if value not in allowed:
            raise ValueError(f"linmix.{name}: {arg} must be one of {allowed}, got {value!r}")


def batch_quantile(stopping: str, quantile: float) -> float:
    """The fused op's batch_quantile: the quantile with stopping="batch", -1 otherwise."""
    return float(quantile) if stopping == "batch" else -1.0


def adjoint_iterations(grad_mode: str, max_iter: int, tol: float) -> tuple[int, float]:
    """The backward's (max_iter, tol). onestep: w = g, i.e. exactly one adjoint iteration; implicit: iterate
    w = g + J_hᵀ w like the forward."""
    return (1, 0.0) if grad_mode == "onestep" else (max_iter, tol)


def fused_fwd(u, lam, hh_u, hh_beta, h0, max_iter, tol, damping, quantile, causal, cu_seqlens=None):
    """The fused forward op: (h, h_prev (the iterate h was computed from), n_iter, residual)."""
    with nvtx_range("linmix/fixed_point_rnn/fwd", u):
        return torch.ops.linmix.fixed_point_rnn_fwd(
            u=u, lam=lam, hh_u=hh_u, hh_beta=hh_beta, initial_state=h0, cu_seqlens=cu_seqlens, max_iter=max_iter,
            tol=tol, damping=damping, batch_quantile=quantile, causal=causal,
        )


def fused_bwd(u, lam, hh_u, hh_beta, h0, h_prev, dh, adjoint, damping, cu_seqlens=None):
    """The fused backward op: (du, dlam, dhh_u, dhh_beta, dh0), dh0 None without h0; adjoint = (max_iter, tol)."""
    with nvtx_range("linmix/fixed_point_rnn/bwd", u):
        *grads, dh0 = torch.ops.linmix.fixed_point_rnn_bwd(
            u=u, lam=lam, hh_u=hh_u, hh_beta=hh_beta, initial_state=h0, cu_seqlens=cu_seqlens, h_prev=h_prev,
            dh=dh.to(u.dtype), max_iter=adjoint[0], tol=adjoint[1], damping=damping,
        )
    return (*grads, dh0 if h0 is not None else None)


def check_grads(finite: bool, adjoint: tuple[int, float], on_nonconvergence: str) -> None:
    """Warn or raise (on_nonconvergence "warn" / "raise") when the backward's gradients are not all finite."""
    if not finite:
        _report(
            "linmix.fixed_point_rnn: the backward produced non-finite gradients"
            + (" (the implicit adjoint iteration diverged: the forward map is not a contraction here; see the"
               " convergence condition in the docstring)" if adjoint[0] > 1 else ""),
            on_nonconvergence,
        )


class FixedPointRNNFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, lam, hh_u, hh_beta, h0, cu_seqlens, max_iter, tol, grad_mode, damping, quantile, causal,
                on_nonconv):
        h, h_prev, n_iter, residual = fused_fwd(u, lam, hh_u, hh_beta, h0, max_iter, tol, damping, quantile, causal,
                                                cu_seqlens)
        ctx.save_for_backward(u, lam, hh_u, hh_beta, h_prev, h0, cu_seqlens)
        ctx.adjoint = adjoint_iterations(grad_mode, max_iter, tol)
        ctx.damping, ctx.on_nonconv = damping, on_nonconv
        ctx.mark_non_differentiable(n_iter, residual)
        return h, n_iter, residual

    @staticmethod
    def backward(ctx, dh, _dn, _dres):
        u, lam, hh_u, hh_beta, h_prev, h0, cu_seqlens = ctx.saved_tensors
        grads = fused_bwd(u, lam, hh_u, hh_beta, h0, h_prev, dh, ctx.adjoint, ctx.damping, cu_seqlens)
        if ctx.on_nonconv != "ignore" and _can_check(u):
            finite = torch.stack([g.isfinite().all() for g in grads if g is not None]).all()
            check_grads(bool(finite), ctx.adjoint, ctx.on_nonconv)  # one host read per backward
        return *grads, *([None] * 8)


def fixed_point_rnn(
    u: torch.Tensor,
    lam: torch.Tensor,
    hh_u: torch.Tensor,
    hh_beta: torch.Tensor,
    max_iter: int = 32,
    tol: float = 1e-4,
    grad_mode: str = "onestep",
    return_info: bool = False,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    damping: float = 1.0,
    stopping: str = "element",
    quantile: float = 0.9,
    on_nonconvergence: str = "ignore",
    cu_seqlens: torch.Tensor | None = None,
):
    """Fixed-point RNN: the dense linear RNN reached by iterating (Householder channel mix, diagonal scan).

    Math (Movahedi et al., "Fixed-Point RNNs", arXiv 2503.10799, Sec. 3 / Eq. 8). With
    Q_t = H_{t,R} ⋯ H_{t,1}, H_{t,i} = I - hh_beta[t,i] hh_u[t,i] hh_u[t,i]ᵀ (H_{t,1} applied first), one
    iteration is f(z)_t = lam_t f(z)_{t-1} + (1 - lam_t) (z_t + Q_t (u_t - z_t)), with f(z)_{-1} = h0 (the
    initial state, zeros by default): a channel mix per token, then one diagonal scan. From z^0 = 0 the
    iterates are z^l = (1 - damping) z^{l-1} + damping f(z^{l-1}). After n iterations the output is
    h = f(z^{n-1}) (so with damping = 1 it is z^n). The fixed point solves
    (diag(lam_t) + (I - diag(lam_t)) Q_t) h_t = lam_t h_{t-1} + (1 - lam_t) Q_t u_t, a dense linear RNN.

    Stopping. An element's residual at iteration l is max_t |f_t - z^{l-1}_t|_inf / |f_t|_inf with
    f = f(z^{l-1}) (taken before damping, as the authors do). tol = 0 runs exactly max_iter iterations.
      - stopping="element" (default): each batch element stops once its residual < tol, or at max_iter.
      - stopping="batch": the authors' rule (their FixedPointOptimizer): the whole batch iterates together
        until the `quantile` of the per-element residuals is < tol (q = 0.9 in their FP-RNN training,
        0.75 for FP-Mamba, 1 at evaluation); elements above the quantile are left unconverged by design.
      - stopping="causal": per-token stopping. Token t keeps z^{l-1}_t from the first iteration l at which
        max_{s<=t} ratio_s < tol (its own and earlier tokens' ratios), and h = f(that record).
    Causality: with tol > 0 and stopping "element" or "batch", the iteration count is shared by all tokens
    (and, for "batch", all elements), so h_t depends on later tokens u_{>t} (and on other batch elements)
    through it. With tol = 0 or stopping="causal", h_t depends only on tokens <= t, so a streaming decode
    computes the same outputs as one forward up to the stopping tolerance.

    Convergence (derived for this iteration). The map f is affine in z: z -> J z + c, with J block
    lower-triangular in time and diagonal blocks J_tt = diag(1 - lam_t)(I - Q_t). Hence:
      - The undamped iteration converges from any start iff rho_t = spectral_radius(diag(1 - lam_t)(I - Q_t))
        < 1 for every token t. A sufficient check: (1 - min_d lam_{t,d}) * min(2, sum_i beta_{t,i}) < 1,
        because every factor has |H_i| <= 1 for beta in [0, 2], so |I - Q_t|_2 <= min(2, sum_i beta_i).
        In particular lam > 1/2 guarantees convergence for any beta in [0, 2); beta in [0, 2) with
        lam near 0 does NOT (rank 1: rho_t = beta_t * sum_d (1 - lam_{t,d}) u_{t,d}^2, up to 2).
      - Even then the rate is not rho: J is non-normal (the scan couples tokens), so the error can grow
        for up to about T iterations before it decays (the paper's l* ~ T on A5). A monotone contraction
        with factor kappa = max_t |I - Q_t|_2 < 1 (in the norm max_t |z_t|_2) holds when lam_t is the same
        for all channels of a token (rank 1: kappa = max beta < 1, the paper's Thm 3.1 condition).
      - Damping 0 < damping < 1 moves each eigenvalue mu of J to 1 - damping + damping * mu: it rescues
        negative or complex mu (rank >= 2 mixers) but not real mu > 1 (rank 1 with small lam), and it slows
        convergence where mu is already small.
    When the loop ends at max_iter without meeting the rule, the returned residual says so (>= tol):
    on_nonconvergence="warn" warns (FixedPointConvergenceWarning), "raise" raises
    FixedPointConvergenceError; both read the residual on the host (one synchronisation) and are skipped
    under torch.compile and CUDA-graph capture. They also check the backward for non-finite gradients
    (the implicit adjoint diverges exactly when the forward map is not a contraction).

    Args:
        u, lam: (B, T, D); lam in (0, 1). float32 / float16 / bfloat16 (float64 on CPU), one dtype for all inputs.
        hh_u: (B, T, R, D) unit vectors, used as given (the caller normalises), 1 <= R <= 16.
        hh_beta: (B, T, R), in [0, 2).
        max_iter: iteration cap (>= 1). tol: relative residual to stop at (>= 0).
        grad_mode: "onestep": the output is h = f(z^{n-1}) with z^{n-1} detached, and gradients are one
            iteration's VJP (the authors' training gradient). "implicit": the exact gradient of the fixed
            point, solving w = g + J_hᵀ w by adjoint iterations (same max_iter / tol / damping), then one VJP.
        return_info: also return the per-batch iteration count and residual.
        initial_state: (B, D) state before token 0, u's dtype and device (None: zeros); differentiable.
            Chunked or token-by-token decoding passes the previous chunk's final state here.
        output_final_state: also return the final state h[:, -1] ((B, D); initial_state when T = 0).
        damping: in (0, 1]; 1 is the plain iteration.
        stopping: "element" | "batch" | "causal", see above. quantile: in [0, 1], for stopping="batch".
        on_nonconvergence: "ignore" (default: the returned residual is the record) | "warn" | "raise".
        cu_seqlens: packed variable-length sequences (FlashAttention's convention): u, lam, hh_u, hh_beta are
            (1, T, ...), the sequences concatenated along T, and cu_seqlens (N + 1,) int32 / int64 offsets
            [0, ..., T] on their device. Each sequence is its own batch element: its own initial_state row
            ((N, D)), final state ((N, D)), iteration count and residual ((N,)), and stopping rule ("batch":
            the quantile over the N sequences). One call, no host loop and no host synchronisation (the kernel
            reads the offsets; a malformed tensor raises RuntimeError through an asynchronous device assert,
            at once on the CPU). On CUDA, packed calls run the fixed_point_rnn_variants kernels (emulation-verified,
            with a one-time warning until a GPU verifies them).

    Returns:
        h: (B, T, D) in u's dtype (state and accumulation in float32, float64 for float64 inputs),
        differentiable w.r.t. u, lam, hh_u, hh_beta (and initial_state); then final_state (B, D) if
        output_final_state; then n_iter (B,) int32 and residual (B,) float32 if return_info. The element
        met the stopping rule iff residual < tol (stopping="batch": iff the quantile of residual < tol).

    Raises:
        RuntimeError: bad shapes, dtypes, devices or ranges (named after the argument).
        ValueError: unknown grad_mode / stopping / on_nonconvergence.
        FixedPointConvergenceError: with on_nonconvergence="raise".
    """
    check_backend("fixed_point_rnn", u, lam, hh_u, hh_beta, initial_state, cu_seqlens)
    check_args("fixed_point_rnn", grad_mode, stopping, on_nonconvergence)
    q = batch_quantile(stopping, quantile)
    if cu_seqlens is not None and u.dim() == 3:
        check_offsets("fixed_point_rnn", cu_seqlens, u.shape[1])
    h, n_iter, residual = FixedPointRNNFn.apply(
        u, lam, hh_u, hh_beta, initial_state, cu_seqlens, int(max_iter), float(tol), grad_mode, float(damping), q,
        stopping == "causal", on_nonconvergence,
    )
    check_converged(h, residual, float(tol), int(max_iter), stopping, q, on_nonconvergence)
    out = (h,)
    if output_final_state:
        out += (_final_state(h, u, initial_state, cu_seqlens),)
    if return_info:
        out += (n_iter, residual)
    return out if len(out) > 1 else h


def _final_state(h, u, initial_state, cu_seqlens):
    """Each sequence's last h, or its initial state (zeros) when it is empty; packed: gathered on the device."""
    if cu_seqlens is None and h.shape[1] > 0:
        return h[:, -1]
    start = initial_state if initial_state is not None else u.new_zeros(n_seqs(u.shape[0], cu_seqlens), u.shape[2])
    if h.shape[1] == 0:
        return start
    ends = cu_seqlens[1:].long()
    last = h[0, (ends - 1).clamp(0, h.shape[1] - 1)]  # (N, D)
    return torch.where((ends > cu_seqlens[:-1])[:, None], last, start.to(last.dtype))


def check_converged(h: torch.Tensor, residual: torch.Tensor, tol: float, max_iter: int, stopping: str, quantile: float,
                    on_nonconvergence: str) -> None:
    """Warn or raise (on_nonconvergence "warn" / "raise") when a forward ended at max_iter without meeting its
    stopping rule (the residuals (B,), as returned with return_info) or with a non-finite output h. Reads the
    residual on the host: nothing is checked with "ignore", tol = 0, an empty batch, under torch.compile or
    while capturing a CUDA graph."""
    if on_nonconvergence == "ignore" or tol <= 0 or h.shape[0] == 0 or not _can_check(h):
        return
    res = residual.detach().float().cpu()
    if stopping == "batch":  # non-finite residuals count as the largest float (torch.quantile would give NaN)
        big = torch.finfo(res.dtype).max
        quant = torch.quantile(res.nan_to_num(nan=big, posinf=big), quantile).item()
        bad = quant >= tol
        what = f"the {quantile} quantile of the batch's residuals is {quant:.3g}"
    else:
        bad_mask = ~(res < tol)  # NaN counts as not converged
        bad = bool(bad_mask.any())
        what = f"{int(bad_mask.sum())} of {res.numel()} batch elements did not (worst residual {res.max().item():.3g})"
    if not bad and bool(h.detach().isfinite().all()):
        return
    _report(
        f"linmix.fixed_point_rnn: the fixed-point iteration did not converge within max_iter={max_iter} to "
        f"tol={tol:g}: {what}"
        + ("" if bool(h.detach().isfinite().all()) else "; the output has non-finite values")
        + ". The output is then not the fixed point: raise max_iter, try damping < 1, or keep the inputs in "
        "the convergence range (docstring: rho(diag(1 - lam_t)(I - Q_t)) < 1 for every token, e.g. lam > 1/2).",
        on_nonconvergence,
    )
