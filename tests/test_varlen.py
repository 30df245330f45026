"""Packed variable-length batches (cu_seqlens) across ops and layers: the pieces shared by every op."""

import pytest
import torch

from linmix.nn.conv import causal_conv

from conftest import HostReads

f64 = torch.float64


def packed_offsets(lengths, dtype=torch.int32):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=dtype)


@pytest.mark.parametrize("silu", [False, True])
def test_causal_conv_packed_matches_per_sequence(silu):
    # Empty, length-1, shorter-than-the-window and longer sequences: zeros before each start, each one's last W inputs.
    torch.manual_seed(0)
    D, W, lengths = 5, 4, [3, 0, 1, 7, 2]
    cu = packed_offsets(lengths)
    w = torch.randn(D, 1, W, dtype=f64, requires_grad=True)
    b = torch.randn(D, dtype=f64)
    x = torch.randn(1, D, sum(lengths), dtype=f64, requires_grad=True)
    with HostReads(strict=True):
        y, state = causal_conv(x, w, b, None, silu, cu_seqlens=cu)
    assert state.shape == (len(lengths), D, W)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        padded = torch.cat([x.new_zeros(1, D, W), x[..., s:e]], -1)  # zeros before the start: the dense conv's state
        y_ref, state_ref = causal_conv(padded, w, b, None, silu)
        torch.testing.assert_close(y[..., s:e], y_ref[..., W:])
        torch.testing.assert_close(state[i : i + 1], state_ref)
    assert torch.autograd.gradcheck(lambda x, w: causal_conv(x, w, b, None, silu, cu_seqlens=cu), (x, w))


def test_causal_conv_packed_errors():
    x, w = torch.randn(2, 3, 5), torch.randn(3, 1, 4)
    with pytest.raises(ValueError, match="batch-1"):
        causal_conv(x, w, None, None, cu_seqlens=packed_offsets([2, 3]))
    with pytest.raises(ValueError, match="state"):
        causal_conv(x[:1], w, None, torch.zeros(1, 3, 4), cu_seqlens=packed_offsets([2, 3]))


def _layer(name):
    import linmix.nn as lnn
    torch.manual_seed(0)
    if name == "Mamba":
        return lnn.Mamba(8, d_state=4, d_conv=3, dtype=f64)
    # tol = 0: every iteration count is max_iter, so the packed row and each sequence alone iterate alike
    grad_mode = name.split("-")[1]
    return lnn.FPMamba(8, d_state=4, d_conv=3, max_iter=5, tol=0.0, grad_mode=grad_mode, dtype=f64)


@pytest.mark.parametrize("name", ["Mamba", "FPMamba-unroll", "FPMamba-onestep", "FPMamba-implicit"])
def test_layer_packed_matches_per_sequence(name):
    # linmix.nn layers on a packed batch: conv, scan (and FPMamba's y_{t-1}) restart at every boundary, so the
    # output and every gradient equal the layer run on each sequence alone; no host synchronisation.
    layer = _layer(name)
    lengths = [5, 0, 1, 9, 3, 0]
    cu = packed_offsets(lengths)
    x = torch.randn(1, sum(lengths), 8, dtype=f64, requires_grad=True)
    w = torch.randn(1, sum(lengths), 8, dtype=f64)
    with HostReads(strict=True):
        out = layer(x, cu_seqlens=cu)
        (out * w).sum().backward()
    got = [x.grad] + [p.grad for p in layer.parameters()]
    layer.zero_grad()
    xs = x.detach().clone().requires_grad_()
    outs = [layer(xs[:, s:e]) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()) if e > s]
    want_out = torch.cat(outs, 1)
    (want_out * w).sum().backward()
    want = [xs.grad] + [p.grad for p in layer.parameters()]
    torch.testing.assert_close(out, want_out)
    for (pname, _), a, b in zip([("x", None)] + list(layer.named_parameters()), got, want):
        torch.testing.assert_close(a, b, msg=lambda m, pname=pname: f"d{pname}: {m}")


def test_layer_packed_unsupported():
    import linmix.nn as lnn
    layer = lnn.FPMamba(8, d_state=4, dtype=f64)
    x, cu = torch.randn(1, 6, 8, dtype=f64), packed_offsets([2, 4])
    with pytest.raises(NotImplementedError, match="cu_seqlens"):
        layer(x, return_state=True, cu_seqlens=cu)
    mamba = lnn.Mamba(8, d_state=4, layer_idx=0, dtype=f64)
    with pytest.raises(NotImplementedError, match="cu_seqlens"):
        mamba(x, inference_params=lnn.InferenceParams(max_seqlen=6, max_batch_size=1), cu_seqlens=cu)
