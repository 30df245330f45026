"""Drop-in sequence-mixing layers built on linmix's ops (mamba-ssm's and flash-linear-attention's names)."""

from .cache import InferenceParams, RecurrentCache
from .conv import ShortConvolution
from .fixed_point_rnn import FixedPointRNN
from .fp_mamba import FPMamba, FPMambaState
from .gla import GatedLinearAttention
from .mamba import Mamba
from .norm import RMSNorm

__all__ = [
    "FPMamba",
    "FPMambaState",
    "FixedPointRNN",
    "GatedLinearAttention",
    "InferenceParams",
    "Mamba",
    "RMSNorm",
    "RecurrentCache",
    "ShortConvolution",
]
