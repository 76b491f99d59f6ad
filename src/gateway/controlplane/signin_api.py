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

Audit (docs/architecture.md, "Audit trail"): a sign-in that opened a session
is one `auth.login` entry, a sign-in refused after the person was matched to
one gateway user (deactivated, tenant suspended) one `auth.login` error entry
for that user, and a sign-out whose session authenticates one `auth.logout`
entry; all go through the writer like the admin API's. A callback refused
before anyone is identified (a bad or spent state, a login-CSRF cookie
mismatch, the provider's refusal, an ID token that does not verify) and a
sign-out without a working session have no principal and get no entry, like
the admin API's 401s; they are logged as before.

A browser's session cookie also works on the admin API (`cookie_credential`),
but a change (any method but GET/HEAD) sent with the cookie must come from
the control plane's own origin: SameSite=Lax keeps other sites' forms out,
this keeps out sibling origins of the same site.

Must not: log, echo or audit a code, a state, a verifier, a nonce, an ID token
or a session token, except the new session's token in the callback's own
answer. An audit entry names a session by its id only.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson
import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.auth.keys import bearer_token
from gateway.auth.signin import Identity, Provider, SignIn, SigninError, new_nonce, new_pkce, new_state
from gateway.config import SigninConfig
from gateway.controlplane import permissions, service, sessions
from gateway.db import tables

if TYPE_CHECKING:
    from gateway.records.audit import AuditTrail
    from gateway.records.writer import RecordWriter

log = logging.getLogger("gateway.controlplane.signin")

SESSION_COOKIE = "gw_session"
STATE_COOKIE = "gw_signin"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache", "Referrer-Policy": "no-referrer"}
# Refusals of `sessions.user_for` that come after the person was matched to exactly one gateway user:
# a failed sign-in by a known principal, audited. Its other refusals (no verified address, no user,
# two users) name no principal.
_KNOWN_USER_REFUSALS = frozenset({"user_inactive", "tenant_suspended"})
# Who a callback found and the session it opened, as far as it got (for its audit entry).
_SIGNING_IN = web.RequestKey("signing_in", object)
_OPENED = web.RequestKey("opened_session", object)


class _Principal(NamedTuple):
    """Who an audit entry of the sign-in routes names (`AuditTrail.admin_row` reads these fields)."""

    tenant_id: uuid.UUID
    user_id: uuid.UUID
    role: str
    api_key_id: None = None


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
    # The audit trail and the writer its entries go through, handed over with the admin API's
    # (ControlPlane.build_app); with none, the sign-in routes write no audit entries.
    audit: AuditTrail | None = None
    writer: RecordWriter | None = None

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
        started = time.perf_counter()
        try:
            provider = self._provider(request)
        except SigninError as exc:
            return _error(exc.status, exc.code, str(exc))
        response = None
        try:
            try:
                response = await self._finish(request, provider)
            except SigninError as exc:
                log.info("sign-in with %s refused: %s", provider.name, exc.code)
                response = _error(exc.status, exc.code, str(exc))
            # The state is spent either way.
            response.del_cookie(STATE_COOKIE, path=f"{provider.base_path}/auth/callback/{provider.name}",
                                secure=provider.secure_cookies, samesite="Lax", httponly=True)
            return response
        finally:
            # An entry only once a gateway user was found: a callback refused before that (state, CSRF
            # cookie, the provider's answer, the ID token, no or several matching users) has no principal.
            who = request.get(_SIGNING_IN)
            if who is not None and self.audit is not None:
                self._audit(request, who, "auth.login", provider.name, request.get(_OPENED), response, started)

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
        try:
            user = await sessions.user_for(self.engine, identity, provider.config)
        except SigninError as exc:
            if exc.code in _KNOWN_USER_REFUSALS and self.audit is not None:
                request[_SIGNING_IN] = await self._refused_user(identity)
            raise
        request[_SIGNING_IN] = _Principal(user["tenant_id"], user["id"], user["role"])
        token, session = await sessions.open_session(
            self.engine, user, identity, ttl=self.signin.session_ttl, ip=request.remote,
            user_agent=request.headers.get("User-Agent"),
        )
        request[_OPENED] = session["id"]
        log.info("sign-in with %s: session %s for user %s", provider.name, session["id"], user["id"])
        response = _json({**session, "token": token})  # the only time the token is shown
        response.set_cookie(
            SESSION_COOKIE, token, max_age=self.signin.session_ttl, path=f"{provider.base_path}/",
            httponly=True, secure=provider.secure_cookies, samesite="Lax",
        )
        return response

    async def logout(self, request: web.Request) -> web.Response:
        """End the caller's session (bearer or cookie); the cookie is cleared either way."""
        started = time.perf_counter()
        try:
            token = bearer_token(request.headers.get("Authorization"))
            if token is None:
                token = self.cookie_credential(request)
        except service.Forbidden as exc:
            return _error(403, "forbidden", str(exc))
        who = session_id = response = None
        try:
            if token is not None and not sessions.is_session_token(token):
                response = _error(400, "not_a_session", "Sign-out ends a sign-in session; API keys are revoked "
                                                        "with DELETE /api/v1/api-keys/{id}")
            else:
                if token is not None and self.audit is not None:
                    # Audited when the session authenticates as it would on the admin API; one that has
                    # ended or expired, or whose user or tenant is shut out, is ended all the same but
                    # names no authenticated principal (like the admin API's 401 and 403 at sign-in).
                    who, session_id = await self._session_principal(token)
                if token is None or not await sessions.end_session(self.engine, token):
                    # With a principal: it authenticated a moment ago, and a revocation or another
                    # sign-out came in between; its entry says error.
                    response = _error(401, "unauthenticated", "No active sign-in session came with this request")
                else:
                    response = _json({"ended": True})
            provider = next(iter(self.signin.providers.values()), None)
            if provider is not None:
                response.del_cookie(SESSION_COOKIE, path=f"{provider.base_path}/", secure=provider.secure_cookies,
                                    samesite="Lax", httponly=True)
            return response
        finally:
            if who is not None:
                self._audit(request, who, "auth.logout", None, session_id, response, started)

    # -- audit ---------------------------------------------------------------------------------------
    def _audit(self, request: web.Request, who: _Principal, action: str, provider: str | None,
               session_id: Any, response: web.Response | None, started: float) -> None:
        """One entry through the writer, as the admin API's (`ControlPlane._audit`): chained, spilled, logged.

        Details are built here from what is known not to be secret; never the query (it holds the code
        and the state), the cookies, the body or the answer (it holds the new session's token).
        """
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        status = response.status if response is not None else 500  # None: the handler raised
        details: dict[str, Any] = {"method": request.method, "path": request.path, "status": status}
        if provider is not None:
            details["provider"] = provider
        if session_id is not None:
            details["session_id"] = str(session_id)
        if status >= 400:
            error = None
            answer = getattr(response, "body", None)
            if isinstance(answer, bytes):
                try:
                    error = orjson.loads(answer).get("error")
                except (orjson.JSONDecodeError, AttributeError):
                    error = None
            details["error"] = ({k: error[k] for k in ("code", "message") if k in error}
                                if isinstance(error, dict) else {"code": "internal_error"})
        self.writer.submit("audit_logs", self.audit.admin_row(
            who, action, "sessions", str(session_id) if session_id is not None else None, details,
            status >= 400, status if status >= 400 else None, elapsed_ms, request.remote,
        ))

    async def _refused_user(self, identity: Identity) -> _Principal | None:
        """The one gateway user a refused sign-in matched (by verified address, as `sessions.user_for`)."""
        wanted = [email.lower() for email in identity.emails]
        query = sa.select(tables.users.c.id, tables.users.c.tenant_id, tables.users.c.role).where(
            sa.func.lower(tables.users.c.email).in_(wanted)
        )
        try:
            async with self.engine.connect() as conn:
                found = (await conn.execute(query)).all()
        except Exception:  # noqa: BLE001 - the refusal stands; only its entry is missing
            log.warning("sign-in refused, but its user could not be read for the audit entry", exc_info=True)
            return None
        return _Principal(found[0].tenant_id, found[0].id, found[0].role) if len(found) == 1 else None

    async def _session_principal(self, token: str) -> tuple[_Principal | None, uuid.UUID | None]:
        """The user behind a session token and the session's id, if the session authenticates; else (None, None)."""
        try:
            actor = await sessions.authenticate(self.engine, token)
        except (service.Unauthenticated, service.Forbidden):
            return None, None
        async with self.engine.connect() as conn:
            session_id = (
                await conn.execute(sa.select(tables.sessions.c.id)
                                   .where(tables.sessions.c.token_hash == sessions.token_hash(token)))
            ).scalar()
        return _Principal(actor.tenant_id, actor.user_id, actor.role), session_id

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
