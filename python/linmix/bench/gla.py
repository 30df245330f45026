"""chunk_gla bench: gated linear attention, q, k, g (B, T, H, K), v (B, T, H, V), against flash-linear-attention's
Triton kernels and causal softmax attention through SDPA (CUDA: flash and cuDNN backends; CPU: PyTorch's CPU flash
kernel and the math backend) at the same B, T, H, D."""

from __future__ import annotations

import inspect

import torch

import linmix
import linmix.reference as R
from linmix import _C
from linmix._cases import CHUNK_GLA

from .baselines import BenchOp, Impl, linmix_impl, loop_reference, optional, sdpa_impls

CHUNK = _C.gla_chunk  # kGlaChunk: the chunk size the floor's flop count assumes


def _cfg(B, T, H, D, dtype, in_sweep=False):
    return dict(B=B, T=T, H=H, K=D, V=D, dtype=dtype, in_sweep=in_sweep)


def configs(device: str, quick: bool) -> list[dict]:
    if device == "cuda":
        bf = torch.bfloat16
        fixed = [(1, 8192, 96, 128), (2, 16384, 16, 128), (4, 2048, 16, 128), (4, 4096, 64, 128), (8, 2048, 32, 256), (8, 1024, 8, 64)]
        Ts = [2048, 8192] if quick else [1024, 2048, 4096, 8192, 16384, 32768]
        fixed = fixed[2:3] if quick else fixed
        # T sweep at H * D = 2048 with 16K tokens per batch (B = 16384 / T, at least 1)
        return [_cfg(*s, bf) for s in fixed] + [_cfg(max(1, 16384 // T), T, 16, 128, bf, True) for T in Ts]
    # CPU: H = 8 heads, K = V in {64, 128}, fp32 and bf16; the plotted sweep is D = 128 in fp32
    if quick:
        return [_cfg(1, T, 8, D, dt, D == 128 and dt == torch.float32)
                for D, T in ((64, 256), (128, 512)) for dt in (torch.float32, torch.bfloat16)]
    return [_cfg(1, T, 8, D, dt, D == 128 and dt == torch.float32)
            for D in (64, 128) for dt in (torch.float32, torch.bfloat16) for T in (256, 2048, 8192)]


def small(cfg: dict) -> dict:
    return dict(cfg, B=1, T=min(cfg["T"], 150), H=min(cfg["H"], 2))


def _fla(attr: str, device: str) -> Impl:
    fn, why = optional("fla.ops.gla", attr)
    if fn is None or device != "cuda":
        return Impl(f"fla {attr}", skip=why or "flash-linear-attention is Triton: CUDA only")
    # (B, T, H, K) is fla's default layout; older releases take head_first and default it to True
    kw = {"head_first": False} if "head_first" in inspect.signature(fn).parameters else {}
    return Impl(f"fla {attr}", lambda x: fn(x["q"], x["k"], x["v"], x["g"], **kw)[0])


def _states_gb(cfg: dict) -> float:
    return cfg["B"] * cfg["T"] * cfg["H"] * cfg["K"] * cfg["V"] * 8 / 1e9  # autograd keeps every float64 state


def _chunked_when(cfg: dict, device: str) -> str | None:
    return "chunked PyTorch timed only at T <= 2048 on the CPU" if device == "cpu" and cfg["T"] > 2048 else None


def _recurrent_when(cfg: dict, device: str) -> str | None:
    return "fused_recurrent timed only at T <= 8192" if cfg["T"] > 8192 else None


def impls(device: str) -> list[Impl]:
    return [
        linmix_impl("linmix", linmix.chunk_gla),
        linmix_impl("linmix fused_recurrent_gla", linmix.fused_recurrent_gla, when=_recurrent_when),
        _fla("chunk_gla", device),
        _fla("fused_recurrent_gla", device),
        *sdpa_impls(device),
        Impl("torch chunked (fp32)", lambda x: R.gla_chunked_ref(x["q"], x["k"], x["v"], x["g"]), when=_chunked_when,
             quick=False),
        loop_reference(CHUNK_GLA, cuda_limit=2048, cpu_limit=128, gb=_states_gb),
    ]


def cost(cfg: dict, mode: str) -> dict:
    """Per token and head, chunk C = 64. fwd: read q, k, g (K each) and v (V), write o (V); matmul flops
    C (K + V) (causal half of the intra-chunk scores and values) + 4 K V (q S and the state update);
    2 K exponentials (gate rescaling of q and k). bwd: read q, k, g, v, do, write dq, dk, dg, dv; matmul flops
    2 x forward + 2 K V (recomputed states); 4 K exponentials."""
    BTH, K, V, s, C = cfg["B"] * cfg["T"] * cfg["H"], cfg["K"], cfg["V"], cfg["dtype"].itemsize, CHUNK
    fwd = {"bytes": BTH * (3 * K + 2 * V) * s, "tc_flops": BTH * (C * (K + V) + 4 * K * V), "sfu": 2 * BTH * K}
    if mode == "fwd":
        return fwd
    return {
        "bytes": fwd["bytes"] + BTH * (6 * K + 3 * V) * s,
        "tc_flops": 3 * fwd["tc_flops"] + 2 * BTH * K * V,
        "sfu": 3 * fwd["sfu"],
    }


OP = BenchOp(CHUNK_GLA, kernels="linmix_gla_", shape=("B", "T", "H", "K", "V"), sweep="T", configs=configs,
             choices=lambda cfg: {}, small=small, impls=impls, cost=cost)
