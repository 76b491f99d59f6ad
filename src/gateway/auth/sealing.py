"""Keys derived from the gateway's secret: sealing upstream credentials, finding imported legacy keys.

One secret (`[secrets] key`, or one generated once and kept in the
`gateway_secrets` table) gives two independent keys through HKDF, each under
its own label:

- `CredentialSealer`: AES-GCM over an upstream server's credential (header
  value, OAuth client secret), bound to the server's id as associated data, so
  a sealed value copied onto another server's row does not open. The sealed
  text names the key it was sealed under (a short fingerprint), so a gateway
  started with another secret says so instead of failing obscurely.
- `LegacyKeyDigest`: HMAC-SHA256 of a presented legacy API key. It is the
  lookup digest stored for an imported key: a keyed digest, so a copy of the
  table alone cannot be used to test guesses against it.

What must not happen here: logging, or returning plaintext anywhere but to the
caller that asked for it. Changing the secret makes every sealed credential
and every imported legacy key unusable until they are set again.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
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

SEALED_PREFIX = "gwc1"
_SECRET_NAME = "secrets_key"
_CREDENTIALS_INFO = b"mcp-gateway upstream credentials v1"
_LEGACY_INFO = b"mcp-gateway legacy key lookup v1"


class SealError(Exception):
    """A sealed value cannot be opened (another key, tampered with, or not ours)."""


def _derive(secret: str, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret.encode())


class CredentialSealer:
    def __init__(self, secret: str) -> None:
        key = _derive(secret, _CREDENTIALS_INFO)
        self._aead = AESGCM(key)
        # Names the key in every sealed value; reveals nothing of it (a hash of the derived key).
        self.key_id = hashlib.sha256(b"key id" + key).hexdigest()[:8]

    def seal(self, plaintext: bytes, owner: uuid.UUID) -> str:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, plaintext, _CREDENTIALS_INFO + owner.bytes)
        data = base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode("ascii")
        return f"{SEALED_PREFIX}.{self.key_id}.{data}"

    def open(self, sealed: str, owner: uuid.UUID) -> bytes:
        version, _, rest = sealed.partition(".")
        key_id, _, data = rest.partition(".")
        if version != SEALED_PREFIX or not data:
            raise SealError("not a sealed credential of this gateway")
        if key_id != self.key_id:
            raise SealError(
                f"sealed under another secrets.key (key id {key_id}; this gateway's is {self.key_id}): "
                "set the credential again, or start the gateway with the key it was sealed under"
            )
        try:
            raw = base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
            return self._aead.decrypt(raw[:12], raw[12:], _CREDENTIALS_INFO + owner.bytes)
        except (ValueError, InvalidTag):
            raise SealError("the sealed credential does not open (tampered with, or not this server's)") from None


class LegacyKeyDigest:
    def __init__(self, secret: str) -> None:
        self._key = _derive(secret, _LEGACY_INFO)

    def __call__(self, token: str) -> str:
        return hmac.new(self._key, token.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()


class GatewaySecrets:
    """Everything derived from the gateway's secret, built once at start-up."""

    def __init__(self, secret: str) -> None:
        self.credentials = CredentialSealer(secret)
        self.legacy_digest = LegacyKeyDigest(secret)


async def load_secrets(engine: AsyncEngine, configured: str = "") -> GatewaySecrets:
    """The configured `secrets.key`, or the one kept in the database (created by whichever process asks first)."""
    return GatewaySecrets(configured or await _stored_secret(engine))


async def _stored_secret(engine: AsyncEngine) -> str:
    query = sa.select(gateway_secrets.c.value).where(gateway_secrets.c.name == _SECRET_NAME)
    async with engine.connect() as conn:
        value = (await conn.execute(query)).scalar()
    if value is not None:
        return value
    try:
        async with engine.begin() as conn:
            await conn.execute(
                sa.insert(gateway_secrets).values(
                    name=_SECRET_NAME, value=secrets.token_urlsafe(48), created_at=utcnow()
                )
            )
    except IntegrityError:
        pass  # another process won the race; read its secret
    async with engine.connect() as conn:
        return (await conn.execute(query)).scalar_one()
