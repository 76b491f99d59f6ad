"""Selects the record row id source: compiled, or the twin on request (see `select`)."""

from . import is_extension_module, select

implementation = select("ids")
RowIds = implementation.RowIds
COMPILED = is_extension_module(implementation)

__all__ = ("COMPILED", "RowIds")
