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
