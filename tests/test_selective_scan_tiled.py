"""The atomic-free (tiled) selective_scan backward and the deterministic option.

Their PyTorch replays (replays/selective_scan.py: bwd_tiled, fwd_warp, at the kernels' geometry and at a small one
with the same structure) run on CPU in CI against the reference; the CUDA tests run the kernels themselves
(LINMIX_UNVERIFIED_KERNELS=1).
"""

import pytest
import torch

import linmix
from linmix.reference import selective_scan_ref

from conftest import assert_close, cuda_only
from replays import selective_scan as selective_scan_replay
from replays.selective_scan import CHUNK, KERNEL, SMALL, TILE, tile_channels, tiling
from test_selective_scan import NAMES, TOL, check_against_ref, make



@pytest.mark.parametrize("geometry,L", [(SMALL, 1), (SMALL, 8), (SMALL, 17), (SMALL, 33), (KERNEL, 129),
                                        (KERNEL, CHUNK + 1)])
@pytest.mark.parametrize("kinds", [("var", "grouped", 2), ("fixed", "var", 1)])
def test_replay_warp_forward(geometry, L, kinds):
    """Outputs, final state and the checkpoints the backward restarts from (the state after each chunk)."""
    torch.manual_seed(L)
    args, sp = make(2, 6, L, 5, torch.float64, "cpu", *kinds[:2], groups=kinds[2], requires_grad=False)
    out, ckpt, fin = selective_scan_replay.fwd_warp(args, sp, geometry["chunk"], geometry["lanes"], geometry["items"])
    rout, rfin = selective_scan_ref(**args, delta_softplus=sp, return_final_state=True)
    assert_close(out, rout, tol=1e-12, name="out")
    assert_close(fin, rfin, tol=1e-12, name="final_state")
    chunk = geometry["chunk"]
    assert ckpt.shape[2] == -(-L // chunk)
    for c in range(ckpt.shape[2]):
        end = min((c + 1) * chunk, L)
        cut = {k: (v[..., :end] if k in ("u", "delta", "z", "B", "C") and v is not None and v.dim() >= 3 else v)
               for k, v in args.items()}
        want_ckpt = selective_scan_ref(**cut, delta_softplus=sp, return_final_state=True)[1]
        assert_close(ckpt[:, :, c], want_ckpt, tol=1e-12, name="ckpt")


def reference_grads(args, softplus, dout, dfinal):
    names = [k for k in NAMES if args[k] is not None]
    out, fin = selective_scan_ref(**args, delta_softplus=softplus, return_final_state=True)
    loss = (out * dout.double()).sum() + (fin * dfinal.double()).sum()
    return dict(zip(names, torch.autograd.grad(loss, [args[k] for k in names])))


def check_replay(b, d, L, n, B_kind, C_kind, groups, geometry, deterministic, seed=0):
    torch.manual_seed(seed)
    args, sp = make(b, d, L, n, torch.float64, "cpu", B_kind, C_kind, groups=groups)
    dout, dfinal = torch.randn(b, d, L, dtype=torch.float64), torch.randn(b, d, n, dtype=torch.float64)
    want = reference_grads(args, sp, dout, dfinal)
    got = selective_scan_replay.bwd_tiled(args, sp, dout, dfinal, deterministic, **geometry)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
    for name, g in zip(names, got):
        w = want[name]
        if name in ("B", "C") and w.dim() == 3:  # (b, n, L) variable -> the op's (b, 1, n, L)
            w = w.unsqueeze(1)
        assert_close(g.reshape(w.shape), w, tol=1e-10, name=f"d{name}")


def test_tiling_covers_channels_inside_groups():
    """Every channel in exactly one tile; a tile never straddles a B or C group; the last tile of a segment partial."""
    for d in (1, 5, 16, 17, 24, 40, 96):
        for gB in [None] + [g for g in (1, 2, 3, 4, 8, d) if d % g == 0]:
            for gC in [None] + [g for g in (1, 2, 3, 6, d) if d % g == 0]:
                seg, tps, n_tiles = tiling(d, gB, gC, TILE)
                seen = []
                for t in range(n_tiles):
                    ch0, n_ch = tile_channels(t, seg, tps, TILE)
                    assert 1 <= n_ch <= TILE
                    chans = range(ch0, ch0 + n_ch)
                    for g in (gB, gC):
                        if g:
                            assert len({c // (d // g) for c in chans}) == 1, (d, gB, gC, t)
                    seen += chans
                assert seen == list(range(d)), (d, gB, gC)


# L around the sub-chunk (8) and chunk (16) boundaries; d = 7 cuts tiles of 3 as 3, 3, 1.
@pytest.mark.parametrize("L", [1, 7, 8, 9, 15, 16, 17, 33])
@pytest.mark.parametrize("kinds", [("var", "var", 1), ("grouped", "fixed", 7), ("fixed", "var", 1),
                                   ("fixed", "fixed", 1)])
def test_replay_small_geometry(L, kinds):
    B_kind, C_kind, groups = kinds
    for det in (False, True):
        check_replay(2, 7, L, 3, B_kind, C_kind, groups, SMALL, det)


def test_replay_groups_straddling_tiles():
    """d = 12: B in 2 groups (6 channels), C in 3 (4): segments of gcd(6, 4) = 2 channels, tiles of 2 (< 3)."""
    assert tiling(12, 2, 3, SMALL["tile"]) == (2, 1, 6)
    torch.manual_seed(1)
    args, sp = make(2, 12, 20, 3, torch.float64, "cpu", "grouped", "grouped", groups=2)
    args["C"] = torch.randn(2, 3, 3, 20, dtype=torch.float64, requires_grad=True)
    dout, dfinal = torch.randn(2, 12, 20, dtype=torch.float64), torch.randn(2, 12, 3, dtype=torch.float64)
    want = reference_grads(args, sp, dout, dfinal)
    for det in (False, True):
        got = selective_scan_replay.bwd_tiled(args, sp, dout, dfinal, det, **SMALL)
        assert_close(got[3], want["B"], tol=1e-10, name="dB")
        assert_close(got[4], want["C"], tol=1e-10, name="dC")
        assert_close(got[0], want["u"], tol=1e-10, name="du")


# The kernel's own geometry: sub-chunks of 128, chunks of 1024, tiles of 16 (d = 20: tiles of 16 and 4).
@pytest.mark.parametrize("L,n", [(1, 3), (127, 3), (129, 17), (1025, 3), (2 * CHUNK + 77, 1), (130, 256)])
def test_replay_kernel_geometry(L, n):
    check_replay(1, 20 if n < 256 else 5, L, n, "var", "grouped", 2 if n < 256 else 1, KERNEL, deterministic=True)


def test_replay_kernel_geometry_atomic_path():
    check_replay(2, 20, 300, 5, "var", "var", 1, KERNEL, deterministic=False)


def _grads(args, sp, gout, **kw):
    names = [k for k in NAMES if args[k] is not None]
    out = linmix.selective_scan(**args, delta_softplus=sp, **kw)
    return torch.autograd.grad((out * gout).sum(), [args[k] for k in names])


@pytest.mark.no_emulation("the CPU kernels' determinism; on CUDA the default backward adds dB/dC with atomics")
def test_cpu_backward_is_deterministic():
    """Two CPU backward runs (two threads, deterministic or not) give bitwise-identical gradients."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        args, sp = make(2, 8, 1100, 4, torch.float32, "cpu", "var", "grouped", groups=2)
        gout = torch.randn(2, 8, 1100)
        first = _grads(args, sp, gout)
        for kw in ({}, {"deterministic": True}):
            for g0, g1 in zip(first, _grads(args, sp, gout, **kw)):
                assert torch.equal(g0, g1)
        torch.use_deterministic_algorithms(True)
        try:
            for g0, g1 in zip(first, _grads(args, sp, gout)):
                assert torch.equal(g0, g1)
        finally:
            torch.use_deterministic_algorithms(False)
    finally:
        torch.set_num_threads(threads)


def test_selective_scan_fn_deterministic_flag():
    torch.manual_seed(0)
    args, sp = make(1, 4, 9, 2, torch.float32, "cpu", "var", "var", h0=False)
    del args["initial_state"]
    out = linmix.selective_scan_fn(**args, delta_softplus=sp, deterministic=True)
    torch.testing.assert_close(out, linmix.selective_scan_fn(**args, delta_softplus=sp))


@cuda_only
@pytest.mark.parametrize("L,n", [(1, 3), (129, 17), (1025, 16), (2100, 5), (300, 83), (130, 256)])
@pytest.mark.parametrize("kinds", [("var", "var", 1), ("grouped", "fixed", 4), ("fixed", "grouped", 2)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_tiled_matches_reference(monkeypatch, L, n, kinds, deterministic):
    """d = 36: tiles of 16, 16, 4 (one group), 9 (4 groups of 9), 16 and 2 (2 groups of 18)."""
    monkeypatch.setenv("LINMIX_UNVERIFIED_KERNELS", "1")
    B_kind, C_kind, groups = kinds
    torch.manual_seed(L + n)
    args, sp = make(2, 36, L, n, torch.float32, "cuda", B_kind, C_kind, groups=groups)
    check_against_ref(args, sp, TOL[torch.float32], deterministic=deterministic)


@cuda_only
@pytest.mark.parametrize("L,n", [(1, 3), (129, 17), (2100, 16), (300, 256)])
def test_cuda_warp_forward_matches_default(monkeypatch, L, n):
    """The warp forward's out, checkpoints and final state against the verified default forward's."""
    torch.manual_seed(L)
    args, sp = make(3, 10, L, n, torch.float32, "cuda", "grouped", "var", groups=2, requires_grad=False)
    a = dict(args)
    for k in ("B", "C"):
        if a[k].dim() == 3:
            a[k] = a[k].unsqueeze(1)
    pos = [a[k] for k in NAMES] + [None]  # cu_seqlens
    monkeypatch.delenv("LINMIX_UNVERIFIED_KERNELS", raising=False)
    want = torch.ops.linmix.selective_scan_fwd(*pos, sp)
    monkeypatch.setenv("LINMIX_UNVERIFIED_KERNELS", "1")
    got = torch.ops.linmix.selective_scan_fwd(*pos, sp)
    for name, g, w in zip(("out", "checkpoints", "final_state"), got, want):
        assert_close(g, w, tol=1e-5, name=name)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_deterministic_is_bitwise_repeatable(monkeypatch, dtype):
    monkeypatch.setenv("LINMIX_UNVERIFIED_KERNELS", "1")
    torch.manual_seed(0)
    args, sp = make(2, 40, 2100, 16, dtype, "cuda", "var", "grouped", groups=2)
    gout = torch.randn(2, 40, 2100, device="cuda", dtype=dtype)
    first = _grads(args, sp, gout, deterministic=True)
    for _ in range(3):
        for g0, g1 in zip(first, _grads(args, sp, gout, deterministic=True)):
            assert torch.equal(g0, g1)


@cuda_only
def test_cuda_deterministic_needs_the_switch(monkeypatch):
    monkeypatch.delenv("LINMIX_UNVERIFIED_KERNELS", raising=False)
    torch.manual_seed(0)
    args, sp = make(1, 4, 9, 2, torch.float32, "cuda", "var", "fixed")
    out = linmix.selective_scan(**args, delta_softplus=sp, deterministic=True)
    with pytest.raises(RuntimeError, match="not yet been verified on a GPU.*LINMIX_UNVERIFIED_KERNELS=1"):
        out.sum().backward()
    out = linmix.selective_scan(**args, delta_softplus=sp)
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="LINMIX_UNVERIFIED_KERNELS=1"):
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)
    # fixed B and C: the default kernel has no atomics and runs
    args, sp = make(1, 4, 9, 2, torch.float32, "cuda", "fixed", "fixed")
    linmix.selective_scan(**args, delta_softplus=sp, deterministic=True).sum().backward()
