"""A property-based fuzzer over the op registry (linmix._cases): hypothesis draws an op, any combination of its
documented arguments, its sizes (0, 1, odd, around a 64-step chunk), each tensor's layout (contiguous, every
other element of a wider buffer, rows of a wider buffer, storage in reversed dim order, a stride-0 broadcast)
and the dtype, then checks the op against its float64 reference (outputs and the gradient of every
differentiable input) or that it refuses the call with a named error (``linmix[.<op>]: ...``). Under
LINMIX_EMULATE_CUDA=1 the float32 and bfloat16 draws run the CUDA kernels' own source, restricted to the
argument values the CUDA backend takes. Also: the ops called from several Python threads at once.

Budget: LINMIX_FUZZ_EXAMPLES draws (default 150 on the CPU kernels, 100 emulated), derandomized so that CI runs
the same draws at every commit; a longer run draws afresh:
``LINMIX_FUZZ_EXAMPLES=2000 LINMIX_FUZZ_RANDOM=1 python -m pytest tests/test_fuzz.py --hypothesis-show-statistics``
(the statistics count the draws per op and dtype). A failure hypothesis finds is shrunk to a small call; it
then becomes a regular case in tests/test_cases.py (FOUND). 64-bit offsets (tensors past 2**31 elements) are
tests/test_large.py's: they need tens of GB.
"""

from __future__ import annotations

import os
import re
import threading
import warnings

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import linmix
from linmix._cases import CASES, make
from linmix.ops.fixed_point_rnn import check_converged

from conftest import EMULATED, LOW_TOL, assert_close

EXAMPLES = int(os.environ.get("LINMIX_FUZZ_EXAMPLES", 100 if EMULATED else 150))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("LINMIX_FUZZ_RANDOM"),
                database=None, suppress_health_check=list(HealthCheck), print_blob=True)

NAMED = re.compile(r"^linmix(\.\w+)?: ")  # linmix.<op>: or, from the shared argument checks, linmix:
LAYOUTS = ("contiguous", "strided", "padded", "reversed", "broadcast")


def _sizes(draw, name: str) -> dict:
    """The op's sizes: batch 0-3, time 0-130 (across the 64-step chunk), small odd channel counts, with the
    divisibility each op's grouping needs."""
    batch = st.sampled_from((0, 1, 2, 3))
    time = st.sampled_from((0, 1, 2, 7, 16, 63, 64, 65, 130))
    small = st.sampled_from((1, 2, 3, 5, 8, 17))
    if name == "linear_scan":
        return dict(B=draw(batch), T=draw(time), D=draw(small))
    if name == "selective_scan":
        g = draw(st.sampled_from((1, 2, 3)))
        return dict(b=draw(batch), d=g * draw(st.sampled_from((1, 2, 3))), n=draw(small), L=draw(time), g=g)
    if name == "selective_state_update":
        g, p = draw(st.sampled_from((1, 2, 3))), draw(st.sampled_from((1, 2, 4)))
        return dict(b=draw(batch), d=g * p * draw(st.sampled_from((1, 2))), p=p, n=draw(small), g=g)
    if name in ("chunk_gla", "fused_recurrent_gla"):
        return dict(B=draw(batch), T=draw(time), H=draw(st.sampled_from((1, 2, 3))), K=draw(small), V=draw(small))
    assert name == "fixed_point_rnn", name
    return dict(B=draw(batch), T=draw(time), D=draw(small), R=draw(st.sampled_from((1, 2, 3))))


def _relayout(t: torch.Tensor, how: str, dim: int) -> torch.Tensor:
    """t's values in another memory layout ("broadcast": the first slice along `dim`, expanded with stride 0)."""
    if how == "contiguous" or t.dim() == 0:
        return t
    if how == "strided":  # every other element of a buffer twice as long in the last dim
        buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        buf[..., ::2] = t
        return buf[..., ::2]
    if how == "padded":  # rows of a wider buffer: unit stride in the last dim, padded strides above it
        buf = torch.zeros(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype)
        buf[..., : t.shape[-1]] = t
        return buf[..., : t.shape[-1]]
    if how == "reversed":  # storage in reversed dim order: every stride differs from the contiguous one
        order = tuple(reversed(range(t.dim())))
        return t.permute(order).contiguous().permute(order)
    return t.narrow(dim, 0, min(1, t.shape[dim])).expand(t.shape)


@st.composite
def calls(draw):
    """(op name, dtype, choices, sizes, layouts) of one call."""
    case = CASES[draw(st.sampled_from(sorted(CASES)))]
    dtype = draw(st.sampled_from((torch.float64, torch.float32, torch.bfloat16)))
    choices = {}
    for arg in case.args:
        v = draw(st.sampled_from(arg.values))
        if v != arg.values[0]:
            choices[arg.name] = v
    sizes = _sizes(draw, case.name)
    layouts = draw(st.lists(st.sampled_from(LAYOUTS), min_size=8, max_size=8))
    return case.name, dtype, choices, sizes, layouts


def _inputs(case, dtype, choices, sizes, layouts, seed):
    x = make(case, "cpu", dtype, seed=seed, sizes=sizes, **choices)
    floating = [n for n, v in x.items() if torch.is_tensor(v) and v.is_floating_point()]
    for i, name in enumerate(floating):
        how = layouts[i % len(layouts)]
        if how == "broadcast" and name == case.in_place:
            how = "padded"  # an input updated in place must not overlap itself
        x[name] = _relayout(x[name], how, dim=i % max(1, x[name].dim()))
    return x


def _leaves(x, names):
    return {k: v.detach().requires_grad_(k in names) if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in x.items()}


def _outcome(fn):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(), None
    except Exception as e:  # noqa: BLE001  (the fuzzer classifies every error below)
        return None, e


def _fixed_point_solve(x):
    """The float64 reference iteration of the call: (h, residuals (B,), or (N,) for packed sequences)."""
    with torch.no_grad():
        out = CASES["fixed_point_rnn"].reference(**{**x, "return_info": True, "output_final_state": False,
                                                    "grad_mode": "onestep"})
    return out[0], out[-1]


def _fixed_point_raises(x) -> bool:
    """Whether on_nonconvergence="raise" should raise here: the op's own host-side rule (check_converged)
    applied to the float64 reference iteration's residuals."""
    stopping, q, tol = x.get("stopping", "element"), x.get("quantile", 0.9), x.get("tol", 1e-4)
    h, residual = _fixed_point_solve(x)
    _, err = _outcome(lambda: check_converged(h, residual, tol, x.get("max_iter", 32), stopping, q, "raise"))
    return err is not None


def _implicit_gradient_reached(x) -> bool:
    """Whether the implicit gradient can match the fixed point's: its adjoint iteration stops as the forward
    does, so every element's forward residual must be below 1e-4 (the default tol; the gradients are then
    compared at 1e-3). A tol of 0, a small max_iter, a batch quantile or a long slowly contracting sequence
    can leave elements short of it."""
    _, residual = _fixed_point_solve(x)
    return residual.numel() == 0 or bool(residual.max() < 1e-4)


def _grads(outs, leaves, seed):
    gen = torch.Generator().manual_seed(seed)
    pairs = [(o, torch.randn(o.shape, generator=gen, dtype=torch.float64))
             for o in outs if o.is_floating_point() and o.requires_grad]
    if not pairs or not leaves:
        return [None] * len(leaves)
    loss = sum((o.double() * w).sum() for o, w in pairs)
    return torch.autograd.grad(loss, leaves, allow_unused=True)


def _compare(got, want, dtype, name, loose=None):
    tol = loose if dtype == torch.float64 else max(LOW_TOL[dtype], loose or 0.0)
    assert_close(got, want, name=name, tol=tol)


def _cuda_refuses(name, dtype, choices) -> str | None:
    """The documented refusal of the CUDA kernels for this call (a RuntimeError message pattern), if any:
    selective_scan's deterministic backward of packed sequences with variable B or C (its varlen backward adds
    dB/dC with float atomics; test_selective_scan_varlen.py pins it)."""
    cuda = EMULATED and dtype != torch.float64
    if (cuda and name == "selective_scan" and choices.get("deterministic") and choices.get("cu_seqlens")
            and (choices.get("B", "variable"), choices.get("C", "variable")) != ("fixed", "fixed")):
        return "deterministic backward .* and cu_seqlens on CUDA is not available"
    return None


@FUZZ
@given(calls())
def test_fuzz_op_against_reference(call):
    name, dtype, choices, sizes, layouts = call
    case = CASES[name]
    event(f"{name}, {str(dtype).removeprefix('torch.')}")  # --hypothesis-show-statistics counts the draws
    event(f"elements: {'none' if any(v == 0 for v in sizes.values()) else 'some'}")
    x = _inputs(case, dtype, choices, sizes, layouts, seed=7)
    names = [n for n in case.grads if x.get(n) is not None and x[n].is_floating_point()]
    xo = _leaves(x, names)
    xr = _leaves({k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in x.items()}, names)
    refs, ref_err = _outcome(lambda: case.reference(**xr))
    outs, err = _outcome(lambda: case.run(xo))
    state = x.get(case.in_place)
    if state is not None and state.stride(-1) != 1 and state.shape[-1] > 1:
        ref_err = "an input updated in place needs unit stride in its last dim (never copied)"
    if ref_err is not None:  # the specification cannot compute it: the op must refuse it by name
        assert err is not None and NAMED.match(str(err)), f"reference raised {ref_err!r}; the op gave {err!r}"
        return
    if err is not None:
        convergence = isinstance(err, linmix.FixedPointConvergenceError)
        assert convergence and choices.get("on_nonconvergence") == "raise" and _fixed_point_raises(xr), \
            f"{case.name}({choices}, sizes={sizes}, {dtype}) raised {err!r}"
        return
    assert len(outs) == len(refs)
    # fixed_point_rnn: the implicit gradient stops at tol (1e-4), as test_cases.py compares it; in float32 the
    # iteration may stop a few iterations away from float64's
    low_fp = case.name == "fixed_point_rnn" and dtype != torch.float64
    loose = 1e-3 if choices.get("grad_mode") == "implicit" or low_fp else None
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert o.shape == r.shape, f"output {i}: shape {tuple(o.shape)} != {tuple(r.shape)}"
        if o.is_floating_point():
            _compare(o, r, dtype, f"output {i}", loose)
        elif dtype == torch.float64:  # fixed_point_rnn's iteration counts
            assert torch.equal(o, r.to(o.dtype)), f"output {i}: {o} != {r}"
    if choices.get("grad_mode") == "implicit" and not _implicit_gradient_reached(xr):
        names = []
    refusal = _cuda_refuses(name, dtype, choices)
    if refusal and names:
        with pytest.raises(RuntimeError, match=refusal):
            _grads(outs, [xo[n] for n in names], 11)
        return
    got = _grads(outs, [xo[n] for n in names], 11)
    want = _grads(refs, [xr[n] for n in names], 11)
    for n, g, w in zip(names, got, want):
        if w is None:
            assert g is None or not g.any(), f"d{n}: nonzero where the reference has no gradient"
            continue
        assert g is not None, f"d{n}: missing"
        _compare(g, w, dtype, f"d{n}", loose)


@pytest.mark.parametrize("name", sorted(CASES))
def test_ops_from_several_threads_agree(name):
    """Eight Python threads calling the op at once get the single-threaded results (forward and grads): bitwise on
    the CPU kernels; to float32 rounding on the CUDA kernels, whose float atomics (selective_scan's dB, dC) sum in
    the order blocks run, which the emulator shuffles on every launch."""
    case = CASES[name]
    x = make(case, "cpu", torch.float32, seed=5, sizes={case.batch: 3})
    names = [n for n in case.grads if x.get(n) is not None]

    def call():
        xo = _leaves(x, names)
        outs = case.run(xo)
        return [o.detach() for o in outs] + [g for g in _grads(outs, [xo[n] for n in names], 3) if g is not None]

    want = call()
    results, errors = [None] * 8, []

    def worker(i):
        try:
            results[i] = call()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for r in results:
        for i, (a, b) in enumerate(zip(r, want)):
            assert_close(a, b, exact=not EMULATED, tol=1e-5 if EMULATED else None, name=f"{name} result {i}")
