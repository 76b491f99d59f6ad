"""Session ids the gateway hands out for upstream (2025-era) sessions.

An upstream answers `initialize` with its own `Mcp-Session-Id`. The gateway
never shows that id to the client: it gives out a sealed token instead,
AES-GCM over (API key id, server id, upstream session id). Any gateway process
holding the same secret can open it, so a client may alternate between
replicas request by request and keep one session, with no shared session
store and no lookup on the request path. A token presented with another key
or for another server opens to a mismatch and is answered like an unknown
session (404), so a leaked session id is useless to anyone else.

Why sealed and not a Redis map: one decryption (microseconds) instead of a
network round trip per request, nothing to expire or clean up, and nothing to
lose when Redis restarts. The cost: a session cannot be revoked alone before
its upstream ends it (revoking the key does it, since the key is checked on
every request).
"""

from __future__ import annotations

import base64
import os
import secrets
import uuid

import sqlalchemy as sa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.db.tables import gateway_secrets, utcnow

TOKEN_PREFIX = "gws1."
_AAD = b"mcp-gateway session v1"
_SECRET_NAME = "session_key"


class SessionSealer:
    # Tokens opened recently: a token is authenticated ciphertext, so it always
    # opens to the same contents; remembering them saves an AES-GCM open (about
    # 10 us) on every request of a session. Bounded; owner checks still run.
    MAX_OPENED = 10_000

    def __init__(self, secret: str) -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_AAD).derive(secret.encode())
        self._aead = AESGCM(key)
        self._opened: dict[str, bytes] = {}

    def seal(self, upstream_session_id: str, key_id: uuid.UUID, server_id: uuid.UUID) -> str:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, key_id.bytes + server_id.bytes + upstream_session_id.encode(), _AAD)
        return TOKEN_PREFIX + base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode("ascii")

    def open(self, token: str, key_id: uuid.UUID, server_id: uuid.UUID) -> str | None:
        """The upstream session id, or None if the token is not one of ours for this key and server."""
        plain = self._opened.get(token)
        if plain is None:
            if not token.startswith(TOKEN_PREFIX) or len(token) > 2048:
                return None
            data = token[len(TOKEN_PREFIX) :]
            try:
                raw = base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
                plain = self._aead.decrypt(raw[:12], raw[12:], _AAD)
            except (ValueError, InvalidTag):
                return None
            if len(self._opened) >= self.MAX_OPENED:
                self._opened = {}
            self._opened[token] = plain
        if plain[:16] != key_id.bytes or plain[16:32] != server_id.bytes:
            return None
        try:
            return plain[32:].decode()
        except UnicodeDecodeError:  # pragma: no cover - we sealed it ourselves
            return None


async def shared_secret(engine: AsyncEngine) -> str:
    """The session secret kept in the database, created by whichever process asks first."""
    async with engine.begin() as conn:
        value = (
            await conn.execute(sa.select(gateway_secrets.c.value).where(gateway_secrets.c.name == _SECRET_NAME))
        ).scalar()
    if value is not None:
        return value
    try:
        async with engine.begin() as conn:
            await conn.execute(
                sa.insert(gateway_secrets).values(name=_SECRET_NAME, value=secrets.token_urlsafe(48), created_at=utcnow())
            )
    except IntegrityError:
        pass  # another process won the race; read its secret
    async with engine.connect() as conn:
        return (
            await conn.execute(sa.select(gateway_secrets.c.value).where(gateway_secrets.c.name == _SECRET_NAME))
        ).scalar_one()
