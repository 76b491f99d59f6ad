"""Selects the audit chain's per-entry functions: compiled, or the twin on request (see `select`)."""

from . import is_extension_module, select

implementation = select("auditentry")
bound_rows = implementation.bound_rows
canonical_head = implementation.canonical_head
canonicals_into = implementation.canonicals_into
entry_hash = implementation.entry_hash
fallbacks = implementation.fallbacks
finish_row = implementation.finish_row
link = implementation.link
log_line = implementation.log_line
log_lines = implementation.log_lines
may_hold_whole_float = implementation.may_hold_whole_float
plain_details = implementation.plain_details
prepare_rows = implementation.prepare_rows
tenants_in = implementation.tenants_in
mcp_row = implementation.mcp_row
SUCCESS, ERROR = implementation.SUCCESS, implementation.ERROR
TARGET_KINDS = implementation.TARGET_KINDS
McpDetails = implementation.McpDetails
DetailsText = implementation.DetailsText
COMPILED = is_extension_module(implementation)

__all__ = (
    "COMPILED", "ERROR", "SUCCESS", "TARGET_KINDS", "DetailsText", "McpDetails", "bound_rows", "canonical_head",
    "canonicals_into", "entry_hash", "fallbacks", "finish_row", "link", "log_line", "log_lines",
    "may_hold_whole_float", "mcp_row", "plain_details", "prepare_rows", "tenants_in",
)
