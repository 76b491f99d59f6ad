"""Circuit breakers per upstream (registry/breakers.py): decided locally, shared through a real Redis.

Several `BreakerBoard`s on one Redis and key prefix stand for several gateway
processes. Outages are real: a board pointed at a closed port, and a board
whose connection to Redis goes through a TCP relay the test cuts.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import pytest
import redis.asyncio as redis
from harness import free_port
from tcp_relay import TcpRelay

from gateway._fast.breaker import ADMITTED, CLOSED, HALF_OPEN, OPEN, REFUSED
from gateway.config import UpstreamSettings
from gateway.registry.breakers import BreakerBoard, BreakerStatus

SERVER = uuid.UUID("00000000-0000-4000-8000-00000000b0a1")
OTHER = uuid.UUID("00000000-0000-4000-8000-00000000b0a2")


def settings(**values) -> UpstreamSettings:
    return UpstreamSettings(**{
        "breaker_consecutive_failures": 3,
        "breaker_minimum_calls": 100,
        "breaker_open_seconds": 60.0,
        "breaker_max_open_seconds": 600.0,
        "breaker_half_open_calls": 2,
        **values,
    })


async def eventually(condition, timeout: float = 1.0) -> float:
    """Seconds until `condition()` held; fails after `timeout`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"not within {timeout} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def trip(board: BreakerBoard, server_id=SERVER) -> None:
    now = time.monotonic()
    for _ in range(3):
        assert board.allow(server_id, now) == ADMITTED
        board.record(server_id, False, now)
    assert board.state(server_id) == OPEN


def recover(board: BreakerBoard, server_id=SERVER) -> None:
    """Run a successful half-open round on `board` (its opening must be over)."""
    now = time.monotonic()
    tickets = [board.allow(server_id, now), board.allow(server_id, now)]
    assert all(t > ADMITTED for t in tickets) and board.state(server_id) == HALF_OPEN
    assert board.allow(server_id, now) == REFUSED  # two trial calls, no more
    board.record(server_id, True, now)
    board.record(server_id, True, now)
    assert board.state(server_id) == CLOSED


async def subscribed(url: str, channel: str, n: int) -> None:
    """Wait until `n` boards listen on `channel` (start() returns before the subscription is made)."""
    client = redis.from_url(url)
    try:
        start = time.monotonic()
        while (await client.pubsub_numsub(channel))[0][1] < n:
            assert time.monotonic() - start < 2.0, "boards not subscribed within 2 s"
            await asyncio.sleep(0.01)
    finally:
        await client.aclose()


def redis_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    return host, int(port)


class Processes:
    """Boards on one Redis and key prefix, as gateway processes would be; closed on exit."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url, self.prefix = url, prefix
        self.started: list[tuple[BreakerBoard, redis.Redis]] = []
        self.relays: list[TcpRelay] = []

    async def start(self, n: int = 1, url: str | None = None, servers=None, **values) -> list[BreakerBoard]:
        made = []
        for _ in range(n):
            client = redis.from_url(url or self.url, socket_timeout=0.5)
            board = BreakerBoard(client, self.prefix)
            board.configure(servers if servers is not None else [(SERVER, settings(**values))])
            await board.start()
            self.started.append((board, client))
            made.append(board)
        return made

    async def relayed(self, **values) -> tuple[BreakerBoard, TcpRelay]:
        """One board whose every Redis connection goes through a relay the test can cut."""
        relay = await TcpRelay(*redis_port(self.url)).start()
        self.relays.append(relay)
        (board,) = await self.start(1, url=f"redis://127.0.0.1:{relay.port}/0", **values)
        return board, relay

    async def close(self) -> None:
        for relay in self.relays:
            relay.restore()
        for board, client in self.started:
            await board.close()
            await client.aclose()
        for relay in self.relays:
            await relay.stop()


@pytest.fixture
async def processes(redis_url, redis_prefix):
    made = Processes(redis_url, redis_prefix)
    yield made
    await made.close()


# -- local decisions ------------------------------------------------------------------------------------------------
def test_a_server_without_a_breaker_is_always_allowed():
    board = BreakerBoard(None, "gw:")
    board.configure([(SERVER, settings(breaker_enabled=False))])
    now = time.monotonic()
    for _ in range(10):
        assert board.allow(SERVER, now) == ADMITTED
        board.record(SERVER, False, now)
    assert board.allow(OTHER, now) == ADMITTED  # never configured
    assert board.state(SERVER) == CLOSED and board.retry_after(SERVER, now) == 0.0
    assert board.available(OTHER, now) is True
    board.release(OTHER, ADMITTED)
    assert board.states() == {}


def test_locally_a_breaker_opens_refuses_and_says_when_to_retry():
    board = BreakerBoard(None, "gw:")
    board.configure([(SERVER, settings(breaker_open_seconds=30.0)), (OTHER, settings())])
    trip(board)
    now = time.monotonic()
    assert board.allow(SERVER, now) == REFUSED
    assert board.available(SERVER, now) is False
    assert 29.0 < board.retry_after(SERVER, now) <= 30.0
    # One upstream's breaker is not another's.
    assert board.allow(OTHER, now) == ADMITTED
    assert board.states() == {SERVER: BreakerStatus("open", 1), OTHER: BreakerStatus("closed", 0)}


def test_configure_keeps_the_state_of_servers_it_keeps():
    board = BreakerBoard(None, "gw:")
    board.configure([(SERVER, settings()), (OTHER, settings())])
    trip(board)
    now = time.monotonic()
    board.record(OTHER, False, now)
    # SERVER's settings unchanged, OTHER's changed: both keep their state and counts.
    board.configure([(SERVER, settings()), (OTHER, settings(breaker_consecutive_failures=2))])
    assert board.state(SERVER) == OPEN
    board.record(OTHER, False, now)
    assert board.state(OTHER) == OPEN  # the earlier failure counted toward the new threshold of 2
    # A shorter cap shortens an opening in force.
    board.configure([(SERVER, settings(breaker_open_seconds=1.0, breaker_max_open_seconds=1.0)), (OTHER, settings())])
    assert board.retry_after(SERVER, time.monotonic()) <= 1.0
    # Gone from the configuration: no breaker any more; back: a fresh one.
    board.configure([(OTHER, settings())])
    assert set(board.states()) == {OTHER}
    assert board.allow(SERVER, now) == ADMITTED
    board.configure([(SERVER, settings()), (OTHER, settings())])
    assert board.states()[SERVER] == BreakerStatus("closed", 0)


def test_a_cancelled_trial_gives_its_slot_back():
    board = BreakerBoard(None, "gw:")
    board.configure([(SERVER, settings(breaker_open_seconds=0.01, breaker_half_open_calls=1))])
    trip(board)
    now = time.monotonic() + 0.02
    ticket = board.allow(SERVER, now)
    assert ticket > ADMITTED and board.allow(SERVER, now) == REFUSED
    board.release(SERVER, ticket)
    assert board.allow(SERVER, now) == ticket


# -- shared through Redis ------------------------------------------------------------------------------------------
async def test_a_trip_reaches_another_process_within_a_second(processes):
    a, b, c = await processes.start(3)
    trip(a)
    took = await eventually(lambda: b.state(SERVER) == OPEN and c.state(SERVER) == OPEN)
    now = time.monotonic()
    assert b.allow(SERVER, now) == REFUSED
    assert 58.0 < b.retry_after(SERVER, now) <= 60.0
    assert b.states()[SERVER] == BreakerStatus("open", 1)
    assert took < 1.0


async def test_recovery_through_half_open_closes_every_process(processes):
    a, b = await processes.start(2, breaker_open_seconds=0.3)
    trip(a)
    await eventually(lambda: b.state(SERVER) == OPEN)
    await asyncio.sleep(0.35)
    recover(a)
    await eventually(lambda: b.state(SERVER) == CLOSED)
    assert b.allow(SERVER, time.monotonic()) == ADMITTED
    assert b.states()[SERVER] == BreakerStatus("closed", 0)
    # Closed everywhere, the next trip is a first opening again, everywhere.
    trip(b)
    await eventually(lambda: a.state(SERVER) == OPEN)
    assert a.states()[SERVER] == BreakerStatus("open", 1)


async def test_a_failed_trial_reopens_every_process_for_longer(processes):
    a, b = await processes.start(2, breaker_open_seconds=0.3)
    trip(a)
    await eventually(lambda: b.state(SERVER) == OPEN)
    await asyncio.sleep(0.35)
    now = time.monotonic()
    assert b.allow(SERVER, now) > ADMITTED
    b.record(SERVER, False, now)
    assert b.states()[SERVER] == BreakerStatus("open", 2)
    await eventually(lambda: a.states()[SERVER] == BreakerStatus("open", 2))
    assert 0.5 < a.retry_after(SERVER, time.monotonic()) <= 0.6


async def test_a_lost_message_is_repaired_by_the_reconcile(processes, redis_url, redis_prefix):
    (b,) = await processes.start(1)
    await subscribed(redis_url, b.channel, 1)
    await asyncio.sleep(0.05)  # the read that follows a subscription is done
    # Another process's opening whose message never arrived: the record alone, as the module documents it.
    client = redis.from_url(redis_url)
    try:
        seconds, micros = await client.time()
        now_ms = seconds * 1000 + micros // 1000
        await client.hset(
            f"{redis_prefix}{{breaker}}:{SERVER}",
            mapping={"v": now_ms, "state": "open", "until": now_ms + 5000, "openings": 1},
        )
    finally:
        await client.aclose()
    # No message: the periodic read finds it, within one reconcile interval (0.5 s) plus a round trip.
    await eventually(lambda: b.state(SERVER) == OPEN, timeout=0.8)
    assert 4.0 < b.retry_after(SERVER, time.monotonic()) <= 5.0


async def test_a_process_started_later_or_configured_later_reads_the_openings(processes):
    (a,) = await processes.start(1, servers=[(SERVER, settings()), (OTHER, settings())])
    trip(a)
    trip(a, OTHER)
    await eventually(lambda: not a._pending)
    (late,) = await processes.start(1)
    assert late.state(SERVER) == OPEN  # read by start(), before any request
    late.configure([(SERVER, settings()), (OTHER, settings())])
    await eventually(lambda: late.state(OTHER) == OPEN)


async def test_a_malformed_message_is_ignored(processes, redis_url, caplog):
    caplog.set_level(logging.WARNING, logger="gateway.breakers")
    a, b = await processes.start(2)
    await subscribed(redis_url, a.channel, 2)
    client = redis.from_url(redis_url)
    try:
        await client.publish(a.channel, b"not json")
        await client.publish(a.channel, b'{"server": "%s", "v": "x"}' % str(SERVER).encode())
    finally:
        await client.aclose()
    await eventually(lambda: sum("malformed" in r.getMessage() for r in caplog.records) >= 4)
    trip(a)
    await eventually(lambda: b.state(SERVER) == OPEN)


# -- Redis unreachable ---------------------------------------------------------------------------------------------
async def test_unreachable_redis_keeps_local_decisions_and_logs_once(processes, caplog):
    caplog.set_level(logging.INFO, logger="gateway.breakers")
    (cut,) = await processes.start(1, url=f"redis://127.0.0.1:{free_port()}/0", breaker_open_seconds=0.3)
    trip(cut)
    assert cut.allow(SERVER, time.monotonic()) == REFUSED
    await asyncio.sleep(0.35)
    recover(cut)
    await asyncio.sleep(1.2)  # retries in the background
    trip(cut)
    unreachable = [r for r in caplog.records if "Redis is unreachable" in r.getMessage()]
    assert len(unreachable) == 1, [r.getMessage() for r in caplog.records]


async def test_a_trip_during_an_outage_is_shared_when_redis_is_back(processes, caplog):
    caplog.set_level(logging.INFO, logger="gateway.breakers")
    (b,) = await processes.start(1)
    a, relay = await processes.relayed()
    relay.cut()
    trip(a)  # decided at once, with Redis out of reach
    await asyncio.sleep(0.8)
    assert b.state(SERVER) == CLOSED
    relay.restore()
    await eventually(lambda: b.state(SERVER) == OPEN, timeout=3.0)
    # Said once the write and the read that follow the outage are done (b may hear of it sooner).
    await eventually(lambda: any("Redis answers again" in r.getMessage() for r in caplog.records))


async def test_a_stale_close_does_not_undo_a_newer_opening(processes):
    # a closes its breaker while cut off; meanwhile b reopened it for longer: b's opening stands, on a too.
    (b,) = await processes.start(1, breaker_open_seconds=0.3)
    a, relay = await processes.relayed(breaker_open_seconds=0.3)
    trip(a)
    await eventually(lambda: b.state(SERVER) == OPEN)
    await eventually(lambda: not a._pending)
    relay.cut()
    await asyncio.sleep(0.35)
    now = time.monotonic()
    assert b.allow(SERVER, now) > ADMITTED
    b.record(SERVER, False, now)  # b's trial fails: open again, second opening
    recover(a)  # a's trials succeed, but a cannot tell anyone
    relay.restore()
    await eventually(lambda: a.state(SERVER) == OPEN, timeout=3.0)
    assert a.states()[SERVER] == BreakerStatus("open", 2)
    assert b.states()[SERVER] == BreakerStatus("open", 2)
