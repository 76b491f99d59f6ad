"""API keys: minting, hashing and verification.

A key reads `gw_<prefix>_<secret>`. The prefix (10 characters) is stored in
clear and finds the row; the secret (40 base62 characters, about 238 bits)
never leaves this module except once, inside the freshly minted key. What is
stored is SHA-256 over a per-key random salt and the whole key.

Why a fast hash and not a password KDF: the secret is machine-generated with
238 bits of entropy, so guessing is hopeless whatever the hash costs, while a
KDF would add milliseconds to every authenticated request. Verification uses
`hmac.compare_digest`, so timing says nothing about how much of a hash matched.

Nothing here logs, and `ParsedKey.__repr__` hides the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
from dataclasses import dataclass

KEY_SCHEME = "gw"
PREFIX_LENGTH = 10
SECRET_LENGTH = 40
_PREFIX_ALPHABET = string.ascii_lowercase + string.digits
_SECRET_ALPHABET = string.ascii_letters + string.digits
_PREFIX_CHARS = frozenset(_PREFIX_ALPHABET)
_SECRET_CHARS = frozenset(_SECRET_ALPHABET)


@dataclass(frozen=True, slots=True)
class MintedKey:
    """A new key: `plaintext` is shown to its owner once and then forgotten."""

    plaintext: str
    prefix: str
    salt: str
    key_hash: str

    def __repr__(self) -> str:
        return f"MintedKey(prefix={self.prefix!r})"


@dataclass(frozen=True, slots=True)
class ParsedKey:
    prefix: str
    plaintext: str

    def __repr__(self) -> str:
        return f"ParsedKey(prefix={self.prefix!r})"


def hash_key(plaintext: str, salt: str) -> str:
    return hashlib.sha256(salt.encode() + plaintext.encode()).hexdigest()


def mint_key() -> MintedKey:
    prefix = "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(PREFIX_LENGTH))
    secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(SECRET_LENGTH))
    plaintext = f"{KEY_SCHEME}_{prefix}_{secret}"
    salt = secrets.token_hex(16)
    return MintedKey(plaintext=plaintext, prefix=prefix, salt=salt, key_hash=hash_key(plaintext, salt))


def parse_key(token: str) -> ParsedKey | None:
    """The prefix of a well-formed key, or None: malformed tokens never reach a lookup."""
    if len(token) != len(KEY_SCHEME) + PREFIX_LENGTH + SECRET_LENGTH + 2:
        return None
    scheme, sep1, rest = token.partition("_")
    prefix, sep2, secret = rest.partition("_")
    if scheme != KEY_SCHEME or not sep1 or not sep2:
        return None
    if len(prefix) != PREFIX_LENGTH or not _PREFIX_CHARS.issuperset(prefix):
        return None
    if len(secret) != SECRET_LENGTH or not _SECRET_CHARS.issuperset(secret):
        return None
    return ParsedKey(prefix=prefix, plaintext=token)


def verify_key(plaintext: str, salt: str, key_hash: str) -> bool:
    return hmac.compare_digest(hash_key(plaintext, salt), key_hash)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None
