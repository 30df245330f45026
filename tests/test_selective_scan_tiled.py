"""The atomic-free (tiled) selective_scan backward and the deterministic option.

`emulate_tiled_bwd` replays linmix_selective_scan_bwd_tiled_kernel's block structure in float64 PyTorch: channel
tiles of one warp per channel inside segments that respect the B and C groups (partial last tile), the forward's
checkpoint every CHUNK steps, sub-chunks of LANES x ITEMS steps whose boundary states pass 1 computes with a warp
scan, pass 2 walking the sub-chunks in reverse with the warps' Kogge-Stone scans (forward states, reverse
adjoint) and the adjoint carried per state, dB/dC summed over a tile's channels before one atomic or a per-tile
partial, and the second pass summing a group's tiles. `emulate_warp_fwd` does the same for the warp-per-channel
forward (linmix_selective_scan_fwd_warp_kernel) and its checkpoints. They run on CPU in CI against the reference;
the CUDA tests run the kernels themselves (LINMIX_UNVERIFIED_KERNELS=1).
"""

import math
import pathlib
import re

import pytest
import torch
import torch.nn.functional as F

import linmix
from linmix.reference import selective_scan_ref

from conftest import assert_close, cuda_only
from test_selective_scan import NAMES, TOL, check_against_ref, make

PARAMS_H = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "selective_scan" / "params.h"


def _constant(name):
    return int(re.search(rf"constexpr int64_t {name} = (\d+);", PARAMS_H.read_text()).group(1))


# The kernel's geometry, read from params.h so the emulation follows it.
CHUNK, TILE, SUB = (_constant(k) for k in ("kSelectiveScanChunk", "kSelectiveScanTile", "kSelectiveScanSubChunk"))
KERNEL = dict(chunk=CHUNK, lanes=32, items=SUB // 32, tile=TILE)
SMALL = dict(chunk=16, lanes=4, items=2, tile=3)  # the same structure at sizes where boundaries are cheap


def tiling(d, gB, gC, tile):
    """selective_scan_tiling (params.h): (seg, tiles_per_seg, n_tiles); g = None for fixed B/C."""
    seg = math.gcd(d // gB if gB else d, d // gC if gC else d)
    tps = -(-seg // tile)
    return seg, tps, d // seg * tps


def tile_channels(t, seg, tps, tile):
    """The channels of tile t: [ch0, ch0 + n_ch)."""
    j = t % tps
    ch0 = t // tps * seg + j * tile
    return ch0, min(tile, seg - j * tile)


def warp_scan(a, b, reverse):
    """warp_scan_pairs over the last (lane) dim: inclusive and exclusive prefixes of (a, b) pairs in scan order."""
    if reverse:
        a, b = a.flip(-1), b.flip(-1)
    lanes = a.shape[-1]
    off = 1
    while off < lanes:
        pa = torch.cat([torch.ones_like(a[..., :off]), a[..., :-off]], -1)  # identity before the first lane
        pb = torch.cat([torch.zeros_like(b[..., :off]), b[..., :-off]], -1)
        a, b = a * pa, a * pb + b  # scan_combine(neighbour, own)
        off *= 2
    ea = torch.cat([torch.ones_like(a[..., :1]), a[..., :-1]], -1)
    eb = torch.cat([torch.zeros_like(b[..., :1]), b[..., :-1]], -1)
    if reverse:
        a, b, ea, eb = a.flip(-1), b.flip(-1), ea.flip(-1), eb.flip(-1)
    return (a, b), (ea, eb)


def emulate_tiled_bwd(args, softplus, dout, dfinal, deterministic, chunk, lanes, items, tile):
    """The kernel's gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state), float64."""
    u, delta, A = (args[k].detach().double() for k in ("u", "delta", "A"))
    b, d, L = u.shape
    n = A.shape[1]
    g = {k: args[k].detach().double() if args[k] is not None else None for k in NAMES}
    for k in ("B", "C"):  # variable (b, n, L) is one group, as the op sees it
        if g[k].dim() == 3:
            g[k] = g[k].unsqueeze(1)
    Bt, Ct = g["B"], g["C"]
    var = {"B": Bt.dim() == 4, "C": Ct.dim() == 4}
    groups = {k: (g[k].shape[1] if var[k] else None) for k in ("B", "C")}
    bias = g["delta_bias"] if g["delta_bias"] is not None else torch.zeros(d, dtype=torch.float64)
    Dv = g["D"] if g["D"] is not None else torch.zeros(d, dtype=torch.float64)
    z = g["z"]
    h0 = g["initial_state"] if g["initial_state"] is not None else torch.zeros(b, d, n, dtype=torch.float64)
    dout = dout.double()
    x = delta + bias[:, None]
    dl_full = F.softplus(x) if softplus else x
    dgrad_full = torch.where(x > 20, 1.0, torch.sigmoid(x)) if softplus else torch.ones_like(x)

    def bc(X, key, chans, t):  # (b, W, n, lanes, items) at times t (zero past L), channels `chans`
        ok = t < L
        tc = t.clamp(max=L - 1)
        if var[key]:
            grp = chans[0] // (d // groups[key])  # a tile lies inside one group
            v = X[:, grp][:, None, :, tc]  # (b, 1, n, lanes, items)
            v = v.expand(b, len(chans), n, *t.shape)
        else:
            v = X[chans][None, :, :, None, None].expand(b, len(chans), n, *t.shape)
        return torch.where(ok, v, 0.0)

    # The forward's checkpoints: the state after each chunk.
    n_chunks = -(-L // chunk)
    Bf = Bt.repeat_interleave(d // groups["B"], 1) if var["B"] else Bt
    ckpt, h = [], h0.clone()
    for t in range(L):
        bt = Bf[..., t] if var["B"] else Bf
        h = torch.exp(dl_full[..., t, None] * A) * h + dl_full[..., t, None] * bt * u[..., t, None]
        if (t + 1) % chunk == 0 or t == L - 1:
            ckpt.append(h.clone())

    seg, tps, n_tiles = tiling(d, groups["B"], groups["C"], tile)
    sub = lanes * items
    out = {k: torch.zeros(b, d, L, dtype=torch.float64) for k in ("du", "ddelta", "dz")}
    dA_part = torch.zeros(b, d, n, dtype=torch.float64)
    dD, dbias = torch.zeros(b, d, dtype=torch.float64), torch.zeros(b, d, dtype=torch.float64)
    dfix = {k: torch.zeros(b, d, n, dtype=torch.float64) for k in ("B", "C")}
    dvar = {k: torch.zeros(b, groups[k], n, L, dtype=torch.float64) for k in ("B", "C") if var[k]}
    part = {k: torch.zeros(b, n_tiles, n, L, dtype=torch.float64) for k in ("B", "C") if var[k]}
    dh0 = torch.zeros(b, d, n, dtype=torch.float64)
    for tile_i in range(n_tiles):
        ch0, n_ch = tile_channels(tile_i, seg, tps, tile)
        chans = list(range(ch0, ch0 + n_ch))
        An = A[chans][None, :, :, None, None]  # (1, W, n, 1, 1)
        carry = (dfinal.double()[:, chans] if dfinal is not None else torch.zeros(b, n_ch, n, dtype=torch.float64))
        for c in range(n_chunks - 1, -1, -1):
            tc = c * chunk
            n_sub = min(chunk // sub, -(-(L - tc) // sub))
            h_first = ckpt[c - 1][:, chans] if c > 0 else h0[:, chans]
            hsub = {0: h_first}

            def steps(s):  # times (lanes, items), validity, δ, u of sub-chunk s: (b, W, 1, lanes, items)
                t = tc + s * sub + torch.arange(sub).view(lanes, items)
                ok = t < L
                tcl = t.clamp(max=L - 1)
                dl = torch.where(ok, dl_full[:, chans][:, :, None, tcl], 0.0)
                uu = torch.where(ok, u[:, chans][:, :, None, tcl], 0.0)
                return t, ok, tcl, dl, uu

            for s in range(n_sub - 1):  # pass 1
                t, ok, _, dl, uu = steps(s)
                a = torch.where(ok, torch.exp(dl * An), 1.0)
                bb = torch.where(ok, bc(Bt, "B", chans, t) * dl * uu, 0.0)
                ga, gb = torch.ones_like(a[..., 0]), torch.zeros_like(a[..., 0])
                for k in range(items):  # the lane's aggregate
                    ga, gb = a[..., k] * ga, a[..., k] * gb + bb[..., k]
                (ia, ib), _ = warp_scan(ga, gb, False)
                hsub[s + 1] = ia[..., -1] * hsub[s] + ib[..., -1]
            for s in range(n_sub - 1, -1, -1):  # pass 2
                t, ok, tcl, dl, uu = steps(s)
                dy = torch.where(ok, dout[:, chans][:, :, None, tcl], 0.0)
                if z is not None:
                    zz = torch.where(ok, z[:, chans][:, :, None, tcl], 0.0)
                    dy = dy * F.silu(zz)
                Bv, Cv = bc(Bt, "B", chans, t), bc(Ct, "C", chans, t)
                a = torch.where(ok, torch.exp(dl * An), 1.0)
                xb = Bv * dl * uu
                ga, gb = torch.ones_like(a[..., 0]), torch.zeros_like(a[..., 0])
                for k in range(items):
                    ga, gb = a[..., k] * ga, a[..., k] * gb + torch.where(ok[..., k], xb[..., k], 0.0)
                _, (ea, eb) = warp_scan(ga, gb, False)
                hcur = ea * hsub[s][..., None] + eb  # state entering each lane's first item
                hp, hs = [], []
                for k in range(items):
                    hp.append(hcur)
                    hcur = a[..., k] * hcur + xb[..., k]
                    hs.append(hcur)
                hp, hs = torch.stack(hp, -1), torch.stack(hs, -1)
                ra, rb = torch.ones_like(a[..., 0]), torch.zeros_like(a[..., 0])
                for k in range(items - 1, -1, -1):  # ss_adjoint_pair composed backwards
                    ra, rb = a[..., k] * ra, a[..., k] * (rb + Cv[..., k] * dy[..., k])
                _, (ra, rb) = warp_scan(ra, rb, True)
                sj = ra * carry[..., None] + rb
                gs = [None] * items
                for k in range(items - 1, -1, -1):
                    gs[k] = Cv[..., k] * dy[..., k] + sj
                    sj = a[..., k] * gs[k]
                gg = torch.stack(gs, -1)
                carry = sj[..., 0]  # lane 0: the adjoint at the sub-chunk's first step
                okn = ok.expand_as(gg)
                du = torch.where(okn, gg * dl * Bv, 0.0).sum(2)  # over states
                ddl = torch.where(okn, gg * Bv * uu + gg * hp * a * An, 0.0).sum(2)
                dA_part[:, chans] += torch.where(okn, gg * hp * a * dl, 0.0).sum((-2, -1))
                dBt = torch.where(okn, gg * dl * uu, 0.0)
                dCt = torch.where(okn, dy * hs, 0.0)
                y = (Cv * hs).sum(2) + Dv[chans][None, :, None, None] * uu[:, :, 0]
                okl = ok.flatten()
                tt = t.flatten()[okl]
                for key, val in (("B", dBt), ("C", dCt)):
                    if not var[key]:
                        dfix[key][:, chans] += val.sum((-2, -1))
                        continue
                    tile_sum = val.sum(1).flatten(-2)[..., okl]  # over the tile's channels: (b, n, steps)
                    if deterministic:
                        part[key][:, tile_i][..., tt] = tile_sum
                    else:  # one atomic per (tile, element)
                        dvar[key][:, ch0 // (d // groups[key])][..., tt] += tile_sum
                dyl = dy[:, :, 0]
                du = du + dyl * Dv[chans][None, :, None, None]
                ddl = ddl * torch.where(ok, dgrad_full[:, chans][:, :, None, tcl], 0.0)[:, :, 0]
                dD[:, chans] += (dyl * uu[:, :, 0]).sum((-2, -1))
                dbias[:, chans] += ddl.sum((-2, -1))
                for key, val in (("du", du), ("ddelta", ddl)):
                    out[key][:, ch0:ch0 + n_ch, tt] = val.flatten(-2)[..., okl]
                if z is not None:
                    do = torch.where(ok, dout[:, chans][:, :, None, tcl], 0.0)[:, :, 0]
                    dzv = do * y * (torch.sigmoid(zz) * (1 + zz * (1 - torch.sigmoid(zz))))[:, :, 0]
                    out["dz"][:, ch0:ch0 + n_ch, tt] = dzv.flatten(-2)[..., okl]
        dh0[:, chans] = carry
    dBC = {}
    for key in ("B", "C"):
        if not var[key]:
            dBC[key] = dfix[key].sum(0)
        elif deterministic:  # linmix_selective_scan_bwd_reduce_kernel: a group's tiles, in tile order
            per_group = d // groups[key] // seg * tps
            dBC[key] = torch.stack([part[key][:, j * per_group:(j + 1) * per_group].sum(1)
                                    for j in range(groups[key])], 1)
        else:
            dBC[key] = dvar[key]
    return (out["du"], out["ddelta"], dA_part.sum(0), dBC["B"], dBC["C"], dD.sum(0), out["dz"], dbias.sum(0), dh0)


def emulate_warp_fwd(args, softplus, chunk, lanes, items):
    """linmix_selective_scan_fwd_warp_kernel, float64: (out, checkpoints (b, d, n_chunks, n), final_state).

    Every (batch, channel) is a warp, all of them at once here: sub-chunks of lanes x items steps in order, per
    state a warp scan of the lanes' aggregates seeded with the carried state, lane 31's prefix the new carry, the
    checkpoint written after the last sub-chunk of each chunk and of the sequence."""
    u, delta, A = (args[k].detach().double() for k in ("u", "delta", "A"))
    b, d, L = u.shape
    n = A.shape[1]

    def per_channel(X):  # (b, d, n, L) or fixed (1, d, n, 1)
        X = X.detach().double()
        if X.dim() == 2:
            return X[None, :, :, None]
        X = X.unsqueeze(1) if X.dim() == 3 else X
        return X.repeat_interleave(d // X.shape[1], 1)

    Bc, Cc = per_channel(args["B"]), per_channel(args["C"])
    x = delta + (args["delta_bias"].detach().double()[:, None] if args["delta_bias"] is not None else 0.0)
    dl_full = F.softplus(x) if softplus else x
    Dv = args["D"].detach().double()[:, None, None] if args["D"] is not None else 0.0
    h = (args["initial_state"].detach().double() if args["initial_state"] is not None
         else torch.zeros(b, d, n, dtype=torch.float64))
    sub = lanes * items
    n_sub, per_chunk = -(-L // sub), chunk // sub
    out, ckpts = torch.zeros(b, d, L, dtype=torch.float64), []
    for s in range(n_sub):
        t = s * sub + torch.arange(sub).view(lanes, items)
        ok = t < L
        tc = t.clamp(max=L - 1)
        dl = torch.where(ok, dl_full[..., None, tc], 0.0)  # (b, d, 1, lanes, items)
        uu = torch.where(ok, u[..., None, tc], 0.0)
        Bv = torch.where(ok, Bc[..., tc if Bc.shape[-1] > 1 else torch.zeros_like(tc)], 0.0)
        Cv = torch.where(ok, Cc[..., tc if Cc.shape[-1] > 1 else torch.zeros_like(tc)], 0.0)
        a = torch.where(ok, torch.exp(dl * A[None, :, :, None, None]), 1.0)
        xb = Bv * dl * uu
        ga, gb = torch.ones_like(a[..., 0]), torch.zeros_like(a[..., 0])
        for k in range(items):
            ga, gb = a[..., k] * ga, a[..., k] * gb + xb[..., k]
        (ia, ib), (ea, eb) = warp_scan(ga, gb, False)
        hcur = ea * h[..., None] + eb
        y = (Dv * uu[:, :, 0]).expand(b, d, lanes, items).clone()
        for k in range(items):
            hcur = a[..., k] * hcur + xb[..., k]
            y[..., k] += (Cv[..., k] * hcur).sum(2)
        h = ia[..., -1] * h + ib[..., -1]
        if args["z"] is not None:
            y = y * F.silu(torch.where(ok, args["z"].detach().double()[..., tc], 0.0))
        out[..., t.flatten()[ok.flatten()]] = y.flatten(-2)[..., ok.flatten()]
        if (s + 1) % per_chunk == 0 or s + 1 == n_sub:
            ckpts.append(h.clone())
    return out, torch.stack(ckpts, 2), h


@pytest.mark.parametrize("geometry,L", [(SMALL, 1), (SMALL, 8), (SMALL, 17), (SMALL, 33), (KERNEL, 129),
                                        (KERNEL, CHUNK + 1)])
@pytest.mark.parametrize("kinds", [("var", "grouped", 2), ("fixed", "var", 1)])
def test_emulation_warp_forward(geometry, L, kinds):
    """Outputs, final state and the checkpoints the backward restarts from (the state after each chunk)."""
    torch.manual_seed(L)
    args, sp = make(2, 6, L, 5, torch.float64, "cpu", *kinds[:2], groups=kinds[2], requires_grad=False)
    out, ckpt, fin = emulate_warp_fwd(args, sp, geometry["chunk"], geometry["lanes"], geometry["items"])
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


def check_emulation(b, d, L, n, B_kind, C_kind, groups, geometry, deterministic, seed=0):
    torch.manual_seed(seed)
    args, sp = make(b, d, L, n, torch.float64, "cpu", B_kind, C_kind, groups=groups)
    dout, dfinal = torch.randn(b, d, L, dtype=torch.float64), torch.randn(b, d, n, dtype=torch.float64)
    want = reference_grads(args, sp, dout, dfinal)
    got = emulate_tiled_bwd(args, sp, dout, dfinal, deterministic, **geometry)
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
def test_emulation_small_geometry(L, kinds):
    B_kind, C_kind, groups = kinds
    for det in (False, True):
        check_emulation(2, 7, L, 3, B_kind, C_kind, groups, SMALL, det)


def test_emulation_groups_straddling_tiles():
    """d = 12: B in 2 groups (6 channels), C in 3 (4): segments of gcd(6, 4) = 2 channels, tiles of 2 (< 3)."""
    assert tiling(12, 2, 3, SMALL["tile"]) == (2, 1, 6)
    torch.manual_seed(1)
    args, sp = make(2, 12, 20, 3, torch.float64, "cpu", "grouped", "grouped", groups=2)
    args["C"] = torch.randn(2, 3, 3, 20, dtype=torch.float64, requires_grad=True)
    dout, dfinal = torch.randn(2, 12, 20, dtype=torch.float64), torch.randn(2, 12, 3, dtype=torch.float64)
    want = reference_grads(args, sp, dout, dfinal)
    for det in (False, True):
        got = emulate_tiled_bwd(args, sp, dout, dfinal, det, **SMALL)
        assert_close(got[3], want["B"], tol=1e-10, name="dB")
        assert_close(got[4], want["C"], tol=1e-10, name="dC")
        assert_close(got[0], want["u"], tol=1e-10, name="du")


# The kernel's own geometry: sub-chunks of 128, chunks of 1024, tiles of 16 (d = 20: tiles of 16 and 4).
@pytest.mark.parametrize("L,n", [(1, 3), (127, 3), (129, 17), (1025, 3), (2 * CHUNK + 77, 1), (130, 256)])
def test_emulation_kernel_geometry(L, n):
    check_emulation(1, 20 if n < 256 else 5, L, n, "var", "grouped", 2 if n < 256 else 1, KERNEL, deterministic=True)


def test_emulation_kernel_geometry_atomic_path():
    check_emulation(2, 20, 300, 5, "var", "var", 1, KERNEL, deterministic=False)


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
    pos = [a[k] for k in NAMES]
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
