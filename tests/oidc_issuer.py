"""A real OpenID Connect issuer for the tests: discovery document, JWKS, and tokens it signs.

An aiohttp server on a free 127.0.0.1 port, in the test's own event loop. It
generates its keys (RSA 2048 and EC P-256) when started and on `rotate()`,
serves `/.well-known/openid-configuration` and `/jwks`, counts the JWKS
fetches, and mints tokens with PyJWT. With `entra=True` it looks like
Microsoft Entra ID v2.0 instead: the issuer is `<base>/<tid>/v2.0`, the
document sits under it and points at `<base>/<tid>/discovery/v2.0/keys`.

Nothing is patched in the gateway: it fetches from here over HTTP as it would
from a real issuer.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa


def _b64(number: int, length: int | None = None) -> str:
    raw = number.to_bytes(length or (number.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class SigningKey:
    """A private key, its kid, and its public half as a JWK."""

    def __init__(self, kind: str = "RSA") -> None:
        self.kind = kind
        self.kid = f"{kind.lower()}-{uuid.uuid4().hex[:12]}"
        if kind == "RSA":
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            numbers = self.private.public_key().public_numbers()
            self.alg = "RS256"
            self.jwk = {"kty": "RSA", "use": "sig", "kid": self.kid, "n": _b64(numbers.n), "e": _b64(numbers.e)}
        else:
            self.private = ec.generate_private_key(ec.SECP256R1())
            numbers = self.private.public_key().public_numbers()
            self.alg = "ES256"
            self.jwk = {
                "kty": "EC", "use": "sig", "kid": self.kid, "crv": "P-256",
                "x": _b64(numbers.x, 32), "y": _b64(numbers.y, 32),
            }


class LocalIssuer:
    def __init__(self, *, entra: bool = False, tid: str | None = None) -> None:
        self.entra = entra
        self.tid = tid or str(uuid.uuid4())
        self.keys: list[SigningKey] = []
        self.jwks_fetches = 0
        self.discovery_fetches = 0
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    # -- the server --------------------------------------------------------------------------
    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def issuer(self) -> str:
        return f"{self.base}/{self.tid}/v2.0" if self.entra else f"{self.base}/issuer"

    @property
    def jwks_path(self) -> str:
        return f"/{self.tid}/discovery/v2.0/keys" if self.entra else "/issuer/jwks"

    async def start(self, port: int = 0) -> LocalIssuer:
        """Serve (again, after `stop`, with the same keys when `port` is the old one)."""
        if not self.keys:
            self.keys = [SigningKey("RSA"), SigningKey("EC")]
        app = web.Application()
        prefix = f"/{self.tid}/v2.0" if self.entra else "/issuer"
        app.router.add_get(prefix + "/.well-known/openid-configuration", self._discovery)
        app.router.add_get(self.jwks_path, self._jwks)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _discovery(self, request: web.Request) -> web.Response:
        self.discovery_fetches += 1
        doc: dict[str, Any] = {
            "issuer": self.issuer,
            "jwks_uri": self.base + self.jwks_path,
            "authorization_endpoint": self.issuer + "/authorize",
            "token_endpoint": self.issuer + "/token",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        }
        if self.entra:
            # The shape of login.microsoftonline.com/<tid>/v2.0/.well-known/openid-configuration.
            doc.update({
                "authorization_endpoint": f"{self.base}/{self.tid}/oauth2/v2.0/authorize",
                "token_endpoint": f"{self.base}/{self.tid}/oauth2/v2.0/token",
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "tenant_region_scope": "EU",
                "cloud_instance_name": "microsoftonline.com",
                "msgraph_host": "graph.microsoft.com",
            })
        return web.json_response(doc)

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_fetches += 1
        return web.json_response({"keys": [key.jwk for key in self.keys]})

    # -- keys and tokens ---------------------------------------------------------------------
    def rotate(self, kind: str = "RSA", *, keep_old: bool = True) -> SigningKey:
        """A new signing key, published from now on; the old ones stay published only with keep_old."""
        key = SigningKey(kind)
        self.keys = [*self.keys, key] if keep_old else [key]
        return key

    def token(
        self,
        *,
        audience: str | list[str] | None,
        subject: str = "user-1",
        key: SigningKey | None = None,
        lifetime: float = 300.0,
        headers: dict | None = None,
        issuer: str | None = None,
        **claims: Any,
    ) -> str:
        """A token signed with `key` (default: the first RSA key); claims set to None are left out."""
        key = key or self.keys[0]
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": issuer or self.issuer, "sub": subject, "aud": audience, "iat": now, "nbf": now,
            "exp": int(now + lifetime),
        }
        if self.entra:
            payload.update({"tid": self.tid, "ver": "2.0", "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, subject))})
        payload.update(claims)
        payload = {name: value for name, value in payload.items() if value is not None}
        return jwt.encode(payload, key.private, algorithm=key.alg, headers={"kid": key.kid, **(headers or {})})
