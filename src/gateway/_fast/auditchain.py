"""Selects the audit chain linker: compiled, or the twin on request (see `select`)."""

from . import is_extension_module, select

implementation = select("auditchain")
entry_hash = implementation.entry_hash
link = implementation.link
COMPILED = is_extension_module(implementation)

__all__ = ("COMPILED", "entry_hash", "link")
