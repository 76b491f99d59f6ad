"""The gateway's own credentials for upstream servers: opened from the snapshot, presented on every transport.

A server's credential is stored sealed (`auth/sealing.py`); the snapshot
carries the sealed text. `UpstreamCredentials.for_server` opens it once per
sealed value and keeps the result, so a snapshot reload that leaves a server's
credential alone keeps its object (and an OAuth token already fetched).

- `StaticHeader`: one header, framed once.
- `ClientCredentials`: OAuth 2.0 client credentials (RFC 6749 4.4). A token is
  fetched on first use and kept until shortly before it expires (a tenth of
  its life, at most 60 s early); concurrent requests share one fetch. An
  upstream's 401 drops the token, so the next request fetches a new one. A
  failed fetch is remembered for 2 s, so a token endpoint that is down is not
  hit by every request. Client authentication is HTTP Basic (form-encoded id
  and secret, 2.3.1) or the form body; redirects are not followed.

Every transport asks here for its headers: the pass-through (`server.py`),
the gateway's MCP client (`mcp_client.py`), the bridge (`bridge.py`) and the
SSE/WebSocket channels (`channels.py`). The client's own `Authorization` is
never among them: these headers are the gateway's, and where a client sent a
header of the same name the pass-through drops the client's.

Nothing here logs a secret: token endpoint failures name the URL, the status
and the endpoint's `error` code only.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from urllib.parse import quote

import aiohttp
import msgspec

from gateway.auth.sealing import CredentialSealer, SealError
from gateway.dataplane.upstream import UpstreamConnectError, UpstreamError
from gateway.snapshot import ServerEntry

log = logging.getLogger("gateway.credentials")

_FAILED_FETCH_MEMORY = 2.0
_DEFAULT_LIFETIME = 300.0  # a token answer without expires_in: assume five minutes
_MAX_TOKEN_BYTES = 64 * 1024


class CredentialUnavailable(UpstreamConnectError):
    """The gateway cannot present its credential to this upstream (token endpoint down, unopenable seal)."""


class _HeaderSpec(msgspec.Struct, tag="header", tag_field="kind"):
    header_name: str
    header_value: str


class _ClientCredentialsSpec(msgspec.Struct, tag="oauth2_client_credentials", tag_field="kind"):
    token_url: str
    client_id: str
    client_secret: str
    scope: str | None = None
    client_auth: str = "basic"


_decode_spec = msgspec.json.Decoder(_HeaderSpec | _ClientCredentialsSpec)


class _TokenAnswer(msgspec.Struct):
    access_token: str
    token_type: str = "Bearer"
    expires_in: float | None = None


class _TokenError(msgspec.Struct):
    error: str = ""


class StaticHeader:
    """A fixed header (e.g. `X-API-Key: …`), framed once."""

    __slots__ = ("_headers", "names")

    def __init__(self, name: str, value: str) -> None:
        self._headers = [(name.encode("latin-1"), value.encode("latin-1"))]
        self.names = frozenset({name.lower().encode("latin-1")})  # what a client may not send in its place

    def __repr__(self) -> str:
        return f"StaticHeader({self._headers[0][0].decode()}: ***)"

    async def headers(self) -> list[tuple[bytes, bytes]]:
        return self._headers

    def invalidate(self) -> None:
        """Nothing to refresh: the upstream refused the configured value itself."""


class ClientCredentials:
    """An OAuth access token from a token endpoint, cached until shortly before it expires."""

    names = frozenset({b"authorization"})

    def __init__(self, spec: _ClientCredentialsSpec, http: _TokenHttp, label: str) -> None:
        self._spec = spec
        self._http = http
        self.label = label
        self._headers: list[tuple[bytes, bytes]] | None = None
        self._refresh_at = 0.0  # monotonic: fetch a new token from here on
        self._expires_at = 0.0  # monotonic: the token must not be used from here on
        self._failed: tuple[float, str] | None = None  # (until, why) after a failed fetch
        self._lock = asyncio.Lock()
        self.fetches = 0  # token requests made (tests, metrics)

    def __repr__(self) -> str:
        return f"ClientCredentials({self._spec.token_url}, client_id={self._spec.client_id!r})"

    async def headers(self) -> list[tuple[bytes, bytes]]:
        now = time.monotonic()
        if self._headers is not None and now < self._refresh_at:
            return self._headers
        async with self._lock:
            now = time.monotonic()
            if self._headers is not None and now < self._refresh_at:
                return self._headers  # another request fetched it meanwhile
            if self._failed is not None and now < self._failed[0]:
                return self._fallback(now, self._failed[1])
            try:
                await self._fetch()
            except CredentialUnavailable as exc:
                self._failed = (time.monotonic() + _FAILED_FETCH_MEMORY, str(exc))
                return self._fallback(time.monotonic(), str(exc))
            self._failed = None
            return self._headers  # type: ignore[return-value]

    def _fallback(self, now: float, why: str) -> list[tuple[bytes, bytes]]:
        # A token fetched before and not yet expired still serves while the endpoint is unwell.
        if self._headers is not None and now < self._expires_at:
            return self._headers
        raise CredentialUnavailable(why)

    def invalidate(self) -> None:
        """The upstream refused the token (401): fetch a new one for the next request."""
        self._headers = None
        self._refresh_at = self._expires_at = 0.0

    async def _fetch(self) -> None:
        spec = self._spec
        form = {"grant_type": "client_credentials"}
        if spec.scope:
            form["scope"] = spec.scope
        headers = {"Accept": "application/json"}
        if spec.client_auth == "body":
            form["client_id"], form["client_secret"] = spec.client_id, spec.client_secret
        else:
            pair = f"{quote(spec.client_id, safe='')}:{quote(spec.client_secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        self.fetches += 1
        started = time.monotonic()
        status, body = await self._http.post(spec.token_url, form, headers)
        if status != 200:
            try:
                code = msgspec.json.decode(body, type=_TokenError).error[:64]
            except msgspec.DecodeError:
                code = ""
            detail = f" ({code})" if code else ""
            raise CredentialUnavailable(
                f"{self.label}: the token endpoint {spec.token_url} refused the gateway's client credentials "
                f"with HTTP {status}{detail}"
            )
        try:
            answer = msgspec.json.decode(body, type=_TokenAnswer)
        except msgspec.DecodeError:
            raise CredentialUnavailable(
                f"{self.label}: the token endpoint {spec.token_url} answered without an access_token"
            ) from None
        if answer.token_type.lower() != "bearer" or not answer.access_token.isascii() or not answer.access_token:
            raise CredentialUnavailable(
                f"{self.label}: the token endpoint {spec.token_url} issued a {answer.token_type!r} token, "
                "not a Bearer token"
            )
        lifetime = answer.expires_in if answer.expires_in and answer.expires_in > 0 else _DEFAULT_LIFETIME
        self._headers = [(b"Authorization", b"Bearer " + answer.access_token.encode("ascii"))]
        self._expires_at = started + lifetime
        self._refresh_at = self._expires_at - min(60.0, lifetime / 10)


class _TokenHttp:
    """The one HTTP client the token fetches share (opened on first use)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def post(self, url: str, form: dict[str, str], headers: dict[str, str]) -> tuple[int, bytes]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        try:
            async with self._session.post(url, data=form, headers=headers, allow_redirects=False) as response:
                body = await response.content.read(_MAX_TOKEN_BYTES + 1)
                if len(body) > _MAX_TOKEN_BYTES:
                    raise CredentialUnavailable(f"the token endpoint {url} sent more than 64 KiB")
                return response.status, body
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            reason = type(exc).__name__ if isinstance(exc, asyncio.TimeoutError) else str(exc) or type(exc).__name__
            raise CredentialUnavailable(f"cannot reach the token endpoint {url}: {reason}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class Unopenable:
    """A sealed credential this gateway cannot open: every use fails with why (the request gets a 502)."""

    names = frozenset({b"authorization"})

    def __init__(self, reason: str) -> None:
        self.reason = reason

    async def headers(self) -> list[tuple[bytes, bytes]]:
        raise CredentialUnavailable(self.reason)

    def invalidate(self) -> None:
        pass


Credential = StaticHeader | ClientCredentials | Unopenable


class UpstreamCredentials:
    """Every server's credential, opened from its sealed form once and kept while the sealed form is unchanged."""

    def __init__(self, sealer: CredentialSealer | None, *, timeout: float = 30.0) -> None:
        self.sealer = sealer
        self._http = _TokenHttp(timeout)
        self._opened: dict[uuid.UUID, tuple[str, Credential]] = {}

    def for_server(self, server: ServerEntry) -> Credential | None:
        """The credential to present to `server`, or None (it never raises: an unopenable one fails when used)."""
        sealed = server.auth_sealed
        if sealed is None:
            return None
        held = self._opened.get(server.id)
        if held is not None and held[0] == sealed:
            return held[1]
        credential = self._open(server, sealed)
        self._opened[server.id] = (sealed, credential)
        return credential

    def _open(self, server: ServerEntry, sealed: str) -> Credential:
        label = f"server '{server.name}'"
        try:
            if self.sealer is None:
                raise SealError("this gateway holds no secrets key")
            spec = _decode_spec.decode(self.sealer.open(sealed, server.id))
        except (SealError, msgspec.DecodeError) as exc:
            log.error("cannot open the upstream credential of %s: %s", label, exc)
            return Unopenable(f"the gateway cannot open its credential for {label}: {exc}")
        if isinstance(spec, _HeaderSpec):
            return StaticHeader(spec.header_name, spec.header_value)
        return ClientCredentials(spec, self._http, label)

    def forget(self, live: set[uuid.UUID]) -> None:
        """Drop the credentials of servers no longer in the snapshot."""
        for server_id in [i for i in self._opened if i not in live]:
            del self._opened[server_id]

    async def close(self) -> None:
        await self._http.close()
