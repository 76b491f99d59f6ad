"""Selects the audit chain's per-entry functions: compiled, or the twin on request (see `select`)."""

from . import is_extension_module, select

implementation = select("auditchain")
canonical_head = implementation.canonical_head
entry_hash = implementation.entry_hash
link = implementation.link
may_hold_whole_float = implementation.may_hold_whole_float
COMPILED = is_extension_module(implementation)

__all__ = ("COMPILED", "canonical_head", "entry_hash", "link", "may_hold_whole_float")
