"""Bearer JWTs from configured issuers, and the gateway as an OAuth resource server (RFC 9728).

Every issuer here is real: `oidc_issuer.LocalIssuer`, an HTTP server in the
test's loop that serves a discovery document and a JWKS and signs tokens with
keys it generates. The first half drives `TokenVerifier` directly (every way a
token can be wrong, claims to principal); the second half goes through a
gateway on PostgreSQL with the SDK client.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import types
import uuid

import aiohttp
import asyncpg
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from mcp import Client
from mcp.client.sse import sse_client
from harness import free_port
from oidc_issuer import LocalIssuer, SigningKey

from gateway.auth.authenticate import RetryAfterFetch, authenticate, authenticate_request
from gateway.auth.oidc import TokenPrincipal, TokenVerifier, principal_id
from gateway.config import AuthConfig, IssuerConfig
from gateway.dataplane import jsonrpc
from gateway.dataplane.jsonrpc import Refusal
from gateway.demo.client import gateway_client
from gateway.snapshot import Snapshot, TenantEntry

RESOURCE = "https://gateway.example.test"
METADATA_URL = RESOURCE + "/.well-known/oauth-protected-resource"
ACME = uuid.UUID("00000000-0000-4000-8000-00000000ac3e")
GLOBEX = uuid.UUID("00000000-0000-4000-8000-0000000910be")
INIT = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}


def snapshot(acme_status: str = "active") -> Snapshot:
    tenants = {
        ACME: TenantEntry(id=ACME, name="acme", status=acme_status, is_platform=False),
        GLOBEX: TenantEntry(id=GLOBEX, name="globex", status="active", is_platform=False),
    }
    return Snapshot(version=1, tenants=tenants, keys_by_prefix={}, servers={})


@pytest.fixture
async def issuer():
    running = await LocalIssuer().start()
    yield running
    await running.stop()


@pytest.fixture
async def make_verifier():
    started: list[TokenVerifier] = []

    async def make(*issuers: IssuerConfig, **auth) -> TokenVerifier:
        verifier = TokenVerifier(AuthConfig(resource_uri=RESOURCE, issuers=list(issuers), **auth))
        await verifier.start()
        started.append(verifier)
        return verifier

    yield make
    for verifier in started:
        await verifier.close()


def acme_issuer(issuer: LocalIssuer, **fields) -> IssuerConfig:
    return IssuerConfig(issuer=issuer.issuer, **{"tenant_map": {"acme-corp": "acme"}, **fields})


def bearer(token: str) -> str:
    return f"Bearer {token}"


def _segment(doc: dict) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(doc)).rstrip(b"=").decode()


def handmade(header: dict, payload: dict, signature: bytes = b"") -> str:
    """A token assembled by hand, for algorithms no library will sign with."""
    return f"{_segment(header)}.{_segment(payload)}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


def claims(issuer: LocalIssuer, **overrides) -> dict:
    now = int(time.time())
    doc = {"iss": issuer.issuer, "sub": "user-1", "aud": RESOURCE, "iat": now, "nbf": now, "exp": now + 300,
           "tenant": "acme-corp"}
    doc.update(overrides)
    return doc


# -- verification: every way a token can be wrong ------------------------------------------------------
def _hs256_with_public_key(issuer: LocalIssuer) -> str:
    # The classic confusion: HMAC keyed with the issuer's public key, which anyone can fetch.
    key = issuer.keys[0]
    pem = key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
    unsigned = f"{_segment(header)}.{_segment(claims(issuer))}"
    signature = hmac.new(pem, unsigned.encode(), hashlib.sha256).digest()
    return f"{unsigned}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


def _signed_by_a_stranger(issuer: LocalIssuer) -> str:
    # Our issuer, our kid, someone else's private key.
    stranger = SigningKey("RSA")
    stranger.kid = issuer.keys[0].kid
    return issuer.token(audience=RESOURCE, key=stranger, tenant="acme-corp")


def _ec_key_under_the_rsa_kid(issuer: LocalIssuer) -> str:
    ec_key = issuer.keys[1]
    ec_key_as_rsa = SigningKey.__new__(SigningKey)
    ec_key_as_rsa.private, ec_key_as_rsa.alg, ec_key_as_rsa.kid = ec_key.private, "ES256", issuer.keys[0].kid
    return issuer.token(audience=RESOURCE, key=ec_key_as_rsa, tenant="acme-corp")


def _without_exp(issuer: LocalIssuer) -> str:
    key = issuer.keys[0]
    payload = claims(issuer)
    del payload["exp"]
    return jwt.encode(payload, key.private, algorithm="RS256", headers={"kid": key.kid})


REFUSED = {
    "expired": (lambda i: i.token(audience=RESOURCE, lifetime=-120, tenant="acme-corp"), "expired at"),
    "not yet valid (nbf)": (lambda i: i.token(audience=RESOURCE, nbf=int(time.time()) + 600, tenant="acme-corp"),
                            "not valid yet"),
    "issued in the future (iat)": (lambda i: i.token(audience=RESOURCE, iat=int(time.time()) + 600,
                                                     tenant="acme-corp"), "not valid yet"),
    "wrong audience": (lambda i: i.token(audience="https://other.example.test", tenant="acme-corp"),
                       f"its audience must include {RESOURCE}"),
    "audience of a path below ours": (lambda i: i.token(audience=RESOURCE + "/mcp", tenant="acme-corp"),
                                      "not meant for this gateway"),
    "no audience": (lambda i: i.token(audience=None, tenant="acme-corp"), "no 'aud' claim"),
    "wrong issuer": (lambda i: i.token(audience=RESOURCE, issuer="https://evil.example.test", tenant="acme-corp"),
                     "issuer 'https://evil.example.test' is not one this gateway trusts"),
    "alg none": (lambda i: handmade({"alg": "none", "typ": "JWT"}, claims(i)), "signing algorithm (none)"),
    "HS256": (lambda i: handmade({"alg": "HS256", "kid": i.keys[0].kid}, claims(i),
                                 hmac.new(b"secret", b"x", hashlib.sha256).digest()), "signing algorithm (HS256)"),
    "HS256 keyed with the public key": (_hs256_with_public_key, "signing algorithm (HS256)"),
    "signed by another key under our kid": (_signed_by_a_stranger, "signature does not verify"),
    "EC signature under an RSA kid": (_ec_key_under_the_rsa_kid, "does not match the issuer's key"),
    "no subject": (lambda i: i.token(audience=RESOURCE, subject=None, tenant="acme-corp"), "no 'sub' claim"),
    "no expiry": (_without_exp, "no 'exp' claim"),
    "garbage in three segments": (lambda i: "eyJhbGciOi.bm90IGpzb24.c2ln", "well-formed JWT"),
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_refused_tokens(issuer, make_verifier, case):
    make, fragment = REFUSED[case]
    verifier = await make_verifier(acme_issuer(issuer))
    token = make(issuer)
    with pytest.raises(Refusal) as refused:
        await authenticate_request(types.SimpleNamespace(current=snapshot()), bearer(token), "proxy", tokens=verifier)
    refusal = refused.value
    assert (refusal.http_status, refusal.code) == (401, jsonrpc.UNAUTHENTICATED)
    assert fragment in refusal.message
    challenge = refusal.headers["WWW-Authenticate"]
    assert 'error="invalid_token"' in challenge and f'resource_metadata="{METADATA_URL}"' in challenge
    # The token is never echoed, in the message or the header (nor any of its segments).
    for part in token.split("."):
        if len(part) > 8:
            assert part not in refusal.message and part not in challenge


async def test_a_valid_token_becomes_a_principal_and_is_verified_once(issuer, make_verifier):
    verifier = await make_verifier(acme_issuer(issuer, rate_limit_per_hour=7, rate_limit_per_day=70))
    token = issuer.token(audience=[RESOURCE, "https://another.example.test"], tenant="acme-corp", subject="ada")
    snap = snapshot()
    principal = authenticate(snap, bearer(token), "proxy", tokens=verifier)
    assert isinstance(principal, TokenPrincipal)
    assert principal.tenant_id == ACME
    assert principal.id == principal.user_id == principal_id(issuer.issuer, "ada")
    assert principal.scopes == frozenset({"proxy"}) and principal.role == "USER"
    assert (principal.rate_limit_per_hour, principal.rate_limit_per_day) == (7, 70)
    assert principal.expires_at > time.time()
    assert verifier.verifications == 1
    # The same token again: answered from the cache, no second signature check.
    assert authenticate(snap, bearer(token), "proxy", tokens=verifier) is principal
    assert verifier.verifications == 1
    # Another token of the same person (here signed with the EC key) is the same principal.
    again = issuer.token(audience=RESOURCE, tenant="acme-corp", subject="ada", key=issuer.keys[1], lifetime=600)
    assert authenticate(snap, bearer(again), "proxy", tokens=verifier).id == principal.id
    assert verifier.verifications == 2
    other = issuer.token(audience=RESOURCE, tenant="acme-corp", subject="grace")
    assert authenticate(snap, bearer(other), "proxy", tokens=verifier).id != principal.id


async def test_a_cached_token_still_expires(issuer, make_verifier):
    verifier = await make_verifier(acme_issuer(issuer), leeway=5)
    token = issuer.token(audience=RESOURCE, tenant="acme-corp", lifetime=60)
    exp = authenticate(snapshot(), bearer(token), "proxy", tokens=verifier).expires_at
    authenticate(snapshot(), bearer(token), "proxy", tokens=verifier, now=exp + 4)  # within the leeway
    with pytest.raises(Refusal) as refused:
        authenticate(snapshot(), bearer(token), "proxy", tokens=verifier, now=exp + 5)
    assert refused.value.http_status == 401 and "expired at" in refused.value.message


async def test_api_keys_still_take_the_key_path(issuer, make_verifier):
    verifier = await make_verifier(acme_issuer(issuer))
    with pytest.raises(Refusal) as refused:
        authenticate(snapshot(), bearer("gw_abcdefghij_" + "A" * 40), "proxy", tokens=verifier)
    assert refused.value.message == "Invalid API key"
    assert verifier.verifications == 0


# -- keys: unknown kid, rotation, an issuer that cannot be reached ------------------------------------
async def test_unknown_kid_fetches_the_keys_once_then_refuses(issuer, make_verifier):
    verifier = await make_verifier(acme_issuer(issuer))
    store = types.SimpleNamespace(current=snapshot())
    assert issuer.jwks_fetches == 1  # at start
    unpublished = SigningKey("RSA")
    token = issuer.token(audience=RESOURCE, key=unpublished, tenant="acme-corp")
    with pytest.raises(RetryAfterFetch):
        authenticate(store.current, bearer(token), "proxy", tokens=verifier)
    for attempt in range(3):
        with pytest.raises(Refusal) as refused:
            await authenticate_request(store, bearer(token), "proxy", tokens=verifier)
        assert not isinstance(refused.value, RetryAfterFetch)
        assert refused.value.http_status == 401
        assert f"key ('{unpublished.kid}') that {issuer.issuer} does not publish" in refused.value.message
    # One refetch for the first attempt; the others fall within jwks_min_refetch_interval.
    assert issuer.jwks_fetches == 2
    # Other garbage kids cannot make it fetch again either.
    other = issuer.token(audience=RESOURCE, key=SigningKey("EC"), tenant="acme-corp")
    with pytest.raises(Refusal):
        await authenticate_request(store, bearer(other), "proxy", tokens=verifier)
    assert issuer.jwks_fetches == 2


async def test_key_rotated_at_the_issuer(issuer, make_verifier):
    verifier = await make_verifier(acme_issuer(issuer))
    store = types.SimpleNamespace(current=snapshot())
    old_token = issuer.token(audience=RESOURCE, tenant="acme-corp")
    await authenticate_request(store, bearer(old_token), "proxy", tokens=verifier)
    new_key = issuer.rotate(keep_old=False)  # the old keys are withdrawn
    new_token = issuer.token(audience=RESOURCE, key=new_key, tenant="acme-corp")
    principal = await authenticate_request(store, bearer(new_token), "proxy", tokens=verifier)
    assert principal.tenant_id == ACME and issuer.jwks_fetches == 2
    # The cached token signed with a withdrawn key is forgotten with the key.
    with pytest.raises(Refusal) as refused:
        await authenticate_request(store, bearer(old_token), "proxy", tokens=verifier)
    assert refused.value.http_status == 401 and "does not publish" in refused.value.message


async def test_unreachable_issuer_is_503_then_recovers(make_verifier):
    # A port of its own (not an ephemeral one another worker could take while it is down).
    issuer = await LocalIssuer().start(port=free_port())
    port = issuer.port
    token = issuer.token(audience=RESOURCE, tenant="acme-corp")
    await issuer.stop()  # the gateway starts while the issuer is down
    verifier = await make_verifier(
        IssuerConfig(issuer=issuer.issuer, tenant_map={"acme-corp": "acme"}), jwks_min_refetch_interval=0
    )
    store = types.SimpleNamespace(current=snapshot())
    with pytest.raises(Refusal) as refused:
        await authenticate_request(store, bearer(token), "proxy", tokens=verifier)
    assert refused.value.http_status == 503 and refused.value.code == jsonrpc.UPSTREAM_UNAVAILABLE
    assert "could not be fetched" in refused.value.message and "Retry-After" in refused.value.headers
    # The issuer comes back (same port, same keys): the next token fetches its keys and passes.
    await issuer.start(port=port)
    try:
        principal = await authenticate_request(store, bearer(token), "proxy", tokens=verifier)
        assert principal.tenant_id == ACME
    finally:
        await issuer.stop()


async def test_a_discovery_document_naming_another_issuer_is_refused(issuer, make_verifier):
    # The document says issuer X; the configuration claims it is issuer Y.
    config = IssuerConfig(
        issuer="http://127.0.0.1:1/impostor", discovery_url=issuer.issuer + "/.well-known/openid-configuration",
        tenant="acme",
    )
    verifier = await make_verifier(config)
    assert not verifier.issuers[config.issuer].loaded and issuer.jwks_fetches == 0
    assert "names issuer" in verifier.issuers[config.issuer].last_error


# -- claims: tenant, role, scope ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "token_claims", "expected"),
    [
        ({"tenant_map": {"acme-corp": "acme"}}, {"tenant": "acme-corp"}, ACME),
        ({"tenant_map": {"g": str(GLOBEX)}}, {"tenant": "g"}, GLOBEX),  # mapped to an id
        ({"tenant": "globex"}, {"tenant": "acme-corp"}, GLOBEX),  # the issuer's fixed tenant wins
        ({"tenant_claim": "org.id", "tenant_map": {"o-1": "acme"}}, {"org": {"id": "o-1"}}, ACME),
        ({"tenant_claim": "org", "tenant_map": {"o-1": "acme"}}, {"org": "o-1"}, ACME),
    ],
    ids=["by-name", "by-id", "fixed", "nested-claim", "named-claim"],
)
async def test_tenant_from_claims(issuer, make_verifier, config, token_claims, expected):
    verifier = await make_verifier(IssuerConfig(issuer=issuer.issuer, **config))
    token = issuer.token(audience=RESOURCE, **token_claims)
    assert authenticate(snapshot(), bearer(token), "proxy", tokens=verifier).tenant_id == expected


@pytest.mark.parametrize(
    ("token_claims", "fragment"),
    [
        ({"tenant": "initech"}, "tenant ('initech') is not mapped to a gateway tenant"),
        ({}, "no 'tenant' claim"),
        ({"tenant": ["acme-corp"]}, "no 'tenant' claim"),
        ({"tenant": "ghost"}, "configured as 'no-such-tenant', which this gateway does not have"),
    ],
    ids=["unmapped", "missing", "not-a-string", "mapped-to-nothing"],
)
async def test_tenant_refused_403(issuer, make_verifier, token_claims, fragment):
    verifier = await make_verifier(
        IssuerConfig(issuer=issuer.issuer, tenant_map={"acme-corp": "acme", "ghost": "no-such-tenant"})
    )
    token = issuer.token(audience=RESOURCE, **token_claims)
    for _ in range(2):  # the second answer comes from the cache, and is the same
        with pytest.raises(Refusal) as refused:
            authenticate(snapshot(), bearer(token), "proxy", tokens=verifier)
        assert (refused.value.http_status, refused.value.code) == (403, jsonrpc.FORBIDDEN)
        assert fragment in refused.value.message
    assert verifier.verifications == 1


async def test_suspended_tenant_403(issuer, make_verifier):
    verifier = await make_verifier(acme_issuer(issuer))
    token = issuer.token(audience=RESOURCE, tenant="acme-corp")
    authenticate(snapshot(), bearer(token), "proxy", tokens=verifier)
    with pytest.raises(Refusal) as refused:
        authenticate(snapshot("suspended"), bearer(token), "proxy", tokens=verifier)
    assert refused.value.http_status == 403 and "tenant is suspended" in refused.value.message


@pytest.mark.parametrize(
    ("role_config", "value", "expected"),
    [
        ({}, ["ADMIN"], "ADMIN"),
        ({}, "SERVICE", "SERVICE"),
        ({}, ["USER", "ADMIN", "READONLY"], "ADMIN"),
        ({}, ["READONLY", "USER"], "USER"),
        ({}, ["admin"], "USER"),  # names are exact: the default role
        ({}, None, "USER"),
        ({"default_role": "READONLY"}, ["Gateway.Admin"], "READONLY"),
        ({"role_map": {"Gateway.Admin": "ADMIN"}}, ["Gateway.Reader", "Gateway.Admin"], "ADMIN"),
        ({"role_claim": "realm_access.roles"}, {"realm_access": {"roles": ["SERVICE"]}}, "SERVICE"),
    ],
    ids=["list", "string", "highest-wins", "user-over-readonly", "exact-names", "missing", "default-role",
         "role-map", "nested-claim"],
)
async def test_role_from_claims(issuer, make_verifier, role_config, value, expected):
    verifier = await make_verifier(acme_issuer(issuer, **role_config))
    extra = value if isinstance(value, dict) else {"roles": value}
    token = issuer.token(audience=RESOURCE, tenant="acme-corp", **extra)
    assert authenticate(snapshot(), bearer(token), "proxy", tokens=verifier).role == expected


async def test_scopes_come_from_the_issuer_configuration(issuer, make_verifier):
    verifier = await make_verifier(acme_issuer(issuer, scopes=["metrics"]), scopes_supported=["mcp:tools"])
    store = types.SimpleNamespace(current=snapshot())
    token = issuer.token(audience=RESOURCE, tenant="acme-corp", scope="proxy admin")  # the token's own say is not ours
    assert (await authenticate_request(store, bearer(token), "metrics", tokens=verifier)).scopes == {"metrics"}
    with pytest.raises(Refusal) as refused:
        await authenticate_request(store, bearer(token), "proxy", tokens=verifier)
    assert refused.value.http_status == 403 and "lacks the 'proxy' scope" in refused.value.message
    challenge = refused.value.headers["WWW-Authenticate"]
    assert 'error="insufficient_scope"' in challenge and 'scope="proxy"' in challenge
    assert f'resource_metadata="{METADATA_URL}"' in challenge
    # A 401 names the scopes to ask the issuer for.
    with pytest.raises(Refusal) as refused:
        await authenticate_request(store, None, "proxy", tokens=verifier)
    assert 'scope="mcp:tools"' in refused.value.headers["WWW-Authenticate"]


async def test_entra_issuer(make_verifier):
    entra = await LocalIssuer(entra=True).start()
    try:
        config = IssuerConfig(
            issuer=entra.issuer, kind="entra", audience="api://gateway-app", tenant_map={entra.tid: "globex"},
            role_map={"Gateway.Admin": "ADMIN"},
        )
        verifier = await make_verifier(config)
        assert entra.discovery_fetches == 1 and entra.jwks_fetches == 1
        token = entra.token(audience="api://gateway-app", roles=["Gateway.Admin"])
        principal = authenticate(snapshot(), bearer(token), "proxy", tokens=verifier)
        assert (principal.tenant_id, principal.role) == (GLOBEX, "ADMIN")
        # Entra shares its signing keys across directories: a token of another tid is refused.
        foreign = entra.token(audience="api://gateway-app", tid=str(uuid.uuid4()))
        with pytest.raises(Refusal) as refused:
            authenticate(snapshot(), bearer(foreign), "proxy", tokens=verifier)
        assert refused.value.http_status == 401 and "'tid' claim is not the tenant of its issuer" in refused.value.message
        # The gateway's own URI is not the audience of this issuer's tokens.
        with pytest.raises(Refusal) as refused:
            authenticate(snapshot(), bearer(entra.token(audience=RESOURCE)), "proxy", tokens=verifier)
        assert "api://gateway-app" in refused.value.message
    finally:
        await entra.stop()


def test_metadata_location_follows_rfc_9728():
    for resource, url in [
        ("https://gw.example.test", "https://gw.example.test/.well-known/oauth-protected-resource"),
        ("https://gw.example.test/", "https://gw.example.test/.well-known/oauth-protected-resource"),
        ("https://gw.example.test:8443/tenant1", "https://gw.example.test:8443/.well-known/oauth-protected-resource/tenant1"),
    ]:
        verifier = TokenVerifier(AuthConfig(resource_uri=resource, issuers=[]))
        assert verifier.metadata_url == url
        assert verifier.metadata_path == "/" + url.split("/", 3)[3]


# -- through a gateway ------------------------------------------------------------------------------------
def auth_toml(issuers: list[dict], **auth) -> str:
    lines = ["[auth]", f"resource_uri = {json.dumps(RESOURCE)}"]
    lines += [f"{name} = {json.dumps(value)}" for name, value in auth.items()]
    for issuer in issuers:
        lines.append("[[auth.issuers]]")
        for name, value in issuer.items():
            if isinstance(value, dict):
                pairs = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in value.items())
                lines.append(f"{name} = {{ {pairs} }}")
            else:
                lines.append(f"{name} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def auth_gateway(pg_url, make_gateway, tmp_path):
    async def start(issuers: list[dict], **auth):
        path = tmp_path / "gateway.toml"
        path.write_text(auth_toml(issuers, **auth))
        return await make_gateway(pg_url, config_file=path)

    return start


async def post(url: str, token: str | None, body=INIT, headers=None):
    sent = {"Accept": "application/json, text/event-stream", **(headers or {})}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=body, headers=sent) as resp:
            return resp.status, resp.headers, await resp.read()


async def test_sdk_client_with_a_token(auth_gateway, issuer, mcp_upstream, pg_url):
    gw = await auth_gateway([{"issuer": issuer.issuer, "tenant_map": {"acme-corp": "acme"}}])
    t = await gw.tenancy("acme", mcp_upstream)
    token = issuer.token(audience=RESOURCE, tenant="acme-corp", subject="ada")
    for mode in ("legacy", "2026-07-28"):
        async with gateway_client(t.endpoint, token, mode=mode) as client:
            result = await client.call_tool("echo", {"text": f"hello {mode}"})
            assert result.content[0].text.endswith(f"hello {mode}")
    # /mcp, the tenant's servers as one.
    async with gateway_client(f"{gw.url}/mcp", token) as client:
        tools = await client.list_tools()
        assert "demo__echo" in {tool.name for tool in tools.tools}
    # The bridged 2024-11-05 transport takes the token too.
    streams = sse_client(f"{gw.url}/servers/demo/sse", headers={"Authorization": f"Bearer {token}"})
    async with Client(streams, mode="legacy") as client:
        result = await client.call_tool("echo", {"text": "over sse"})
        assert result.content[0].text.endswith("over sse")
    # Requests are recorded under the token's principal.
    conn = await asyncpg.connect(pg_url)
    try:
        for _ in range(100):
            rows = await conn.fetch("SELECT DISTINCT api_key_id, user_id, tenant_id FROM request_logs "
                                    "WHERE api_key_id IS NOT NULL")
            if rows:
                break
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    expected = principal_id(issuer.issuer, "ada")
    assert {(r["api_key_id"], r["user_id"], str(r["tenant_id"])) for r in rows} == {(expected, expected, t.tenant_id)}


async def test_refusals_through_the_gateway(auth_gateway, issuer, mcp_upstream):
    gw = await auth_gateway(
        [{"issuer": issuer.issuer, "tenant_map": {"acme-corp": "acme", "initech": "initech"}}],
        scopes_supported=["mcp:tools"],
    )
    t = await gw.tenancy("acme", mcp_upstream)
    await gw.tenancy("initech", mcp_upstream)
    # No credentials: 401 pointing at the metadata, with the scopes to ask for.
    status, headers, body = await post(t.endpoint, None)
    assert status == 401
    challenge = headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ") and f'resource_metadata="{METADATA_URL}"' in challenge
    assert 'scope="mcp:tools"' in challenge
    # A token meant for someone else.
    foreign = issuer.token(audience="https://other.example.test", tenant="acme-corp")
    status, headers, body = await post(t.endpoint, foreign)
    assert status == 401 and orjson.loads(body)["error"]["code"] == jsonrpc.UNAUTHENTICATED
    assert "not meant for this gateway" in orjson.loads(body)["error"]["message"]
    assert foreign.split(".")[2] not in body.decode() and foreign.split(".")[1] not in headers["WWW-Authenticate"]
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert f'resource_metadata="{METADATA_URL}"' in headers["WWW-Authenticate"]
    # A tenant the issuer names but the gateway does not map: 403.
    status, _, body = await post(t.endpoint, issuer.token(audience=RESOURCE, tenant="umbrella"))
    assert status == 403 and "'umbrella') is not mapped" in orjson.loads(body)["error"]["message"]
    # A suspended tenant: 403 like its keys.
    token = issuer.token(audience=RESOURCE, tenant="initech")
    status, _, _ = await post(f"{gw.url}/servers/demo/mcp", token)
    assert status == 200
    await _suspend(gw, "initech")
    status, _, body = await post(f"{gw.url}/servers/demo/mcp", token)
    assert status == 403 and "tenant is suspended" in orjson.loads(body)["error"]["message"]
    # An API key without the proxy scope: 403 insufficient_scope, pointing at the metadata too.
    status, key = await gw.admin(
        "POST", "/api-keys", {"user_id": t.user_id, "name": "metrics-only", "scopes": ["metrics"]}
    )
    assert status == 201
    status, headers, _ = await post(t.endpoint, key["key"])
    assert status == 403
    assert 'error="insufficient_scope"' in headers["WWW-Authenticate"] and 'scope="proxy"' in headers["WWW-Authenticate"]
    assert f'resource_metadata="{METADATA_URL}"' in headers["WWW-Authenticate"]
    # /metrics: a token of an issuer that grants only proxy is refused there.
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw.url}/metrics", headers={"Authorization": f"Bearer {foreign}"}) as resp:
            assert resp.status == 401 and "resource_metadata=" in resp.headers["WWW-Authenticate"]
        good = issuer.token(audience=RESOURCE, tenant="acme-corp")
        async with http.get(f"{gw.url}/metrics", headers={"Authorization": f"Bearer {good}"}) as resp:
            assert resp.status == 403 and 'error="insufficient_scope"' in resp.headers["WWW-Authenticate"]


async def _suspend(gw, name: str) -> None:
    conn = await asyncpg.connect(str(gw.gateway.config.database.url))
    try:
        await conn.execute("UPDATE tenants SET status = 'suspended' WHERE name = $1", name)
        await conn.execute("UPDATE config_state SET version = version + 1 WHERE id = 1")
    finally:
        await conn.close()
    await gw.gateway.store.refresh()


async def test_unknown_kid_and_rotation_through_the_gateway(auth_gateway, issuer, mcp_upstream):
    gw = await auth_gateway([{"issuer": issuer.issuer, "tenant_map": {"acme-corp": "acme"}}])
    t = await gw.tenancy("acme", mcp_upstream)
    assert issuer.jwks_fetches == 1
    # The issuer rotates: a token with the new kid makes the gateway fetch the keys, once.
    new_key = issuer.rotate("EC")
    status, _, _ = await post(t.endpoint, issuer.token(audience=RESOURCE, key=new_key, tenant="acme-corp"))
    assert status == 200 and issuer.jwks_fetches == 2
    # A kid nobody publishes: refused, and no fetch so soon after the last one.
    stray = issuer.token(audience=RESOURCE, key=SigningKey("RSA"), tenant="acme-corp")
    for _ in range(3):
        status, _, body = await post(t.endpoint, stray)
        assert status == 401 and "does not publish" in orjson.loads(body)["error"]["message"]
    assert issuer.jwks_fetches == 2


async def test_entra_through_the_gateway(auth_gateway, mcp_upstream):
    entra = await LocalIssuer(entra=True).start()
    try:
        gw = await auth_gateway([{
            "issuer": entra.issuer, "kind": "entra", "audience": "api://gateway-app",
            "tenant_map": {entra.tid: "contoso"}, "role_map": {"Gateway.User": "USER"},
        }])
        t = await gw.tenancy("contoso", mcp_upstream)
        token = entra.token(audience="api://gateway-app", roles=["Gateway.User"])
        async with gateway_client(t.endpoint, token) as client:
            tools = await client.list_tools()
            assert "echo" in {tool.name for tool in tools.tools}
    finally:
        await entra.stop()


async def test_token_quota(auth_gateway, issuer, mcp_upstream):
    gw = await auth_gateway([{"issuer": issuer.issuer, "tenant_map": {"acme-corp": "acme"}, "rate_limit_per_hour": 2}])
    t = await gw.tenancy("acme", mcp_upstream)
    first = issuer.token(audience=RESOURCE, tenant="acme-corp")
    second = issuer.token(audience=RESOURCE, tenant="acme-corp", lifetime=400)  # same person, fresh token
    assert (await post(t.endpoint, first))[0] == 200
    assert (await post(t.endpoint, second))[0] == 200
    await gw.gateway.store.publish_change()  # a configuration change keeps the principal's used allowance
    status, headers, body = await post(t.endpoint, first)
    assert status == 429 and "Retry-After" in headers
    assert orjson.loads(body)["error"]["code"] == jsonrpc.RATE_LIMITED


async def test_protected_resource_metadata(auth_gateway, issuer, pg_url):
    gw = await auth_gateway([{"issuer": issuer.issuer, "tenant": "acme"}], scopes_supported=["mcp:tools", "openid"])
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw.url}/.well-known/oauth-protected-resource") as resp:
            assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "*"
            assert await resp.json() == {
                "resource": RESOURCE,
                "authorization_servers": [issuer.issuer],
                "bearer_methods_supported": ["header"],
                "scopes_supported": ["mcp:tools", "openid"],
            }
        # One resource, one document: a path-suffixed URL would have to name a resource of that path.
        async with http.get(f"{gw.url}/.well-known/oauth-protected-resource/mcp") as resp:
            assert resp.status == 404
        async with http.post(f"{gw.url}/.well-known/oauth-protected-resource") as resp:
            assert resp.status == 405


async def test_without_issuers_nothing_changes(gateway, mcp_upstream):
    t = await gateway.tenancy("acme", mcp_upstream)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway.url}/.well-known/oauth-protected-resource") as resp:
            assert resp.status == 404
    status, headers, body = await post(t.endpoint, None)
    assert status == 401 and "resource_metadata" not in headers["WWW-Authenticate"]
    # A JWT is then just a string that is not an API key.
    issuer = await LocalIssuer().start()
    try:
        status, _, body = await post(t.endpoint, issuer.token(audience=RESOURCE))
    finally:
        await issuer.stop()
    assert status == 401 and orjson.loads(body)["error"]["message"] == "Invalid API key"
