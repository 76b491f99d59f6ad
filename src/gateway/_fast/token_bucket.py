"""Selects the token bucket implementation: compiled, or the twin on request (see `select`)."""

from . import is_extension_module, select

implementation = select("token_bucket")
TokenBucket = implementation.TokenBucket
COMPILED = is_extension_module(implementation)

__all__ = ("COMPILED", "TokenBucket")
