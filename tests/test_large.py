"""64-bit indexing: with more than 2**31 elements in a tensor, the last batch element's outputs and input
gradients must equal those of the same op run on that batch element alone (whose offsets fit in 32 bits).
The large cases need a GPU with tens of GB free; the same check at small sizes runs everywhere, so the
test code itself is exercised in CI."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

import linmix
from conftest import HAS_CUDA

BIG = 2**31 + 2**21  # elements in the largest input of a "big" case


def _last_element_matches(fn, inputs: dict, batched: set[str], grads: set[str]) -> None:
    """fn(**inputs) -> output tensor (batch first). Compare output[-1] and the batched inputs' gradients of
    sum(w * output[-1]) between the full batch and the last batch element alone."""

    def run(x):
        leaves = {k: v.detach().requires_grad_(k in grads) for k, v in x.items()}
        out = fn(**leaves)
        last = out[-1]
        w = torch.randn(last.shape, device=last.device, generator=torch.Generator(last.device).manual_seed(1))
        g = torch.autograd.grad((last.float() * w).sum(), [leaves[k] for k in sorted(grads)])
        return last.detach(), {k: gi[-1] if k in batched else None for k, gi in zip(sorted(grads), g)}

    full_out, full_g = run(inputs)
    one_out, one_g = run({k: v[-1:] if k in batched else v for k, v in inputs.items()})
    torch.testing.assert_close(full_out, one_out)
    for k in batched & grads:
        torch.testing.assert_close(full_g[k], one_g[k], msg=lambda m, k=k: f"d{k}: {m}")


def _need(case: str, gbytes: float):
    if case == "small":
        return "cpu"
    if not HAS_CUDA:
        pytest.skip("needs a GPU")
    gc.collect()
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    if free < gbytes * 2**30:
        pytest.skip(f"needs {gbytes} GB of free GPU memory, {free / 2**30:.0f} GB free")
    return "cuda"


# The big cases share one xdist worker (`--dist loadgroup`) so that two never hold the GPU's memory at once.
CASES = ["small", pytest.param("big", marks=pytest.mark.xdist_group("gpu_memory"))]


@pytest.mark.parametrize("case", CASES)
def test_linear_scan(case):
    dev = _need(case, 40)
    B, T, D = (3, 37, 40) if case == "small" else (2, 2**20, BIG // 2**21 + 1)
    dt = torch.float32 if case == "small" else torch.bfloat16
    torch.manual_seed(0)
    x = {"a": torch.rand(B, T, D, device=dev, dtype=dt), "b": torch.randn(B, T, D, device=dev, dtype=dt)}
    _last_element_matches(linmix.linear_scan, x, {"a", "b"}, {"a", "b"})


@pytest.mark.parametrize("case", CASES)
def test_selective_scan(case):
    dev = _need(case, 50)
    b, d, n, L = (3, 8, 4, 37) if case == "small" else (2, 1024, 1, BIG // 2048 + 1)
    dt = torch.float32 if case == "small" else torch.bfloat16
    torch.manual_seed(0)
    x = {
        "u": torch.randn(b, d, L, device=dev, dtype=dt),
        "delta": (0.1 * torch.rand(b, d, L, device=dev)).to(dt),
        "A": -torch.rand(d, n, device=dev) - 0.5,
        "B": torch.randn(b, n, L, device=dev, dtype=dt),
        "C": torch.randn(b, n, L, device=dev, dtype=dt),
        "z": torch.randn(b, d, L, device=dev, dtype=dt),
    }
    _last_element_matches(linmix.selective_scan, x, {"u", "delta", "B", "C", "z"}, {"u", "delta", "B", "C", "z"})


@pytest.mark.parametrize("case", CASES)
def test_chunk_gla(case):
    dev = _need(case, 50)
    # V is small so that the backward's per-chunk fp32 states stay small; q, k, g carry the large offsets
    B, T, H, K, V = (3, 70, 2, 8, 4) if case == "small" else (2, 2**17, 64, BIG // 2**24 + 1, 16)
    dt = torch.float32 if case == "small" else torch.bfloat16
    torch.manual_seed(0)
    x = {n: torch.randn(B, T, H, K, device=dev, dtype=dt) for n in ("q", "k")}
    x["v"] = torch.randn(B, T, H, V, device=dev, dtype=dt)
    x["g"] = (F.logsigmoid(torch.randn(B, T, H, K, device=dev)) / 16).to(dt)
    names = {"q", "k", "v", "g"}
    _last_element_matches(lambda **kw: linmix.chunk_gla(**kw)[0], x, names, names)


@pytest.mark.parametrize("case", CASES)
def test_fixed_point_rnn(case):
    dev = _need(case, 70)
    B, T, D = (3, 37, 24) if case == "small" else (2, 2**20, BIG // 2**21 + 1)
    dt = torch.float32 if case == "small" else torch.bfloat16
    torch.manual_seed(0)
    x = {
        "u": torch.randn(B, T, D, device=dev, dtype=dt),
        "lam": torch.sigmoid(torch.randn(B, T, D, device=dev) + 2).to(dt),
        "hh_u": F.normalize(torch.randn(B, T, 1, D, device=dev), dim=-1).to(dt),
        "hh_beta": torch.rand(B, T, 1, device=dev).to(dt),
    }
    names = {"u", "lam", "hh_u", "hh_beta"}
    _last_element_matches(lambda **kw: linmix.fixed_point_rnn(**kw, max_iter=3, tol=0.0), x, names, names)
