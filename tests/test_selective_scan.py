import itertools

import pytest
import torch
import torch.nn.functional as F

import linmix
from linmix.ops.selective_scan import CHUNK
from linmix.reference import selective_scan_ref

from conftest import DEVICES, assert_close, low_precision_close

NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


def make(b, d, L, n, dtype, device, B_kind="var", C_kind="var", D=True, z=True, bias=True, softplus=True, h0=True,
         groups=2, requires_grad=True):
    """Inputs as a dict of linmix.selective_scan keyword arguments (float64 draws, then cast)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def bc():
        return {"fixed": lambda: torch.randn(d, n, dtype=torch.float64).to(device, acc),
                "var": lambda: torch.randn(b, n, L, dtype=torch.float64).to(device, dtype),
                "grouped": lambda: torch.randn(b, groups, n, L, dtype=torch.float64).to(device, dtype)}

    act = lambda x: x.to(device, dtype)  # noqa: E731
    # delta > 0 without softplus; around softplus' knee with it
    delta = torch.randn(b, d, L, dtype=torch.float64) * 0.5 - 1.0 if softplus else 0.1 + 0.5 * torch.rand(b, d, L)
    args = dict(
        u=act(torch.randn(b, d, L, dtype=torch.float64)), delta=act(delta.double()),
        A=(-0.2 - torch.rand(d, n, dtype=torch.float64) * 2).to(device, acc),
        B=bc()[B_kind](), C=bc()[C_kind](),
        D=torch.randn(d, dtype=torch.float64).to(device, acc) if D else None,
        z=act(torch.randn(b, d, L, dtype=torch.float64)) if z else None,
        delta_bias=(0.1 * torch.rand(d, dtype=torch.float64)).to(device, acc) if bias else None,
        initial_state=torch.randn(b, d, n, dtype=torch.float64).to(device, acc) if h0 else None,
    )
    for v in args.values():
        if v is not None:
            v.requires_grad_(requires_grad)
    return args, softplus


def check_against_ref(args, softplus, tol, final=True, use_out=True, **kw):
    out, fin = linmix.selective_scan(**args, delta_softplus=softplus, return_final_state=True, **kw)
    rout, rfin = selective_scan_ref(**args, delta_softplus=softplus, return_final_state=True)
    assert out.dtype == args["u"].dtype and fin.dtype == args["A"].dtype
    assert_close(out, rout, tol=tol, name="out")
    assert_close(fin, rfin, tol=tol, name="final_state")
    names = [k for k in NAMES if args[k] is not None]
    inputs = [args[k] for k in names]
    gout, gfin = torch.randn_like(rout), torch.randn_like(rfin)
    loss = lambda o, f: (o * gout.to(o.dtype)).sum() * use_out + ((f * gfin.to(f.dtype)).sum() if final else 0)  # noqa: E731
    got = torch.autograd.grad(loss(out, fin), inputs, allow_unused=True)
    want = torch.autograd.grad(loss(rout, rfin), inputs, allow_unused=True)
    for name, x, g, w in zip(names, inputs, got, want):
        assert g is not None and g.shape == x.shape and g.dtype == x.dtype, name
        assert_close(g, w, tol=tol, name="d" + name)


TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
BC_KINDS = ["fixed", "var", "grouped"]


@pytest.mark.parametrize("B_kind", BC_KINDS)
@pytest.mark.parametrize("C_kind", BC_KINDS)
def test_flag_product_fp64(B_kind, C_kind):
    """Every combination of optional inputs and flags at one small shape (CPU kernel in float64)."""
    torch.manual_seed(0)
    for D, z, bias, softplus, h0, final in itertools.product([False, True], repeat=6):
        args, sp = make(2, 4, 7, 3, torch.float64, "cpu", B_kind, C_kind, D, z, bias, softplus, h0)
        check_against_ref(args, sp, TOL[torch.float64], final=final)


FLAG_SETS = {
    "all": dict(B_kind="var", C_kind="grouped", D=True, z=True, bias=True, softplus=True, h0=True),
    "bare": dict(B_kind="fixed", C_kind="fixed", D=False, z=False, bias=False, softplus=False, h0=False),
    "mamba": dict(B_kind="grouped", C_kind="var", D=True, z=True, bias=True, softplus=True, h0=False),
}
SIZES = [(1, 1), (7, 16), (64, 1), (64, 64), (CHUNK, 16), (CHUNK + 1, 64), (2 * CHUNK + 1, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("L, n", SIZES)
@pytest.mark.parametrize("flags", list(FLAG_SETS))
def test_sizes(device, L, n, flags):
    torch.manual_seed(L * 100 + n)
    dtypes = [torch.float64, torch.float32] if device == "cpu" else [torch.float32]
    for dtype in dtypes:
        args, sp = make(2, 4, L, n, dtype, device, **FLAG_SETS[flags])
        check_against_ref(args, sp, TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_through_final_state_only(device):
    for L in (5, CHUNK + 3):
        args, sp = make(2, 4, L, 4, torch.float32, device, **FLAG_SETS["all"])
        check_against_ref(args, sp, TOL[torch.float32], final=True, use_out=False)


@pytest.mark.parametrize("device", DEVICES)
def test_large_state(device):
    args, sp = make(1, 2, 33, 256, torch.float32, device, **FLAG_SETS["mamba"])
    check_against_ref(args, sp, TOL[torch.float32])


def test_gradcheck():
    torch.manual_seed(0)
    for B_kind, C_kind in [("var", "fixed"), ("grouped", "var"), ("fixed", "grouped")]:
        args, sp = make(2, 4, 9, 3, torch.float64, "cpu", B_kind, C_kind)
        names = [k for k in NAMES if args[k] is not None]

        def f(*xs):
            return linmix.selective_scan(**dict(zip(names, xs)), delta_softplus=sp, return_final_state=True)

        assert torch.autograd.gradcheck(f, [args[k] for k in names])


def lowp_torch(x, softplus):
    """PyTorch's own computation in a low-precision dtype: the reference loop with every tensor in that dtype."""
    u, delta, A = x["u"], x["delta"], x["A"]
    if x["delta_bias"] is not None:
        delta = delta + x["delta_bias"][:, None]
    if softplus:
        delta = F.softplus(delta)
    d = u.shape[1]
    Bs = [X if X.dim() == 2 else X.unsqueeze(1) if X.dim() == 3 else X for X in (x["B"], x["C"])]
    Bs = [X if X.dim() == 2 else X.repeat_interleave(d // X.shape[1], dim=1) for X in Bs]
    h = x["initial_state"] if x["initial_state"] is not None else u.new_zeros((u.shape[0], d, A.shape[1]))
    us, deltas = u.unbind(-1), delta.unbind(-1)
    Bt, Ct = ([X] * u.shape[2] if X.dim() == 2 else X.unbind(-1) for X in Bs)
    ys = []
    for t in range(u.shape[2]):
        dt = deltas[t][..., None]
        h = torch.exp(dt * A) * h + dt * Bt[t] * us[t][..., None]
        ys.append((h * Ct[t]).sum(-1))
    y = torch.stack(ys, -1)
    if x["D"] is not None:
        y = y + x["D"][:, None] * u
    return y * F.silu(x["z"]) if x["z"] is not None else y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(device, dtype):
    torch.manual_seed(0)
    args, sp = make(2, 16, CHUNK + 77, 16, dtype, device, **FLAG_SETS["mamba"])
    args["B"] = args["B"][:, 0].detach().requires_grad_()  # mamba's (b, n, L)
    names = [k for k in NAMES if args[k] is not None]
    low = {k: (v.detach().to(dtype).requires_grad_() if v is not None else None) for k, v in args.items()}
    out = linmix.selective_scan(**args, delta_softplus=sp)
    ref = selective_scan_ref(**args, delta_softplus=sp)
    out_pt = lowp_torch(low, sp)
    low_precision_close(out, ref, out_pt)
    dout = torch.randn_like(ref)
    got = torch.autograd.grad(out, [args[k] for k in names], dout.to(dtype))
    want = torch.autograd.grad(ref, [args[k] for k in names], dout)
    base = torch.autograd.grad(out_pt, [low[k] for k in names], dout.to(dtype))
    for name, g, w, p in zip(names, got, want, base):
        low_precision_close(g, w, p, atol=1e-3 * max(1.0, w.abs().max().item()))


@pytest.mark.parametrize("device", DEVICES)
def test_mamba_compatible_signature(device):
    args, sp = make(2, 4, 20, 8, torch.float32, device, **FLAG_SETS["mamba"], requires_grad=False)
    B3, C3 = args["B"][:, 0], args["C"]  # (b, n, L)
    pos = (args["u"], args["delta"], args["A"], B3, C3, args["D"], args["z"], args["delta_bias"], True)
    out = linmix.selective_scan_fn(*pos)
    out2, last = linmix.selective_scan_fn(*pos, return_last_state=True)
    rout, rlast = selective_scan_ref(*pos[:8], delta_softplus=True, return_final_state=True)
    assert_close(out, rout, tol=1e-5, name="out")
    torch.testing.assert_close(out, out2)
    assert_close(last, rlast, tol=1e-5, name="last_state")
    assert last.shape == (2, 4, 8) and last.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous(device):
    args, sp = make(2, 4, 30, 5, torch.float32, device, **FLAG_SETS["all"], requires_grad=False)
    nc = dict(args)
    nc["u"] = torch.randn(2, 4, 60, device=device)[..., ::2]
    nc["delta"] = args["delta"].transpose(0, 1).contiguous().transpose(0, 1)
    nc["B"] = args["B"].transpose(0, 1).contiguous().transpose(0, 1)  # (b, n, L), batch and state strides swapped
    nc["C"] = args["C"].transpose(1, 2).contiguous().transpose(1, 2)  # (b, g, n, L), group and state swapped
    nc["z"] = torch.randn(2, 4, 90, device=device)[..., ::3]
    nc["A"] = args["A"].t().contiguous().t()
    contig = {k: (v.contiguous() if v is not None else None) for k, v in nc.items()}
    outs, grads = [], []
    for a in (nc, contig):
        a = {k: (v.detach().requires_grad_() if v is not None else None) for k, v in a.items()}
        out = linmix.selective_scan(**a, delta_softplus=sp)
        out.backward(torch.ones_like(out))
        outs.append(out)
        grads.append([a[k].grad for k in NAMES])
    torch.testing.assert_close(outs[0], outs[1])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1)


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    for b, d, L in [(0, 3, 5), (2, 0, 5), (2, 3, 0)]:
        args, sp = make(b, d, L, 4, torch.float32, device, **FLAG_SETS["all"], groups=1)
        out, fin = linmix.selective_scan(**args, delta_softplus=sp, return_final_state=True)
        assert out.shape == (b, d, L) and fin.shape == (b, d, 4)
        torch.testing.assert_close(fin, args["initial_state"].detach())
        (out.sum() + fin.sum()).backward()
        assert args["u"].grad.shape == (b, d, L)
        torch.testing.assert_close(args["initial_state"].grad, torch.ones_like(fin))


def test_opcheck():
    for flags in ("all", "bare", "mamba"):
        args, sp = make(2, 4, 9, 3, torch.float32, "cpu", **FLAG_SETS[flags], requires_grad=False)
        a = dict(args)
        for k in ("B", "C"):
            if a[k].dim() == 3:
                a[k] = a[k].unsqueeze(1)
        pos = [a[k] for k in NAMES]
        pos.append(None)  # cu_seqlens
        out, ckpt, fin = torch.ops.linmix.selective_scan_fwd(*pos, sp)
        torch.library.opcheck(torch.ops.linmix.selective_scan_fwd, (*pos, sp))
        for dfin in (None, torch.randn_like(fin)):
            torch.library.opcheck(torch.ops.linmix.selective_scan_bwd, (*pos, ckpt, torch.randn_like(out), dfin, sp))
        torch.library.opcheck(torch.ops.linmix.selective_scan_bwd, (*pos, ckpt, torch.randn_like(out), None, sp, True))


def test_compile_fullgraph():
    args, sp = make(2, 4, 17, 3, torch.float32, "cpu", **FLAG_SETS["all"])

    def f(**kw):
        out, fin = linmix.selective_scan(**kw, delta_softplus=sp, return_final_state=True)
        return (out * 2).sum() + fin.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(**args)
    loss.backward()
    gu = args["u"].grad.clone()
    args["u"].grad = None
    f(**args).backward()
    torch.testing.assert_close(loss, f(**args))
    torch.testing.assert_close(gu, args["u"].grad)


def _bad(**over):
    args, _ = make(2, 4, 6, 3, torch.float32, "cpu", **FLAG_SETS["all"], requires_grad=False)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, match",
    [
        (lambda: dict(u=torch.randn(4, 6)), "u must have shape"),
        (lambda: dict(u=torch.randn(2, 4, 6).int()), "u must be float32"),
        (lambda: dict(delta=torch.randn(2, 4, 5)), "delta must have shape"),
        (lambda: dict(delta=torch.randn(2, 4, 6, dtype=torch.float16)), "delta must have the same dtype"),
        (lambda: dict(A=torch.randn(5, 3)), "A must have shape"),
        (lambda: dict(A=torch.randn(4, 3, dtype=torch.complex64)), "complex A"),
        (lambda: dict(B=torch.randn(2, 4, 3, 6, 1)), "B must have shape"),
        (lambda: dict(B=torch.randn(4, 2)), "B must have shape"),
        (lambda: dict(C=torch.randn(2, 3, 3, 6)), "must divide d"),
        (lambda: dict(C=torch.randn(2, 2, 3, 7)), "C must have shape"),
        (lambda: dict(B=torch.randn(2, 3, 6, dtype=torch.float16)), "B must have the same dtype"),
        (lambda: dict(D=torch.randn(5)), "D must have shape"),
        (lambda: dict(delta_bias=torch.randn(4, 1)), "delta_bias must have shape"),
        (lambda: dict(z=torch.randn(2, 4, 7)), "z must have shape"),
        (lambda: dict(initial_state=torch.randn(2, 4, 4)), "initial_state must have shape"),
    ],
)
def test_bad_inputs(over, match):
    with pytest.raises(RuntimeError, match=match):
        linmix.selective_scan(**_bad(**over()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mixed_devices():
    args, sp = make(2, 4, 6, 3, torch.float32, "cuda", requires_grad=False)
    with pytest.raises(RuntimeError, match="same device"):
        linmix.selective_scan(**dict(args, delta=args["delta"].cpu()), delta_softplus=sp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64])
def test_selective_state_update(device, state_dtype):
    # mamba-ssm's decoding step: one step of the recurrence from `state`, updated in place
    torch.manual_seed(0)
    b, d, n = 3, 10, 4
    f64 = dict(dtype=torch.float64, device=device)
    x, dt, z = torch.randn(b, d, **f64), 0.3 * torch.rand(b, d, **f64), torch.randn(b, d, **f64)
    A, Bm, Cm = -torch.rand(d, n, **f64) - 0.5, torch.randn(b, n, **f64), torch.randn(b, n, **f64)
    D, bias = torch.randn(d, **f64), torch.randn(d, **f64)
    state = torch.randn(b, d, n, **f64).to(state_dtype)
    s0 = state.double().clone()
    delta = F.softplus(dt + bias)
    want_state = torch.exp(delta[..., None] * A) * s0 + delta[..., None] * Bm[:, None] * x[..., None]
    want = ((want_state * Cm[:, None]).sum(-1) + D * x) * F.silu(z)
    dt_ = torch.float64 if device == "cpu" else torch.float32
    out = linmix.selective_state_update(state, *(t.to(dt_) for t in (x, dt, A, Bm, Cm, D, z, bias)), dt_softplus=True)
    tol = dict(rtol=1e-10, atol=1e-10) if dt_ == torch.float64 and state_dtype == torch.float64 else {}
    torch.testing.assert_close(out.double(), want, **tol)
    torch.testing.assert_close(state.double(), want_state, **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_state_updates_replay_the_scan(device):
    # L decoding steps from zero give the scan's outputs and final state
    torch.manual_seed(0)
    args, sp = make(2, 6, 9, 3, torch.float32, device, B_kind="var", C_kind="grouped", h0=False, requires_grad=False)
    out, last = linmix.selective_scan(**{k: v for k, v in args.items() if v is not None}, delta_softplus=sp,
                                      return_final_state=True)
    state = torch.zeros_like(last)
    steps = [
        linmix.selective_state_update(state, args["u"][..., t], args["delta"][..., t], args["A"], args["B"][..., t],
                                      args["C"][..., t], args["D"], args["z"][..., t], args["delta_bias"], sp)
        for t in range(args["u"].shape[-1])
    ]
    torch.testing.assert_close(torch.stack(steps, -1), out)
    torch.testing.assert_close(state, last)
    with pytest.raises(RuntimeError, match="state must have shape"):
        linmix.selective_state_update(state[0], args["u"][0, :, 0], args["delta"][0, :, 0], args["A"],
                                      args["B"][0, ..., 0], args["C"][0, ..., 0])


@pytest.mark.parametrize("device", DEVICES)
def test_selective_state_update_heads(device):
    # Mamba-2's layout: state (b, h, p, n), per-head A broadcast over (p, n), B/C shared by groups of heads
    torch.manual_seed(0)
    b, h, p, n, g = 2, 4, 3, 5, 2
    f64 = dict(dtype=torch.float64, device=device)
    x, dt, z = torch.randn(b, h, p, **f64), torch.rand(b, h, 1, **f64).expand(b, h, p), torch.randn(b, h, p, **f64)
    A = (-torch.rand(h, **f64) - 0.5)[:, None, None].expand(h, p, n)
    Bm, Cm = torch.randn(b, g, n, **f64), torch.randn(b, g, n, **f64)
    D, bias = torch.randn(h, 1, **f64).expand(h, p), torch.randn(h, 1, **f64).expand(h, p)
    state = torch.randn(b, h, p, n, **f64)
    s0 = state.clone()
    delta = F.softplus(dt + bias)[..., None]  # (b, h, p, 1)
    Bh, Ch = (t.repeat_interleave(h // g, dim=1)[:, :, None] for t in (Bm, Cm))  # (b, h, 1, n)
    want_state = torch.exp(delta * A) * s0 + delta * Bh * x[..., None]
    want = ((want_state * Ch).sum(-1) + D * x) * F.silu(z)
    dt_ = torch.float64 if device == "cpu" else torch.float32
    state = state.to(dt_)
    out = linmix.selective_state_update(state, *(t.to(dt_) for t in (x, dt, A, Bm, Cm, D, z, bias)), dt_softplus=True)
    tol = dict(rtol=1e-10, atol=1e-10) if dt_ == torch.float64 else {}
    assert out.shape == (b, h, p)
    torch.testing.assert_close(out.double(), want, **tol)
    torch.testing.assert_close(state.double(), want_state, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B_kind, C_kind", [("var", "grouped"), ("fixed", "var")])
@pytest.mark.parametrize("h0", [True, False])
def test_varlen_matches_separate_runs(device, B_kind, C_kind, h0):
    # cu_seqlens packs sequences (an empty one included) along L of a batch-1 input; each must equal its own run
    lens = [7, 0, 40, 1, 23]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=device)
    N, L = len(lens), sum(lens)
    dt = torch.float64 if device == "cpu" else torch.float32
    args, sp = make(1, 6, L, 3, dt, device, B_kind=B_kind, C_kind=C_kind, h0=False)
    if h0:
        args["initial_state"] = torch.randn(N, 6, 3, dtype=dt, device=device, requires_grad=True)
    leaves = {k: v for k, v in args.items() if v is not None}
    out, last = linmix.selective_scan(**leaves, delta_softplus=sp, return_final_state=True, cu_seqlens=cu)
    (out.square().sum() + last.square().sum()).backward()
    got = [out, last] + [leaves[k].grad for k in sorted(leaves)]
    ref = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    outs, lasts = [], []
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        kw = {k: (v if k in ("A", "D", "delta_bias") or (k in ("B", "C") and v.dim() == 2) else v[..., a:b])
              for k, v in ref.items() if k != "initial_state"}
        if h0:
            kw["initial_state"] = ref["initial_state"][i : i + 1]
        o, s = linmix.selective_scan(**kw, delta_softplus=sp, return_final_state=True)
        outs.append(o)
        lasts.append(s)
    want_out, want_last = torch.cat(outs, -1), torch.cat(lasts, 0)
    (want_out.square().sum() + want_last.square().sum()).backward()
    want = [want_out, want_last] + [ref[k].grad for k in sorted(ref)]
    assert last.shape == (N, 6, 3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match="batch size must be 1"):
        linmix.selective_scan(**make(2, 6, 5, 3, dt, device, h0=False)[0], cu_seqlens=torch.tensor([0, 5], device=device))
