import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import linmix
from linmix.reference import gla_ref

from conftest import DEVICES, EMULATED, HAS_CUDA, cuda_only, low_precision_close, rel_err

ALGOS = {"chunk": linmix.chunk_gla, "recurrent": linmix.fused_recurrent_gla}


def make(B, T, H, K, V, dtype, device, gate="medium", h0=True, requires_grad=False):
    """Random inputs; `gate` sets the log-decay: logsigmoid scaled by 0.1 / 1 / 10, ~0, or exactly 0."""
    f64 = dict(dtype=torch.float64)
    q, k = torch.randn(B, T, H, K, **f64), torch.randn(B, T, H, K, **f64)
    v = torch.randn(B, T, H, V, **f64)
    x = torch.randn(B, T, H, K, **f64)
    g = {
        "mild": 0.1 * F.logsigmoid(x),
        "medium": F.logsigmoid(x),
        "harsh": 10 * F.logsigmoid(x),
        "tiny": -1e-7 * torch.rand_like(x),
        "zero": torch.zeros_like(x),
        "positive": 0.05 * torch.rand_like(x),
    }[gate]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.randn(B, H, K, V, **f64).to(device, acc) if h0 else None
    ins = [t.to(device, dtype) for t in (q, k, v, g)] + [s]
    for t in ins:
        if t is not None:
            t.requires_grad_(requires_grad)
    return ins


def run_and_grads(fn, q, k, v, g, h0, final, do, dht):
    o, ht = fn(q, k, v, g, initial_state=h0, output_final_state=final)
    assert (ht is not None) == final
    loss = (o.double() * do).sum() + ((ht.double() * dht).sum() if final else 0)
    inputs = [t for t in (q, k, v, g, h0) if t is not None]
    return [o] + ([ht] if final else []) + list(torch.autograd.grad(loss, inputs))


# (T, K, V, gate, with initial state, with final state): a sweep, not the full product.
CASES = [
    (1, 16, 16, "medium", True, True),
    (15, 64, 16, "mild", False, True),
    (64, 16, 64, "harsh", True, False),
    (65, 100, 64, "medium", True, True),
    (200, 64, 100, "harsh", True, True),
    (200, 16, 128, "mild", False, False),
    (65, 128, 16, "tiny", True, True),
    (64, 64, 64, "zero", True, True),
    (15, 100, 100, "zero", False, True),
    (130, 32, 32, "positive", True, True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ["chunk", "recurrent"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_reference(device, algo, case):
    T, K, V, gate, with_h0, final = case
    dtypes = [torch.float64, torch.float32] if device == "cpu" else [torch.float32]
    for dtype in dtypes:
        q, k, v, g, h0 = make(2, T, 2, K, V, dtype, device, gate, with_h0, requires_grad=True)
        ro, rht = gla_ref(q, k, v, g, initial_state=h0, output_final_state=True)
        do, dht = torch.randn_like(ro), torch.randn_like(rht)
        got = run_and_grads(ALGOS[algo], q, k, v, g, h0, final, do, dht)
        want = run_and_grads(gla_ref, q, k, v, g, h0, final, do, dht)
        tol = 1e-11 if dtype == torch.float64 else 2e-5
        names = ["o"] + (["final_state"] if final else []) + ["dq", "dk", "dv", "dg"] + (["dh0"] if with_h0 else [])
        for name, a, b in zip(names, got, want):
            assert torch.isfinite(a).all(), name
            assert rel_err(a, b) < tol, f"{name}: {rel_err(a, b):.2e} (dtype {dtype})"


@pytest.mark.parametrize("device", DEVICES)
def test_chunk_and_recurrent_agree(device):
    q, k, v, g, h0 = make(2, 150, 3, 64, 48, torch.float32, device, "medium", requires_grad=True)
    do = torch.randn(2, 150, 3, 48, device=device, dtype=torch.float64)
    dht = torch.randn(2, 3, 64, 48, device=device, dtype=torch.float64)
    a = run_and_grads(linmix.chunk_gla, q, k, v, g, h0, True, do, dht)
    b = run_and_grads(linmix.fused_recurrent_gla, q, k, v, g, h0, True, do, dht)
    for x, y in zip(a, b):
        assert rel_err(x, y) < 2e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ["chunk", "recurrent"])
def test_harsh_gates_stay_finite(device, algo):
    # Cumulative log-decays down to about -1e4 inside a chunk: every exponent must stay <= 0.
    q, k, v, _, h0 = make(1, 130, 2, 32, 32, torch.float32, device, requires_grad=True)
    g = torch.full_like(q, -80.0).requires_grad_()
    o, ht = ALGOS[algo](q, k, v, g, initial_state=h0, output_final_state=True)
    ro, rht = gla_ref(q, k, v, g, initial_state=h0, output_final_state=True)
    assert rel_err(o, ro) < 2e-5 and rel_err(ht, rht) < 2e-5
    (o.sum() + ht.sum()).backward()
    for t in (q, k, v, g, h0):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("algo", ["chunk", "recurrent"])
@pytest.mark.parametrize("T, K, V", [(300, 64, 64), (33, 320, 512)])  # the second: gla_head512 on CUDA
def test_low_precision(device, dtype, algo, T, K, V):
    if device == "cpu" and dtype == torch.float16 and not EMULATED:
        pytest.skip("covered by bfloat16 on CPU")
    q, k, v, g, h0 = make(2, T, 2, K, V, dtype, device, "medium", requires_grad=True)
    o, ht = ALGOS[algo](q, k, v, g, initial_state=h0, output_final_state=True)
    ro, rht = gla_ref(q, k, v, g, initial_state=h0, output_final_state=True)
    # PyTorch's own computation in this dtype: the reference loop with inputs and state in `dtype`.
    S, outs = h0.to(dtype), []
    for t in range(q.shape[1]):
        S = g[:, t].exp().unsqueeze(-1) * S + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        outs.append(q.shape[-1] ** -0.5 * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    low_precision_close(o, ro, torch.stack(outs, 1))
    low_precision_close(ht, rht, S)
    do = torch.randn_like(ro)
    got = torch.autograd.grad((o.double() * do).sum(), (q, k, v, g))
    want = torch.autograd.grad((ro * do).sum(), (q, k, v, g))
    # Inputs are exact in both; what remains is fp32 accumulation and rounding the gradient to dtype
    # (about half an eps of the largest value; measured <= 1 eps on CPU).
    eps = torch.finfo(dtype).eps
    for a, b in zip(got, want):
        assert rel_err(a, b) < 4 * eps


@pytest.mark.parametrize("algo", ["chunk", "recurrent"])
def test_gradcheck(algo):
    fn = ALGOS[algo]
    for T in (5, 70):
        q, k, v, g, h0 = make(1, T, 2, 3, 2, torch.float64, "cpu", "medium", requires_grad=True)

        def f(q, k, v, g, h0):
            o, ht = fn(q, k, v, g, scale=0.7, initial_state=h0, output_final_state=True)
            return o, ht

        assert torch.autograd.gradcheck(f, (q, k, v, g, h0))
    assert torch.autograd.gradcheck(lambda q, k, v, g: fn(q, k, v, g)[0], (q, k, v, g))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ["chunk", "recurrent"])
def test_non_contiguous_and_odd_shapes(device, algo):
    fn = ALGOS[algo]
    q, k, v, g, h0 = make(3, 67, 2, 24, 40, torch.float32, device)
    q_nc = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, T, K) memory
    v_nc = torch.randn(3, 67, 2, 80, device=device)[..., ::2]  # non-unit channel stride
    a = fn(q_nc, k, v_nc, g, initial_state=h0, output_final_state=True)
    b = fn(q, k, v_nc.contiguous(), g, initial_state=h0, output_final_state=True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ["chunk", "recurrent"])
def test_empty(device, algo):
    fn = ALGOS[algo]
    for B, T in [(0, 5), (2, 0)]:
        q, k, v, g, h0 = make(B, T, 2, 8, 4, torch.float32, device, requires_grad=True)
        o, ht = fn(q, k, v, g, initial_state=h0, output_final_state=True)
        assert o.shape == (B, T, 2, 4) and ht.shape == (B, 2, 8, 4)
        torch.testing.assert_close(ht, h0.detach())
        (o.sum() + ht.sum()).backward()
        assert q.grad.shape == q.shape and h0.grad.shape == h0.shape


def test_opcheck():
    q, k, v, g, h0 = make(2, 70, 2, 8, 4, torch.float32, "cpu")
    dout, dfinal_state = torch.randn(2, 70, 2, 4), torch.randn(2, 2, 8, 4)
    x = dict(q=q, k=k, v=v, g=g, scale=0.5)
    for algo in ("chunk_gla", "fused_recurrent_gla"):
        fwd, bwd = getattr(torch.ops.linmix, f"{algo}_fwd"), getattr(torch.ops.linmix, f"{algo}_bwd")
        torch.library.opcheck(fwd, (), dict(x, initial_state=h0))
        torch.library.opcheck(fwd, (), dict(x, initial_state=None))
        torch.library.opcheck(bwd, (), dict(x, initial_state=h0, dout=dout, dfinal_state=dfinal_state))
        torch.library.opcheck(bwd, (), dict(x, initial_state=None, dout=dout, dfinal_state=None))


def test_compile_fullgraph():
    q, k, v, g, h0 = make(2, 70, 2, 8, 4, torch.float32, "cpu", requires_grad=True)

    def f(q, k, v, g, h0):
        o, ht = linmix.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)
        o2, _ = linmix.fused_recurrent_gla(q, k, v, g)
        return (o * 2).sum() + ht.sum() + o2.sum()

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, g, h0)
    out.backward()
    gq = q.grad.clone()
    q.grad = None
    ref = f(q, k, v, g, h0)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gq, q.grad)


def _bad(**over):
    x = dict(q=torch.rand(2, 5, 3, 8), k=torch.rand(2, 5, 3, 8), v=torch.rand(2, 5, 3, 4), g=-torch.rand(2, 5, 3, 8))
    x.update(over)
    return x


@pytest.mark.parametrize("algo", ["chunk", "recurrent"])
@pytest.mark.parametrize(
    "over, match",
    [
        (dict(q=torch.rand(2, 5, 8)), "q must have shape"),
        (dict(k=torch.rand(2, 5, 3, 7)), "k must have shape"),
        (dict(g=torch.rand(2, 6, 3, 8)), "g must have shape"),
        (dict(v=torch.rand(2, 5, 2, 4)), "v must have shape"),
        (dict(v=torch.rand(2, 5, 3, 513)), r"head dims K and V must be in \[1, 512\]"),
        (dict(k=torch.rand(2, 5, 3, 8, dtype=torch.float16)), "k must have the same dtype"),
        (dict(q=torch.rand(2, 5, 3, 8).int()), "q must be float32"),
        (dict(initial_state=torch.rand(2, 3, 4, 8)), "initial_state must have shape"),
    ],
)
def test_bad_inputs(algo, over, match):
    with pytest.raises(RuntimeError, match=match):
        ALGOS[algo](**_bad(**over))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ["chunk", "recurrent"])
@pytest.mark.parametrize("T, K, V", [(70, 320, 320), (20, 512, 512), (33, 300, 512)])
def test_head_dims_up_to_512(device, algo, T, K, V):
    # fla's own test_chunk runs K = V = 320 and 512; the CPU kernels take any K, V <= 512, and so do the CUDA
    # kernels (above 256 the gla_head512 family, warning once per process that it has not yet run on a GPU)
    dtypes = [torch.float64, torch.float32] if device == "cpu" else [torch.float32]
    for dtype in dtypes:
        q, k, v, g, h0 = make(1, T, 1, K, V, dtype, device, requires_grad=True)
        ro, rht = gla_ref(q, k, v, g, initial_state=h0, output_final_state=True)
        do, dht = torch.randn_like(ro), torch.randn_like(rht)
        got = run_and_grads(ALGOS[algo], q, k, v, g, h0, True, do, dht)
        want = run_and_grads(gla_ref, q, k, v, g, h0, True, do, dht)
        for name, a, b in zip(["o", "final_state", "dq", "dk", "dv", "dg", "dh0"], got, want):
            assert rel_err(a, b) < (1e-11 if dtype == torch.float64 else 2e-5), name


WARN_ONCE = """
import warnings, torch, linmix
q = torch.randn(1, 9, 1, {K}, device="{device}")
v = torch.randn(1, 9, 1, {V}, device="{device}")
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    for _ in range(2):
        linmix.{op}(q, q, v, -q.abs())
print(sum("have not yet run on a GPU" in str(x.message) for x in w))
"""


@pytest.mark.slow
@pytest.mark.skipif(not (HAS_CUDA or EMULATED), reason="the CUDA kernels (a GPU, or LINMIX_EMULATE_CUDA=1)")
@pytest.mark.parametrize("op", ["chunk_gla", "fused_recurrent_gla"])
def test_cuda_head_dims_above_256_warn_once(op):
    # No GPU-verified kernel takes head dims above 256: the emulation-verified gla_head512 family runs them by
    # default and warns once per process; switched on, it runs without a warning.
    device = "cuda" if HAS_CUDA else "cpu"
    for K, V, switch, warnings_seen in ((320, 64, None, 1), (64, 512, None, 1), (320, 64, "gla_head512", 0)):
        env = {n: x for n, x in os.environ.items() if n not in ("LINMIX_KERNELS", "LINMIX_UNVERIFIED_KERNELS")}
        env.update({"LINMIX_KERNELS": switch} if switch else {})
        script = WARN_ONCE.format(K=K, V=V, device=device, op=op)
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[-1] == str(warnings_seen), (K, V, switch, out.stdout)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mixed_devices():
    with pytest.raises(RuntimeError, match="same device"):
        linmix.chunk_gla(**_bad(k=torch.rand(2, 5, 3, 8, device="cuda")))


@pytest.mark.parametrize("device", DEVICES)
def test_fla_signature_state_v_first(device):
    # flash-linear-attention's keyword arguments: state_v_first keeps states as (B, H, V, K)
    q, k, v, g, s = make(2, 70, 2, 8, 5, torch.float32, device, requires_grad=True)
    o, ht = linmix.chunk_gla(q, k, v, g, initial_state=s, output_final_state=True)
    (o.sum() + (ht * ht).sum()).backward()
    want = [t.grad.clone() for t in (q, k, v, g, s)]
    for t in (q, k, v, g, s):
        t.grad = None
    s_vk = s.detach().transpose(-1, -2).contiguous().requires_grad_()
    o2, ht2 = linmix.chunk_gla(q, k, v, g, initial_state=s_vk, output_final_state=True, state_v_first=True,
                               cu_seqlens=None, cu_seqlens_cpu=None)
    assert ht2.shape == (2, 2, 5, 8)
    (o2.sum() + (ht2 * ht2).sum()).backward()
    torch.testing.assert_close(o2, o)
    torch.testing.assert_close(ht2, ht.transpose(-1, -2))
    for got, w in zip([q.grad, k.grad, v.grad, g.grad, s_vk.grad], want[:4] + [want[4].transpose(-1, -2)]):
        torch.testing.assert_close(got, w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ["chunk", "recurrent", "recurrent-reverse"])
@pytest.mark.parametrize("h0", [True, False])
def test_varlen_matches_separate_runs(device, algo, h0):
    # cu_seqlens packs sequences (an empty one included) along T of a batch-1 tensor; each must equal its own run
    lens = [5, 70, 0, 1, 33]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    N, T = len(lens), sum(lens)
    q, k, v, g, _ = make(1, T, 2, 8, 4, torch.float64 if device == "cpu" else torch.float32, device, h0=False,
                         requires_grad=True)
    s = torch.randn(N, 2, 8, 4, dtype=q.dtype, device=device, requires_grad=True) if h0 else None
    fn = ALGOS[algo.split("-")[0]]
    kw = {"reverse": True} if algo.endswith("reverse") else {}
    o, ht = fn(q, k, v, g, initial_state=s, output_final_state=True, cu_seqlens=cu, **kw)
    (o.square().sum() + ht.square().sum()).backward()
    got = [o, ht, q.grad, k.grad, v.grad, g.grad] + ([s.grad] if h0 else [])
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, g)] + ([s.detach().clone().requires_grad_()] if h0 else [])
    outs, hts = [], []
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        oi, hi = fn(*(t[:, a:b] for t in leaves[:4]), initial_state=leaves[4][i : i + 1] if h0 else None,
                    output_final_state=True, **kw)
        outs.append(oi)
        hts.append(hi)
    want_o, want_ht = torch.cat(outs, 1), torch.cat(hts, 0)
    (want_o.square().sum() + want_ht.square().sum()).backward()
    want = [want_o, want_ht] + [t.grad for t in leaves]
    assert ht.shape == (N, 2, 8, 4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_varlen_bad_offsets():
    q, k, v, g, _ = make(1, 10, 2, 8, 4, torch.float32, "cpu", h0=False)
    for cu, match in [(torch.tensor([0, 4, 9]), "rise from 0 to the packed length 10"), (torch.tensor([0, 6, 4, 10]), "rise"),
                      (torch.tensor([0.0, 10.0]), "integer")]:
        with pytest.raises(ValueError, match=match):
            linmix.chunk_gla(q, k, v, g, cu_seqlens=cu)
    q2, k2, v2, g2, _ = make(2, 10, 2, 8, 4, torch.float32, "cpu", h0=False)
    with pytest.raises(ValueError, match="batch size must be 1"):
        linmix.chunk_gla(q2, k2, v2, g2, cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="one state per sequence"):
        linmix.chunk_gla(q, k, v, g, cu_seqlens=torch.tensor([0, 4, 10]), initial_state=torch.zeros(3, 2, 8, 4))


@pytest.mark.parametrize("device", DEVICES)
def test_fla_recurrent_keywords(device):
    # fused_recurrent_gla with flash-linear-attention's keywords: gk, reverse, no gate, and gv refused
    q, k, v, g, s = make(2, 37, 2, 8, 5, torch.float64 if device == "cpu" else torch.float32, device)
    rec = linmix.fused_recurrent_gla
    torch.testing.assert_close(rec(q, k, v, gk=g, initial_state=s)[0], rec(q, k, v, g, initial_state=s)[0])
    torch.testing.assert_close(rec(q, k, v)[0], rec(q, k, v, torch.zeros_like(k))[0])
    # reverse: the recurrence runs from T-1 down to 0, i.e. the reference on time-reversed inputs
    o, ht = rec(q, k, v, gk=g, initial_state=s, output_final_state=True, reverse=True)
    ro, rht = gla_ref(*(t.flip(1).double() for t in (q, k, v, g)), initial_state=s.double(), output_final_state=True)
    tol = dict(rtol=1e-10, atol=1e-10) if q.dtype == torch.float64 else {}
    torch.testing.assert_close(o.double(), ro.flip(1), **tol)
    torch.testing.assert_close(ht.double(), rht, **tol)
    with pytest.raises(ValueError, match="not both"):
        rec(q, k, v, g, gk=g)
    with pytest.raises(NotImplementedError, match="gv"):
        rec(q, k, v, gk=g, gv=torch.zeros_like(v))


def test_fla_deprecated_transpose_state_layout():
    # fla renamed transpose_state_layout to state_v_first: the old name still works with a DeprecationWarning,
    # both at once is a ValueError, and the new name alone warns nothing (fla's test_fused_recurrent_state_v_first)
    q, k, v, g, s = make(2, 9, 2, 8, 5, torch.float64, "cpu")
    s_vk = s.transpose(-1, -2).contiguous()
    rec = linmix.fused_recurrent_gla
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = rec(q, k, v, gk=g, initial_state=s_vk, output_final_state=True, state_v_first=True)
    with pytest.warns(DeprecationWarning, match="transpose_state_layout is deprecated"):
        got = rec(q, k, v, gk=g, initial_state=s_vk, output_final_state=True, transpose_state_layout=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not both"):
        rec(q, k, v, gk=g, state_v_first=True, transpose_state_layout=True)


def _fla_gla():
    try:
        from fla.ops.gla import chunk_gla as fla_chunk_gla
    except Exception:  # absent, or its Triton stack does not import here
        return None
    return fla_chunk_gla


@pytest.mark.skipif(not HAS_CUDA or _fla_gla() is None, reason="needs a GPU and flash-linear-attention (fla-core)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_fla(dtype):
    # Drop-in check: same call, same outputs and gradients as fla's Triton chunk_gla, both against float64
    q, k, v, g, s = make(2, 300, 4, 64, 64, dtype, "cuda", requires_grad=True)
    outs = {}
    for name, fn in (("linmix", linmix.chunk_gla), ("fla", _fla_gla())):
        for t in (q, k, v, g, s):
            t.grad = None
        o, ht = fn(q, k, v, g, initial_state=s, output_final_state=True)
        (o.float().sum() + ht.float().square().sum()).backward()
        outs[name] = [o, ht] + [t.grad.clone() for t in (q, k, v, g, s)]
    ref = [t.detach().double().requires_grad_() for t in (q, k, v, g, s)]
    o, ht = gla_ref(*ref[:4], initial_state=ref[4], output_final_state=True)
    (o.sum() + ht.square().sum()).backward()
    want = [o, ht] + [t.grad for t in ref]
    for i, w in enumerate(want):
        e_lm, e_fla = rel_err(outs["linmix"][i], w), rel_err(outs["fla"][i], w)
        assert e_lm <= 2 * e_fla + 1e-5, f"tensor {i}: linmix rel err {e_lm:.2e} vs fla {e_fla:.2e}"
