"""Selects the binary COPY encoder implementation: compiled, or the twin on request (see `select`)."""

from . import is_extension_module, select

implementation = select("pgcopy")
encode = implementation.encode
KIND_NAMES = implementation.KIND_NAMES
UUID, TEXT, INT4, INT8, FLOAT8, TIMESTAMPTZ, JSONB = (
    implementation.UUID, implementation.TEXT, implementation.INT4, implementation.INT8, implementation.FLOAT8,
    implementation.TIMESTAMPTZ, implementation.JSONB,
)
COMPILED = is_extension_module(implementation)

__all__ = ("COMPILED", "FLOAT8", "INT4", "INT8", "JSONB", "KIND_NAMES", "TEXT", "TIMESTAMPTZ", "UUID", "encode")
