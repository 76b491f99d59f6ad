"""Selects the deficit round robin implementation: compiled, or the twin on request (see `select`)."""

from . import is_extension_module, select

implementation = select("fairness")
DeficitRoundRobin = implementation.DeficitRoundRobin
COMPILED = is_extension_module(implementation)

__all__ = ("COMPILED", "DeficitRoundRobin")
