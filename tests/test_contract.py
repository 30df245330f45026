"""The contract every op keeps, run over every op and device (DESIGN: the op contract).

For each op, on CPU and CUDA: torch.library.opcheck of its forward and backward ops; torch.compile with
fullgraph=True, once with static shapes and once with dynamic=True, each at two different sequence lengths,
forward and backward matching eager; empty inputs; inputs on two devices rejected with a clear error;
non-contiguous inputs matching contiguous ones; outputs fully written (the CUDA caching allocator is
poisoned with NaN before the call, so an unwritten element shows up).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch

import linmix
from conftest import DEVICES, HAS_CUDA, assert_close, poison


@dataclasses.dataclass
class OpCase:
    name: str
    make: Callable[[str, int, int], dict]  # (device, batch, length) -> keyword inputs of `run`
    run: Callable[..., torch.Tensor]       # keyword inputs -> one output tensor
    grads: tuple[str, ...]                 # inputs that get gradients
    opcheck: Callable[[dict], list]        # inputs -> [(op overload, keyword args), ...]
    time_dim: int                          # the sequence-length dim of the grad inputs


def _ls_make(device, B, T):
    g = torch.Generator().manual_seed(T)
    return dict(a=torch.rand(B, T, 6, generator=g).mul(0.9).to(device), b=torch.randn(B, T, 6, generator=g).to(device),
                h0=torch.randn(B, 6, generator=g).to(device))


def _ls_opcheck(x):
    fwd = dict(a=x["a"], b=x["b"], h0=x["h0"], reverse=False)
    h = torch.ops.linmix.linear_scan_fwd(**fwd)
    return [(torch.ops.linmix.linear_scan_fwd.default, fwd),
            (torch.ops.linmix.linear_scan_bwd.default,
             dict(a=x["a"], h0=x["h0"], h=h, dh=torch.randn_like(h), reverse=False))]


def _ss_make(device, B, T):
    g = torch.Generator().manual_seed(T)
    d, n = 4, 3
    return dict(u=torch.randn(B, d, T, generator=g).to(device), delta=torch.rand(B, d, T, generator=g).to(device),
                A=-torch.rand(d, n, generator=g).add(0.1).to(device), B=torch.randn(B, n, T, generator=g).to(device),
                C=torch.randn(B, n, T, generator=g).to(device), D=torch.randn(d, generator=g).to(device),
                z=torch.randn(B, d, T, generator=g).to(device))


def _ss_run(u, delta, A, B, C, D, z):
    return linmix.selective_scan(u, delta, A, B, C, D=D, z=z, delta_softplus=True)


def _ss_opcheck(x):
    u, delta, A, D, z = x["u"], x["delta"], x["A"], x["D"], x["z"]
    B, C = x["B"].unsqueeze(1), x["C"].unsqueeze(1)
    inputs = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=None, initial_state=None)
    out, ckpt, fin = torch.ops.linmix.selective_scan_fwd(**inputs, delta_softplus=True)
    return [(torch.ops.linmix.selective_scan_fwd.default, dict(inputs, delta_softplus=True)),
            (torch.ops.linmix.selective_scan_bwd.default,
             dict(inputs, checkpoints=ckpt, dout=torch.randn_like(out), dfinal_state=torch.randn_like(fin),
                  delta_softplus=True))]


def _gla_make(device, B, T):
    g = torch.Generator().manual_seed(T)
    H, K, V = 2, 8, 4
    return dict(q=torch.randn(B, T, H, K, generator=g).to(device), k=torch.randn(B, T, H, K, generator=g).to(device),
                v=torch.randn(B, T, H, V, generator=g).to(device),
                g=torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, generator=g)).to(device),
                initial_state=torch.randn(B, H, K, V, generator=g).to(device))


def _gla_opcheck(algo):
    def f(x):
        fwd, bwd = getattr(torch.ops.linmix, f"{algo}_fwd"), getattr(torch.ops.linmix, f"{algo}_bwd")
        inputs = {name: x[name] for name in ("q", "k", "v", "g", "initial_state")}
        out, final_state = fwd(**inputs, scale=0.5)
        return [(fwd.default, dict(inputs, scale=0.5)),
                (bwd.default, dict(inputs, dout=torch.randn_like(out), dfinal_state=torch.randn_like(final_state),
                                   scale=0.5))]
    return f


def _fp_make(device, B, T):
    g = torch.Generator().manual_seed(T)
    D, R = 5, 2
    hh_u = torch.nn.functional.normalize(torch.randn(B, T, R, D, generator=g), dim=-1)
    return dict(u=torch.randn(B, T, D, generator=g).to(device), lam=torch.rand(B, T, D, generator=g).mul(0.8).to(device),
                hh_u=hh_u.to(device), hh_beta=torch.rand(B, T, R, generator=g).mul(1.5).to(device))


def _fp_run(u, lam, hh_u, hh_beta):
    return linmix.fixed_point_rnn(u, lam, hh_u, hh_beta, max_iter=6, tol=0.0)


def _fp_opcheck(x):
    u, lam, hh_u, hh_beta = x["u"], x["lam"], x["hh_u"], x["hh_beta"]
    inputs = dict(u=u, lam=lam, hh_u=hh_u, hh_beta=hh_beta, initial_state=None)
    h, h_prev, _, _ = torch.ops.linmix.fixed_point_rnn_fwd(**inputs, max_iter=4, tol=0.0)
    return [(torch.ops.linmix.fixed_point_rnn_fwd.default, dict(inputs, max_iter=4, tol=0.0)),
            (torch.ops.linmix.fixed_point_rnn_bwd.default,
             dict(inputs, h_prev=h_prev, dh=torch.randn_like(h), max_iter=4, tol=0.0))]


OPS = [
    OpCase("linear_scan", _ls_make, lambda a, b, h0: linmix.linear_scan(a, b, h0=h0), ("a", "b", "h0"), _ls_opcheck, 1),
    OpCase("selective_scan", _ss_make, _ss_run, ("u", "delta", "A", "B", "C", "D", "z"), _ss_opcheck, 2),
    OpCase("chunk_gla", _gla_make,
           lambda q, k, v, g, initial_state: linmix.chunk_gla(q, k, v, g, initial_state=initial_state)[0],
           ("q", "k", "v", "g", "initial_state"), _gla_opcheck("chunk_gla"), 1),
    OpCase("fused_recurrent_gla", _gla_make,
           lambda q, k, v, g, initial_state: linmix.fused_recurrent_gla(q, k, v, g, initial_state=initial_state)[0],
           ("q", "k", "v", "g", "initial_state"), _gla_opcheck("fused_recurrent_gla"), 1),
    OpCase("fixed_point_rnn", _fp_make, _fp_run, ("u", "lam", "hh_u", "hh_beta"), _fp_opcheck, 1),
]
OP_IDS = [op.name for op in OPS]



def _is_tensor(arg):
    t = arg.type
    return isinstance(t, torch.TensorType) or (isinstance(t, torch.OptionalType)
                                               and isinstance(t.getElementType(), torch.TensorType))


@pytest.mark.parametrize("name", OP_IDS + ["selective_state_update"])
def test_schema_convention(name):
    """csrc/bindings.cpp's convention: named returns; tensors before scalars; a backward takes (some of) the
    forward's tensor inputs in order, then forward outputs it reuses, then grads d<output>, then scalars, and
    returns d<input> for every forward tensor input."""
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
    assert [r.name for r in bwd.returns] == ["d" + n for n in inputs], str(bwd)
    names = [a.name for a in bwd.arguments if _is_tensor(a)]
    rank = {n: (0, inputs.index(n)) for n in inputs}
    rank.update({n: (1, outputs.index(n)) for n in outputs})
    rank.update({"d" + n: (2, outputs.index(n)) for n in outputs})
    assert all(n in rank for n in names) and names == sorted(names, key=rank.get), str(bwd)
    assert any(rank[n][0] == 2 for n in names), f"no output grad: {bwd}"


def _fwd_bwd(run, x, grads):
    x = {k: (v.detach().requires_grad_(k in grads) if torch.is_tensor(v) else v) for k, v in x.items()}
    out = run(**x)
    out.backward(torch.ones_like(out))
    return out.detach(), {k: x[k].grad for k in grads}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_opcheck(op, device):
    for overload, kwargs in op.opcheck(op.make(device, 2, 5)):
        torch.library.opcheck(overload, (), kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_compile_two_lengths(op, dynamic, device):
    torch._dynamo.reset()
    compiled = torch.compile(op.run, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for T in (7, 13):  # a second, different length: a recompile (static) or the same symbolic graph (dynamic)
        x = op.make(device, 2, T)
        out, grads = _fwd_bwd(op.run, x, op.grads)
        out_c, grads_c = _fwd_bwd(compiled, x, op.grads)
        assert_close(out_c, out, exact=True)
        for k in op.grads:
            assert_close(grads_c[k], grads[k], exact=True, name=k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_empty(op, device):
    for B, T in ((0, 5), (2, 0)):
        x = op.make(device, B, T)
        out, grads = _fwd_bwd(op.run, x, op.grads)
        assert out.numel() == 0 or (T == 0 and out.shape[op.time_dim] == 0)
        for k in op.grads:
            assert grads[k].shape == x[k].shape


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and backend")
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_mixed_devices(op):
    x = op.make("cuda", 2, 5)
    moved = next(k for k in x if k not in ("A", "D", "initial_state", "h0"))
    other = next(k for k in x if k != moved and x[k].dim() >= 2)
    x[other] = x[other].cpu()
    with pytest.raises(RuntimeError, match="device|cpu|cuda"):
        op.run(**x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_non_contiguous(op, device):
    x = op.make(device, 2, 9)
    # Each tensor with a time axis becomes a strided view of a twice-as-long buffer (every other step).
    strided = {}
    for k, v in x.items():
        td = op.time_dim if v.dim() >= 3 and v.shape[op.time_dim] == 9 else v.dim() - 1
        if v.dim() >= 3 and v.shape[td] == 9:
            wide = torch.repeat_interleave(v, 2, dim=td)
            strided[k] = wide.narrow(td, 0, 2 * 9 - 1)[(slice(None),) * td + (slice(None, None, 2),)]
            assert torch.equal(strided[k], v) and not strided[k].is_contiguous()
        else:
            strided[k] = v
    out, grads = _fwd_bwd(op.run, x, op.grads)
    out_s, grads_s = _fwd_bwd(op.run, strided, op.grads)
    assert_close(out_s, out, exact=True)
    for k in op.grads:
        assert_close(grads_s[k], grads[k], exact=True, name=k)


@pytest.mark.skipif(not HAS_CUDA, reason="poisons the CUDA caching allocator")
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_outputs_fully_written(op):
    x = op.make("cuda", 2, 70)
    # NaN in freed blocks of both caching-allocator pools (small: <= 1 MiB, large), so the op's outputs reuse them.
    blocks = [poison(torch.empty(256 * 1024, device="cuda")) for _ in range(16)]
    blocks.append(poison(torch.empty(16 * 1024 * 1024, device="cuda")))
    del blocks
    out, grads = _fwd_bwd(op.run, x, op.grads)
    assert torch.isfinite(out).all()
    for k in op.grads:
        assert torch.isfinite(grads[k]).all(), k
