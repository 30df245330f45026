import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import linmix
from linmix.reference import gla_ref

from conftest import DEVICES, EMULATED, HAS_CUDA, HostReads, assert_close, low_precision_close, rel_err

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
    x = dict(q=q, k=k, v=v, g=g, cu_seqlens=None, scale=0.5)
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
        linmix.{op}(q, q, v, -q.abs(){kw})
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
        script = WARN_ONCE.format(K=K, V=V, device=device, op=op, kw="")
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


# ---- packed sequences (cu_seqlens): one op call whose kernels read the offsets on the device

# Sequence lengths: boundaries inside a chunk and a sequence across one, an empty and a length-1 sequence; boundaries
# exactly on chunk edges (64, 192); sequences all shorter than a chunk.
VARLEN_LENS = {"mixed": [5, 70, 0, 1, 33], "edges": [64, 128, 1, 63], "short": [3, 0, 17, 1, 2]}


def packed(lens, dtype, device, H=2, K=8, V=4, offsets=torch.int32, h0=True, seed=0):
    """q, k, v, g (1, sum(lens), H, .), initial states (N, H, K, V) or None, and the offsets."""
    torch.manual_seed(seed)
    q, k, v, g, _ = make(1, sum(lens), H, K, V, dtype, device, h0=False)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.randn(len(lens), H, K, V, dtype=torch.float64).to(device, acc) if h0 else None
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=offsets, device=device)
    return [q, k, v, g, s], cu


def per_sequence_reference(inputs, cu, reverse, do, dht):
    """Outputs, final states and gradients of every input, each sequence on its own through gla_ref in float64."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    q, k, v, g, s = leaves
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        part = [t[:, a:b].flip(1) if reverse else t[:, a:b] for t in (q, k, v, g)]
        o, fin = gla_ref(*part, initial_state=None if s is None else s[i : i + 1], output_final_state=True)
        outs.append(o.flip(1) if reverse else o)
        finals.append(fin)
    o, ht = torch.cat(outs, 1), torch.cat(finals, 0)
    ((o * do).sum() + (ht * dht).sum()).backward()
    return [o, ht] + [t.grad for t in leaves if t is not None]


def packed_call(algo, inputs, cu, do, dht, **kw):
    """The packed call's outputs, final states and gradients (of the same loss as per_sequence_reference)."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    fn = ALGOS[algo.split("-")[0]]
    if algo.endswith("reverse"):
        kw["reverse"] = True
    o, ht = fn(*leaves[:4], initial_state=leaves[4], output_final_state=True, cu_seqlens=cu, **kw)
    ((o.double() * do).sum() + (ht.double() * dht).sum()).backward()
    return [o, ht] + [t.grad for t in leaves if t is not None]


VARLEN_ALGOS = ["chunk", "recurrent", "recurrent-reverse"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32: the CUDA kernels when emulated
@pytest.mark.parametrize("algo", VARLEN_ALGOS)
@pytest.mark.parametrize("layout, offsets", [("mixed", torch.int32), ("edges", torch.int64), ("short", torch.int32)])
@pytest.mark.parametrize("h0", [True, False])
def test_varlen_matches_per_sequence_reference(device, dtype, algo, layout, offsets, h0):
    if dtype == torch.float64 and device == "cuda":
        pytest.skip("float64 is CPU only")
    inputs, cu = packed(VARLEN_LENS[layout], dtype, device, offsets=offsets, h0=h0)
    N, T = cu.numel() - 1, inputs[0].shape[1]
    do, dht = torch.randn(1, T, 2, 4, dtype=torch.float64), torch.randn(N, 2, 8, 4, dtype=torch.float64)
    with HostReads(strict=True):  # no synchronising read of the offsets, forward or backward
        got = packed_call(algo, inputs, cu, do.to(device), dht.to(device))
    want = per_sequence_reference([t if t is None else t.cpu() for t in inputs], cu.cpu(), algo.endswith("reverse"),
                                  do, dht)
    names = ["o", "final_state", "dq", "dk", "dv", "dg"] + (["dinitial_state"] if h0 else [])
    assert got[1].shape == (N, 2, 8, 4)
    for name, a, b in zip(names, got, want, strict=True):
        assert_close(a.cpu().double(), b, name=name, dtype=dtype)


@pytest.mark.parametrize("algo", VARLEN_ALGOS)
def test_varlen_state_v_first(algo):
    # (N, H, V, K) states: the transposes of the (N, H, K, V) ones, gradients included
    inputs, cu = packed(VARLEN_LENS["mixed"], torch.float64, "cpu")
    do, dht = torch.randn(1, inputs[0].shape[1], 2, 4, dtype=torch.float64), torch.randn(5, 2, 8, 4, dtype=torch.float64)
    want = packed_call(algo, inputs, cu, do, dht)
    vk = inputs[:4] + [inputs[4].transpose(-1, -2).contiguous()]
    got = packed_call(algo, vk, cu, do, dht.transpose(-1, -2), state_v_first=True)
    for a, b in zip(got[:1] + got[2:6], want[:1] + want[2:6]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1].transpose(-1, -2), rtol=0, atol=0)
    torch.testing.assert_close(got[6], want[6].transpose(-1, -2), rtol=0, atol=0)


@pytest.mark.parametrize("algo", VARLEN_ALGOS)
def test_varlen_gradcheck(algo):
    inputs, cu = packed([3, 0, 5, 1], torch.float64, "cpu", H=1, K=3, V=2)
    kw = {"reverse": True} if algo.endswith("reverse") else {}
    fn = ALGOS[algo.split("-")[0]]

    def f(q, k, v, g, s):
        return fn(q, k, v, g, initial_state=s, output_final_state=True, cu_seqlens=cu, **kw)
    assert torch.autograd.gradcheck(f, [t.detach().requires_grad_() for t in inputs])


def test_chunk_gla_cu_seqlens_cpu():
    # fla's host copy of the offsets: alone it is the offsets; with cu_seqlens, the device tensor is the one read
    inputs, cu = packed(VARLEN_LENS["mixed"], torch.float64, "cpu")
    want = linmix.chunk_gla(*inputs[:4], initial_state=inputs[4], output_final_state=True, cu_seqlens=cu)
    for kw in (dict(cu_seqlens_cpu=cu), dict(cu_seqlens=cu, cu_seqlens_cpu=cu)):
        got = linmix.chunk_gla(*inputs[:4], initial_state=inputs[4], output_final_state=True, **kw)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("algo", ["chunk", "recurrent-reverse"])
def test_varlen_compiles_fullgraph_dynamic(algo):
    fn = ALGOS[algo.split("-")[0]]
    kw = {"reverse": True} if algo.endswith("reverse") else {}

    def call(q, k, v, g, s, cu):
        o, ht = fn(q, k, v, g, initial_state=s, output_final_state=True, cu_seqlens=cu, **kw)
        return o.square().sum() + ht.square().sum()
    compiled = torch.compile(call, fullgraph=True, dynamic=True, backend="aot_eager")
    for lens in (VARLEN_LENS["mixed"], VARLEN_LENS["short"]):  # another N and T: the same symbolic graph
        inputs, cu = packed(lens, torch.float64, "cpu")
        grads = []
        for run in (call, compiled):
            leaves = [t.detach().requires_grad_() for t in inputs]
            loss = run(*leaves, cu)
            grads.append([loss] + list(torch.autograd.grad(loss, leaves)))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("algo", ["chunk_gla", "fused_recurrent_gla"])
@pytest.mark.parametrize("offsets", [torch.int32, torch.int64])
def test_varlen_opcheck(algo, offsets):
    inputs, cu = packed([5, 0, 9, 1], torch.float64, "cpu", offsets=offsets)
    x = dict(zip(("q", "k", "v", "g", "initial_state"), inputs))
    fwd, bwd = getattr(torch.ops.linmix, f"{algo}_fwd"), getattr(torch.ops.linmix, f"{algo}_bwd")
    out, final_state = fwd(**x, scale=0.5, cu_seqlens=cu)
    assert final_state.shape == (4, 2, 8, 4)
    torch.library.opcheck(fwd.default, (), dict(x, scale=0.5, cu_seqlens=cu))
    torch.library.opcheck(bwd.default, (), dict(x, dout=torch.randn_like(out), dfinal_state=torch.randn_like(final_state),
                                                scale=0.5, cu_seqlens=cu))


@pytest.mark.parametrize("algo", VARLEN_ALGOS)
def test_varlen_bad_offsets_raise(algo):
    # values: an asynchronous device assert, which raises at once on the CPU
    fn = ALGOS[algo.split("-")[0]]
    kw = {"reverse": True} if algo.endswith("reverse") else {}
    q, k, v, g, _ = make(1, 10, 2, 8, 4, torch.float32, "cpu", h0=False)
    for cu in ([0, 4, 9], [0, 6, 4, 10], [1, 10], [0, 4, 11]):
        with pytest.raises(RuntimeError, match=f"linmix.{fn.__name__}: cu_seqlens must rise from 0 to the packed"):
            fn(q, k, v, g, cu_seqlens=torch.tensor(cu), **kw)


def test_varlen_bad_arguments_raise():
    q, k, v, g, _ = make(1, 10, 2, 8, 4, torch.float32, "cpu", h0=False)
    cu = torch.tensor([0, 4, 10])
    for fn in ALGOS.values():
        name = fn.__name__
        with pytest.raises(RuntimeError, match=f"linmix.{name}: cu_seqlens must be int32 or int64"):
            fn(q, k, v, g, cu_seqlens=torch.tensor([0.0, 10.0]))
        with pytest.raises(RuntimeError, match=f"linmix.{name}: cu_seqlens must be 1-D"):
            fn(q, k, v, g, cu_seqlens=cu[None])
        q2, k2, v2, g2, _ = make(2, 10, 2, 8, 4, torch.float32, "cpu", h0=False)
        with pytest.raises(RuntimeError, match=f"linmix.{name}: with cu_seqlens the batch size must be 1"):
            fn(q2, k2, v2, g2, cu_seqlens=torch.tensor([0, 10]))
        with pytest.raises(RuntimeError, match=r"initial_state must have shape \(N, H, K, V\) for N sequences"):
            fn(q, k, v, g, cu_seqlens=cu, initial_state=torch.zeros(3, 2, 8, 4))


@pytest.mark.slow
@pytest.mark.skipif(not (HAS_CUDA or EMULATED), reason="the CUDA kernels (a GPU, or LINMIX_EMULATE_CUDA=1)")
@pytest.mark.parametrize("op", ["chunk_gla", "fused_recurrent_gla"])
def test_cuda_varlen_warns_once(op):
    # No GPU-verified kernel takes cu_seqlens: the emulation-verified gla_varlen family runs by default and warns
    # once per process; switched on, it runs without a warning.
    device = "cuda" if HAS_CUDA else "cpu"
    kw = f", cu_seqlens=torch.tensor([0, 4, 4, 9], device='{device}')"
    for switch, warnings_seen in ((None, 1), ("gla_varlen", 0)):
        env = {n: x for n, x in os.environ.items() if n not in ("LINMIX_KERNELS", "LINMIX_UNVERIFIED_KERNELS")}
        env.update({"LINMIX_KERNELS": switch} if switch else {})
        script = WARN_ONCE.format(K=8, V=8, device=device, op=op, kw=kw)
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[-1] == str(warnings_seen), (switch, out.stdout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", VARLEN_ALGOS)
@pytest.mark.parametrize("K, V", [(260, 8), (8, 300)])
def test_varlen_wide_heads(device, algo, K, V):
    # head dims above 256 (on CUDA the gla_varlen kernels sized for 512): each sequence matches its reference
    inputs, cu = packed([3, 0, 9, 1], torch.float32, device, H=1, K=K, V=V)
    N, T = cu.numel() - 1, inputs[0].shape[1]
    do, dht = torch.randn(1, T, 1, V, dtype=torch.float64), torch.randn(N, 1, K, V, dtype=torch.float64)
    got = packed_call(algo, inputs, cu, do.to(device), dht.to(device))
    want = per_sequence_reference([t.cpu() for t in inputs], cu.cpu(), algo.endswith("reverse"), do, dht)
    for name, a, b in zip(["o", "final_state", "dq", "dk", "dv", "dg", "dinitial_state"], got, want, strict=True):
        assert_close(a.cpu().double(), b, name=name, dtype=torch.float32)


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
