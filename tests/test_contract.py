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
    opcheck: Callable[[dict], list]        # inputs -> [(op overload, args), ...]
    time_dim: int                          # the sequence-length dim of the grad inputs


def _ls_make(device, B, T):
    g = torch.Generator().manual_seed(T)
    return dict(a=torch.rand(B, T, 6, generator=g).mul(0.9).to(device), b=torch.randn(B, T, 6, generator=g).to(device),
                h0=torch.randn(B, 6, generator=g).to(device))


def _ls_opcheck(x):
    h = torch.ops.linmix.linear_scan_fwd(x["a"], x["b"], x["h0"], False)
    return [(torch.ops.linmix.linear_scan_fwd.default, (x["a"], x["b"], x["h0"], False)),
            (torch.ops.linmix.linear_scan_bwd.default, (x["a"], h, torch.randn_like(h), x["h0"], False))]


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
    out, ckpt, fin = torch.ops.linmix.selective_scan_fwd(u, delta, A, B, C, D, z, None, None, True)
    return [(torch.ops.linmix.selective_scan_fwd.default, (u, delta, A, B, C, D, z, None, None, True)),
            (torch.ops.linmix.selective_scan_bwd.default,
             (u, delta, A, B, C, D, z, None, None, ckpt, torch.randn_like(out), torch.randn_like(fin), True))]


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
        q, k, v, g, h0 = x["q"], x["k"], x["v"], x["g"], x["initial_state"]
        o, ht = fwd(q, k, v, g, 0.5, h0)
        return [(fwd.default, (q, k, v, g, 0.5, h0)),
                (bwd.default, (q, k, v, g, torch.randn_like(o), torch.randn_like(ht), 0.5, h0))]
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
    h, h_prev, _, _ = torch.ops.linmix.fixed_point_rnn_fwd(u, lam, hh_u, hh_beta, 4, 0.0)
    return [(torch.ops.linmix.fixed_point_rnn_fwd.default, (u, lam, hh_u, hh_beta, 4, 0.0)),
            (torch.ops.linmix.fixed_point_rnn_bwd.default, (torch.randn_like(h), u, lam, hh_u, hh_beta, h_prev, 4, 0.0))]


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


def _fwd_bwd(run, x, grads):
    x = {k: (v.detach().requires_grad_(k in grads) if torch.is_tensor(v) else v) for k, v in x.items()}
    out = run(**x)
    out.backward(torch.ones_like(out))
    return out.detach(), {k: x[k].grad for k in grads}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_opcheck(op, device):
    for overload, args in op.opcheck(op.make(device, 2, 5)):
        torch.library.opcheck(overload, args)


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
