"""Models built from linmix's layers under torch.compile(fullgraph=True), at several sequence lengths.

A 2-layer Mamba compiled with fullgraph=True once failed on its second sequence length (and with dynamic=True)
at a reshape of B/C inside selective_scan. Each layer here is stacked twice and compiled once,
static (a recompile per length) and dynamic (one symbolic graph), then run at three lengths (one of length 1,
one past the selective-scan / GLA chunk): outputs and every parameter gradient must equal eager's.
"""

from __future__ import annotations

import pytest
import torch

import linmix.nn as lnn
from conftest import assert_close

pytestmark = pytest.mark.slow

D_MODEL = 16

LAYERS = {
    "mamba": lambda: lnn.Mamba(D_MODEL, d_state=4, d_conv=4, expand=2),
    "gla": lambda: lnn.GatedLinearAttention(mode="chunk", hidden_size=D_MODEL, num_heads=2, use_short_conv=True),
    "fp_mamba": lambda: lnn.FPMamba(D_MODEL, d_state=4, mixer_rank=1, max_iter=4, tol=0.0),
    "fixed_point_rnn": lambda: lnn.FixedPointRNN(D_MODEL, rank=2, max_iter=4, tol=0.0, on_nonconvergence="ignore"),
}


class Stack(torch.nn.Module):
    """Two residual layers; layers that return tuples (GLA: (o, attn, cache)) contribute their first item."""

    def __init__(self, make):
        super().__init__()
        self.layers = torch.nn.ModuleList([make(), make()])

    def forward(self, x):
        for layer in self.layers:
            y = layer(x)
            x = x + (y[0] if isinstance(y, tuple) else y)
        return x


def _run(fn, model, x):
    """fn (model or its compiled wrapper, which shares the parameters) at x: output and parameter grads."""
    model.zero_grad(set_to_none=True)
    out = fn(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_two_layer_model_compiles_across_lengths(layer, dynamic):
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = Stack(LAYERS[layer])
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for L in (9, 70, 1):
        x = torch.randn(2, L, D_MODEL)
        out, grads = _run(model, model, x)
        out_c, grads_c = _run(compiled, model, x)
        assert_close(out_c, out, name=f"out L={L}")
        assert grads_c.keys() == grads.keys()
        for name in grads:
            assert_close(grads_c[name], grads[name], name=f"{name} L={L}")
