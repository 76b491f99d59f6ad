"""Sign-in through an OAuth 2.0 authorization-code flow with PKCE: the provider's side of it.

Owns: the authorization request (random `state`, an S256 `code_challenge`
(RFC 7636), a `nonce` for OpenID Connect), the code exchange at the provider's
token endpoint (with the `code_verifier` and the client's credentials), and
learning who signed in: the provider's subject and the person's verified email
addresses. Two kinds of provider:

- `github`: a GitHub OAuth app (no OIDC): `GET /user` for the id and login,
  `GET /user/emails` for the addresses and whether GitHub verified them;
- `oidc`: any OpenID Connect provider, from its discovery document. The ID
  token is verified (signature with the provider's JWKS through
  `oidc.IssuerKeys`, `iss`, `aud` = our client id, `exp`, `nonce`); the
  address comes from it or from the userinfo endpoint.

Must not: touch the database (pending sign-ins and sessions are
`controlplane/sessions.py`), follow redirects from a provider's endpoints, or
put a code, a token, a verifier, a nonce or the client secret into a message
or a log line. Every refusal is a `SigninError` a person can act on.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
import jwt
import orjson

from gateway.auth.oidc import ACCEPTED_ALGORITHMS, IssuerKeys, _acceptable_url, _get_json, _shown
from gateway.config import AuthConfig, IssuerConfig, SigninConfig, SigninProviderConfig

log = logging.getLogger("gateway.auth.signin")

GITHUB_AUTHORIZE_URL = "https://github.com/login/oauth/authorize"
GITHUB_TOKEN_URL = "https://github.com/login/oauth/access_token"
GITHUB_API_URL = "https://api.github.com"
_DEFAULT_SCOPES = {"oidc": ("openid", "email", "profile"), "github": ("read:user", "user:email")}
_TIMEOUT = 10.0
_MAX_BODY = 1 << 20
# A provider's discovery document is fetched again after this long (its keys follow auth.jwks_* rules).
_DOCUMENT_TTL = 3600.0


class SigninError(Exception):
    """A sign-in that cannot go on: the HTTP status, a stable code, and a message for the person signing in."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class Identity:
    """Who signed in, as the provider vouches: its subject, verified addresses (preferred first), a login name."""

    provider: str
    subject: str
    emails: tuple[str, ...]
    login: str | None = None


@dataclass(frozen=True, slots=True)
class Pkce:
    verifier: str
    challenge: str

    def __repr__(self) -> str:
        return "Pkce(...)"


def new_pkce() -> Pkce:
    """A code verifier (64 characters of the unreserved set) and its S256 challenge."""
    verifier = secrets.token_urlsafe(48)
    return Pkce(verifier, _b64(hashlib.sha256(verifier.encode()).digest()))


def new_state() -> str:
    return secrets.token_urlsafe(32)


def new_nonce() -> str:
    return secrets.token_urlsafe(24)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _loopback(url: str) -> bool:
    return urlsplit(url).hostname in ("localhost", "127.0.0.1", "::1")


class Provider:
    """One configured provider: where the browser goes, and how a code becomes an `Identity`."""

    kind = ""

    def __init__(self, config: SigninProviderConfig, redirect_base_url: str) -> None:
        self.config = config
        self.name = config.name
        base = redirect_base_url.rstrip("/")
        self.redirect_uri = f"{base}/auth/callback/{config.name}"
        parts = urlsplit(base)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        # Cookies carry the Secure flag except for a control plane on a loopback address over http.
        self.secure_cookies = not (parts.scheme == "http" and _loopback(base))
        self.base_path = parts.path.rstrip("/")
        self.scopes = tuple(config.scopes) or _DEFAULT_SCOPES[config.kind]

    async def authorization_url(self, http: aiohttp.ClientSession, state: str, pkce: Pkce, nonce: str | None) -> str:
        raise NotImplementedError

    async def identify(self, http: aiohttp.ClientSession, code: str, verifier: str, nonce: str | None) -> Identity:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------
    def _query(self, state: str, pkce: Pkce, **extra: str) -> str:
        params = {
            "response_type": "code",
            "client_id": self.config.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": " ".join(self.scopes),
            "state": state,
            "code_challenge": pkce.challenge,
            "code_challenge_method": "S256",
            **extra,
        }
        return urlencode(params, quote_via=quote)

    async def _exchange(
        self, http: aiohttp.ClientSession, url: str, code: str, verifier: str, *, basic_auth: bool
    ) -> dict[str, Any]:
        """POST the code and verifier to the token endpoint; the token response, or a SigninError."""
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "code_verifier": verifier,
        }
        headers = {"Accept": "application/json"}
        if basic_auth:
            # RFC 6749 section 2.3.1: each part form-encoded, then joined and base64'd.
            pair = f"{quote(self.config.client_id, safe='')}:{quote(self.config.client_secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
            form["client_id"] = self.config.client_id
        else:
            form.update(client_id=self.config.client_id, client_secret=self.config.client_secret)
        status, doc = await self._call(http, "POST", url, data=form, headers=headers)
        error = doc.get("error") if isinstance(doc, dict) else None
        if error is not None:
            # GitHub reports a refused code with 200 and an `error` member; others with 400.
            raise SigninError(400, "provider_refused", self._refused(error, doc.get("error_description")))
        if status != 200 or not isinstance(doc, dict):
            raise self._broken(f"its token endpoint answered {status}")
        token = doc.get("access_token")
        if not isinstance(token, str) or not token:
            raise self._broken("its token endpoint answered without an access_token")
        return doc

    def _refused(self, error: Any, description: Any) -> str:
        message = f"{self.name} refused the authorization code: {_shown(error, 64)}"
        if isinstance(description, str) and description:
            message += f" ({_shown(description, 200)})"
        if error in ("invalid_grant", "bad_verification_code"):
            message += "; the code was wrong, expired or already used, or the PKCE verifier does not match it"
        return message + f". Start again at /auth/login/{self.name}"

    def _broken(self, what: str) -> SigninError:
        return SigninError(502, "provider_error", f"Sign-in with {self.name} failed: {what}; try again later")

    async def _call(self, http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
        """One request to the provider, no redirects, at most 1 MiB of JSON back: (status, document)."""
        try:
            async with http.request(method, url, allow_redirects=False, **kwargs) as resp:
                body = await resp.content.read(_MAX_BODY + 1)
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            log.warning("sign-in provider %s: %s %s failed: %s", self.name, method, url, type(exc).__name__)
            raise self._broken(f"{urlsplit(url).netloc} could not be reached") from None
        if len(body) > _MAX_BODY:
            raise self._broken(f"{method} {url} answered more than {_MAX_BODY} bytes")
        try:
            return status, orjson.loads(body)
        except orjson.JSONDecodeError:
            raise self._broken(f"{method} {url} answered {status} without JSON") from None


class GitHubProvider(Provider):
    """A GitHub OAuth app: identity from the REST API, addresses only as GitHub verified them."""

    kind = "github"

    def __init__(self, config: SigninProviderConfig, redirect_base_url: str) -> None:
        super().__init__(config, redirect_base_url)
        self.authorize_endpoint = config.authorize_url or GITHUB_AUTHORIZE_URL
        self.token_endpoint = config.token_url or GITHUB_TOKEN_URL
        self.api = (config.api_url or GITHUB_API_URL).rstrip("/")

    async def authorization_url(self, http: aiohttp.ClientSession, state: str, pkce: Pkce, nonce: str | None) -> str:
        return f"{self.authorize_endpoint}?{self._query(state, pkce)}"

    async def identify(self, http: aiohttp.ClientSession, code: str, verifier: str, nonce: str | None) -> Identity:
        token = (await self._exchange(http, self.token_endpoint, code, verifier, basic_auth=False))["access_token"]
        headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28",
            "User-Agent": "mcp-gateway",
        }
        status, user = await self._call(http, "GET", f"{self.api}/user", headers=headers)
        if status != 200 or not isinstance(user, dict) or not isinstance(user.get("id"), int):
            raise self._broken(f"GET {self.api}/user answered {status}")
        status, listed = await self._call(http, "GET", f"{self.api}/user/emails", headers=headers)
        if status != 200 or not isinstance(listed, list):
            raise self._broken(
                f"GET {self.api}/user/emails answered {status} (the app needs the user:email scope)"
            )
        verified = [
            e for e in listed
            if isinstance(e, dict) and e.get("verified") is True and isinstance(e.get("email"), str)
        ]
        verified.sort(key=lambda e: e.get("primary") is not True)  # the primary address first
        login = user.get("login")
        return Identity(
            provider=self.name,
            subject=str(user["id"]),
            emails=tuple(e["email"] for e in verified),
            login=login if isinstance(login, str) else None,
        )


class OidcProvider(Provider):
    """An OpenID Connect provider found by its discovery document; ID tokens verified with its JWKS."""

    kind = "oidc"

    def __init__(self, config: SigninProviderConfig, redirect_base_url: str, auth: AuthConfig) -> None:
        super().__init__(config, redirect_base_url)
        self.issuer = config.issuer
        self.discovery_url = config.discovery_url or config.issuer.rstrip("/") + "/.well-known/openid-configuration"
        self.leeway = auth.leeway
        # The key cache of the bearer-token path: refetched when a token names an unknown kid,
        # at most once per auth.jwks_min_refetch_interval.
        self.keys = IssuerKeys(
            IssuerConfig(issuer=config.issuer, discovery_url=self.discovery_url),
            min_refetch_interval=auth.jwks_min_refetch_interval,
        )
        self.keys_max_age = auth.jwks_refresh_interval
        self._document: dict[str, Any] | None = None
        self._document_at = -_DOCUMENT_TTL
        self._keys_at = -auth.jwks_refresh_interval

    async def document(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        """The discovery document (checked: its issuer, https endpoints), fetched at most once an hour."""
        now = time.monotonic()
        if self._document is not None and now - self._document_at < _DOCUMENT_TTL:
            return self._document
        try:
            doc = await _get_json(http, self.discovery_url)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            log.warning("sign-in provider %s: discovery failed: %s", self.name, _shown(exc, 200))
            raise self._broken(f"its discovery document {self.discovery_url} could not be read") from None
        if doc.get("issuer") != self.issuer:
            # OpenID Connect Discovery 1.0 section 4.3: the document must be the issuer's own.
            raise self._broken(f"its discovery document names issuer '{_shown(doc.get('issuer'))}'")
        for member in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            value = doc.get(member)
            if not isinstance(value, str) or not _acceptable_url(value):
                raise self._broken(f"its discovery document has no usable {member}")
        userinfo = doc.get("userinfo_endpoint")
        if userinfo is not None and (not isinstance(userinfo, str) or not _acceptable_url(userinfo)):
            raise self._broken("its discovery document has an unusable userinfo_endpoint")
        self.keys.jwks_uri = doc["jwks_uri"]
        self._document, self._document_at = doc, now
        return doc

    async def authorization_url(self, http: aiohttp.ClientSession, state: str, pkce: Pkce, nonce: str | None) -> str:
        doc = await self.document(http)
        endpoint = doc["authorization_endpoint"]
        joiner = "&" if urlsplit(endpoint).query else "?"
        return f"{endpoint}{joiner}{self._query(state, pkce, nonce=nonce or '')}"

    async def identify(self, http: aiohttp.ClientSession, code: str, verifier: str, nonce: str | None) -> Identity:
        doc = await self.document(http)
        methods = doc.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        # client_secret_basic is the default every provider must support (OIDC Core 9);
        # client_secret_post only when the provider lists it and not basic.
        basic = "client_secret_basic" in methods or "client_secret_post" not in methods
        answer = await self._exchange(http, doc["token_endpoint"], code, verifier, basic_auth=basic)
        id_token = answer.get("id_token")
        if not isinstance(id_token, str):
            raise self._broken("its token endpoint answered without an id_token (is `openid` among the scopes?)")
        claims = await self._verify(http, id_token, nonce)
        subject = claims["sub"]
        email, verified = claims.get("email"), claims.get("email_verified")
        login = claims.get("preferred_username")
        if not isinstance(email, str) and doc.get("userinfo_endpoint"):
            info = await self._userinfo(http, doc["userinfo_endpoint"], answer["access_token"], subject)
            email, verified = info.get("email"), info.get("email_verified")
            login = login or info.get("preferred_username")
        emails: tuple[str, ...] = ()
        if isinstance(email, str) and email:
            # Some providers send the flag as a string.
            if verified is True or verified == "true" or (self.config.trust_unverified_email and verified is None):
                emails = (email,)
        return Identity(self.name, subject, emails, login if isinstance(login, str) else None)

    async def _verify(self, http: aiohttp.ClientSession, id_token: str, nonce: str | None) -> dict[str, Any]:
        """The ID token's claims once signature, iss, aud, exp, iat and nonce held (OIDC Core 3.1.3.7)."""
        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.InvalidTokenError:
            raise self._broken("its ID token is not a well-formed JWT") from None
        alg = header.get("alg")
        if alg not in ACCEPTED_ALGORITHMS:
            raise self._broken(f"its ID token is signed with {_shown(alg, 16)}, which the gateway does not accept")
        now = time.monotonic()
        if not self.keys.loaded or now - self._keys_at >= self.keys_max_age:
            if await self.keys.refresh(http):
                self._keys_at = now
        key = self.keys.key_for(header.get("kid"))
        if key is None and await self.keys.refetch(http):
            self._keys_at = time.monotonic()
            key = self.keys.key_for(header.get("kid"))
        if key is None:
            raise self._broken("its ID token is signed with a key it does not publish")
        if alg not in key.algorithms:
            raise self._broken("its ID token's algorithm does not match the signing key")
        try:
            claims = jwt.decode(
                id_token,
                key.key,
                algorithms=[alg],
                audience=self.config.client_id,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.InvalidTokenError as exc:
            raise self._broken(f"its ID token did not verify ({_shown(exc, 120)})") from None
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if len(audiences) > 1 and claims.get("azp") != self.config.client_id:
            raise self._broken("its ID token names several audiences and another authorized party")
        sent = claims.get("nonce")
        if nonce is None or not isinstance(sent, str) or not hmac.compare_digest(sent, nonce):
            # The ID token was not issued for this sign-in (a replayed or injected response).
            raise SigninError(400, "provider_refused",
                              f"The ID token from {self.name} does not carry this sign-in's nonce; start again at "
                              f"/auth/login/{self.name}")
        if not isinstance(claims["sub"], str) or not claims["sub"]:
            raise self._broken("its ID token has no usable 'sub' claim")
        return claims

    async def _userinfo(self, http: aiohttp.ClientSession, url: str, access_token: str, subject: str) -> dict:
        status, info = await self._call(http, "GET", url, headers={"Authorization": f"Bearer {access_token}",
                                                                   "Accept": "application/json"})
        if status != 200 or not isinstance(info, dict):
            raise self._broken(f"its userinfo endpoint answered {status}")
        if info.get("sub") != subject:
            # OIDC Core 5.3.2: a userinfo answer for another subject must not be used.
            raise self._broken("its userinfo endpoint answered for another subject than the ID token")
        return info


class SignIn:
    """The configured providers, one HTTP client for talking to them, and the session and state lifetimes."""

    def __init__(self, config: SigninConfig, auth: AuthConfig | None = None) -> None:
        auth = auth or AuthConfig()
        self.config = config
        self.session_ttl = config.session_ttl
        self.state_ttl = config.state_ttl
        self.providers: dict[str, Provider] = {}
        for provider in config.providers:
            base = provider.redirect_base_url or config.redirect_base_url
            if provider.kind == "github":
                self.providers[provider.name] = GitHubProvider(provider, base)
            else:
                self.providers[provider.name] = OidcProvider(provider, base, auth)
        # Where a browser's pages come from: a cookie-authenticated change must come from one of these.
        self.origins = frozenset(p.origin for p in self.providers.values())
        self._http: aiohttp.ClientSession | None = None

    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=_TIMEOUT), cookie_jar=aiohttp.DummyCookieJar()
            )
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
