"""Float64 PyTorch references: the specification every kernel is tested against."""

from .gla import gla_ref
from .linear_scan import linear_scan_ref
from .selective_scan import selective_scan_ref

__all__ = ["gla_ref", "linear_scan_ref", "selective_scan_ref"]
