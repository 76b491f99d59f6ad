"""Selects the circuit breaker implementation: compiled, or the twin on request (see `select`)."""

from . import is_extension_module, select

implementation = select("breaker")
CircuitBreaker = implementation.CircuitBreaker
CLOSED, OPEN, HALF_OPEN = implementation.CLOSED, implementation.OPEN, implementation.HALF_OPEN
STATE_NAMES, REFUSED, ADMITTED = implementation.STATE_NAMES, implementation.REFUSED, implementation.ADMITTED
COMPILED = is_extension_module(implementation)

__all__ = ("ADMITTED", "CLOSED", "COMPILED", "HALF_OPEN", "OPEN", "REFUSED", "STATE_NAMES", "CircuitBreaker")
