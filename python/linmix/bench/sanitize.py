"""Every linmix op's forward and backward once on tiny CUDA shapes (odd lengths included), for
`compute-sanitizer --tool memcheck|racecheck python -m linmix.bench.sanitize [OP ...]`; naming ops (case-name
prefixes such as chunk_gla or fixed_point_rnn) runs only their cases, so a slow tool can be given one op at a
time. Exits non-zero on any error."""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import linmix


def _cases(dev: str, dt: torch.dtype):
    """(name, callable returning an output to differentiate, its leaf inputs) for every linmix op."""
    def r(*s, fp32=False):
        return torch.randn(*s, device=dev, dtype=torch.float32 if fp32 else dt).requires_grad_()

    for T in (1, 37, 300):
        a = torch.rand(2, T, 40, device=dev, dtype=dt).requires_grad_()
        b = r(2, T, 40)
        yield f"linear_scan T={T}", lambda a=a, b=b: linmix.linear_scan(a, b), [a, b]
        yield f"linear_scan reverse T={T}", lambda a=a, b=b: linmix.linear_scan(a, b, reverse=True), [a, b]
    for L in (1, 37, 300):
        b_, d, n = 2, 24, 16
        u, delta, z, B, C = r(b_, d, L), r(b_, d, L), r(b_, d, L), r(b_, n, L), r(b_, n, L)
        A = (-torch.rand(d, n, device=dev) - 0.5).requires_grad_()
        D, bias = r(d, fp32=True), r(d, fp32=True)
        leaves = [u, delta, A, B, C, D, z, bias]
        yield (f"selective_scan L={L}",
               lambda v=leaves: linmix.selective_scan(*v[:7], delta_bias=v[7], delta_softplus=True), leaves)
        # grouped B, C (b, g, n, L), no D / z, a differentiable initial and final state
        Bg, Cg, h0 = r(b_, 2, n, L), r(b_, 2, n, L), r(b_, d, n, fp32=True)

        def grouped(v=(u, delta, A, Bg, Cg, h0)):
            out, last = linmix.selective_scan(*v[:5], initial_state=v[5], return_final_state=True)
            return out.float().sum() + last.sum()

        yield f"selective_scan grouped+state L={L}", grouped, [u, delta, A, Bg, Cg, h0]
    for T in (1, 37, 130):
        q, k, v = r(1, T, 2, 64), r(1, T, 2, 64), r(1, T, 2, 64)
        g = (F.logsigmoid(torch.randn(1, T, 2, 64, device=dev)) / 16).to(dt).requires_grad_()
        s0 = r(1, 2, 64, 64, fp32=True)
        for fname in ("chunk_gla", "fused_recurrent_gla"):
            f = getattr(linmix, fname)
            yield f"{fname} T={T}", lambda f=f, x=(q, k, v, g): f(*x)[0], [q, k, v, g]

            def with_state(f=f, x=(q, k, v, g), s0=s0):
                o, last = f(*x, initial_state=s0, output_final_state=True)
                return o.float().sum() + last.sum()

            yield f"{fname} state T={T}", with_state, [q, k, v, g, s0]
    for T in (1, 37, 300):
        u, lam = r(2, T, 48), torch.rand(2, T, 48, device=dev, dtype=dt).requires_grad_()
        hh_u = F.normalize(torch.randn(2, T, 2, 48, device=dev), dim=-1).to(dt).requires_grad_()
        beta = torch.rand(2, T, 2, device=dev, dtype=dt).requires_grad_()
        for mode in ("onestep", "implicit"):
            yield (f"fixed_point_rnn {mode} T={T}",
                   lambda m=mode, x=(u, lam, hh_u, beta): linmix.fixed_point_rnn(*x, max_iter=4, tol=0.0, grad_mode=m),
                   [u, lam, hh_u, beta])
    # decoding steps (no backward: leaves empty): Mamba-1 and head layouts, a cache indexed per request with a
    # padding row, fp32 state with the activations' dtype
    for b_, h, p, n in ((3, 24, 1, 16), (2, 3, 64, 17)):
        state = torch.randn(b_ + 2, h, p, n, device=dev)
        x, dt_, z = (torch.randn(b_, h, p, device=dev, dtype=dt) for _ in range(3))
        A = -torch.rand(h, p, n, device=dev) - 0.5
        B, C = torch.randn(b_, 1, n, device=dev, dtype=dt), torch.randn(b_, 1, n, device=dev, dtype=dt)
        idx = torch.tensor([b_ + 1] + [-1] + list(range(b_ - 2)), device=dev)
        yield (f"selective_state_update b={b_} h={h} p={p} n={n}",
               lambda x=(state, x, dt_, A, B, C, z, idx): linmix.selective_state_update(
                   *x[:6], z=x[6], dt_softplus=True, state_batch_indices=x[7]), [])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m linmix.bench.sanitize")
    ap.add_argument("ops", nargs="*", help="run only the cases whose name starts with one of these")
    args = ap.parse_args(argv)
    if not (torch.cuda.is_available() and linmix.build_info()["cuda"]):
        print("sanitize: needs a GPU and a linmix build with the CUDA backend")
        return 1
    failed = 0
    for dt in (torch.float32, torch.bfloat16):
        for name, fn, leaves in _cases("cuda", dt):
            if args.ops and not any(name.startswith(op + " ") for op in args.ops):
                continue
            try:
                out = fn()
                if leaves:
                    torch.autograd.grad(out, leaves, torch.randn_like(out), allow_unused=True)
                torch.cuda.synchronize()
                print(f"ok   {name} {dt}")
            except Exception as e:
                failed += 1
                print(f"FAIL {name} {dt}: {type(e).__name__}: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
