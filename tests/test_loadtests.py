"""The locust suites in loadtests/ run against a real gateway: requests flow, nothing fails unexpectedly.

Each user class runs headless for a few seconds, as a subprocess (locust monkey-patches the
standard library with gevent: never in the test process), against a gateway on PostgreSQL
that this test starts and provisions through its admin API with loadtests/provision.py,
in front of the shipped stub upstream (loadtests/stub_upstream.py). The verdict is read
from locust's own CSV reports, as an SRE would read them.
"""

from __future__ import annotations

import asyncio
import csv
import importlib.util
import os
import sys
from pathlib import Path

import pytest

LOADTESTS = Path(__file__).resolve().parent.parent / "loadtests"


def _load_provision():
    """loadtests/provision.py (stdlib only), loaded by path: loadtests/ is not put on sys.path."""
    spec = importlib.util.spec_from_file_location("loadtests_provision", LOADTESTS / "provision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


provision = _load_provision()

# (how the class is selected on locust's command line, the prefix of its request names)
SHAPES = {
    "ModernToolCalls": (["ModernToolCalls"], "modern: "),
    "LegacySessions": (["LegacySessions"], "legacy: "),
    "AggregateCalls": (["AggregateCalls"], "mcp: "),
    "TenantMix": (["TenantMix"], "tenant "),
    # By tag: the locustfile leaves out every class the tag does not select.
    "AbusiveClient": (["--tags", "abusive"], "abusive: "),
}


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_locust_user_class_runs_clean(shape, pg_url, make_gateway, stub_upstream, tmp_path):
    selection, prefix = SHAPES[shape]
    # The abusive users speak for their own addresses through X-Forwarded-For: the load
    # generator is a trusted proxy here, as the README asks for runs that include them.
    gw = await make_gateway(pg_url, dataplane={"trusted_proxies": "127.0.0.1/32"}, limits={"ban_violations": 10})
    admin = provision.Admin(gw.admin_url, gw.admin_key)
    document = await asyncio.to_thread(
        provision.provision, admin, gateway_url=gw.url, upstream=stub_upstream, tenants=2, weights=[3, 1],
        servers_per_tenant=2, keys_per_tenant=1, abusive_keys=1, abusive_quota=5,
    )
    targets = tmp_path / "targets.json"
    provision.write_targets(document, targets)
    assert targets.stat().st_mode & 0o077 == 0  # it holds API keys

    report = tmp_path / "run"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "locust", "-f", str(LOADTESTS / "locustfile.py"), "--headless",
        "-u", "2", "-r", "2", "-t", "3s", "--stop-timeout", "2", "--only-summary",
        "--csv", str(report), "--html", str(tmp_path / "run.html"), *selection,
        env={**os.environ, "LOADTEST_TARGETS": str(targets)}, cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(), 90)
    log = output.decode(errors="replace")[-4000:]
    assert proc.returncode == 0, log  # locust exits 1 when any request failed

    stats = [row for row in _rows(Path(f"{report}_stats.csv")) if row["Name"] != "Aggregated"]
    failures = _rows(Path(f"{report}_failures.csv"))
    assert failures == [], failures
    assert stats, log
    assert all(row["Name"].startswith(prefix) for row in stats), [row["Name"] for row in stats]
    assert all(row["Failure Count"] == "0" for row in stats), stats
    limited = {row["Name"]: int(row["Request Count"]) for row in stats if row["Type"] == "429"}
    answered = sum(int(row["Request Count"]) for row in stats if row["Type"] != "429")
    if shape == "AbusiveClient":
        # A few calls within its quota of 5, then the key's tier, then the address is banned.
        assert 1 <= answered <= 5 * len(document["abusive"]["keys"]), stats
        assert limited.get("abusive: tools/call [api_key]", 0) > 0, limited
        assert limited.get("abusive: tools/call [ip_ban]", 0) > 0, limited
    else:
        assert limited == {}, limited  # quotas never shape the other traffic
        assert answered >= 20, stats
    assert (tmp_path / "run.html").stat().st_size > 0
