"""Selects the per-server call windows: compiled, or the twin on request (see `select`)."""

from . import is_extension_module, select

implementation = select("windows")
CallWindows = implementation.CallWindows
Window = implementation.Window
SAMPLES = implementation.SAMPLES
COMPILED = is_extension_module(implementation)

__all__ = ("COMPILED", "SAMPLES", "CallWindows", "Window")
