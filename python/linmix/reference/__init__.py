"""Float64 PyTorch references: the specification every kernel is tested against."""

from .fixed_point_rnn import fixed_point_dense_ref, fixed_point_iter_ref, fixed_point_solve_ref, fixed_point_step_ref
from .gla import gla_chunked_ref, gla_ref
from .linear_scan import linear_scan_ref
from .selective_scan import selective_scan_ref, selective_state_update_ref

__all__ = [
    "fixed_point_dense_ref",
    "fixed_point_iter_ref",
    "fixed_point_solve_ref",
    "fixed_point_step_ref",
    "gla_chunked_ref",
    "gla_ref",
    "linear_scan_ref",
    "selective_scan_ref",
    "selective_state_update_ref",
]
