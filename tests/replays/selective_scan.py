"""A PyTorch replay of the warp-per-channel selective_scan forward (selective_scan_fwd_warp_kernel.cuh): fwd_warp;
and of the atomic-free tiled backward (selective_scan_bwd_tiled_kernel.cuh): bwd_tiled. Both in float64, all
(batch, channel) warps at once.

bwd_tiled follows the kernel's block structure: channel tiles of one warp per channel inside segments that respect
the B and C groups (partial last tile), the forward's checkpoint every CHUNK steps, sub-chunks of LANES x ITEMS
steps whose boundary states pass 1 computes with a warp scan, pass 2 walking the sub-chunks in reverse with the
warps' Kogge-Stone scans (forward states, reverse adjoint) and the adjoint carried per state, dB/dC summed over a
tile's channels before one atomic or a per-tile partial, and the second pass summing a group's tiles.
"""

import math
import pathlib
import re

import torch
import torch.nn.functional as F

NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]  # the op's tensor arguments
PARAMS_H = pathlib.Path(__file__).resolve().parents[2] / "csrc" / "selective_scan" / "params.h"


def _constant(name):
    return int(re.search(rf"constexpr int64_t {name} = (\d+);", PARAMS_H.read_text()).group(1))


# The kernel's geometry, read from params.h so the replay follows it.
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


def bwd_tiled(args, softplus, dout, dfinal, deterministic, chunk, lanes, items, tile):
    """linmix_selective_scan_bwd_tiled_kernel's gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias,
    dinitial_state), float64."""
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


def fwd_warp(args, softplus, chunk, lanes, items):
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
