"""A real OAuth 2.0 / OpenID Connect provider for the sign-in tests, and a GitHub-shaped one.

An aiohttp server on a free 127.0.0.1 port in the test's loop. `kind="oidc"`
serves a discovery document, a JWKS, an authorize endpoint, a token endpoint
and userinfo under `/issuer`, and signs ID tokens with a key it generates;
`kind="github"` serves `/login/oauth/authorize`, `/login/oauth/access_token`
(errors as 200 with an `error` member, as GitHub does), `/api/user` and
`/api/user/emails`.

Who "logs in" at the authorize endpoint is `next_user` (a name given to
`add_user`); the endpoint then redirects back with a code at once, as a
provider does for a person already signed in there. The token endpoint checks
what a real one checks: client credentials (HTTP Basic or in the form), the
code (single use, for this client and redirect URI) and the PKCE verifier
against the challenge (S256). Nothing in the gateway is patched.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from typing import Any
from urllib.parse import unquote, urlencode

import jwt
from aiohttp import web
from oidc_issuer import SigningKey


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class LocalProvider:
    def __init__(self, kind: str = "oidc", *, client_id: str = "gateway-app", client_secret: str | None = None) -> None:
        self.kind = kind
        self.client_id = client_id
        self.client_secret = client_secret or secrets.token_urlsafe(24)
        self.redirect_uris: set[str] = set()
        self.users: dict[str, dict[str, Any]] = {}
        self.next_user: str | None = None
        self.deny = False  # the person declines at the provider: redirect back with error=access_denied
        self.id_token_nonce: str | None = None  # sign ID tokens with this nonce instead of the one asked for
        self.id_token_audience: str | None = None  # ... or for another client
        self.key = SigningKey("RSA")
        self.codes: dict[str, dict[str, Any]] = {}
        self.access_tokens: dict[str, str] = {}
        self.token_errors: list[str] = []  # every refusal of the token endpoint, in order
        self.authorize_requests: list[dict[str, str]] = []
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    # -- the server --------------------------------------------------------------------------
    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def issuer(self) -> str:
        return f"{self.base}/issuer"

    async def start(self) -> LocalProvider:
        app = web.Application()
        if self.kind == "oidc":
            app.router.add_get("/issuer/.well-known/openid-configuration", self._discovery)
            app.router.add_get("/issuer/jwks", self._jwks)
            app.router.add_get("/issuer/authorize", self._authorize)
            app.router.add_post("/issuer/token", self._token)
            app.router.add_get("/issuer/userinfo", self._userinfo)
        else:
            app.router.add_get("/login/oauth/authorize", self._authorize)
            app.router.add_post("/login/oauth/access_token", self._token)
            app.router.add_get("/api/user", self._github_user)
            app.router.add_get("/api/user/emails", self._github_emails)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def add_user(
        self, name: str, email: str | None, *, verified: bool = True, emails: list[dict] | None = None,
        email_in_id_token: bool = True,
    ) -> None:
        """A person with an account here; `emails` is GitHub's /user/emails list (default: `email`, primary)."""
        if emails is None:
            emails = [{"email": email, "verified": verified, "primary": True, "visibility": "private"}] if email else []
        self.users[name] = {
            "sub": f"sub-{name}-{secrets.token_hex(4)}", "id": 1000 + len(self.users), "login": name,
            "email": email, "email_verified": verified, "emails": emails, "email_in_id_token": email_in_id_token,
        }

    # -- OIDC discovery ------------------------------------------------------------------------
    async def _discovery(self, request: web.Request) -> web.Response:
        return web.json_response({
            "issuer": self.issuer,
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "userinfo_endpoint": f"{self.issuer}/userinfo",
            "jwks_uri": f"{self.issuer}/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        })

    async def _jwks(self, request: web.Request) -> web.Response:
        return web.json_response({"keys": [self.key.jwk]})

    # -- the flow --------------------------------------------------------------------------------
    async def _authorize(self, request: web.Request) -> web.Response:
        q = dict(request.query)
        self.authorize_requests.append(q)
        # Problems with the client or redirect URI are shown to the person, never redirected (RFC 6749 4.1.2.1).
        if q.get("client_id") != self.client_id:
            return web.Response(status=400, text="unknown client_id")
        if q.get("redirect_uri") not in self.redirect_uris:
            return web.Response(status=400, text="redirect_uri not registered")
        back = q["redirect_uri"]
        state = q.get("state")
        if q.get("response_type", "code" if self.kind == "github" else None) != "code":
            return _redirect(back, error="unsupported_response_type", state=state)
        if q.get("code_challenge_method") != "S256" or not q.get("code_challenge"):
            return _redirect(back, error="invalid_request", error_description="PKCE S256 required", state=state)
        if self.kind == "oidc" and "openid" not in q.get("scope", "").split():
            return _redirect(back, error="invalid_scope", state=state)
        if self.deny or self.next_user is None:
            return _redirect(back, error="access_denied", error_description="the user declined", state=state)
        code = secrets.token_urlsafe(24)
        self.codes[code] = {
            "user": self.next_user, "client_id": q["client_id"], "redirect_uri": back,
            "challenge": q["code_challenge"], "nonce": q.get("nonce"), "expires": time.time() + 60,
        }
        return _redirect(back, code=code, state=state)

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        client_id, secret = form.get("client_id"), form.get("client_secret")
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Basic ") and self.kind == "oidc":
            pair = base64.b64decode(auth[6:]).decode()
            client_id, _, secret = pair.partition(":")
            client_id, secret = unquote(client_id), unquote(secret)
        if client_id != self.client_id or secret != self.client_secret:
            return self._refuse("invalid_client", "client authentication failed", 401)
        if form.get("grant_type", "authorization_code" if self.kind == "github" else None) != "authorization_code":
            return self._refuse("unsupported_grant_type", "authorization_code only")
        grant = self.codes.pop(form.get("code", ""), None)  # a code works once
        if grant is None or grant["expires"] < time.time():
            return self._refuse("invalid_grant", "unknown, expired or used code")
        if grant["client_id"] != client_id or grant["redirect_uri"] != form.get("redirect_uri"):
            return self._refuse("invalid_grant", "code issued to another client or redirect_uri")
        verifier = form.get("code_verifier", "")
        if _b64(hashlib.sha256(verifier.encode()).digest()) != grant["challenge"]:
            return self._refuse("invalid_grant", "PKCE verification failed")
        user = self.users[grant["user"]]
        access = secrets.token_urlsafe(24)
        self.access_tokens[access] = grant["user"]
        answer: dict[str, Any] = {"access_token": access, "token_type": "bearer", "scope": "openid email"}
        if self.kind == "oidc":
            now = int(time.time())
            claims = {
                "iss": self.issuer, "sub": user["sub"], "aud": self.id_token_audience or self.client_id,
                "iat": now, "exp": now + 300, "nonce": self.id_token_nonce or grant["nonce"],
                "preferred_username": user["login"],
            }
            if user["email_in_id_token"] and user["email"]:
                claims.update(email=user["email"], email_verified=user["email_verified"])
            answer["id_token"] = jwt.encode(claims, self.key.private, algorithm="RS256", headers={"kid": self.key.kid})
            answer["expires_in"] = 300
        return web.json_response(answer)

    def _refuse(self, error: str, description: str, status: int = 400) -> web.Response:
        self.token_errors.append(error)
        # GitHub answers a refused code with 200 and an error member.
        status = 200 if self.kind == "github" else status
        return web.json_response({"error": error, "error_description": description}, status=status)

    def _bearer_user(self, request: web.Request) -> dict[str, Any] | None:
        auth = request.headers.get("Authorization", "")
        name = self.access_tokens.get(auth[7:]) if auth.startswith("Bearer ") else None
        return self.users.get(name) if name else None

    async def _userinfo(self, request: web.Request) -> web.Response:
        user = self._bearer_user(request)
        if user is None:
            return web.json_response({"error": "invalid_token"}, status=401)
        info = {"sub": user["sub"], "preferred_username": user["login"]}
        if user["email"]:
            info.update(email=user["email"], email_verified=user["email_verified"])
        return web.json_response(info)

    # -- GitHub's REST API -----------------------------------------------------------------------
    async def _github_user(self, request: web.Request) -> web.Response:
        user = self._bearer_user(request)
        if user is None:
            return web.json_response({"message": "Bad credentials"}, status=401)
        # The public profile email may be an unverified one: the gateway must not use it.
        return web.json_response({"id": user["id"], "login": user["login"], "email": user["email"]})

    async def _github_emails(self, request: web.Request) -> web.Response:
        user = self._bearer_user(request)
        if user is None:
            return web.json_response({"message": "Bad credentials"}, status=401)
        return web.json_response(user["emails"])


def _redirect(url: str, **params: str | None) -> web.Response:
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return web.Response(status=302, headers={"Location": f"{url}{'&' if '?' in url else '?'}{query}"})
