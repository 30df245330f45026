"""Drop-in sequence-mixing layers built on linmix's ops (mamba-ssm's and flash-linear-attention's names)."""

from .cache import InferenceParams, RecurrentCache
from .mamba import Mamba

__all__ = [
    "InferenceParams",
    "Mamba",
    "RecurrentCache",
]
