"""linmix: handwritten CUDA and C++ kernels for linear sequence mixers."""

from ._native import build_info, kernels
from .ops.fixed_point_rnn import FixedPointConvergenceError, FixedPointConvergenceWarning, fixed_point_rnn
from .ops.gla import chunk_gla, fused_recurrent_gla
from .ops.linear_scan import linear_scan
from .ops.selective_scan import selective_scan, selective_scan_fn, selective_state_update

__version__ = "0.1.0"

__all__ = [
    "FixedPointConvergenceError",
    "FixedPointConvergenceWarning",
    "build_info",
    "chunk_gla",
    "fixed_point_rnn",
    "fused_recurrent_gla",
    "kernels",
    "linear_scan",
    "selective_scan",
    "selective_scan_fn",
    "selective_state_update",
]
