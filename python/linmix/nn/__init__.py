"""Sequence-mixing layers built on linmix's ops."""

from .fixed_point import FixedPointRNN

__all__ = ["FixedPointRNN"]
