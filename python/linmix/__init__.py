"""linmix: handwritten CUDA and C++ kernels for linear sequence mixers."""

from ._native import build_info
from .ops.fixed_point import fixed_point_rnn
from .ops.linear_scan import linear_scan

__version__ = "0.1.0"

__all__ = ["build_info", "fixed_point_rnn", "linear_scan"]
