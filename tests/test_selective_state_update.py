"""selective_state_update: mamba-ssm's decode contract against the float64 step (reference/selective_scan.py),
shape errors that name the argument and its expected shape, state_batch_indices, mixed dtypes, broadcast, and a
replay of the CUDA kernel's block structure (replays/selective_state_update.py)."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import linmix
from linmix.reference import selective_state_update_ref

from conftest import DEVICES, EMULATED, assert_close, cuda_only
from replays import selective_state_update as selective_state_update_replay

EPS = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}


def mamba_inputs(device, itype, batch, dim, dstate, has_z, heads=False, headdim=64, ngroups=1, tie_hdim=False,
                 state_rows=None, state_dtype=None):
    """mamba-ssm's test inputs (tests/ops/triton/test_selective_state_update.py): activations and state in
    itype, A, B, C, D, dt_bias in float32, dt_softplus on."""
    kw = dict(device=device)
    S = batch if state_rows is None else state_rows
    sdt = itype if state_dtype is None else state_dtype
    if not heads:
        args = dict(state=torch.randn(S, dim, dstate, dtype=sdt, **kw), x=torch.randn(batch, dim, dtype=itype, **kw),
                    dt=torch.randn(batch, dim, dtype=itype, **kw), A=-torch.rand(dim, dstate, **kw) - 1.0,
                    B=torch.randn(batch, dstate, **kw), C=torch.randn(batch, dstate, **kw), D=torch.randn(dim, **kw),
                    dt_bias=torch.rand(dim, **kw) - 4.0)
    else:
        h = dim // headdim
        args = dict(state=torch.randn(S, h, headdim, dstate, dtype=sdt, **kw),
                    x=torch.randn(batch, h, headdim, dtype=itype, **kw),
                    B=torch.randn(batch, ngroups, dstate, **kw), C=torch.randn(batch, ngroups, dstate, **kw))
        if tie_hdim:  # one dt, A, D, dt_bias per head, broadcast with stride 0
            args.update(dt=torch.randn(batch, h, 1, dtype=itype, **kw).expand(batch, h, headdim),
                        dt_bias=(torch.rand(h, 1, **kw) - 4.0).expand(h, headdim),
                        A=(-torch.rand(h, 1, 1, **kw) - 1.0).expand(h, headdim, dstate),
                        D=torch.randn(h, 1, **kw).expand(h, headdim))
        else:
            args.update(dt=torch.randn(batch, h, headdim, dtype=itype, **kw), dt_bias=torch.rand(h, headdim, **kw) - 4.0,
                        A=-torch.rand(h, headdim, dstate, **kw) - 1.0, D=torch.randn(h, headdim, **kw))
    args["z"] = torch.randn_like(args["x"]) if has_z else None
    return args


def run_and_check(args, itype, **kw):
    ref_out, ref_state = selective_state_update_ref(**args, dt_softplus=True, **kw)
    state = args["state"]
    out = linmix.selective_state_update(**args, dt_softplus=True, **kw)
    assert out.dtype == itype and out.shape == args["x"].shape
    assert_close(out, ref_out, tol=2 * EPS[itype], name="out")
    assert_close(state, ref_state, tol=2 * EPS[state.dtype], name="state")


ITYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("itype", ITYPES)
@pytest.mark.parametrize("has_z", [False, True])
@pytest.mark.no_emulation("mamba-ssm's shapes (d = 2048: 4096 blocks a call) take about half a minute a call in the emulator; "
                            "tests/test_emulated_kernels.py runs the decode step's kernels on small shapes")
@pytest.mark.parametrize("dstate", [16, 32, 64])
def test_mamba1_layout(device, itype, has_z, dstate):
    torch.manual_seed(0)
    run_and_check(mamba_inputs(device, itype, 2, 2048 + 16, dstate, has_z), itype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("itype", ITYPES)
@pytest.mark.parametrize("has_z, tie_hdim", [(False, False), (True, True), (True, False)])
@pytest.mark.parametrize("ngroups", [1, 2, 4])
@pytest.mark.no_emulation("mamba-ssm's shapes (d = 2048: 4096 blocks a call) take about half a minute a call in the emulator; "
                            "tests/test_emulated_kernels.py runs the decode step's kernels on small shapes")
@pytest.mark.parametrize("dstate", [16, 64])
def test_heads_layout(device, itype, has_z, tie_hdim, ngroups, dstate):
    torch.manual_seed(0)
    run_and_check(mamba_inputs(device, itype, 2, 2048, dstate, has_z, True, ngroups=ngroups, tie_hdim=tie_hdim), itype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("itype", ITYPES)
@pytest.mark.parametrize("heads, tie_hdim", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_state_batch_indices(device, itype, heads, tie_hdim, index_dtype):
    # mamba-ssm's cache: 16 requests in a cache of 160 rows, a random permutation's first 16 entries
    torch.manual_seed(0)
    args = mamba_inputs(device, itype, 16, 1024, 16, True, heads, ngroups=2, tie_hdim=tie_hdim, state_rows=160)
    idx = torch.randperm(160)[:16].to(device, index_dtype)
    before = args["state"].clone()
    run_and_check(args, itype, state_batch_indices=idx)
    untouched = torch.ones(160, dtype=torch.bool)
    untouched[idx.long().cpu()] = False
    assert torch.equal(args["state"][untouched.to(device)], before[untouched.to(device)])


@pytest.mark.parametrize("device", DEVICES)
def test_padding_indices(device):
    # a negative entry marks a padding row (mamba-ssm): out 0, no state row touched
    torch.manual_seed(0)
    args = mamba_inputs(device, torch.float32, 4, 64, 16, True, True, headdim=16, state_rows=6)
    idx = torch.tensor([3, -1, 0, -1], device=device)
    before = args["state"].clone()
    run_and_check(args, torch.float32, state_batch_indices=idx)
    out = linmix.selective_state_update(**args, state_batch_indices=idx)
    assert (out[1] == 0).all() and (out[3] == 0).all()
    for r in (1, 2, 4, 5):
        assert torch.equal(args["state"][r], before[r])


# mamba-ssm's (rtol, atol) in its four decode tests (tests/ops/triton/test_selective_state_update.py), by
# (heads layout, state_batch_indices) and dtype.
MAMBA_TOL = {
    (False, False): {torch.float16: (5e-3, 1e-2), torch.bfloat16: (1e-2, 5e-2)},
    (True, False): {torch.float16: (5e-3, 3e-2), torch.bfloat16: (1e-2, 1e-1)},
    (False, True): {torch.float16: (5e-3, 1e-2), torch.bfloat16: (6e-2, 6e-2)},
    (True, True): {torch.float16: (5e-3, 3e-2), torch.bfloat16: (1e-1, 1e-1)},
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("itype", ITYPES)
@pytest.mark.parametrize("heads, indexed", list(MAMBA_TOL))
@pytest.mark.parametrize("has_z", [False, True])
def test_mamba_tolerances(monkeypatch, device, itype, heads, indexed, has_z):
    # mamba's own tolerances at n = 64, where 16-bit rounding weighs most. They hold because the output
    # reads the state as stored and silu(z) is rounded to z's dtype, as in mamba's selective_state_update_ref;
    # summing the unrounded states instead misses them by up to 0.25 in bf16. On CUDA: the kernel (the default
    # L = 1 selective_scan path sums the fp32 state).
    if device == "cuda" or EMULATED:
        monkeypatch.setenv("LINMIX_UNVERIFIED_KERNELS", "1")
    torch.manual_seed(0)
    batch = 16 if indexed else 2
    args = mamba_inputs(device, itype, batch, 4096, 64, has_z, heads,
                        state_rows=2 * batch if indexed else None)  # mamba's cache has 10 * batch rows
    kw = dict(state_batch_indices=torch.randperm(2 * batch)[:batch].to(device, torch.int32)) if indexed else {}
    rows = kw["state_batch_indices"].long() if indexed else slice(None)
    ref_out, ref_state = selective_state_update_ref(**args, dt_softplus=True, **kw)
    out = linmix.selective_state_update(**args, dt_softplus=True, **kw)
    rtol, atol = MAMBA_TOL[heads, indexed].get(itype, (3e-4, 1e-3))
    torch.testing.assert_close(args["state"][rows].double(), ref_state[rows], rtol=rtol, atol=atol)
    torch.testing.assert_close(out.double(), ref_out, rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("itype", ITYPES)
@pytest.mark.parametrize("has_z", [False, True])
def test_output_reads_stored_state(monkeypatch, device, itype, has_z):
    # The semantics behind test_mamba_tolerances, pinned tightly: out = (C · s' + D x) silu(z) with s' the state as
    # stored (after its rounding) and silu(z) in z's dtype, up to fp32 accumulation and a unit in the last place of
    # silu(z) and of out (the host's exp is not torch's). Summing the unrounded s' instead is off by about 0.01 in bf16.
    if device == "cuda" or EMULATED:
        monkeypatch.setenv("LINMIX_UNVERIFIED_KERNELS", "1")
    torch.manual_seed(0)
    a = mamba_inputs(device, itype, 4, 4096, 64, has_z)
    out = linmix.selective_state_update(**a, dt_softplus=True)
    terms = a["state"].double() * a["C"].double()[:, None]  # (b, d, n): C_n s'_n
    want = terms.sum(-1) + a["D"].double() * a["x"].double()
    if has_z:
        want = want * F.silu(a["z"]).double()
    torch.testing.assert_close(out.double(), want, rtol=2 * EPS[itype], atol=1e-6 * terms.abs().sum(-1).max().item())


def _raises(args, match, **kw):
    """The call raises a RuntimeError matching `match` and leaves the state bitwise untouched."""
    before = args["state"].clone()
    with pytest.raises(RuntimeError, match=match):
        linmix.selective_state_update(**args, **kw)
    assert torch.equal(args["state"], before)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_indices(device):
    args = mamba_inputs(device, torch.float32, 3, 8, 4, False, state_rows=5)
    if device == "cpu":  # on CUDA the values are never read on the host: an async device assert (not tested here)
        _raises(args, r"state_batch_indices\[1\] = 5 is out of range for a state of 5 rows",
                state_batch_indices=torch.tensor([0, 5, 1], device=device))
        _raises(args, r"state_batch_indices\[2\] = 4 repeats state_batch_indices\[0\]",
                state_batch_indices=torch.tensor([4, 1, 4], device=device))
    _raises(args, r"state_batch_indices must be int32 or int64",
            state_batch_indices=torch.tensor([0.0, 1.0, 2.0], device=device))
    _raises(args, r"state_batch_indices must have shape \(b,\) like x's first dim = \(3\), got \(2\)",
            state_batch_indices=torch.tensor([0, 1], device=device))
    _raises(args, r"x must have shape \(b, d\) with d from state \(b, d, n\) = \(5, 8\), got \(3, 8\)")


def test_cache_rows_checked_on_the_device():
    # What a CUDA call checks without reading the indices on the host (asynchronous asserts), run on CPU tensors
    # here, where the assert raises at once: padding rows may repeat, state rows may not.
    from linmix.ops.selective_scan import check_cache_rows
    check_cache_rows(torch.tensor([3, -1, 0, -1, 2]), 4)
    check_cache_rows(torch.tensor([], dtype=torch.int32), 4)
    with pytest.raises(RuntimeError, match="names a state row twice"):
        check_cache_rows(torch.tensor([1, -1, 2, 1], dtype=torch.int32), 4)
    with pytest.raises(RuntimeError, match="is >= the state's row count"):
        check_cache_rows(torch.tensor([0, 4]), 4)
    compiled = torch.compile(check_cache_rows, fullgraph=True)
    compiled(torch.tensor([2, 0]), 4)
    with pytest.raises(RuntimeError, match="names a state row twice"):
        compiled(torch.tensor([2, 2]), 4)


def _heads(b=2, h=4, p=3, n=2, g=2):
    return dict(state=torch.randn(b, h, p, n), x=torch.randn(b, h, p), dt=torch.rand(b, h, p), A=-torch.rand(h, p, n),
                B=torch.randn(b, g, n), C=torch.randn(b, g, n), D=torch.randn(h, p), z=torch.randn(b, h, p),
                dt_bias=torch.randn(h, p))


def test_mamba2_shape_errors():
    # Mamba-2 (heads) inputs of the wrong shape: each must raise naming the argument, its expected and actual shape.
    torch.manual_seed(0)
    a = _heads(b=1, h=4, p=3, n=2)
    _raises(dict(a, B=torch.randn(1, 3, 2), C=torch.randn(1, 3, 2)), r"group count g = 3 of B \(1, 3, 2\) must divide the head count 4")
    a = _heads()
    _raises(dict(a, D=torch.randn(4)), r"D must have shape \(h, p\) = \(4, 3\), got \(4\)")
    _raises(dict(a, D=torch.randn(12, 3)), r"D must have shape \(h, p\) = \(4, 3\), got \(12, 3\)")
    _raises(dict(a, dt=torch.rand(2, 4)), r"dt must have shape \(b, h, p\) like x = \(2, 4, 3\), got \(2, 4\)")
    _raises(dict(a, A=-torch.rand(4)), r"A must have shape \(h, p, n\) = \(4, 3, 2\), got \(4\)")
    _raises(dict(a, dt_bias=torch.randn(4)), r"dt_bias must have shape \(h, p\) = \(4, 3\), got \(4\)")
    _raises(dict(a, x=torch.randn(2, 4, 4)), r"x must have shape \(b, h, p\) .* = \(2, 4, 3\), got \(2, 4, 4\)")
    m1 = dict(state=torch.randn(2, 5, 3), x=torch.randn(2, 6), dt=torch.rand(2, 5), A=-torch.rand(5, 3),
              B=torch.randn(2, 3), C=torch.randn(2, 3))
    _raises(m1, r"x must have shape \(b, d\) .* = \(2, 5\), got \(2, 6\)")
    _raises(dict(m1, x=torch.randn(2, 5), z=torch.randn(2, 6)), r"z must have shape \(b, d\) like x = \(2, 5\), got \(2, 6\)")
    _raises(dict(m1, x=torch.randn(2, 5), B=torch.randn(2, 4)), r"B must have shape \(b, n\) = \(2, 3\), got \(2, 4\)")
    _raises(dict(m1, x=torch.randn(2, 5), C=torch.randn(2, 2, 3)), r"group count g = 2 of C \(2, 2, 3\) must divide the channel count 5")
    _raises(dict(m1, x=torch.randn(2, 5), D=torch.randn(5, 1)), r"D must have shape \(d,\) = \(5\), got \(5, 1\)")
    _raises(dict(a, z=torch.randn(2, 4, 3, dtype=torch.float64)), r"z must have the same dtype as x")
    _raises(dict(a, x=a["x"].int()), r"x must be float32, float16, bfloat16")
    _raises(dict(a, state=torch.randn(2, 4, 2, 3).transpose(-1, -2)), r"state must have unit stride along n")


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes(device):
    # float32 state with bfloat16 activations, float32 dt with float16 x, bfloat16 parameters: all computed in fp32
    torch.manual_seed(0)
    a = mamba_inputs(device, torch.bfloat16, 3, 256, 16, True, True, headdim=32, ngroups=2, state_dtype=torch.float32)
    run_and_check(a, torch.bfloat16)
    a = mamba_inputs(device, torch.float16, 3, 256, 16, True, False)
    a["dt"] = a["dt"].float()
    run_and_check(a, torch.float16)
    a = mamba_inputs(device, torch.float32, 3, 96, 8, True, True, headdim=16, ngroups=3)
    for k in ("A", "B", "C", "D", "dt_bias"):
        a[k] = a[k].to(torch.bfloat16)
    run_and_check(a, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    # non-contiguous x / dt / z / B / C, state rows of a larger cache (a slice), B and C with different groups
    torch.manual_seed(0)
    b, h, p, n = 3, 6, 5, 7
    dt_ = torch.float64 if device == "cpu" else torch.float32
    kw = dict(device=device, dtype=dt_)
    cache = torch.randn(b, h, p, n + 3, **kw)
    args = dict(state=cache[..., 1:n + 1], x=torch.randn(b, p, h, **kw).transpose(1, 2),
                dt=torch.rand(b, h, 2 * p, **kw)[..., ::2], A=-torch.rand(h, n, p, **kw).transpose(1, 2),
                B=torch.randn(b, n, 3, **kw).transpose(1, 2), C=torch.randn(b, 2, 2 * n, **kw)[..., ::2],
                D=torch.randn(p, h, **kw).t(), z=torch.randn(b, h, p, 2, **kw)[..., 0], dt_bias=torch.randn(h, p, **kw))
    outside = cache[..., [0, n + 1, n + 2]].clone()
    run_and_check(args, dt_)
    assert torch.equal(cache[..., [0, n + 1, n + 2]], outside)


def test_float64_flag_product():
    # every optional input and flag, both layouts, CPU float64 against the float64 step to 1e-12
    torch.manual_seed(0)
    for heads, D, z, bias, softplus in itertools.product([False, True], repeat=5):
        a = _heads(b=3, h=4, p=3, n=5) if heads else dict(
            state=torch.randn(3, 6, 5), x=torch.randn(3, 6), dt=torch.rand(3, 6), A=-torch.rand(6, 5),
            B=torch.randn(3, 3, 5), C=torch.randn(3, 5), D=torch.randn(6), z=torch.randn(3, 6), dt_bias=torch.rand(6))
        a = {k: v.double() for k, v in a.items()}
        for k, keep in (("D", D), ("z", z), ("dt_bias", bias)):
            if not keep:
                a[k] = None
        ref_out, ref_state = selective_state_update_ref(**a, dt_softplus=softplus)
        out = linmix.selective_state_update(**a, dt_softplus=softplus)
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a["state"], ref_state, rtol=1e-12, atol=1e-12)


def test_empty_batch():
    a = _heads(b=0)
    out = linmix.selective_state_update(**a)
    assert out.shape == (0, 4, 3)


def test_opcheck_and_compile():
    torch.manual_seed(0)
    a = _heads(b=2, h=4, p=3, n=5)
    kwargs = dict(a, state_batch_indices=None, dt_softplus=True)
    torch.library.opcheck(torch.ops.linmix.selective_state_update.default, (), kwargs)
    idx = torch.tensor([1, 0])
    torch.library.opcheck(torch.ops.linmix.selective_state_update.default, (), dict(kwargs, state_batch_indices=idx))

    def step(state, x, dt, A, B, C):
        return linmix.selective_state_update(state, x, dt, A, B, C, dt_softplus=True) * 2

    s1, s2 = a["state"].clone(), a["state"].clone()
    want = step(s1, a["x"], a["dt"], a["A"], a["B"], a["C"])
    got = torch.compile(step, fullgraph=True)(s2, a["x"], a["dt"], a["A"], a["B"], a["C"])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(s2, s1)


# ---- the CUDA kernel's block structure, replayed (replays/selective_state_update.py) ----

@pytest.mark.parametrize("n", [1, 3, 4, 15, 16, 17, 33, 64, 65, 129])
def test_replay_block_structure(n):
    # rows h * p = 3 * 11 = 33: not a multiple of any rows-per-block (4..32); a padding and an unordered index
    torch.manual_seed(n)
    a = {k: v.double() for k, v in _heads(b=3, h=3, p=11, n=n, g=3).items()}
    a["state"] = torch.randn(5, 3, 11, n, dtype=torch.float64)
    idx = torch.tensor([4, -1, 1])
    ref_out, ref_state = selective_state_update_ref(**a, dt_softplus=True, state_batch_indices=idx)
    npa = {k: v.numpy() for k, v in a.items()}
    out, state = selective_state_update_replay.fwd(npa["state"], npa["x"], npa["dt"], npa["A"], npa["B"], npa["C"],
                                                   npa["D"], npa["z"], npa["dt_bias"], True, idx.numpy())
    np.testing.assert_allclose(out, ref_out.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state, ref_state.numpy(), rtol=1e-12, atol=1e-12)


def test_threads_per_row_matches_kernel():
    # ssu_threads_per_row in the .cuh: 4 threads up to n = 16, doubling to a warp
    assert [selective_state_update_replay.threads_per_row(n) for n in (1, 16, 17, 32, 33, 64, 65, 128, 129, 256)] == [4, 4, 8, 8, 16, 16, 32, 32, 32, 32]


# ---- CUDA: the unverified fused kernel (switch on) and the default selective_scan route ----


@cuda_only
@pytest.mark.parametrize("switch", ["0", "1"])
@pytest.mark.parametrize("itype", ITYPES)
@pytest.mark.parametrize("heads, tie_hdim, n", [(False, False, 16), (True, False, 64), (True, True, 17),
                                                 (True, False, 200), (False, False, 3)])
def test_cuda_paths(monkeypatch, switch, itype, heads, tie_hdim, n):
    monkeypatch.setenv("LINMIX_UNVERIFIED_KERNELS", switch)
    torch.manual_seed(0)
    args = mamba_inputs("cuda", itype, 9, 1024 + 64, n, True, heads, ngroups=1 if not heads else 17,
                        tie_hdim=tie_hdim, state_rows=20)
    idx = torch.tensor([3, 19, -1, 0, 7, 8, -1, 11, 2], device="cuda", dtype=torch.int32)
    run_and_check(args, itype, state_batch_indices=idx)
    run_and_check(mamba_inputs("cuda", itype, 20, 1024 + 64, n, False, heads, tie_hdim=tie_hdim), itype)


@cuda_only
@pytest.mark.parametrize("switch", ["0", "1"])
def test_cuda_graph_capture_with_indices(monkeypatch, switch):
    # the indices are never read back, so a decode step with them can be captured; padding rows included
    monkeypatch.setenv("LINMIX_UNVERIFIED_KERNELS", switch)
    torch.manual_seed(0)
    args = mamba_inputs("cuda", torch.float32, 4, 256, 16, True, True, headdim=32, state_rows=8)
    idx = torch.tensor([5, -1, 0, 2], device="cuda")
    want_out, want_state = selective_state_update_ref(**args, dt_softplus=True, state_batch_indices=idx)
    graph = torch.cuda.CUDAGraph()
    linmix.selective_state_update(**dict(args, state=args["state"].clone()), dt_softplus=True, state_batch_indices=idx)
    with torch.cuda.graph(graph):
        out = linmix.selective_state_update(**args, dt_softplus=True, state_batch_indices=idx)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, want_out, tol=2 * EPS[torch.float32], name="out")
    assert_close(args["state"], want_state, tol=2 * EPS[torch.float32], name="state")


@cuda_only
@pytest.mark.parametrize("switch", ["0", "1"])
def test_cuda_graph_capture(monkeypatch, switch):
    # without state_batch_indices neither CUDA path syncs, so a decode step can be captured in a graph
    monkeypatch.setenv("LINMIX_UNVERIFIED_KERNELS", switch)
    torch.manual_seed(0)
    args = mamba_inputs("cuda", torch.bfloat16, 3, 128, 16, True, False, state_dtype=torch.float32)
    want_out, want_state = selective_state_update_ref(**args, dt_softplus=True)
    linmix.selective_state_update(**dict(args, state=args["state"].clone()), dt_softplus=True)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = linmix.selective_state_update(**args, dt_softplus=True)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, want_out, tol=2 * EPS[torch.bfloat16], name="out")
    assert_close(args["state"], want_state, tol=2 * EPS[torch.float32], name="state")
