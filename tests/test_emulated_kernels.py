"""Every CUDA kernel family on small odd shapes, forward and backward, fp32 and bf16: the target of the CUDA
emulator's sanitizer runs (``python -m linmix.emulation --sanitizer address|thread -- python -m pytest
tests/test_emulated_kernels.py``). Under LINMIX_EMULATE_CUDA=1 the fp32/bf16 calls run the CUDA kernels' own
source; without it, the CPU kernels. The expected values are the same op in float64, which always runs the CPU
kernels (themselves checked against the float64 PyTorch references in each op's test file). Every case runs with
the default kernels and with every opt-in family switched on.

Shapes: T in {1, 37, 65, 130} (one step, odd, just past a 64-step chunk, several chunks); head dims and channel
counts that are not multiples of 16; grouped B/C; initial and final states.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import linmix

from conftest import assert_rel_close

DTYPES = [torch.float32, torch.bfloat16]
SWITCHES = ["default", "all"]
TOL = {torch.float32: 2e-4, torch.bfloat16: 5e-2}  # relative error in the 2-norm


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check(fn, inputs: list[torch.Tensor], dtype: torch.dtype, grads: bool = True, seed: int = 0) -> None:
    """fn(*inputs) in `dtype` (inputs rounded to it first) against fn in float64 on the same rounded values:
    every output, and (if `grads`) every input's gradient of a random projection of the outputs."""
    base = [x.to(dtype).double() if x.is_floating_point() else x for x in inputs]

    def run(dt):
        xs = [x.to(dt).detach().requires_grad_(grads) if x.is_floating_point() else x for x in base]
        outs = [o for o in fn(*xs) if o is not None]
        return xs, outs

    xs, outs = run(dtype)
    xs64, outs64 = run(torch.float64)
    for i, (o, o64) in enumerate(zip(outs, outs64)):
        assert_rel_close(o, o64, TOL[dtype], name=f"output {i}", norm="fro")
    if not grads:
        return
    weights = [torch.randn(o.shape, generator=gen(seed + 1 + i), dtype=torch.float64) for i, o in enumerate(outs64)]
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights))
    loss64 = sum((o * w).sum() for o, w in zip(outs64, weights))
    diff = [x for x in xs if x.requires_grad]
    got = torch.autograd.grad(loss, diff, allow_unused=True)
    want = torch.autograd.grad(loss64, [x for x in xs64 if x.requires_grad], allow_unused=True)
    for i, (g, g64) in enumerate(zip(got, want)):
        if g64 is None:
            continue
        assert_rel_close(g, g64, TOL[dtype], name=f"gradient {i}", norm="fro")


@pytest.fixture(params=SWITCHES)
def switch(request, monkeypatch):
    if request.param == "all":
        monkeypatch.setenv("LINMIX_UNVERIFIED_KERNELS", "1")
    else:
        monkeypatch.delenv("LINMIX_UNVERIFIED_KERNELS", raising=False)
        monkeypatch.delenv("LINMIX_KERNELS", raising=False)
    return request.param


# ---- the cases, one function per op: (fn, inputs, differentiable)
def linear_scan_case(B, T, D, h0, reverse, seed=0, lengths=None):
    """lengths: packed sequences of these lengths (B = 1, T their sum, one h0 row each)."""
    g = gen(seed)
    cu = None if lengths is None else torch.tensor([0, *itertools.accumulate(lengths)])
    n = B if lengths is None else len(lengths)
    a = torch.rand(B, T, D, generator=g, dtype=torch.float64) * 0.9 + 0.05
    b = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    inputs = [a, b] + ([torch.randn(n, D, generator=g, dtype=torch.float64)] if h0 else [])

    def fn(a, b, *h):
        acc = torch.float64 if a.dtype == torch.float64 else torch.float32
        return (linmix.linear_scan(a, b, h[0].to(acc) if h else None, reverse=reverse, cu_seqlens=cu),)
    return fn, inputs


def selective_scan_case(b, d, n, L, variable, groups, seed=0):
    g = gen(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    u, delta, z = torch.randn(b, d, L, **f64), torch.randn(b, d, L, **f64) * 0.5, torch.randn(b, d, L, **f64)
    A = -torch.rand(d, n, **f64) - 0.5
    if variable:
        B, C = torch.randn(b, groups, n, L, **f64), torch.randn(b, groups, n, L, **f64)
    else:
        B, C = torch.randn(d, n, **f64), torch.randn(d, n, **f64)
    D, bias, h0 = torch.randn(d, **f64), torch.randn(d, **f64) * 0.1, torch.randn(b, d, n, **f64)

    def fn(u, delta, A, B, C, z, D, bias, h0):
        acc = torch.float64 if u.dtype == torch.float64 else torch.float32
        A, D, bias, h0 = A.to(acc), D.to(acc), bias.to(acc), h0.to(acc)
        if not variable:
            B, C = B.to(acc), C.to(acc)
        return linmix.selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True,
                                     initial_state=h0, return_final_state=True, deterministic=variable)
    return fn, [u, delta, A, B, C, z, D, bias, h0]


def selective_scan_varlen_case(d, n, lengths, variable, seed=0):
    """Packed sequences (cu_seqlens, the selective_scan_varlen kernels): empty, length-1 and longer sequences."""
    g = gen(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    L, N = sum(lengths), len(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    u, delta, z = torch.randn(1, d, L, **f64), torch.randn(1, d, L, **f64) * 0.5, torch.randn(1, d, L, **f64)
    A = -torch.rand(d, n, **f64) - 0.5
    B, C = (torch.randn(1, 1, n, L, **f64), torch.randn(1, 1, n, L, **f64)) if variable else \
        (torch.randn(d, n, **f64), torch.randn(d, n, **f64))
    D, bias, h0 = torch.randn(d, **f64), torch.randn(d, **f64) * 0.1, torch.randn(N, d, n, **f64)

    def fn(u, delta, A, B, C, z, D, bias, h0, cu):
        acc = torch.float64 if u.dtype == torch.float64 else torch.float32
        A, D, bias, h0 = A.to(acc), D.to(acc), bias.to(acc), h0.to(acc)
        if not variable:
            B, C = B.to(acc), C.to(acc)
        return linmix.selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True,
                                     initial_state=h0, return_final_state=True, cu_seqlens=cu)
    return fn, [u, delta, A, B, C, z, D, bias, h0, cu]


def gla_case(op, B, T, H, K, V, seed=0):
    g = gen(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    q, k = torch.randn(B, T, H, K, **f64), torch.randn(B, T, H, K, **f64)
    v, gate = torch.randn(B, T, H, V, **f64), F.logsigmoid(torch.randn(B, T, H, K, **f64) + 2)
    h0 = torch.randn(B, H, K, V, **f64)

    def fn(q, k, v, gate, h0):
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        return op(q, k, v, gate, initial_state=h0.to(acc), output_final_state=True)
    return fn, [q, k, v, gate, h0]


def gla_varlen_case(op, lens, H, K, V, seed=0, **kw):
    """Packed sequences of these lengths (a batch of one, cu_seqlens), per-sequence initial states."""
    fn, (q, k, v, gate, _) = gla_case(op, 1, sum(lens), H, K, V, seed)
    h0 = torch.randn(len(lens), H, K, V, generator=gen(seed + 1), dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)

    def packed(q, k, v, gate, h0):
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        return op(q, k, v, gate, initial_state=h0.to(acc), output_final_state=True, cu_seqlens=cu, **kw)
    return packed, [q, k, v, gate, h0]


def fixed_point_case(B, T, D, R, grad_mode, seed=0):
    g = gen(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    u, lam = torch.randn(B, T, D, **f64), torch.rand(B, T, D, **f64) * 0.5 + 0.45
    hh_u = F.normalize(torch.randn(B, T, R, D, **f64), dim=-1)
    beta = torch.rand(B, T, R, **f64) * 0.5

    def fn(u, lam, hh_u, beta):
        return (linmix.fixed_point_rnn(u, lam, hh_u, beta, max_iter=12, tol=0.0, grad_mode=grad_mode),)
    return fn, [u, lam, hh_u, beta]


def fixed_point_variants_case(B, T, D, R, stopping, tol, seed=0, lengths=None):
    """An initial state (and the final one), damping, the stopping rule, the implicit gradient: the
    fixed_point_rnn_variants kernels. With tol > 0 the dtype's run may stop a few iterations from float64's, both
    within tol of the fixed point. lengths: packed sequences of these lengths (B = 1, T their sum), each with its
    own initial state and stopping."""
    fn0, inputs = fixed_point_case(B, T, D, R, "implicit", seed)
    cu = None if lengths is None else torch.tensor([0, *itertools.accumulate(lengths)])
    h0 = torch.randn(B if lengths is None else len(lengths), D, generator=gen(seed + 1), dtype=torch.float64)

    def fn(u, lam, hh_u, beta, h0):
        return linmix.fixed_point_rnn(u, lam, hh_u, beta, max_iter=60 if tol else 5, tol=tol, grad_mode="implicit",
                                      initial_state=h0, output_final_state=True, damping=0.8, stopping=stopping,
                                      quantile=0.5, cu_seqlens=cu)
    return fn, inputs + [h0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, D, h0, reverse", [(2, 1, 33, True, False), (1, 37, 40, False, True),
                                                 (2, 130, 17, True, True)])
def test_linear_scan(B, T, D, h0, reverse, dtype, switch):
    check(*linear_scan_case(B, T, D, h0, reverse), dtype)


# Packed sequences (linear_scan_varlen): empty, length-1, exactly one 64-step chunk, longer than a chunk, and
# boundaries inside a chunk.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths, reverse", [((5, 0, 1, 64, 70), False), ((3, 0, 9), True)])
def test_linear_scan_varlen(lengths, reverse, dtype):
    check(*linear_scan_case(1, sum(lengths), 33, True, reverse, lengths=lengths), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, d, n, L, variable, groups", [(2, 5, 16, 1, False, 1), (1, 6, 7, 37, True, 2),
                                                          (2, 3, 16, 130, True, 3), (1, 4, 4, 65, False, 1)])
def test_selective_scan(b, d, n, L, variable, groups, dtype, switch):
    check(*selective_scan_case(b, d, n, L, variable, groups), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variable", [True, False])
def test_selective_scan_varlen(variable, dtype):
    # one family serves packed calls whatever the switches say: no `switch` fixture (CI's sanitizer time)
    check(*selective_scan_varlen_case(2, 3, [0, 2, 1, 6, 0], variable), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_selective_state_update(layout, dtype, switch):
    g = gen(3)
    f64 = dict(generator=g, dtype=torch.float64)
    if layout == "mamba1":
        b, d, n = 3, 10, 16
        shapes = dict(state=(b, d, n), x=(b, d), A=(d, n), BC=(b, 2, n), D=(d,))
    else:
        b, h, p, n = 2, 4, 6, 12
        shapes = dict(state=(b, h, p, n), x=(b, h, p), A=(h, p, n), BC=(b, 2, n), D=(h, p))
    state = torch.randn(shapes["state"], **f64)
    x, dt, z = (torch.randn(shapes["x"], **f64) for _ in range(3))
    A = -torch.rand(shapes["A"], **f64) - 0.5
    B, C = torch.randn(shapes["BC"], **f64), torch.randn(shapes["BC"], **f64)
    D, bias = torch.randn(shapes["D"], **f64), torch.randn(shapes["D"], **f64) * 0.1

    def run(dt_):
        acc = torch.float64 if dt_ == torch.float64 else torch.float32
        s = state.to(dtype).to(acc)
        out = linmix.selective_state_update(s, x.to(dtype).to(dt_), dt.to(dtype).to(acc), A.to(acc),
                                            B.to(dtype).to(acc), C.to(dtype).to(acc), D=D.to(acc),
                                            z=z.to(dtype).to(dt_), dt_bias=bias.to(acc), dt_softplus=True)
        return out, s
    out, s = run(dtype)
    out64, s64 = run(torch.float64)
    assert_rel_close(out, out64, TOL[dtype], name="out", norm="fro")
    assert_rel_close(s, s64, TOL[torch.float32], name="state", norm="fro")


GLA_SHAPES = [(1, 1, 2, 20, 33), (2, 37, 1, 33, 20), (1, 65, 2, 64, 40), (1, 130, 1, 17, 64)]
# chunk_gla's fused kernels have traits per key head dim (64, 128, 256) and 64-column V tiles; the fused backward
# per max(K, V) <= 64, 128 (wider heads take the serial backward)
GLA_WIDE_SHAPES = [(1, 70, 1, 100, 72), (1, 37, 1, 200, 24)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, H, K, V", GLA_SHAPES)
@pytest.mark.parametrize("op", ["chunk_gla", "fused_recurrent_gla"])
def test_gla(op, B, T, H, K, V, dtype, switch):
    check(*gla_case(getattr(linmix, op), B, T, H, K, V), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, H, K, V", GLA_WIDE_SHAPES)
def test_chunk_gla_wide_heads(B, T, H, K, V, dtype, switch):
    check(*gla_case(linmix.chunk_gla, B, T, H, K, V), dtype)


# head dims above 256: the gla_head512 family (by default there, warning once), both ops
GLA_HEAD512_SHAPES = [(1, 37, 1, 320, 24), (1, 9, 2, 20, 512), (1, 65, 1, 512, 40)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, H, K, V", GLA_HEAD512_SHAPES)
@pytest.mark.parametrize("op", ["chunk_gla", "fused_recurrent_gla"])
def test_gla_head512(op, B, T, H, K, V, dtype, switch):
    check(*gla_case(getattr(linmix, op), B, T, H, K, V), dtype)


# packed sequences (cu_seqlens): the gla_varlen family, the one family that serves them (so no switch), both ops and
# fused_recurrent_gla's reverse, and its kernels sized for head dims up to 512; boundaries inside a chunk and on its
# edge (69), an empty and a length-1 sequence
GLA_VARLEN_LENS = [5, 0, 64, 1, 3]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op, kw, K, V", [("chunk_gla", {}, 20, 33), ("fused_recurrent_gla", {"reverse": True}, 20, 33),
                                          ("chunk_gla", {}, 260, 24)])
def test_gla_varlen(op, kw, K, V, dtype):
    check(*gla_varlen_case(getattr(linmix, op), GLA_VARLEN_LENS, 1, K, V, **kw), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, D, R, grad_mode", [(2, 1, 20, 1, "onestep"), (1, 37, 24, 2, "implicit"),
                                                   (2, 65, 17, 3, "onestep")])
def test_fixed_point_rnn(B, T, D, R, grad_mode, dtype, switch):
    check(*fixed_point_case(B, T, D, R, grad_mode), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, D, R, stopping, tol", [(2, 37, 24, 2, "element", 0.0), (3, 37, 20, 2, "batch", 1e-5),
                                                       (2, 65, 17, 3, "causal", 1e-5), (1, 1, 20, 1, "causal", 1e-5),
                                                       (3, 4, 9, 1, "batch", 1e-5)])
def test_fixed_point_rnn_variants(B, T, D, R, stopping, tol, dtype, switch):
    check(*fixed_point_variants_case(B, T, D, R, stopping, tol), dtype)


# Packed sequences (fixed_point_rnn_variants, the one family that serves them, so no switch): empty and length-1
# sequences, one longer than the scan's 64-step chunk, boundaries inside a chunk; each stopping rule.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths, stopping, tol", [((5, 0, 1, 66, 3), "element", 0.0), ((4, 1, 0, 9), "causal", 1e-5),
                                                    ((3, 7, 0, 2), "batch", 1e-5)])
def test_fixed_point_rnn_varlen(lengths, stopping, tol, dtype):
    check(*fixed_point_variants_case(1, sum(lengths), 17, 2, stopping, tol, lengths=lengths), dtype)
