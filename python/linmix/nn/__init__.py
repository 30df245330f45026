"""Drop-in sequence-mixing layers built on linmix's ops (mamba-ssm's and flash-linear-attention's names)."""

from .cache import InferenceParams, RecurrentCache
from .gla import GatedLinearAttention
from .mamba import Mamba

__all__ = [
    "GatedLinearAttention",
    "InferenceParams",
    "Mamba",
    "RecurrentCache",
]
