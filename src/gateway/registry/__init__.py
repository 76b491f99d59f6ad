"""Upstream servers: registration, capability discovery, health."""
