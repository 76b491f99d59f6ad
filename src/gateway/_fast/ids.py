"""Selects the record row id source and clock: compiled, or the twin on request (see `select`)."""

from . import is_extension_module, select

implementation = select("ids")
RowIds = implementation.RowIds
utc_now = implementation.utc_now
utc_at = implementation.utc_at
COMPILED = is_extension_module(implementation)

__all__ = ("COMPILED", "RowIds", "utc_at", "utc_now")
