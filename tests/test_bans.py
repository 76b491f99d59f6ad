"""Per-address bans (limits/bans.py): shared by every process through a real Redis, decided locally.

Several `BanList`s on one Redis stand for several gateway processes. Outages
are real: a BanList pointed at a closed port, and a Redis server of the test's
own that is killed and started again.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import time

import pytest
import redis.asyncio as redis
from harness import free_port, wait_for_port

from gateway.config import LimitSettings
from gateway.limits.bans import Ban, BanList, NeverBanned

ADDRESS = "198.51.100.7"


def settings(**values) -> LimitSettings:
    return LimitSettings(**{"ban_violations": 5, "ban_window": 60.0, "ban_seconds": 600.0, **values})


async def eventually(condition, timeout: float = 1.0) -> float:
    """Seconds until `condition()` held; fails after `timeout`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"not within {timeout} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def banned(bans: BanList, address: str = ADDRESS) -> Ban | None:
    return bans.check(address, time.monotonic())


class Processes:
    """`n` BanLists on one Redis and key prefix, as `n` gateway processes would be; stopped and closed on exit."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url, self.prefix = url, prefix
        self.started: list[tuple[BanList, redis.Redis]] = []

    async def start(self, n: int = 1, url: str | None = None, **values) -> list[BanList]:
        made = []
        for _ in range(n):
            client = redis.from_url(url or self.url)
            bans = BanList(client, self.prefix, settings(**values))
            await bans.start()
            self.started.append((bans, client))
            made.append(bans)
        return made

    async def close(self) -> None:
        for bans, client in self.started:
            await bans.stop()
            await client.aclose()


@pytest.fixture
async def processes(redis_url, redis_prefix):
    made = Processes(redis_url, redis_prefix)
    yield made
    await made.close()


# -- shared through Redis ----------------------------------------------------------------------------------------
async def test_a_ban_reaches_every_process_within_a_second(processes):
    a, b, c = await processes.start(3)
    ban = await a.ban(ADDRESS, 120, "scanning")
    assert ban.address == ADDRESS and ban.reason == "scanning" and 119 < ban.seconds_left() <= 120
    assert banned(a) == ban
    await eventually(lambda: banned(b) is not None and banned(c) is not None)
    assert banned(c).reason == "scanning" and 118 < banned(c).seconds_left() <= 120
    assert [x.address for x in await c.list()] == [ADDRESS]


async def test_a_flood_spread_over_processes_bans_on_all(processes):
    a, b, c = await processes.start(3, ban_violations=6)
    now = time.monotonic()
    # Three refusals each: no process sees six, the shared count does (it drains a little
    # between the processes' flushes, so exactly six spread over time may fall short).
    for bans in (a, b, c):
        for _ in range(3):
            assert bans.violation(ADDRESS, now) is None
    await eventually(lambda: all(banned(x) is not None for x in (a, b, c)))
    assert banned(b).reason == "6 refused requests within 60 s"
    assert 590 < banned(a).seconds_left() <= 600
    # Another address, counted apart, is not banned.
    assert all(banned(x, "198.51.100.8") is None for x in (a, b, c))


async def test_the_threshold_bans_at_once_here_and_soon_everywhere(processes):
    a, b = await processes.start(2, ban_violations=3)
    now = time.monotonic()
    assert a.violation(ADDRESS, now) is None
    assert a.violation(ADDRESS, now) is None
    ban = a.violation(ADDRESS, now)  # the request path decides alone, at once
    assert ban is not None and a.check(ADDRESS, now) == ban
    assert a.violation(ADDRESS, now) == ban  # already banned: not counted again
    await eventually(lambda: banned(b) is not None)


async def test_a_process_started_later_reads_the_bans_in_force(processes):
    (a,) = await processes.start(1)
    await a.ban("2001:db8::7", 60, "earlier")
    (late,) = await processes.start(1)
    assert banned(late, "2001:db8::7").reason == "earlier"


async def test_a_ban_ends_after_ban_seconds_everywhere(processes, redis_url, redis_prefix):
    a, b = await processes.start(2, ban_violations=2, ban_seconds=1.0)
    now = time.monotonic()
    a.violation(ADDRESS, now)
    assert a.violation(ADDRESS, now) is not None
    await eventually(lambda: banned(b) is not None)
    await eventually(lambda: banned(a) is None and banned(b) is None, timeout=1.5)
    assert await a.list() == [] and await b.list() == []
    client = redis.from_url(redis_url)
    try:
        assert [k async for k in client.scan_iter(match=redis_prefix + "{bans}:ban:*")] == []
    finally:
        await client.aclose()
    # Released with a clean slate: one more refusal is not a ban.
    assert a.violation(ADDRESS, time.monotonic()) is None


async def test_a_lift_reaches_every_process(processes):
    a, b, c = await processes.start(3)
    await a.ban(ADDRESS, 600, "mistake")
    await eventually(lambda: banned(c) is not None)
    assert await b.lift(ADDRESS) is True
    assert banned(b) is None
    await eventually(lambda: banned(a) is None and banned(c) is None)
    assert await c.lift(ADDRESS) is False
    assert await a.list() == []


async def test_the_operator_ban_replaces_one_in_force(processes):
    a, b = await processes.start(2)
    await a.ban(ADDRESS, 600, "long")
    await a.ban(ADDRESS, 30, "shorter, on second thought")
    await eventually(lambda: banned(b) is not None and banned(b).reason == "shorter, on second thought")
    assert banned(b).seconds_left() <= 30


# -- the admin API on a real gateway -------------------------------------------------------------------------------
async def test_admin_api_bans_and_lifts_in_every_process(make_gateway, pg_url, redis_url, redis_prefix, processes):
    gw = await make_gateway(pg_url, redis={"url": redis_url, "key_prefix": redis_prefix},
                            limits={"ip_allow": "10.0.0.0/8"})
    other, third = await processes.start(2)

    status, ban = await gw.admin("POST", "/bans", {"address": "2001:db8::66", "seconds": 300, "reason": "abuse"})
    assert status == 201, ban
    assert ban["address"] == "2001:db8::66" and ban["reason"] == "abuse" and ban["until"].endswith("Z")
    assert 299 < ban["seconds_left"] <= 300
    await eventually(lambda: banned(other, "2001:db8::66") is not None and banned(third, "2001:db8::66") is not None)
    assert gw.gateway.bans.check("2001:db8::66", time.monotonic()) is not None

    # A ban another process made by counting is listed too; the IPv4-mapped form is the same address.
    now = time.monotonic()
    for _ in range(5):
        other.violation("::ffff:192.0.2.9", now)
    await eventually(lambda: gw.gateway.bans.check("192.0.2.9", time.monotonic()) is not None)
    status, page = await gw.admin("GET", "/bans")
    assert status == 200 and page["next_cursor"] is None
    assert [(b["address"], b["reason"]) for b in page["items"]] == [
        ("192.0.2.9", "5 refused requests within 60 s"), ("2001:db8::66", "abuse")]

    status, body = await gw.admin("DELETE", "/bans/2001:db8::66")
    assert status == 204 and body is None
    await eventually(lambda: banned(other, "2001:db8::66") is None and banned(third, "2001:db8::66") is None)
    assert (await gw.admin("DELETE", "/bans/2001:db8::66"))[0] == 404
    status, body = await gw.admin("DELETE", "/bans/::ffff:192.0.2.9")
    assert status == 204
    await eventually(lambda: banned(third, "192.0.2.9") is None)
    assert (await gw.admin("GET", "/bans"))[1]["items"] == []


async def test_admin_api_refuses_what_is_not_one_address(gateway):
    for address, needle in (("192.0.2.0/24", "is a range"), ("example.com", "not an IPv4 or IPv6 address"),
                            ("300.1.2.3", "not an IPv4 or IPv6 address")):
        status, body = await gateway.admin("POST", "/bans", {"address": address, "seconds": 60})
        assert status == 400, body
        assert body["error"]["code"] == "bad_address" and needle in body["error"]["message"], body
    status, body = await gateway.admin("DELETE", "/bans/not-an-address")
    assert status == 400 and "not an IPv4 or IPv6 address" in body["error"]["message"]
    status, body = await gateway.admin("POST", "/bans", {"address": ADDRESS, "seconds": -1, "colour": "red"})
    assert status == 422 and {d["field"] for d in body["error"]["details"]} == {"seconds", "colour"}
    # Without Redis the gateway's bans are its own, and work the same; seconds default to limits.ban_seconds.
    status, ban = await gateway.admin("POST", "/bans", {"address": ADDRESS})
    assert status == 201 and ban["reason"] == "banned by the operator" and 599 < ban["seconds_left"] <= 600
    assert [b["address"] for b in (await gateway.admin("GET", "/bans"))[1]["items"]] == [ADDRESS]


async def test_admin_api_will_not_ban_an_allowed_address(make_gateway, pg_url):
    gw = await make_gateway(pg_url, limits={"ip_allow": "10.0.0.0/8,2001:db8:a::/48"})
    for address in ("10.1.2.3", "::ffff:10.1.2.3", "2001:db8:a::9"):
        status, body = await gw.admin("POST", "/bans", {"address": address, "seconds": 60})
        assert status == 409 and "ip_allow" in body["error"]["message"], body


# -- Redis unreachable ---------------------------------------------------------------------------------------------
async def test_unreachable_redis_keeps_local_bans_and_logs_once(processes, caplog):
    caplog.set_level(logging.INFO, logger="gateway.bans")
    (cut,) = await processes.start(1, url=f"redis://127.0.0.1:{free_port()}/0", ban_violations=3)
    now = time.monotonic()
    for address in (ADDRESS, "2001:db8::1"):
        cut.violation(address, now)
        cut.violation(address, now)
        assert cut.violation(address, now) is not None
    ban = await cut.ban("192.0.2.50", 60, "by hand")
    assert banned(cut, "192.0.2.50") == ban
    assert {b.address for b in await cut.list()} == {ADDRESS, "2001:db8::1", "192.0.2.50"}
    await asyncio.sleep(1.3)  # flushes and retries in the background
    assert await cut.lift(ADDRESS) is True and banned(cut) is None
    assert banned(cut, "2001:db8::1") is not None
    unreachable = [r for r in caplog.records if "Redis is unreachable" in r.getMessage()]
    assert len(unreachable) == 1, [r.getMessage() for r in caplog.records]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server to run a Redis of its own")
async def test_after_an_outage_local_bans_are_shared_and_bans_read_again(processes, caplog):
    caplog.set_level(logging.INFO, logger="gateway.bans")
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port, server)
        url = f"redis://127.0.0.1:{port}/0"
        a, b = await processes.start(2, url=url, ban_violations=2)
        server.terminate()
        server.wait(10)
        # The outage: A decides alone.
        now = time.monotonic()
        a.violation(ADDRESS, now)
        assert a.violation(ADDRESS, now) is not None
        await a.ban("2001:db8::99", 300, "during the outage")
        await asyncio.sleep(0.5)
        assert banned(b) is None

        server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        wait_for_port(port, server)
        # A writes what it decided alone; B reads it (or hears it published).
        await eventually(lambda: banned(b) is not None and banned(b, "2001:db8::99") is not None, timeout=5.0)
        assert banned(b, "2001:db8::99").reason == "during the outage"
        await eventually(lambda: any("Redis is back" in r.getMessage() for r in caplog.records), timeout=5.0)
        # Shared again: a lift by B reaches A.
        assert await b.lift(ADDRESS) is True
        await eventually(lambda: banned(a) is None)
        unreachable = [r for r in caplog.records if "Redis is unreachable" in r.getMessage()]
        assert 1 <= len(unreachable) <= 2  # once per process that noticed
    finally:
        server.terminate()
        server.wait(10)


# -- address ranges ----------------------------------------------------------------------------------------------
def test_allow_and_deny_ranges_ipv4_and_ipv6():
    bans = BanList(None, "gw:", settings(
        ip_allow=["10.0.0.0/8", "2001:db8:a::/48", "::ffff:172.16.0.0/108"],
        ip_deny=["192.0.2.0/24", "2001:db8:bad::/48", "203.0.113.9"],
    ))
    for address in ("10.1.2.3", "::ffff:10.1.2.3", "::FFFF:a01:203", "2001:db8:a::1", "172.16.5.5"):
        assert bans.is_allowed_range(address), address
    for address in ("11.0.0.1", "2001:db8:b::1", "172.32.0.1", "::1", "not an address", ""):
        assert not bans.is_allowed_range(address), address
    for address in ("192.0.2.7", "::ffff:192.0.2.7", "2001:db8:bad::1", "2001:DB8:BAD:0:0:0:0:2", "203.0.113.9"):
        assert bans.is_denied(address), address
    for address in ("192.0.3.1", "203.0.113.10", "2001:db8:bae::1", "10.0.0.1", "garbage"):
        assert not bans.is_denied(address), address


async def test_allowed_addresses_are_never_counted_nor_banned():
    bans = BanList(None, "gw:", settings(ban_violations=1, ip_allow=["10.0.0.0/8", "2001:db8:a::/48"]))
    now = time.monotonic()
    for address in ("10.9.9.9", "::ffff:10.9.9.9", "2001:db8:a::5"):
        assert bans.violation(address, now) is None
        assert bans.check(address, now) is None
        with pytest.raises(NeverBanned):
            await bans.ban(address, 60, "no")
    assert bans.violation("11.9.9.9", now) is not None
    # An allow range added later frees an address banned before.
    bans.reconfigure(settings(ban_violations=1, ip_allow=["11.0.0.0/8"]))
    assert bans.check("11.9.9.9", now) is None


async def test_addresses_are_normalized():
    bans = BanList(None, "gw:", settings(ban_violations=2))
    now = time.monotonic()
    await bans.ban("::ffff:198.51.100.7", 60, "mapped")
    assert bans.check("198.51.100.7", now).address == "198.51.100.7"
    await bans.ban("2001:DB8:0:0:0:0:0:1", 60, "long form")
    assert bans.check("2001:db8::1", now) is not None
    # Counted under one name whatever the form.
    bans.violation("192.0.2.1", now)
    assert bans.violation("::ffff:192.0.2.1", now) is not None
    assert await bans.lift("::ffff:192.0.2.1") is True
    assert await bans.lift("192.0.2.1") is False


async def test_operator_input_is_checked():
    bans = BanList(None, "gw:", settings())
    for address in ("192.0.2.0/24", "2001:db8::/64", "host.example", "", "1.2.3"):
        with pytest.raises(ValueError):
            await bans.ban(address, 60, "x")
    for seconds in (0, -5, 31 * 86_400):
        with pytest.raises(ValueError):
            await bans.ban(ADDRESS, seconds, "x")
    with pytest.raises(ValueError):
        await bans.lift("192.0.2.0/24")
    assert await bans.list() == []


def test_bad_ranges_are_refused_by_name():
    with pytest.raises(ValueError, match=r"ip_deny: '10.0.0.300/8' is not an IP address or CIDR range"):
        BanList(None, "gw:", _Unchecked(ip_deny=["10.0.0.300/8"]))


class _Unchecked:
    """Settings as `reconfigure` reads them, without the config's own validation of the ranges."""

    def __init__(self, **values) -> None:
        base = settings()
        for name in ("ban_violations", "ban_window", "ban_seconds", "ip_allow", "ip_deny"):
            setattr(self, name, values.get(name, getattr(base, name)))


async def test_threshold_zero_bans_nothing_but_the_operator_still_can():
    bans = BanList(None, "gw:", settings(ban_violations=0))
    now = time.monotonic()
    assert all(bans.violation(ADDRESS, now) is None for _ in range(100))
    assert bans.check(ADDRESS, now) is None
    await bans.ban(ADDRESS, 60, "by hand")
    assert bans.check(ADDRESS, now) is not None
    # Turned on at runtime.
    bans.reconfigure(settings(ban_violations=2))
    bans.violation("192.0.2.1", now)
    assert bans.violation("192.0.2.1", now) is not None


async def test_local_bans_expire_and_start_stop_without_redis():
    bans = BanList(None, "gw:", settings(ban_violations=1, ban_seconds=0.2))
    await bans.start()
    try:
        ban = bans.violation(ADDRESS, time.monotonic())
        assert ban is not None and ban.seconds_left() <= 0.2
        await eventually(lambda: banned(bans) is None)
        assert await bans.list() == []
    finally:
        await bans.stop()
