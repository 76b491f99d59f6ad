"""Selects the binary COPY encoder: compiled, or the twin on request (see `select`)."""

from . import is_extension_module, select

implementation = select("pgcopy")
encode = implementation.encode
sqlite_rows = implementation.sqlite_rows
KINDS = implementation.KINDS
COMPILED = is_extension_module(implementation)

__all__ = ("COMPILED", "KINDS", "encode", "sqlite_rows")
