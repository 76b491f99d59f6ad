"""Bearer JWTs from configured OIDC issuers: their keys, verification, and the principal a token becomes.

Owns: each issuer's discovery document and JWKS (fetched with an aiohttp
client at start, every `auth.jwks_refresh_interval`, and again when a token
names a key id the gateway does not hold, at most once per
`auth.jwks_min_refetch_interval` per issuer so that garbage tokens cannot make
the gateway hammer an issuer); verifying a token (PyJWT: signature, exp, nbf,
iat, iss, aud); turning its claims into a `TokenPrincipal`; remembering
verified tokens until they expire; the RFC 9728 protected-resource metadata.

Must not: do network I/O on the request path except the refetch that
`authenticate_request` awaits; accept unsigned or symmetric (HS*) tokens; accept
a token whose audience is not the gateway's (the MCP authorization spec forbids
accepting tokens meant for others); put a token into a message or a log line.

Why PyJWT and not hand-written checks: signature verification, JWK parsing
and the registered-claim rules (aud as string or list, leeway, required
claims) are where hand-rolled JWT code goes wrong; PyJWT does them on top of
`cryptography` (already our OpenSSL binding) and is what the MCP SDK itself
depends on. What stays here is policy: which algorithms, which key, which
audience, and what the claims mean for the gateway.

A token principal has no database row (just-in-time): see `TokenPrincipal`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
import orjson

from gateway.auth.authenticate import REALM, RetryAfterFetch, unauthenticated
from gateway.config import AuthConfig, IssuerConfig, entra_tenant
from gateway.dataplane.jsonrpc import FORBIDDEN, UPSTREAM_UNAVAILABLE, Refusal
from gateway.snapshot import Snapshot, TenantEntry

log = logging.getLogger("gateway.auth.oidc")

# Asymmetric signatures only: "none" and HS* (a shared secret the issuer would
# have to give every resource server) are refused whatever the token says.
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHMS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
ACCEPTED_ALGORITHMS = _RSA_ALGORITHMS | frozenset(_EC_ALGORITHMS.values())
# When a token's role claim carries several roles, the first of these present wins.
_ROLE_ORDER = ("ADMIN", "SERVICE", "USER", "READONLY")
# Principal ids are uuid5(issuer + "\n" + sub) in this namespace: stable across
# tokens, processes and restarts, so sessions and quotas follow the person.
PRINCIPAL_NAMESPACE = uuid.UUID("7d4f1c1e-5b8a-4b7e-9a53-2f0e6c1d8a10")
METADATA_PATH = "/.well-known/oauth-protected-resource"
_MAX_DOCUMENT_BYTES = 1 << 20
_FETCH_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class TokenPrincipal:
    """A caller proved by a JWT, with the fields the data plane reads from a `KeyEntry`.

    Just-in-time: no database row, not linked to a `users` row with the same
    email. Linking would let any trusted issuer that asserts an address act as
    the user who registered it (email claims are not always verified, and two
    issuers may each vouch for the same address), and it would need users in
    the snapshot. So `id` and `user_id` are both uuid5(issuer, sub); request
    logs carry it as their key and user id. Scopes and quotas come from the
    issuer's configuration, tenant and role from the token's claims.
    """

    id: uuid.UUID
    tenant_id: uuid.UUID
    user_id: uuid.UUID
    role: str
    scopes: frozenset[str]
    rate_limit_per_hour: int
    rate_limit_per_day: int
    expires_at: float  # the token's exp, epoch seconds
    issuer: str
    subject: str
    key_active: bool = True
    user_active: bool = True


def principal_id(issuer: str, subject: str) -> uuid.UUID:
    return uuid.uuid5(PRINCIPAL_NAMESPACE, f"{issuer}\n{subject}")


def looks_like_jwt(token: str) -> bool:
    """Three dot-separated segments (JWS compact form); API keys never contain a dot."""
    return token.count(".") == 2


def _shown(value: Any, limit: int = 80) -> str:
    """A claim value fit for a message and a header: printable ASCII, no quotes, bounded."""
    text = "".join(c for c in str(value) if " " <= c <= "~" and c not in "\"\\")
    return text if len(text) <= limit else text[:limit] + "..."


def _invalid(message: str) -> Refusal:
    return unauthenticated(message)


class _Key:
    __slots__ = ("key", "algorithms")

    def __init__(self, key: Any, algorithms: frozenset[str]) -> None:
        self.key = key
        self.algorithms = algorithms


def _parse_jwk(jwk: dict) -> _Key | None:
    """A verification key and the algorithms it may verify, or None for keys the gateway does not use."""
    if jwk.get("use", "sig") != "sig":
        return None
    kty = jwk.get("kty")
    if kty == "RSA":
        allowed = _RSA_ALGORITHMS
    elif kty == "EC" and jwk.get("crv") in _EC_ALGORITHMS:
        allowed = frozenset({_EC_ALGORITHMS[jwk["crv"]]})
    else:
        return None
    declared = jwk.get("alg")
    if declared is not None:
        # A key that names its algorithm verifies that one only.
        allowed = allowed & {declared}
        if not allowed:
            return None
    try:
        key = jwt.PyJWK(jwk).key
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
        return None
    return _Key(key, allowed)


class IssuerKeys:
    """One issuer's discovery document and signing keys, and when they may be fetched again."""

    def __init__(self, config: IssuerConfig, *, min_refetch_interval: float) -> None:
        self.config = config
        self.issuer = config.issuer
        self.discovery_url = config.discovery_url or config.issuer.rstrip("/") + "/.well-known/openid-configuration"
        self.min_refetch_interval = min_refetch_interval
        self.jwks_uri: str | None = None
        self.keys: dict[str | None, _Key] = {}
        self.loaded = False
        self.last_error: str | None = None
        self.fetches = 0  # JWKS documents fetched (for tests and metrics)
        self._last_forced = -math.inf  # monotonic time of the last refetch a token caused
        self._inflight: asyncio.Task | None = None
        self.on_change = None  # callback(issuer, removed key ids)

    @property
    def fetching(self) -> bool:
        return self._inflight is not None

    def may_refetch(self, now: float) -> bool:
        return now - self._last_forced >= self.min_refetch_interval

    async def refetch(self, http: aiohttp.ClientSession) -> bool:
        """Fetch the keys again because a token named an unknown one; False if not allowed now or failed."""
        now = time.monotonic()
        if self._inflight is None:
            if not self.may_refetch(now):
                return False
            self._last_forced = now
        return await self.refresh(http)

    async def refresh(self, http: aiohttp.ClientSession) -> bool:
        """Fetch discovery (if not known yet) and the JWKS; concurrent callers share one fetch."""
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._fetch(http))
            self._inflight.add_done_callback(self._fetched)
        # Shielded: a caller that goes away does not cancel the fetch others wait for.
        return await asyncio.shield(self._inflight)

    def _fetched(self, task: asyncio.Task) -> None:
        self._inflight = None
        if not task.cancelled():
            task.exception()  # _fetch catches its own errors; this only marks it retrieved

    async def _fetch(self, http: aiohttp.ClientSession) -> bool:
        try:
            if self.jwks_uri is None:
                doc = await _get_json(http, self.discovery_url)
                self._check_discovery(doc)
            jwks = await _get_json(http, self.jwks_uri)
            self.fetches += 1
            self.load(jwks)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            self.last_error = str(exc) or type(exc).__name__
            log.warning("could not fetch the signing keys of issuer %s: %s", self.issuer, self.last_error)
            return False
        self.last_error = None
        return True

    def _check_discovery(self, doc: dict) -> None:
        issuer = doc.get("issuer")
        if self.config.kind == "entra" and isinstance(issuer, str):
            # Entra's multi-tenant documents spell the issuer with a placeholder.
            issuer = issuer.replace("{tenantid}", entra_tenant(self.issuer) or "")
        if issuer != self.issuer:
            # OpenID Connect Discovery 1.0 section 4.3: the document must be the issuer's own.
            raise ValueError(f"discovery document {self.discovery_url} names issuer {_shown(issuer)!r}")
        jwks_uri = doc.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not _acceptable_url(jwks_uri):
            raise ValueError(f"discovery document {self.discovery_url} has no usable jwks_uri")
        self.jwks_uri = jwks_uri

    def load(self, jwks: dict) -> None:
        """Replace the key set with the signing keys of a JWKS document."""
        entries = jwks.get("keys")
        if not isinstance(entries, list):
            raise ValueError("the JWKS document has no keys list")
        keys: dict[str | None, _Key] = {}
        for jwk in entries:
            parsed = _parse_jwk(jwk) if isinstance(jwk, dict) else None
            if parsed is not None:
                kid = jwk.get("kid")
                keys[kid if isinstance(kid, str) else None] = parsed
        removed = set(self.keys) - set(keys)
        self.keys = keys
        self.loaded = True
        if removed and self.on_change is not None:
            self.on_change(self.issuer, removed)

    def key_for(self, kid: Any) -> _Key | None:
        key = self.keys.get(kid if isinstance(kid, str) else None)
        if key is None and kid is None and len(self.keys) == 1:
            # A token without a kid from an issuer with a single key.
            key = next(iter(self.keys.values()))
        return key


def _acceptable_url(url: str) -> bool:
    parts = urlsplit(url)
    loopback = parts.hostname in ("localhost", "127.0.0.1", "::1")
    return bool(parts.hostname) and (parts.scheme == "https" or (parts.scheme == "http" and loopback))


async def _get_json(http: aiohttp.ClientSession, url: str) -> dict:
    # No redirects: the keys must come from where the issuer's document says.
    async with http.get(url, allow_redirects=False, headers={"Accept": "application/json"}) as resp:
        if resp.status != 200:
            raise ValueError(f"GET {url} answered {resp.status}")
        body = await resp.content.read(_MAX_DOCUMENT_BYTES + 1)
    if len(body) > _MAX_DOCUMENT_BYTES:
        raise ValueError(f"GET {url}: document larger than {_MAX_DOCUMENT_BYTES} bytes")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ValueError(f"GET {url}: not JSON") from None
    if not isinstance(doc, dict):
        raise ValueError(f"GET {url}: not a JSON object")
    return doc


class _Verified:
    """A token whose signature and claims held: what it says, and the principal it made under one snapshot."""

    __slots__ = ("issuer", "kid", "exp", "id", "role", "tenant_ref", "tenant_value", "subject", "snapshot",
                 "principal")

    def __init__(self, issuer: IssuerKeys, kid, exp: float, subject: str, role: str, tenant_ref, tenant_value):
        self.issuer = issuer
        self.kid = kid
        self.exp = exp
        self.subject = subject
        self.id = principal_id(issuer.issuer, subject)
        self.role = role
        self.tenant_ref = tenant_ref  # the configured tenant id or name, or None when unmapped
        self.tenant_value = tenant_value  # the tenant claim's value, for messages
        self.snapshot: Snapshot | None = None
        self.principal: TokenPrincipal | None = None


class TokenVerifier:
    """The configured issuers; verifies bearer JWTs (synchronously, once the keys are held) and caches them.

    A verified token is remembered until its `exp` (plus leeway), so a repeated
    token costs a dict lookup and the checks that can change per request
    (tenant suspended, scope). Only tokens whose signature held are remembered,
    the cache is bounded (dropped whole when full), and tokens signed with a
    key the issuer stopped publishing are forgotten when the keys are fetched.
    """

    MAX_ENTRIES = 10_000

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self.leeway = config.leeway
        self.resource_uri = config.resource_uri
        self.issuers: dict[str, IssuerKeys] = {}
        for issuer_config in config.issuers:
            keys = IssuerKeys(issuer_config, min_refetch_interval=config.jwks_min_refetch_interval)
            keys.on_change = self._forget_keys
            self.issuers[issuer_config.issuer] = keys
        parts = urlsplit(config.resource_uri)
        path = parts.path.rstrip("/")
        # RFC 9728 section 3.1: the well-known segment goes between the host and the resource's path.
        self.metadata_path = METADATA_PATH + path
        self.metadata_url = f"{parts.scheme}://{parts.netloc}{self.metadata_path}"
        self.verifications = 0  # signatures checked (cache misses that got that far)
        self._cache: dict[str, _Verified] = {}
        self._tenants_of: Snapshot | None = None
        self._tenants: dict[str, TenantEntry] = {}
        self._http: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Fetch every issuer's keys (failures are logged; tokens then wait for a refetch) and keep them fresh."""
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=_FETCH_TIMEOUT), cookie_jar=aiohttp.DummyCookieJar()
        )
        await asyncio.gather(*(keys.refresh(self._http) for keys in self.issuers.values()))
        self._task = asyncio.ensure_future(self._refresh_periodically())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _refresh_periodically(self) -> None:
        interval = self.config.jwks_refresh_interval
        delay = interval
        while True:
            await asyncio.sleep(delay)
            results = await asyncio.gather(*(keys.refresh(self._http) for keys in self.issuers.values()))
            # An issuer that could not be reached is tried again sooner.
            delay = interval if all(results) else min(interval, 60.0)

    async def refetch(self, issuer: IssuerKeys) -> bool:
        if self._http is None:
            return False
        return await issuer.refetch(self._http)

    def _forget_keys(self, issuer: str, removed: set) -> None:
        self._cache = {
            token: entry for token, entry in self._cache.items()
            if not (entry.issuer.issuer == issuer and entry.kid in removed)
        }

    # -- the request path -----------------------------------------------------------------------
    def authenticate(self, snapshot: Snapshot, token: str, scope: str, now: float | None = None) -> TokenPrincipal:
        """The principal of a bearer JWT, or a Refusal (401 invalid, 403 tenant or scope, 503 issuer unreachable).

        Raises `RetryAfterFetch` when the token names a key the gateway does not
        hold and may fetch now; `authenticate_request` awaits that and tries again.
        """
        now = time.time() if now is None else now
        entry = self._cache.get(token)
        if entry is None:
            entry = self._verify(token, now)
            if len(self._cache) >= self.MAX_ENTRIES:
                self._cache = {}
            self._cache[token] = entry
        elif now >= entry.exp + self.leeway:
            del self._cache[token]
            raise _invalid(f"Token expired at {_when(entry.exp)}; get a new one from {entry.issuer.issuer}")
        if entry.snapshot is not snapshot:
            entry.principal = self._principal(snapshot, entry)
            entry.snapshot = snapshot
        principal = entry.principal
        if principal is None:
            raise self._unmapped(entry)
        tenant = snapshot.tenants.get(principal.tenant_id)
        if tenant is None or tenant.status != "active":
            raise Refusal(403, FORBIDDEN, "This token's tenant is suspended; contact the gateway operator")
        if scope not in principal.scopes:
            raise Refusal(
                403,
                FORBIDDEN,
                f"This token lacks the '{scope}' scope needed here (the gateway grants tokens of "
                f"{principal.issuer} the scopes set for that issuer)",
                headers={"WWW-Authenticate": f'Bearer realm="{REALM}", error="insufficient_scope", scope="{scope}"'},
            )
        return principal

    def _verify(self, token: str, now: float) -> _Verified:
        header, claims = _peek(token)
        alg = header.get("alg")
        if alg not in ACCEPTED_ALGORITHMS:
            shown = _shown(alg, 16) if isinstance(alg, str) else "missing"
            raise _invalid(
                f"Token refused: its signing algorithm ({shown}) is not accepted; the gateway takes "
                "asymmetric signatures only (RS256, PS256, ES256 and their longer variants)"
            )
        iss = claims.get("iss")
        issuer = self.issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            shown = f"'{_shown(iss)}'" if isinstance(iss, str) else "(none)"
            raise _invalid(f"Token issuer {shown} is not one this gateway trusts")
        kid = header.get("kid")
        key = issuer.key_for(kid)
        if key is None:
            raise self._unknown_key(issuer, kid)
        if alg not in key.algorithms:
            raise _invalid(f"Token refused: its algorithm ({alg}) does not match the issuer's key")
        cfg = issuer.config
        audience = cfg.audience or self.resource_uri
        self.verifications += 1
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=audience,
                issuer=issuer.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iss", "aud", "sub"], "enforce_minimum_key_length": True},
            )
        except jwt.ExpiredSignatureError:
            raise _invalid(f"Token expired at {_when(claims.get('exp'))}; get a new one from {issuer.issuer}") from None
        except jwt.ImmatureSignatureError:
            raise _invalid("Token is not valid yet (nbf or iat is in the future); check the clocks") from None
        except jwt.InvalidAudienceError:
            raise _invalid(f"Token is not meant for this gateway: its audience must include {audience}") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _invalid(f"Token refused: it has no '{exc.claim}' claim") from None
        except jwt.InvalidSignatureError:
            raise _invalid(f"Token signature does not verify with the keys of {issuer.issuer}") from None
        except jwt.InvalidTokenError as exc:
            raise _invalid(f"Invalid token: {_shown(exc, 120)}") from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise _invalid("Token refused: its 'sub' claim must be a non-empty string")
        exp = float(claims["exp"])
        if cfg.kind == "entra":
            tid = claims.get("tid")
            if tid != entra_tenant(issuer.issuer):
                # Keys are shared across Entra tenants: the issuer must also be the token's own tenant.
                raise _invalid("Token refused: its 'tid' claim is not the tenant of its issuer")
        tenant_ref, tenant_value = self._tenant_of(cfg, claims)
        return _Verified(issuer, kid, exp, subject, _role_of(cfg, claims), tenant_ref, tenant_value)

    def _unknown_key(self, issuer: IssuerKeys, kid: Any) -> Refusal:
        shown = f"'{_shown(kid, 64)}'" if isinstance(kid, str) else "(none)"
        if not issuer.loaded:
            refusal = Refusal(
                503,
                UPSTREAM_UNAVAILABLE,
                f"Cannot verify tokens of {issuer.issuer} right now: its signing keys could not be fetched "
                f"({_shown(issuer.last_error or 'not fetched yet', 160)}); try again shortly",
                headers={"Retry-After": str(max(1, math.ceil(issuer.min_refetch_interval)))},
            )
        else:
            refusal = _invalid(f"Token signed with a key ({shown}) that {issuer.issuer} does not publish")
        if issuer.fetching or issuer.may_refetch(time.monotonic()):
            return RetryAfterFetch(refusal, lambda: self.refetch(issuer))
        return refusal

    def _tenant_of(self, cfg: IssuerConfig, claims: dict) -> tuple[str | None, Any]:
        if cfg.tenant:
            return cfg.tenant, None
        claim = cfg.tenant_claim or ("tid" if cfg.kind == "entra" else "tenant")
        value = _claim(claims, claim)
        if not isinstance(value, str):
            return None, None
        return cfg.tenant_map.get(value), value

    def _principal(self, snapshot: Snapshot, entry: _Verified) -> TokenPrincipal | None:
        tenant = self._tenant(snapshot, entry.tenant_ref) if entry.tenant_ref is not None else None
        if tenant is None:
            return None
        cfg = entry.issuer.config
        return TokenPrincipal(
            id=entry.id,
            tenant_id=tenant.id,
            user_id=entry.id,
            role=entry.role,
            scopes=frozenset(cfg.scopes),
            rate_limit_per_hour=cfg.rate_limit_per_hour,
            rate_limit_per_day=cfg.rate_limit_per_day,
            expires_at=entry.exp,
            issuer=entry.issuer.issuer,
            subject=entry.subject,
        )

    def _tenant(self, snapshot: Snapshot, ref: str) -> TenantEntry | None:
        """A configured tenant reference (id or name) in this snapshot."""
        if self._tenants_of is not snapshot:
            index = {tenant.name: tenant for tenant in snapshot.tenants.values()}
            index.update({str(tenant.id): tenant for tenant in snapshot.tenants.values()})
            self._tenants, self._tenants_of = index, snapshot
        return self._tenants.get(ref)

    def _unmapped(self, entry: _Verified) -> Refusal:
        issuer = entry.issuer.issuer
        if entry.tenant_ref is not None:
            message = (
                f"This token's tenant is configured as '{_shown(entry.tenant_ref)}', which this gateway does "
                "not have; contact the gateway operator"
            )
        elif entry.tenant_value is not None:
            message = (
                f"This token's tenant ('{_shown(entry.tenant_value)}') is not mapped to a gateway tenant; ask "
                f"the gateway operator to add it to the tenant_map of {issuer}"
            )
        else:
            claim = entry.issuer.config.tenant_claim or ("tid" if entry.issuer.config.kind == "entra" else "tenant")
            message = f"This token has no '{claim}' claim, which names its tenant at this gateway"
        return Refusal(403, FORBIDDEN, message)

    # -- OAuth resource server ------------------------------------------------------------------
    def metadata(self) -> dict:
        """The RFC 9728 protected-resource metadata document."""
        return {
            "resource": self.resource_uri,
            "authorization_servers": [keys.issuer for keys in self.issuers.values()],
            "bearer_methods_supported": ["header"],
            "scopes_supported": list(self.config.scopes_supported),
        }

    def challenge(self, refusal: Refusal) -> Refusal:
        """Add `resource_metadata` (and on a 401, `scope` when configured) to a refusal's challenge."""
        header = refusal.headers.get("WWW-Authenticate")
        if header is None or "resource_metadata=" in header:
            return refusal
        header += f', resource_metadata="{self.metadata_url}"'
        if refusal.http_status == 401 and self.config.scopes_supported and 'scope="' not in header:
            header += f', scope="{_shown(" ".join(self.config.scopes_supported), 1000)}"'
        refusal.headers["WWW-Authenticate"] = header
        return refusal


def _peek(token: str) -> tuple[dict, dict]:
    """The header and claims of a JWS, unverified: only to choose the issuer and key.

    PyJWT then decodes the token again, strictly, and verifies it; this is done
    here rather than with its unverified helpers because each of those costs a
    full strict parse (about a third of a first-time verification).
    """
    try:
        header, payload, _ = token.split(".")
        header_doc = orjson.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, binascii.Error, orjson.JSONDecodeError):
        header_doc = claims = None
    if not isinstance(header_doc, dict) or not isinstance(claims, dict):
        raise _invalid("Invalid bearer token: neither a gateway API key nor a well-formed JWT")
    return header_doc, claims


def _claim(claims: dict, path: str) -> Any:
    """A claim by name, or by a dotted path into nested objects (realm_access.roles)."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _role_of(cfg: IssuerConfig, claims: dict) -> str:
    value = _claim(claims, cfg.role_claim)
    values = value if isinstance(value, list) else [value]
    found = set()
    for item in values:
        if not isinstance(item, str):
            continue
        found.add(cfg.role_map.get(item, item))
    for role in _ROLE_ORDER:
        if role in found:
            return role
    return cfg.default_role


def _when(exp: Any) -> str:
    try:
        return datetime.fromtimestamp(float(exp), timezone.utc).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return "an unreadable time"

