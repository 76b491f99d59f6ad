"""Sign-in routes of the control plane: /auth/login/{provider}, /auth/callback/{provider}, /auth/logout.

The flow (docs/architecture.md, "Sign-in sessions"): login makes a state, a
PKCE verifier and (OIDC) a nonce, remembers them server-side under the hash of
the state (`sessions.begin_signin`), binds the state to the browser with a
short-lived cookie, and redirects to the provider. The callback requires the
same state in the query and in that cookie (login CSRF), uses it once, has the
provider exchange the code (with the verifier), maps the person to their
gateway user and opens a session: an HttpOnly, SameSite=Lax cookie (Secure
unless the control plane is on loopback over http), and the token once in the
JSON body for programs. Logout ends the caller's session.

A browser's session cookie also works on the admin API (`cookie_credential`),
but a change (any method but GET/HEAD) sent with the cookie must come from
the control plane's own origin: SameSite=Lax keeps other sites' forms out,
this keeps out sibling origins of the same site.

Must not: log or echo a code, a state, a verifier or a token, except the new
session's token in the callback's own answer.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

import orjson
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.auth.keys import bearer_token
from gateway.auth.signin import Provider, SignIn, SigninError, new_nonce, new_pkce, new_state
from gateway.config import SigninConfig
from gateway.controlplane import permissions, service, sessions

log = logging.getLogger("gateway.controlplane.signin")

SESSION_COOKIE = "gw_session"
STATE_COOKIE = "gw_signin"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache", "Referrer-Policy": "no-referrer"}


def _json(data: Any, status: int = 200) -> web.Response:
    body = orjson.dumps(data, default=str, option=orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC)
    return web.Response(body=body, status=status, content_type="application/json", headers=_NO_STORE)


def _error(status: int, code: str, message: str) -> web.Response:
    # The admin API's error shape (api.py).
    return _json({"error": {"code": code, "message": message}}, status)


def _public(handler):
    handler.__func__.permission = permissions.PUBLIC  # the route table test reads it
    return handler


class SigninRoutes:
    def __init__(self, engine: AsyncEngine, signin: SignIn | None) -> None:
        self.engine = engine
        self.signin = signin or SignIn(SigninConfig())

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/auth/login/{provider}", _public(self.login))
        router.add_get("/auth/callback/{provider}", _public(self.callback))
        router.add_post("/auth/logout", _public(self.logout))

    def _provider(self, request: web.Request) -> Provider:
        provider = self.signin.providers.get(request.match_info["provider"])
        if provider is None:
            known = ", ".join(sorted(self.signin.providers)) or "none is configured"
            raise SigninError(404, "not_found", f"No sign-in provider by that name (providers: {known})")
        return provider

    # -- the flow -----------------------------------------------------------------------------------
    async def login(self, request: web.Request) -> web.Response:
        """302 to the provider with state, S256 challenge and (OIDC) nonce; the state is bound to this browser."""
        try:
            provider = self._provider(request)
            state, pkce = new_state(), new_pkce()
            nonce = new_nonce() if provider.kind == "oidc" else None
            url = await provider.authorization_url(self.signin.http(), state, pkce, nonce)
            await sessions.begin_signin(self.engine, provider.name, state, pkce.verifier, nonce, self.signin.state_ttl)
        except SigninError as exc:
            return _error(exc.status, exc.code, str(exc))
        response = web.Response(status=302, headers={**_NO_STORE, "Location": url})
        response.set_cookie(
            STATE_COOKIE, state, max_age=self.signin.state_ttl, path=f"{provider.base_path}/auth/callback/{provider.name}",
            httponly=True, secure=provider.secure_cookies, samesite="Lax",
        )
        return response

    async def callback(self, request: web.Request) -> web.Response:
        """Check the state, exchange the code, map the user, open a session (cookie, and the token once in JSON)."""
        try:
            provider = self._provider(request)
        except SigninError as exc:
            return _error(exc.status, exc.code, str(exc))
        try:
            response = await self._finish(request, provider)
        except SigninError as exc:
            log.info("sign-in with %s refused: %s", provider.name, exc.code)
            response = _error(exc.status, exc.code, str(exc))
        # The state is spent either way.
        response.del_cookie(STATE_COOKIE, path=f"{provider.base_path}/auth/callback/{provider.name}",
                            secure=provider.secure_cookies, samesite="Lax", httponly=True)
        return response

    async def _finish(self, request: web.Request, provider: Provider) -> web.Response:
        query = request.query
        state = query.get("state")
        again = f"start again at /auth/login/{provider.name}"
        if not state or len(state) > 256:
            raise SigninError(400, "invalid_state", f"The provider's answer has no state; {again}")
        bound = request.cookies.get(STATE_COOKIE)
        if bound is None or not hmac.compare_digest(bound.encode(), state.encode()):
            # A callback this browser did not start: someone else's code pushed into this browser (login CSRF).
            raise SigninError(400, "invalid_state", f"This sign-in was not started in this browser; {again}")
        verifier, nonce = await sessions.consume_signin(self.engine, provider.name, state)
        if "error" in query:
            error = query["error"]
            message = f"{provider.name} did not sign you in: {error[:64]}"
            if query.get("error_description"):
                message += f" ({query['error_description'][:200]})"
            raise SigninError(400, "provider_refused", f"{message}; {again}")
        code = query.get("code")
        if not code:
            raise SigninError(400, "provider_refused", f"The provider's answer has no code; {again}")
        identity = await provider.identify(self.signin.http(), code, verifier, nonce)
        user = await sessions.user_for(self.engine, identity, provider.config)
        token, session = await sessions.open_session(
            self.engine, user, identity, ttl=self.signin.session_ttl, ip=request.remote,
            user_agent=request.headers.get("User-Agent"),
        )
        log.info("sign-in with %s: session %s for user %s", provider.name, session["id"], user["id"])
        response = _json({**session, "token": token})  # the only time the token is shown
        response.set_cookie(
            SESSION_COOKIE, token, max_age=self.signin.session_ttl, path=f"{provider.base_path}/",
            httponly=True, secure=provider.secure_cookies, samesite="Lax",
        )
        return response

    async def logout(self, request: web.Request) -> web.Response:
        """End the caller's session (bearer or cookie); the cookie is cleared either way."""
        try:
            token = bearer_token(request.headers.get("Authorization"))
            if token is None:
                token = self.cookie_credential(request)
        except service.Forbidden as exc:
            return _error(403, "forbidden", str(exc))
        if token is not None and not sessions.is_session_token(token):
            response = _error(400, "not_a_session",
                              "Sign-out ends a sign-in session; API keys are revoked with DELETE /api/v1/api-keys/{id}")
        elif token is None or not await sessions.end_session(self.engine, token):
            response = _error(401, "unauthenticated", "No active sign-in session came with this request")
        else:
            response = _json({"ended": True})
        provider = next(iter(self.signin.providers.values()), None)
        if provider is not None:
            response.del_cookie(SESSION_COOKIE, path=f"{provider.base_path}/", secure=provider.secure_cookies,
                                samesite="Lax", httponly=True)
        return response

    # -- the admin API's side ----------------------------------------------------------------------
    def cookie_credential(self, request: web.Request) -> str | None:
        """A browser's session token from its cookie; Forbidden for a change that does not come from our origin."""
        token = request.cookies.get(SESSION_COOKIE)
        if token is None:
            return None
        if request.method not in _SAFE_METHODS:
            origin = request.headers.get("Origin")
            if origin is None or origin not in self.signin.origins:
                raise service.Forbidden(
                    "a change sent with the session cookie must come from the gateway's own pages (Origin "
                    f"{'missing' if origin is None else 'not allowed'}); programs send the session token as a bearer"
                )
        return token
