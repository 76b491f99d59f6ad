"""Selects the audit body screen implementation: compiled, or the twin on request (see `select`)."""

from . import is_extension_module, select

implementation = select("screen")
Screen = implementation.Screen
FOLDED_MARKERS = implementation.FOLDED_MARKERS
COMPILED = is_extension_module(implementation)

__all__ = ("COMPILED", "FOLDED_MARKERS", "Screen")
