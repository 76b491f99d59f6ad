"""Selects the violation counter implementation: compiled, or the twin on request (see `select`)."""

from . import is_extension_module, select

implementation = select("violations")
ViolationCounts = implementation.ViolationCounts
COMPILED = is_extension_module(implementation)

__all__ = ("COMPILED", "ViolationCounts")
