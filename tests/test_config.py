"""Configuration: defaults, TOML, environment overrides, and errors that name the key."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import uuid

import pytest
import sqlalchemy as sa

from gateway import config
from gateway.cli import configure_logging
from gateway.config import ConfigError
from gateway.db.engine import create_engine


def test_defaults_are_the_embedded_gateway():
    cfg = config.load(None, env={})
    assert cfg.database.url.startswith("sqlite:///")
    assert cfg.redis.url == ""
    assert (cfg.dataplane.host, cfg.dataplane.port) == ("127.0.0.1", 8080)
    assert (cfg.controlplane.host, cfg.controlplane.port) == ("127.0.0.1", 8081)
    assert not cfg.uses_postgres


def test_limit_defaults_are_the_documented_tiers():
    limits = config.load(None, env={}).limits
    assert limits.enabled and limits.global_per_minute == 5000
    assert limits.roles == {"ADMIN": 1000, "USER": 100, "SERVICE": 1000, "READONLY": 100}
    assert (limits.anonymous_per_minute, limits.ip_per_minute, limits.burst_seconds) == (20, 600, 60.0)
    assert (limits.queue_max, limits.queue_deadline, limits.redis_down_policy) == (64, 2.0, "local")


def test_limit_tables_from_toml_and_environment(tmp_path):
    path = tmp_path / "limits.toml"
    path.write_text('[limits]\nroles = {USER = 7}\ncosts = {"tools/call:search" = 5}\nip_deny = ["10.0.0.0/8"]\n')
    limits = config.load(path, env={}).limits
    assert limits.roles["USER"] == 7 and limits.roles["ADMIN"] == 1000  # a role left out keeps its default
    assert limits.costs == {"tools/call:search": 5.0} and limits.ip_deny == ["10.0.0.0/8"]
    limits = config.load(None, env={"GATEWAY_LIMITS_ROLES": '{"SERVICE": 0}', "GATEWAY_LIMITS_IP_ALLOW": "::1, 127.0.0.1"}).limits
    assert limits.roles["SERVICE"] == 0 and limits.ip_allow == ["::1", "127.0.0.1"]
    for env, named in [
        ({"GATEWAY_LIMITS_ROLES": "USER=3"}, "must be a JSON object"),
        ({"GATEWAY_LIMITS_ROLES": '{"BOSS": 3}'}, "BOSS"),
        ({"GATEWAY_LIMITS_IP_DENY": "10.0.0.0/8, nonsense"}, "'nonsense' is not an IP address or CIDR range"),
        ({"GATEWAY_DATAPLANE_TRUSTED_PROXIES": "300.1.1.1"}, "trusted_proxies"),
        ({"GATEWAY_LIMITS_REDIS_DOWN_POLICY": "open"}, "redis_down_policy"),
    ]:
        with pytest.raises(config.ConfigError, match=named):
            config.load(None, env=env)


def test_toml_then_environment(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text('[database]\nurl = "postgresql://postgres@127.0.0.1/test"\n[dataplane]\nport = 9000\n')
    cfg = config.load(path, env={"GATEWAY_DATAPLANE_PORT": "9100", "GATEWAY_REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert cfg.uses_postgres
    assert cfg.dataplane.port == 9100  # the environment wins
    assert cfg.redis.url == "redis://127.0.0.1:6379/0"


def test_gateway_config_variable(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text("[writer]\nbatch_size = 17\n")
    assert config.load(None, env={"GATEWAY_CONFIG": str(path)}).writer.batch_size == 17


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"GATEWAY_DATAPLANE_PORT": "eighty"}, ["GATEWAY_DATAPLANE_PORT", "dataplane.port"]),
        ({"GATEWAY_DATAPLANE_PORT": "70000"}, ["GATEWAY_DATAPLANE_PORT", "<= 65535"]),
        ({"GATEWAY_WRITER_BATCH_SIZE": "0"}, ["writer.batch_size", ">= 1"]),
        ({"GATEWAY_DATAPLANE_PROT": "1"}, ["GATEWAY_DATAPLANE_PROT", "unknown key"]),
        ({"GATEWAY_NOPE_X": "1"}, ["GATEWAY_NOPE_X", "unknown setting"]),
        ({"GATEWAY_DATABASE_URL": "mysql://x"}, ["database.url", "sqlite or postgresql"]),
        ({"GATEWAY_LOG_LEVEL": "LOUD"}, ["log.level"]),
    ],
)
def test_bad_values_name_the_key(env, names):
    with pytest.raises(ConfigError) as err:
        config.load(None, env=env)
    for name in names:
        assert name in str(err.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        config.load(None, env={"GATEWAY_DATAPLANE_PORT": "x", "GATEWAY_WRITER_BATCH_SIZE": "-1"})
    assert "dataplane.port" in str(err.value) and "writer.batch_size" in str(err.value)


def test_bad_toml_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[dataplane\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(path, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.toml", env={})


def test_cli_stops_on_bad_config_with_the_key_named():
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"],
        env={"GATEWAY_DATAPLANE_PORT": "eighty", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "GATEWAY_DATAPLANE_PORT" in proc.stderr


def test_describe_lists_every_setting_with_its_variable():
    rows = {key: env for key, env, _ in config.describe()}
    assert rows["database.url"] == "GATEWAY_DATABASE_URL"
    assert rows["redis.url"] == "GATEWAY_REDIS_URL"
    assert rows["dataplane.max_body_bytes"] == "GATEWAY_DATAPLANE_MAX_BODY_BYTES"


# -- [auth]: JWT issuers (a list of tables, so TOML only) --------------------------------------------
AUTH_TOML = """
[auth]
resource_uri = "https://mcp.example.com"
scopes_supported = ["mcp:tools"]
[[auth.issuers]]
issuer = "https://login.microsoftonline.com/2f1c7a52-7b0e-4c6b-9d0e-3a4b5c6d7e8f/v2.0"
kind = "entra"
audience = "api://gateway"
tenant_map = { "2f1c7a52-7b0e-4c6b-9d0e-3a4b5c6d7e8f" = "acme" }
role_map = { "Gateway.Admin" = "ADMIN" }
[[auth.issuers]]
issuer = "http://127.0.0.1:9000/realms/dev"
tenant = "acme"
scopes = ["proxy", "metrics"]
"""


def test_auth_issuers_from_toml_and_scalars_from_the_environment(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text(AUTH_TOML)
    cfg = config.load(path, env={"GATEWAY_AUTH_RESOURCE_URI": "https://gw.example.com", "GATEWAY_AUTH_LEEWAY": "10"})
    assert cfg.auth.resource_uri == "https://gw.example.com"  # the environment wins
    assert cfg.auth.leeway == 10.0 and cfg.auth.scopes_supported == ["mcp:tools"]
    entra, local = cfg.auth.issuers
    assert (entra.kind, entra.audience, entra.role_map) == ("entra", "api://gateway", {"Gateway.Admin": "ADMIN"})
    assert entra.tenant_map == {"2f1c7a52-7b0e-4c6b-9d0e-3a4b5c6d7e8f": "acme"}
    assert (local.kind, local.tenant, local.scopes, local.default_role) == ("oidc", "acme", ["proxy", "metrics"], "USER")
    assert config.load(None, env={}).auth.issuers == []


@pytest.mark.parametrize(
    ("edit", "env", "names"),
    [
        (lambda t: t.replace('tenant = "acme"', 'tenant = "acme"\nteanant_claim = "x"'), {},
         ["auth.issuers[1]", "unknown field `teanant_claim`"]),
        (lambda t: t.replace('kind = "entra"', 'kind = "okta"'), {}, ["auth.issuers[0].kind", "okta"]),
        (lambda t: t.replace('"Gateway.Admin" = "ADMIN"', '"Gateway.Admin" = "ROOT"'), {},
         ["auth.issuers[0].role_map", "ROOT"]),
        (lambda t: t, {"GATEWAY_AUTH_ISSUERS": "https://issuer.example.com"},
         ["GATEWAY_AUTH_ISSUERS", "list of tables", "[[auth.issuers]]"]),
        (lambda t: t.replace('resource_uri = "https://mcp.example.com"\n', ""), {}, ["auth.resource_uri is required"]),
        (lambda t: t.replace('tenant = "acme"', ""), {}, ["auth.issuers[1]", "exactly one of `tenant`"]),
        (lambda t: t.replace("http://127.0.0.1:9000", "http://idp.example.com"), {},
         ["auth.issuers[1].issuer", "https://"]),
        (lambda t: t.replace("/v2.0", ""), {}, ["auth.issuers[0].issuer", "<tenant id>/v2.0"]),
        (lambda t: t.replace("http://127.0.0.1:9000/realms/dev", "https://login.microsoftonline.com/"
                             "2f1c7a52-7b0e-4c6b-9d0e-3a4b5c6d7e8f/v2.0"), {}, ["configured twice"]),
    ],
    ids=["unknown-key", "bad-kind", "bad-role", "issuers-from-env", "no-resource", "no-tenant", "plain-http",
         "entra-shape", "duplicate"],
)
def test_bad_auth_settings_name_the_key(tmp_path, edit, env, names):
    path = tmp_path / "gateway.toml"
    path.write_text(edit(AUTH_TOML))
    with pytest.raises(ConfigError) as err:
        config.load(path, env=env)
    for name in names:
        assert name in str(err.value)


# ------------------------------------------------------------------ logging


@pytest.fixture
def saved_logging():
    """The logging state configure_logging changes, put back afterwards."""
    names = ("", "gateway.audit", "aiosqlite", "sqlalchemy.engine")
    saved = [(logging.getLogger(n), logging.getLogger(n).handlers[:], logging.getLogger(n).level,
              logging.getLogger(n).propagate) for n in names]
    yield
    for logger, handlers, level, propagate in saved:
        logger.handlers[:], logger.propagate = handlers, propagate
        logger.setLevel(level)


async def test_debug_logging_prints_no_sql_parameter(saved_logging, sqlite_url):
    """[log] level = "DEBUG": the gateway's own debug lines are written, the SQL libraries' parameters are not
    (a pending sign-in's PKCE verifier is one: controlplane/sessions.py stores it through such an engine)."""
    configure_logging(config.load(None, env={"GATEWAY_LOG_LEVEL": "DEBUG"}))
    stream = io.StringIO()
    logging.getLogger().handlers[0].setStream(stream)
    secret = "pkce-verifier-" + uuid.uuid4().hex
    engine = create_engine(sqlite_url)
    try:
        async with engine.begin() as conn:
            assert (await conn.execute(sa.text("SELECT :verifier"), {"verifier": secret})).scalar_one() == secret
    finally:
        await engine.dispose()
    logging.getLogger("gateway.test").debug("debug lines are written")
    written = stream.getvalue()
    assert "gateway.test: debug lines are written" in written
    assert secret not in written
    assert logging.getLogger("aiosqlite").getEffectiveLevel() == logging.INFO
    assert logging.getLogger("sqlalchemy.engine.Engine").getEffectiveLevel() == logging.WARNING


def test_a_quieter_gateway_keeps_the_sql_libraries_as_quiet(saved_logging):
    configure_logging(config.load(None, env={"GATEWAY_LOG_LEVEL": "ERROR"}))
    assert logging.getLogger("aiosqlite").getEffectiveLevel() == logging.ERROR
    assert logging.getLogger("sqlalchemy.engine").getEffectiveLevel() == logging.ERROR
