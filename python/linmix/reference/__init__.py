"""Float64 PyTorch references: the specification every kernel is tested against."""

from .linear_scan import linear_scan_ref
from .selective_scan import selective_scan_ref

__all__ = ["linear_scan_ref", "selective_scan_ref"]
