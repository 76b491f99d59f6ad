"""Provision a gateway for a load test through its admin API, and write the targets file locust reads.

    python loadtests/provision.py --admin-url http://127.0.0.1:8081 --admin-key "$ADMIN_KEY" \\
        --upstream http://127.0.0.1:9100/mcp --gateway-url http://127.0.0.1:8080 \\
        --tenants 5 --weights 8,4,2,1,1 --servers-per-tenant 2 --keys-per-tenant 4 \\
        --lift-limits --out loadtests/targets.json

What it creates, all over HTTP with the operator key that `gateway bootstrap` printed
(nothing touches the database directly, so it works against any deployment):

- `--tenants` tenants named `<prefix>-t<NN>`, each with a fair-scheduling `weight` taken
  from `--weights` (cycled; the same numbers weight the multi-tenant locust mix);
- in each, one SERVICE user and `--keys-per-tenant` API keys (scope `proxy`) at the
  highest per-key quotas the API allows (100,000/hour, 1,000,000/day), so quotas never
  shape a measurement; and `--servers-per-tenant` servers `stub-<i>` pointing at
  `--upstream` (the stub in loadtests/stub_upstream.py, or any MCP server);
- one more tenant `<prefix>-abuse` whose keys have `--abusive-quota` requests an hour:
  the abusive locust user spends that at once, then meets 429s and, after
  `limits.ban_violations` of them, a ban of its (X-Forwarded-For) address;
- with `--lift-limits`, the deployment-wide limits are raised to their maximum
  (`PATCH /api/v1/rate-limits`: global, per role, per address) so that one load
  generator's address is not what the test measures. It changes a running deployment:
  `curl -X DELETE <admin>/api/v1/rate-limits` with the operator key restores the
  `[limits]` defaults.

The prefix defaults to `lt<random>`, so runs never collide with each other or with real
tenants. The targets file holds API keys: it is written with mode 0600 and belongs in no
repository (loadtests/targets.json is ignored by git).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
import urllib.error
import urllib.request
from itertools import cycle
from pathlib import Path

# The admin API's maxima (controlplane/schemas.py): quotas are never what a load test measures.
MAX_PER_HOUR = 100_000
MAX_PER_DAY = 1_000_000
MAX_PER_MINUTE = 100_000_000
ROLES = ("ADMIN", "USER", "SERVICE", "READONLY")
DEFAULT_TARGETS = Path(__file__).resolve().parent / "targets.json"


class AdminError(RuntimeError):
    pass


class Admin:
    """A small synchronous client of the admin API (stdlib only: provisioning is a few dozen calls)."""

    def __init__(self, base_url: str, key: str, timeout: float = 30.0) -> None:
        self.base = base_url.rstrip("/")
        if not self.base.endswith("/api/v1"):
            self.base += "/api/v1"
        self.key = key
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.base + path, data=data, method=method,
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                text = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise AdminError(f"{method} {path}: HTTP {exc.code}: {detail}") from None
        except urllib.error.URLError as exc:
            raise AdminError(f"{method} {path}: cannot reach the admin API at {self.base}: {exc.reason}") from None
        return json.loads(text) if text else {}


def _tenant(admin: Admin, name: str, weight: int, role: str, keys: int, per_hour: int, per_day: int) -> dict:
    tenant = admin.call("POST", "/tenants", {"name": name, "weight": weight})
    user = admin.call("POST", "/users", {
        "tenant_id": tenant["id"], "username": f"{name}-load", "email": f"{name}@loadtest.invalid", "role": role,
    })
    minted = [
        admin.call("POST", "/api-keys", {
            "user_id": user["id"], "name": f"{name}-key-{i}", "scopes": ["proxy"],
            "rate_limit_per_hour": per_hour, "rate_limit_per_day": per_day,
        })["key"]
        for i in range(keys)
    ]
    return {"id": tenant["id"], "name": name, "user_id": user["id"], "keys": minted}


def provision(
    admin: Admin, *, gateway_url: str, upstream: str, tenants: int = 3, weights: list[int] | None = None,
    servers_per_tenant: int = 2, keys_per_tenant: int = 2, abusive_keys: int = 2, abusive_quota: int = 30,
    prefix: str | None = None, lift_limits: bool = False,
) -> dict:
    """Create the tenants, users, keys and servers; return the targets document."""
    prefix = prefix or f"lt{secrets.token_hex(3)}"
    if lift_limits:
        admin.call("PATCH", "/rate-limits", {
            "global_per_minute": MAX_PER_MINUTE, "ip_per_minute": MAX_PER_MINUTE,
            "roles": {role: MAX_PER_MINUTE for role in ROLES},
        })
    out_tenants = []
    for index, weight in zip(range(tenants), cycle(weights or [1])):
        entry = _tenant(admin, f"{prefix}-t{index:02d}", weight, "SERVICE", keys_per_tenant, MAX_PER_HOUR, MAX_PER_DAY)
        entry["weight"] = weight
        entry["servers"] = []
        for s in range(servers_per_tenant):
            name = f"stub-{s}"
            admin.call("POST", "/servers", {
                "tenant_id": entry["id"], "name": name, "endpoint_url": upstream, "transport_type": "http",
                "tags": ["loadtest"],
            })
            entry["servers"].append(name)
        out_tenants.append(entry)
    abuse = _tenant(admin, f"{prefix}-abuse", 1, "SERVICE", abusive_keys, abusive_quota, MAX_PER_DAY)
    admin.call("POST", "/servers", {
        "tenant_id": abuse["id"], "name": "stub-0", "endpoint_url": upstream, "transport_type": "http",
    })
    abuse.update(servers=["stub-0"], rate_limit_per_hour=abusive_quota)
    return {
        "version": 1,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "prefix": prefix,
        "gateway": gateway_url.rstrip("/"),
        "upstream": upstream,
        "limits_lifted": lift_limits,
        "tenants": out_tenants,
        "abusive": abuse,
    }


def write_targets(document: dict, path: Path) -> None:
    """Write the targets file readable by its owner only: it holds API keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(document, handle, indent=2)
        handle.write("\n")


def _weights(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"weights are whole numbers separated by commas, not {text!r}") from None
    if not values or any(not 1 <= v <= 1000 for v in values):
        raise argparse.ArgumentTypeError("each weight is 1..1000 (a tenant's fair-scheduling weight)")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--admin-url", default=os.environ.get("LOADTEST_ADMIN_URL", "http://127.0.0.1:8081"),
                        help="the control plane (default $LOADTEST_ADMIN_URL or http://127.0.0.1:8081)")
    parser.add_argument("--admin-key", default=os.environ.get("LOADTEST_ADMIN_KEY"),
                        help="the operator key from `gateway bootstrap` (default $LOADTEST_ADMIN_KEY)")
    parser.add_argument("--gateway-url", default="http://127.0.0.1:8080",
                        help="the data plane the locust users call (written to the targets file)")
    parser.add_argument("--upstream", required=True, help="the MCP endpoint every server points at")
    parser.add_argument("--tenants", type=int, default=3)
    parser.add_argument("--weights", type=_weights, default=[4, 2, 1],
                        help="tenant weights, cycled over the tenants (default 4,2,1)")
    parser.add_argument("--servers-per-tenant", type=int, default=2)
    parser.add_argument("--keys-per-tenant", type=int, default=2)
    parser.add_argument("--abusive-keys", type=int, default=2)
    parser.add_argument("--abusive-quota", type=int, default=30, help="requests per hour of an abusive key")
    parser.add_argument("--prefix", help="tenant name prefix (default lt<random>)")
    parser.add_argument("--lift-limits", action="store_true",
                        help="raise the deployment's global, per-role and per-address limits to their maximum")
    parser.add_argument("--out", type=Path, default=DEFAULT_TARGETS, help=f"targets file (default {DEFAULT_TARGETS})")
    args = parser.parse_args(argv)
    if not args.admin_key:
        parser.error("the operator key is needed: --admin-key or $LOADTEST_ADMIN_KEY")
    admin = Admin(args.admin_url, args.admin_key)
    try:
        document = provision(
            admin, gateway_url=args.gateway_url, upstream=args.upstream, tenants=args.tenants, weights=args.weights,
            servers_per_tenant=args.servers_per_tenant, keys_per_tenant=args.keys_per_tenant,
            abusive_keys=args.abusive_keys, abusive_quota=args.abusive_quota, prefix=args.prefix,
            lift_limits=args.lift_limits,
        )
    except AdminError as exc:
        print(f"provision: {exc}", file=sys.stderr)
        return 1
    write_targets(document, args.out)
    print(f"provisioned {len(document['tenants'])} tenants (+1 abusive) under prefix {document['prefix']}; "
          f"targets in {args.out}", file=sys.stderr)
    print(f"targets={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
