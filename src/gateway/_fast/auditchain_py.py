"""Linking a batch of audit entries into their chains: the writer's per-entry numbering and hashing
(the pure-Python twin of `auditchain_c.pyx`).

records/chain.py says what a chain is and owns the canonical form; this
module does the part the writer repeats for every entry of every batch, in
the database transaction that inserts them:

    entry_hash = SHA-256( prev_hash "|" chain_seq "|" canonical )  (lowercase hex)

`link` numbers each row after its tenant's head, hashes it and returns the
row with its chain values set. The compiled twin does the same with the
SHA-256 of the system's libcrypto called directly (hashlib's wrapper costs
about four times the hashing itself on an entry of a few hundred bytes) and
builds the rows at C level; tests/fast/test_auditchain.py holds the two to the
same rows and heads.
"""

from __future__ import annotations

import hashlib

GENESIS = "0" * 64
"""The prev_hash of a chain's first entry."""


def entry_hash(prev_hash: str, chain_seq: int, canonical: bytes) -> str:
    digest = hashlib.sha256(b"%s|%d|" % (prev_hash.encode(), chain_seq))
    digest.update(canonical)
    return digest.hexdigest()


def link(rows: list[tuple], heads: dict, canonicals: list[bytes], texts: list | None, tenant_at: int,
         details_at: int, seq_at: int) -> list[tuple]:
    """`rows` numbered and hashed after their chains' heads: each row's `chain_seq`, `prev_hash` and
    `entry_hash` at `seq_at`, `seq_at + 1`, `seq_at + 2`, and (given `texts`) its details replaced by its text.

    `heads` maps a tenant (the value at `tenant_at`; None is a chain too) to its
    last (chain_seq, entry_hash); a tenant not in it starts a chain. It is
    updated in place. `canonicals[i]` is row i's canonical form.
    """
    states: dict = {}  # tenant -> [seq, hash], by value: equal UUID objects are one chain
    # The same state by the tenant object's identity: rows of one key share one object, and a UUID's hash and
    # equality run Python code. The rows hold their tenants alive for the call, so no identity is reused.
    known: dict[int, list] = {}
    linked = []
    for i, row in enumerate(rows):
        tenant = row[tenant_at]
        state = known.get(id(tenant))
        if state is None:
            state = states.get(tenant)
            if state is None:
                seq, digest = heads.get(tenant, (0, GENESIS))
                state = states[tenant] = [seq, digest]
            known[id(tenant)] = state
        prev = state[1]
        seq = state[0] + 1
        digest = entry_hash(prev, seq, canonicals[i])
        state[0], state[1] = seq, digest
        values = list(row)
        values[seq_at], values[seq_at + 1], values[seq_at + 2] = seq, prev, digest
        if texts is not None:
            values[details_at] = texts[i]
        linked.append(tuple(values))
    for tenant, (seq, digest) in states.items():
        heads[tenant] = (seq, digest)
    return linked


__all__ = ("GENESIS", "entry_hash", "link")
