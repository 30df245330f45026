"""fixed_point_rnn bench: the FP-RNN layer at (B, T, D, R) = (8, 2048, 1024, 2), a fixed number of iterations
(tol = 0), both grad modes, against a straightforward PyTorch loop with a host check per iteration; and one
linear_scan pass at the same (B, T, D), the yardstick for one fused iteration."""

from __future__ import annotations

import torch

import linmix
import linmix.reference as R
from linmix._cases import FIXED_POINT_RNN

from . import linear_scan
from .baselines import BenchOp, Impl, linmix_impl, scan_torch

SCAN_PASS = "linmix.linear_scan (1 pass)"


def configs(device: str, quick: bool) -> list[dict]:
    if device == "cuda":
        return [dict(B=8, T=2048, D=1024, R=2, n_iter=n, dtype=torch.bfloat16) for n in ([10] if quick else [10, 30])]
    return [dict(B=2, T=256, D=128, R=2, n_iter=n, dtype=torch.float32) for n in ([10] if quick else [10, 30])]


def small(cfg: dict) -> dict:
    return dict(cfg, B=2, T=min(cfg["T"], 100), D=min(cfg["D"], 64))


def _step(h, u, lam, hh_u, hh_beta):
    """One iteration: x = h + Q (u - h) with Q = H_R ... H_1, H_i = I - beta_i u_i u_i^T; then the scan."""
    y = u - h
    for i in range(hh_u.shape[2]):
        ui = hh_u[:, :, i]  # (B, T, D)
        y = y - hh_beta[:, :, i, None] * ui * (ui * y).sum(-1, keepdim=True)
    return scan_torch(lam, (1 - lam) * (h + y))


def fp_torch(u, lam, hh_u, hh_beta, n_iter: int, tol: float = 0.0, grad_mode: str = "onestep") -> torch.Tensor:
    """The layer as one would first write it: iterations without autograd and a host-side residual check after
    each (`.item()`), the last iteration differentiable (onestep); `implicit` solves w = g + J^T w in the
    backward by the same kind of loop (a hook on the output)."""
    p = [t.float() for t in (u, lam, hh_u, hh_beta)]
    h = torch.zeros_like(p[0])
    with torch.no_grad():
        for _ in range(n_iter - 1):
            h_new = _step(h, *p)
            res = ((h_new - h).abs().amax((1, 2)) / h_new.abs().amax((1, 2)).clamp_min(1e-30)).max().item()
            h = h_new
            if res < tol:
                break
    out = _step(h, *p)
    if grad_mode == "implicit" and out.requires_grad:
        z0 = h.requires_grad_()
        f0 = _step(z0, *(t.detach() for t in p))  # a second graph, through h only, for J^T w products

        def solve(g):  # replaces the gradient reaching the output by w = g + J^T w
            w = g
            for _ in range(n_iter):
                w_new = g + torch.autograd.grad(f0, z0, w, retain_graph=True)[0]
                res = ((w_new - w).abs().max() / w_new.abs().max().clamp_min(1e-30)).item()
                w = w_new
                if res < tol:
                    break
            return w

        out.register_hook(solve)
    return out.to(u.dtype)


def _torch(mode):
    return lambda x: fp_torch(x["u"], x["lam"], x["hh_u"], x["hh_beta"], x["max_iter"], grad_mode=mode)


def impls(device: str) -> list[Impl]:
    implicit = dict(modes=("fwd+bwd",), variant="implicit", cost=lambda c, m: cost(c, m, "implicit"))
    scan = Impl(SCAN_PASS, lambda x: linmix.linear_scan(x["lam"], x["u"]), modes=("fwd",),
                ref=lambda x: R.linear_scan_ref(x["lam"], x["u"]),
                cost=lambda c, m: linear_scan.cost(c, m))
    return [
        linmix_impl("linmix", linmix.fixed_point_rnn),
        linmix_impl("linmix", linmix.fixed_point_rnn, dict(grad_mode="implicit"), **implicit),
        Impl("torch (host check)", _torch("onestep")),
        Impl("torch (host check)", _torch("implicit"), **implicit),
        scan,
    ]


def annotate(rows: list[dict]) -> None:
    """ms per iteration on the layer's rows; for linmix's forward, one iteration / one linear_scan pass."""
    name = FIXED_POINT_RNN.name
    scan = {r["shape"]: r["ms"] for r in rows if r["op"] == name and r["impl"] == SCAN_PASS}
    for r in rows:
        if r["op"] != name or r["impl"] == SCAN_PASS:
            continue
        r["ms_per_iter"] = r["ms"] / int(r["shape"].split("n_iter=")[1])
        if r["impl"] == "linmix" and r["mode"] == "fwd" and r["shape"] in scan:
            r["iter_vs_scan"] = r["ms_per_iter"] / scan[r["shape"]]


def cost(cfg: dict, mode: str, grad_mode: str = "onestep") -> dict:
    """Per token and iteration: read u, lam, h (D each), hh_u (R D), hh_beta (R), write h (D); (4 R + 6) D flops
    (R Householder reflections at 4 D, the mix and the scan). Onestep backward: one step's VJP, reading the
    inputs, h* and dh, writing du, dlam, dhh_u, dhh_beta, at twice a step's flops. Implicit adds n_iter adjoint
    iterations at the cost of a forward iteration."""
    BT, D, Rr, s, n = cfg["B"] * cfg["T"], cfg["D"], cfg["R"], cfg["dtype"].itemsize, cfg["n_iter"]
    it = {"bytes": BT * ((4 + Rr) * D + Rr) * s, "flops": BT * (4 * Rr + 6) * D}
    fwd = {k: n * v for k, v in it.items()}
    if mode == "fwd":
        return fwd
    vjp = {"bytes": BT * ((7 + 2 * Rr) * D + 2 * Rr) * s, "flops": 2 * it["flops"]}
    adj = n if grad_mode == "implicit" else 0
    return {k: fwd[k] + vjp[k] + adj * it[k] for k in fwd}


# n_iter iterations exactly (tol = 0); onestep / implicit gradients are not the reference's unrolled gradient, so
# the check compares outputs only
OP = BenchOp(FIXED_POINT_RNN, kernels="linmix_fixed_point_rnn_", shape=("B", "T", "D", "R", "n_iter"), sweep="n_iter",
             configs=configs, choices=lambda cfg: dict(max_iter=cfg["n_iter"], tol=0.0), small=small, impls=impls,
             cost=cost, check_grad=False, annotate=annotate)
