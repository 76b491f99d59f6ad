"""Authenticate a bearer credential against the snapshot (no database, no network).

Each refusal says what is wrong in words a person can act on, but never more
than the presenter has proved: "revoked", "expired" and "suspended" are only
said to someone who holds the key's secret; everyone else hears "invalid".
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from gateway.auth.keys import bearer_token, parse_key, verify_key
from gateway.dataplane.jsonrpc import FORBIDDEN, UNAUTHENTICATED, Refusal
from gateway.snapshot import KeyEntry, Snapshot

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from gateway.auth.oidc import TokenPrincipal, TokenVerifier
    from gateway.snapshot import SnapshotStore

REALM = "mcp-gateway"
# Verified against when the prefix is unknown, so a miss costs the same time as a hit.
_DUMMY_SALT = "0" * 32
_DUMMY_HASH = "0" * 64


def _challenge(error: str | None = None, description: str | None = None, scope: str | None = None) -> str:
    parts = [f'Bearer realm="{REALM}"']
    if error:
        parts.append(f'error="{error}"')
    if description:
        parts.append(f'error_description="{description}"')
    if scope:
        parts.append(f'scope="{scope}"')
    return ", ".join(parts)


def unauthenticated(message: str, error: str | None = "invalid_token") -> Refusal:
    return Refusal(401, UNAUTHENTICATED, message, headers={"WWW-Authenticate": _challenge(error, message)})


class VerifiedKeys:
    """Keys whose secret this process has already verified against the current snapshot.

    Verifying costs a parse and a SHA-256 per request; a hit here costs one dict
    lookup. Only successful verifications are remembered (a flood of bad keys
    cannot fill it), the whole cache is dropped when the snapshot changes (a
    rotated or deleted key is verified afresh), and it is bounded. Everything
    that can change per request (revoked, expired, deactivated, suspended,
    scope) is still checked on every request, from the entry.

    The cost: presented keys stay in this process's memory while they are in
    use, as they already do in request buffers.
    """

    MAX_ENTRIES = 10_000

    def __init__(self) -> None:
        self._snapshot: Snapshot | None = None
        self._entries: dict[str, KeyEntry] = {}

    def get(self, snapshot: Snapshot, token: str) -> KeyEntry | None:
        if snapshot is not self._snapshot:
            self._snapshot = snapshot
            self._entries = {}
            return None
        return self._entries.get(token)

    def put(self, token: str, entry: KeyEntry) -> None:
        if len(self._entries) >= self.MAX_ENTRIES:
            self._entries = {}
        self._entries[token] = entry


def authenticate(
    snapshot: Snapshot,
    authorization: str | None,
    scope: str,
    now: float | None = None,
    verified: VerifiedKeys | None = None,
    tokens: TokenVerifier | None = None,
) -> KeyEntry | TokenPrincipal:
    """The key presented in `Authorization`, or a Refusal (401, or 403 for scope and suspension).

    With `tokens` (configured issuers), a JWT is verified by them instead and
    becomes a `TokenPrincipal`, which has the fields of a key the data plane uses.
    """
    token = bearer_token(authorization)
    if token is None:
        raise unauthenticated(
            "Authentication required: send 'Authorization: Bearer <api key>'", error=None
        )
    if tokens is not None and token.startswith("eyJ") and token.count(".") == 2:
        # A JWS header is base64url JSON, so it starts with "eyJ"; API keys hold no dot.
        return tokens.authenticate(snapshot, token, scope, now)
    entry = verified.get(snapshot, token) if verified is not None else None
    if entry is None:
        entry = _verify(snapshot, token)
        if verified is not None:
            verified.put(token, entry)
    return _admit(snapshot, entry, scope, now)


def _verify(snapshot: Snapshot, token: str) -> KeyEntry:
    parsed = parse_key(token)
    if parsed is None:
        # Not a gateway key: an imported legacy key, found by its keyed digest (one
        # dict lookup), then proved by its salted hash like any key.
        entry = snapshot.legacy_key(token)
        if entry is None or not verify_key(token, entry.salt, entry.key_hash):
            if entry is None:
                verify_key(token, _DUMMY_SALT, _DUMMY_HASH)
            raise unauthenticated("Invalid API key")
        return entry
    entry = snapshot.keys_by_prefix.get(parsed.prefix)
    if entry is None:
        verify_key(token, _DUMMY_SALT, _DUMMY_HASH)
        raise unauthenticated("Invalid API key")
    if not verify_key(parsed.plaintext, entry.salt, entry.key_hash):
        raise unauthenticated("Invalid API key")
    return entry


def _admit(snapshot: Snapshot, entry: KeyEntry, scope: str, now: float | None) -> KeyEntry:
    if not entry.key_active:
        raise unauthenticated("This API key has been revoked")
    now = time.time() if now is None else now
    if entry.expires_at is not None and entry.expires_at <= now:
        when = datetime.fromtimestamp(entry.expires_at, timezone.utc).isoformat(timespec="seconds")
        if entry.rotated:
            raise unauthenticated(f"This API key was rotated and its grace period ended at {when}; use its replacement")
        raise unauthenticated(f"This API key expired at {when}; ask an admin for a new one")
    if not entry.user_active:
        raise unauthenticated("The user this API key belongs to is deactivated")
    tenant = snapshot.tenants.get(entry.tenant_id)
    if tenant is None or tenant.status != "active":
        raise Refusal(403, FORBIDDEN, "This key's tenant is suspended; contact the gateway operator")
    if scope not in entry.scopes:
        raise Refusal(
            403,
            FORBIDDEN,
            f"This API key lacks the '{scope}' scope needed here",
            headers={"WWW-Authenticate": _challenge("insufficient_scope", None, scope)},
        )
    return entry


class RetryAfterFetch(Refusal):
    """A refusal that may not stand: the credential needs something this process can fetch first.

    Raised by `TokenVerifier` for a token signed with a key the gateway does not
    hold yet; `fetch()` gets it (False when not allowed now, or failed).
    """

    def __init__(self, refusal: Refusal, fetch: Callable[[], Awaitable[bool]]) -> None:
        super().__init__(refusal.http_status, refusal.code, refusal.message, headers=refusal.headers)
        self.fetch = fetch


async def authenticate_request(
    store: SnapshotStore,
    authorization: str | None,
    scope: str,
    *,
    verified: VerifiedKeys | None = None,
    tokens: TokenVerifier | None = None,
) -> KeyEntry | TokenPrincipal:
    """`authenticate` for a request that can wait: one fetch of an issuer's keys when a
    token needs it, and challenges that point at the protected-resource metadata."""
    try:
        try:
            return authenticate(store.current, authorization, scope, verified=verified, tokens=tokens)
        except RetryAfterFetch as pending:
            await pending.fetch()  # fetched or not, the second answer stands (no fetch is allowed again so soon)
            return authenticate(store.current, authorization, scope, verified=verified, tokens=tokens)
    except Refusal as refusal:
        if tokens is not None:
            tokens.challenge(refusal)
        raise
