"""What an op's bench and an implementation are, and the baselines more than one op uses: the float64 loop
reference, a vectorised PyTorch scan, PyTorch SDPA pinned to one backend, flash-linear-attention and mamba-ssm
(each skipped with a reason when absent)."""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from linmix._cases import Case, make

Inputs = dict  # the op's keyword arguments (linmix._cases.make)


@dataclass
class Impl:
    """One implementation of an op. `fn(inputs) -> output tensor` runs it; `skip` says why it cannot run here.

    `ref` / `cost` replace the op's reference and cost when the implementation computes something else (SDPA);
    `when(cfg, device)` returns a reason to skip one configuration (memory, a slow loop at long lengths);
    `modes` lists the timed modes it takes part in; `variant` names a mode of the op (fixed_point_rnn's grad_mode)
    so speed-ups compare like with like; `grads` replaces the op's differentiated inputs when the
    implementation uses only some of them (SDPA has no gate g)."""

    name: str
    fn: Callable[[Inputs], torch.Tensor] | None = None
    skip: str | None = None
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")
    ref: Callable[[Inputs], torch.Tensor] | None = None
    cost: Callable[[dict, str], dict] | None = None
    when: Callable[[dict, str], str | None] | None = None
    variant: str = ""
    grads: tuple[str, ...] | None = None

    @property
    def label(self) -> str:
        return f"{self.name} [{self.variant}]" if self.variant else self.name


def linmix_impl(name: str, op: Callable, options: dict | None = None, **kw) -> Impl:
    """linmix's own op on the inputs (plus `options`), its first output."""
    def fn(x):
        out = op(**x, **(options or {}))
        return out[0] if isinstance(out, tuple) else out

    return Impl(name, fn, **kw)


def loop_reference(case: Case, cuda_limit: int, cpu_limit: int, gb: Callable[[dict], float] | None = None) -> Impl:
    """The float64 reference timed as a baseline: a plain loop over time whose autograd graph grows with every
    step, so it runs only up to a length per device (and below 16 GB of states, `gb(cfg)`, where given)."""
    def when(cfg: dict, device: str) -> str | None:
        limit = cuda_limit if device == "cuda" else cpu_limit
        if cfg[case.time] > limit:
            return f"float64 loop reference timed only at {case.time} <= {limit}"
        size = gb(cfg) if gb else 0.0
        return f"float64 loop reference would keep {size:.0f} GB of states" if size > 16 else None

    def fn(x):
        dtype = next(v.dtype for v in x.values() if torch.is_tensor(v))
        return case.reference(**x)[0].to(dtype)

    return Impl("torch reference (float64 loop)", fn, when=when)


@dataclass(frozen=True)
class BenchOp:
    """One op's bench: its case (linmix._cases: inputs, reference, differentiable inputs), the configurations
    timed and how each is called, the implementations compared, and the cost model of its floor.

    configs(device, quick) gives the configurations: the case's sizes by name, plus "dtype" (and "in_sweep":
    False keeps a configuration out of the plotted sweep over `sweep`); `shape` names the sizes shown.
    choices(cfg) gives linmix._cases.make's choices for a configuration (which optional inputs and options).
    small(cfg) is the configuration the correctness check runs at; check_grad says whether it compares input
    gradients too. cost(cfg, mode) gives bytes / flops / sfu for floors.floor_ms; annotate, if given, adds
    op-specific columns to the finished rows. `kernels` is the ncu --kernel-name regex of the op's kernels."""

    case: Case
    kernels: str
    shape: tuple[str, ...]
    sweep: str
    configs: Callable[[str, bool], list[dict]]
    choices: Callable[[dict], dict]
    small: Callable[[dict], dict]
    impls: Callable[[str], list[Impl]]
    cost: Callable[[dict, str], dict]
    check_grad: bool = True
    annotate: Callable[[list[dict]], None] | None = None

    @property
    def name(self) -> str:
        return self.case.name

    def make_inputs(self, cfg: dict, device: str, seed: int = 0) -> Inputs:
        sizes = {k: v for k, v in cfg.items() if k in self.case.sizes}
        return make(self.case, device, cfg["dtype"], seed=seed, sizes=sizes, **self.choices(cfg))

    def reference(self, x: Inputs) -> torch.Tensor:
        return self.case.reference(**x)[0]

    def grads(self, x: Inputs) -> tuple[str, ...]:
        """The inputs whose gradients fwd+bwd computes."""
        return tuple(n for n in self.case.grads if x.get(n) is not None)

    def tokens(self, cfg: dict) -> int:
        return cfg[self.case.batch] * (cfg[self.case.time] if self.case.time else 1)


def optional(module: str, attr: str):
    """(object, None) or (None, one-line reason)."""
    try:
        return getattr(importlib.import_module(module), attr), None
    except Exception as e:  # ImportError, or a broken install raising anything at import
        return None, f"{module}.{attr} unavailable ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"


def scan_torch(a: torch.Tensor, b: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """h_t = a_t h_{t-1} + b_t along `dim`, loop-free up to log2(T) doubling steps (Hillis-Steele), in fp32."""
    a, b = a.float().movedim(dim, -1), b.float().movedim(dim, -1)
    T, s = a.shape[-1], 1
    while s < T:
        # (a, b)_t <- (a_t a_{t-s}, a_t b_{t-s} + b_t) for t >= s: out-of-place so autograd keeps every step.
        b = torch.cat([b[..., :s], torch.addcmul(b[..., s:], a[..., s:], b[..., :-s])], dim=-1)
        a = torch.cat([a[..., :s], a[..., s:] * a[..., :-s]], dim=-1)
        s *= 2
    return b.movedim(-1, dim)


def sdpa_impls(device: str) -> list[Impl]:
    """Causal softmax attention through SDPA pinned to FLASH_ATTENTION and to CUDNN_ATTENTION, fed (B, T, H, D)
    tensors: the transposes to SDPA's (B, H, T, D) and back (made contiguous) are charged to SDPA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(backend):
        def fn(x):
            with sdpa_kernel([backend]):
                o = F.scaled_dot_product_attention(
                    x["q"].transpose(1, 2), x["k"].transpose(1, 2), x["v"].transpose(1, 2), is_causal=True
                )
            return o.transpose(1, 2).contiguous()

        return fn

    out = []
    for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
        if device != "cuda":
            out.append(Impl(name, skip="SDPA flash/cuDNN backends need CUDA"))
            continue
        out.append(Impl(name, run(backend), ref=attention_ref, cost=sdpa_cost, when=_sdpa_when, grads=("q", "k", "v")))
    return out


def _sdpa_when(cfg: dict, device: str) -> str | None:
    if cfg["K"] != cfg["V"]:
        return "SDPA needs the key and value head dims equal"
    return None


def attention_ref(x: Inputs) -> torch.Tensor:
    """Causal softmax attention in float64, (B, T, H, D) in and out."""
    q, k, v = (x[n].double().transpose(1, 2) for n in ("q", "k", "v"))
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    T = s.shape[-1]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


def sdpa_cost(cfg: dict, mode: str) -> dict:
    """Causal attention: q, k, v read and o written once; 2 B H T^2 D matmul flops forward (half of the full
    4 B H T^2 D), backward 2.5x forward (five matmuls against two); B H T^2 / 2 exponentials per pass."""
    B, T, H, D, s = cfg["B"], cfg["T"], cfg["H"], cfg["K"], cfg["dtype"].itemsize
    fwd = {"bytes": 4 * B * T * H * D * s, "tc_flops": 2 * B * H * T * T * D, "sfu": B * H * T * T / 2}
    if mode == "fwd":
        return fwd
    return {
        "bytes": fwd["bytes"] + 8 * B * T * H * D * s,  # backward: q, k, v, o, do read; dq, dk, dv written
        "tc_flops": 3.5 * fwd["tc_flops"],
        "sfu": 2 * fwd["sfu"],
    }
