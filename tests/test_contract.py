"""The contract every op keeps, run over every op and device (docs/DESIGN.md, "The op contract").

For each op, on CPU and CUDA: torch.library.opcheck of its forward and backward ops; torch.compile with
fullgraph=True, once with static shapes and once with dynamic=True, each at two different sequence lengths,
forward and backward matching eager; empty inputs; inputs on two devices rejected with a clear error;
non-contiguous inputs matching contiguous ones; outputs fully written (the CUDA caching allocator is
poisoned with NaN before the call, so an unwritten element shows up).
"""

from __future__ import annotations

import pytest
import torch

from linmix._cases import CASES, make
from conftest import DEVICES, HAS_CUDA, assert_close, poison


# The call each op's contract runs (linmix._cases builds the inputs): its tensors, an initial state where it takes
# one, and the options that exercise most of its kernels. selective_scan asks for the deterministic backward: the
# comparisons below are bitwise, and its default CUDA backward adds dB/dC with float atomics.
CALLS = {
    "linear_scan": dict(h0="given"),
    "selective_scan": dict(D="given", z="given", delta_softplus=True, deterministic=True),
    "chunk_gla": dict(initial_state="given"),
    "fused_recurrent_gla": dict(initial_state="given"),
    "fixed_point_rnn": dict(max_iter=6, tol=0.0),
}
OPS = [CASES[name] for name in CALLS]
OP_IDS = list(CALLS)


def _make(case, device, B, T):
    return make(case, device, seed=T, sizes={case.batch: B, case.time: T}, **CALLS[case.name])


def _grads(case, x):
    """The differentiable tensor inputs of this call."""
    return tuple(n for n in case.grads if x.get(n) is not None)


def _linear_scan_dispatch(x):
    fwd = dict(a=x["a"], b=x["b"], h0=x["h0"], cu_seqlens=x.get("cu_seqlens"), reverse=False)
    h = torch.ops.linmix.linear_scan_fwd(**fwd)
    return [(torch.ops.linmix.linear_scan_fwd.default, fwd),
            (torch.ops.linmix.linear_scan_bwd.default,
             dict(a=x["a"], h0=x["h0"], h=h, dh=torch.randn_like(h), cu_seqlens=x.get("cu_seqlens"), reverse=False))]


def _selective_scan_dispatch(x):
    u, delta, A, D, z = x["u"], x["delta"], x["A"], x["D"], x["z"]
    B, C = x["B"].unsqueeze(1), x["C"].unsqueeze(1)
    inputs = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=None, initial_state=None,
                  cu_seqlens=x.get("cu_seqlens"))
    out, ckpt, fin = torch.ops.linmix.selective_scan_fwd(**inputs, delta_softplus=True)
    return [(torch.ops.linmix.selective_scan_fwd.default, dict(inputs, delta_softplus=True)),
            (torch.ops.linmix.selective_scan_bwd.default,
             dict(inputs, checkpoints=ckpt, dout=torch.randn_like(out), dfinal_state=torch.randn_like(fin),
                  delta_softplus=True))]


def _gla_dispatch(algo):
    def f(x):
        fwd, bwd = getattr(torch.ops.linmix, f"{algo}_fwd"), getattr(torch.ops.linmix, f"{algo}_bwd")
        inputs = {name: x[name] for name in ("q", "k", "v", "g", "initial_state")} | {"cu_seqlens": None}
        out, final_state = fwd(**inputs, scale=0.5)
        return [(fwd.default, dict(inputs, scale=0.5)),
                (bwd.default, dict(inputs, dout=torch.randn_like(out), dfinal_state=torch.randn_like(final_state),
                                   scale=0.5))]
    return f


def _fixed_point_rnn_dispatch(x):
    u, lam, hh_u, hh_beta = x["u"], x["lam"], x["hh_u"], x["hh_beta"]
    inputs = dict(u=u, lam=lam, hh_u=hh_u, hh_beta=hh_beta, initial_state=None, cu_seqlens=None)
    h, h_prev, _, _ = torch.ops.linmix.fixed_point_rnn_fwd(**inputs, max_iter=4, tol=0.0)
    return [(torch.ops.linmix.fixed_point_rnn_fwd.default, dict(inputs, max_iter=4, tol=0.0)),
            (torch.ops.linmix.fixed_point_rnn_bwd.default,
             dict(inputs, h_prev=h_prev, dh=torch.randn_like(h), max_iter=4, tol=0.0))]


# The dispatcher calls opcheck runs for one set of inputs: (op overload, keyword arguments), forward then backward.
DISPATCH = {
    "linear_scan": _linear_scan_dispatch,
    "selective_scan": _selective_scan_dispatch,
    "chunk_gla": _gla_dispatch("chunk_gla"),
    "fused_recurrent_gla": _gla_dispatch("fused_recurrent_gla"),
    "fixed_point_rnn": _fixed_point_rnn_dispatch,
}


def _is_tensor(arg):
    t = arg.type
    return isinstance(t, torch.TensorType) or (isinstance(t, torch.OptionalType)
                                               and isinstance(t.getElementType(), torch.TensorType))


@pytest.mark.parametrize("name", OP_IDS + ["selective_state_update"])
def test_schema_convention(name):
    """csrc/bindings.cpp's convention: named returns; tensors before scalars; a backward takes (some of) the
    forward's tensor inputs in order, then forward outputs it reuses, then grads d<output>, then scalars, and
    returns d<input> for every forward tensor input but the integer offsets cu_seqlens."""
    def schema(op):
        return getattr(torch.ops.linmix, op).default._schema

    fwd = schema(name if name == "selective_state_update" else f"{name}_fwd")
    schemas = [fwd] if name == "selective_state_update" else [fwd, schema(f"{name}_bwd")]
    for sch in schemas:
        assert all(r.name for r in sch.returns), str(sch)
        kinds = [_is_tensor(a) for a in sch.arguments]
        assert kinds == sorted(kinds, reverse=True), f"a tensor after a scalar: {sch}"
    if len(schemas) == 1:
        return
    bwd = schemas[1]
    inputs = [a.name for a in fwd.arguments if _is_tensor(a)]
    outputs = [r.name for r in fwd.returns]
    # cu_seqlens (integer offsets) has no gradient
    assert [r.name for r in bwd.returns] == ["d" + n for n in inputs if n != "cu_seqlens"], str(bwd)
    names = [a.name for a in bwd.arguments if _is_tensor(a)]
    rank = {n: (0, inputs.index(n)) for n in inputs}
    rank.update({n: (1, outputs.index(n)) for n in outputs})
    rank.update({"d" + n: (2, outputs.index(n)) for n in outputs})
    assert all(n in rank for n in names) and names == sorted(names, key=rank.get), str(bwd)
    assert any(rank[n][0] == 2 for n in names), f"no output grad: {bwd}"


def _first_output(case):
    return lambda **x: case.run(x)[0]


def _fwd_bwd(case, x, run=None):
    """The first output of the op (or of `run`, the op compiled) and the gradients of its differentiable inputs."""
    grads = _grads(case, x)
    x = {k: (v.detach().requires_grad_(k in grads) if torch.is_tensor(v) else v) for k, v in x.items()}
    out = (run or _first_output(case))(**x)
    out.backward(torch.ones_like(out))
    return out.detach(), {k: x[k].grad for k in grads}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_opcheck(op, device):
    for overload, kwargs in DISPATCH[op.name](_make(op, device, 2, 5)):
        torch.library.opcheck(overload, (), kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_compile_two_lengths(op, dynamic, device):
    torch._dynamo.reset()
    compiled = torch.compile(_first_output(op), fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for T in (7, 13):  # a second, different length: a recompile (static) or the same symbolic graph (dynamic)
        x = _make(op, device, 2, T)
        out, grads = _fwd_bwd(op, x)
        out_c, grads_c = _fwd_bwd(op, x, compiled)
        assert_close(out_c, out, exact=True)
        for k in grads:
            assert_close(grads_c[k], grads[k], exact=True, name=k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_empty(op, device):
    for B, T in ((0, 5), (2, 0)):
        x = _make(op, device, B, T)
        out, grads = _fwd_bwd(op, x)
        assert out.numel() == 0 or (T == 0 and out.shape[x.time_dim(next(iter(x)))] == 0)
        for k in grads:
            assert grads[k].shape == x[k].shape


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and backend")
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_mixed_devices(op):
    x = _make(op, "cuda", 2, 5)
    other = [k for k in x if x.time_dim(k) is not None][1]  # a sequence input other than the first
    x[other] = x[other].cpu()
    with pytest.raises(RuntimeError, match="device|cpu|cuda"):
        op.run(x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_non_contiguous(op, device):
    x = _make(op, device, 2, 9)
    # Each tensor with a time axis becomes a strided view of a twice-as-long buffer (every other step).
    strided = x.copy()
    for k in x:
        td = x.time_dim(k)
        if td is not None:
            wide = torch.repeat_interleave(x[k], 2, dim=td)
            strided[k] = wide.narrow(td, 0, 2 * 9 - 1)[(slice(None),) * td + (slice(None, None, 2),)]
            assert torch.equal(strided[k], x[k]) and not strided[k].is_contiguous()
    out, grads = _fwd_bwd(op, x)
    out_s, grads_s = _fwd_bwd(op, strided)
    assert_close(out_s, out, exact=True)
    for k in grads:
        assert_close(grads_s[k], grads[k], exact=True, name=k)


@pytest.mark.skipif(not HAS_CUDA, reason="poisons the CUDA caching allocator")
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_outputs_fully_written(op):
    x = _make(op, "cuda", 2, 70)
    # NaN in freed blocks of both caching-allocator pools (small: <= 1 MiB, large), so the op's outputs reuse them.
    blocks = [poison(torch.empty(256 * 1024, device="cuda")) for _ in range(16)]
    blocks.append(poison(torch.empty(16 * 1024 * 1024, device="cuda")))
    del blocks
    out, grads = _fwd_bwd(op, x)
    assert torch.isfinite(out).all()
    for k in grads:
        assert torch.isfinite(grads[k]).all(), k
