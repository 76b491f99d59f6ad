"""Selects the record writer's intake: compiled, or the twin on request (see `select`)."""

from . import is_extension_module, select

implementation = select("intake")
Intake = implementation.Intake
CallRecorder = implementation.CallRecorder
INT32_MAX = implementation.INT32_MAX
COMPILED = is_extension_module(implementation)

__all__ = ("COMPILED", "INT32_MAX", "CallRecorder", "Intake")
