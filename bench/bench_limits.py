"""Benchmark: rate-limit decisions on shared buckets (local, synchronized) against one Redis call each.

    python bench/bench_limits.py
    python bench/bench_limits.py --seconds 5 --rounds 5 --processes 4 --concurrency 32
    BENCH_REDIS_URL=redis://host:6379/0 python bench/bench_limits.py

Two measurements, each against a baseline taken in the same run:

1. Decisions per second. The shared limiter (gateway.limits.shared): --processes
   SharedBuckets instances, each with its own Redis connection and its sync
   loop running (spend reported every 50 ms, one Lua script per batch), stand in
   for gateway processes; --concurrency tasks, spread over them, each decide a
   stream of requests: `bucket(user).try_acquire`, then `bucket(global)
   .try_acquire` (two decisions), user picked from --users, then one yield to
   the loop (a request yields at least once). The naive limiter makes one Redis
   call per decision: an EVALSHA token-bucket script on Redis' clock, awaited,
   with the same tasks, users and order. Limits are far above the load, so this
   is the cost of deciding, not of refusing (the admitted share is printed).
   All instances run in this one process on one event loop: the figure is
   decisions per second of one core (plus what Redis spends on the side).
2. The latency of one `Limiter.admit` for an authenticated request with every
   tier on (key hour and day, user by role, tenant share with two tenants
   active, global through the fair queue's fast path), on real
   gateway.snapshot.KeyEntry objects, with Redis synchronization running; and
   `check_address` (deny list, ban, per-address bucket) beside it. Measured in
   child processes: the compiled `gateway._fast` modules, and the pure-Python
   twins (GATEWAY_NO_EXTENSIONS=1, which only counts at import time),
   alternating, medians over --rounds.

Keys live under a prefix of this run's own (gwbench-limits-<random>:) and are
deleted at the end. Redis, this script and whatever else runs on the machine
share its CPUs: compare the figures of one run, and read the conditions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import uuid

import redis
import redis.asyncio as aioredis

from gateway.config import LimitSettings
from gateway.limits.bans import BanList
from gateway.limits.limiter import Limiter
from gateway.limits.shared import SharedBuckets
from gateway.snapshot import KeyEntry

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
# Far above any load this machine can make: LimitSettings' maximum for per-minute limits.
HIGH = 100_000_000
BURST_SECONDS = 60.0  # LimitSettings' default: a bucket holds a minute's worth
USER_PER_MINUTE = 6_000_000  # per user bucket in the decisions/s comparison
ROLES = ("ADMIN", "USER", "SERVICE", "READONLY")
# How the users are picked: one precomputed random sequence, read round-robin from a per-task offset.
SEQUENCE = 1 << 16

# One decision, the naive way: refill on Redis' clock, take `cost` if there, store, answer 1 or 0.
_NAIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cap, rate, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local v = redis.call('HMGET', KEYS[1], 'level', 'at')
local level, at = tonumber(v[1]) or cap, tonumber(v[2]) or now
if now > at then
  level = math.min(cap, level + (now - at) * rate)
end
local ok = 0
if level >= cost then
  level = level - cost
  ok = 1
end
redis.call('HSET', KEYS[1], 'level', tostring(level), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(cap / rate * 1000) + 10000)
return ok
"""


def per_minute(limit: float) -> tuple[float, float]:
    """(capacity, refill per second), as the limiter makes them."""
    return max(1.0, limit / 60.0 * BURST_SECONDS), limit / 60.0


# -- decisions per second ------------------------------------------------------------------------
class Mix:
    """The request stream both limiters decide: one global bucket, `users` user buckets."""

    def __init__(self, users: int, seed: int = 1) -> None:
        rng = random.Random(seed)
        self.users = users
        self.sequence = [rng.randrange(users) for _ in range(SEQUENCE)]
        self.user_limits = per_minute(USER_PER_MINUTE)
        self.global_limits = per_minute(HIGH)


async def decide_shared(mix: Mix, prefix: str, processes: int, concurrency: int, seconds: float) -> dict:
    clients = [aioredis.from_url(REDIS_URL) for _ in range(processes)]
    instances = [SharedBuckets(client, prefix) for client in clients]
    try:
        for shared in instances:
            await shared.start()
        ucap, urate = mix.user_limits
        gcap, grate = mix.global_limits
        keys = [("user", u) for u in range(mix.users)]
        sequence, clock, pause = mix.sequence, time.monotonic, asyncio.sleep
        counts = {"decisions": 0, "admitted": 0}
        start = clock()
        deadline = start + seconds

        async def worker(task: int) -> None:
            bucket = instances[task % processes].bucket
            i = task * (SEQUENCE // concurrency)
            decisions = admitted = 0
            while (now := clock()) < deadline:
                user = sequence[i % SEQUENCE]
                i += 1
                admitted += bucket(keys[user], ucap, urate, now).try_acquire(1.0, now)
                admitted += bucket("global", gcap, grate, now).try_acquire(1.0, now)
                decisions += 2
                await pause(0)
            counts["decisions"] += decisions
            counts["admitted"] += admitted

        await asyncio.gather(*(worker(t) for t in range(concurrency)))
        elapsed = clock() - start
        syncs = sum(s.syncs for s in instances)
        failures = sum(s.sync_failures for s in instances)
    finally:
        for shared in instances:
            await shared.stop()
        for client in clients:
            await client.aclose()
    if failures:
        raise RuntimeError(f"{failures} synchronizations with Redis failed: the figures would not include them")
    return {**counts, "seconds": elapsed, "syncs": syncs}


async def decide_naive(mix: Mix, prefix: str, concurrency: int, seconds: float) -> dict:
    client = aioredis.from_url(REDIS_URL, max_connections=concurrency + 4)
    try:
        script = client.register_script(_NAIVE)
        await client.script_load(_NAIVE)  # EVALSHA from the first call
        ucap, urate = mix.user_limits
        gcap, grate = mix.global_limits
        names = [f"{prefix}naive:user:{u}" for u in range(mix.users)]
        global_key = [f"{prefix}naive:global"]
        sequence, clock = mix.sequence, time.monotonic
        counts = {"decisions": 0, "admitted": 0}
        start = clock()
        deadline = start + seconds

        async def worker(task: int) -> None:
            i = task * (SEQUENCE // concurrency)
            decisions = admitted = 0
            while clock() < deadline:
                user = sequence[i % SEQUENCE]
                i += 1
                admitted += await script(keys=[names[user]], args=[ucap, urate, 1])
                admitted += await script(keys=global_key, args=[gcap, grate, 1])
                decisions += 2
            counts["decisions"] += decisions
            counts["admitted"] += admitted

        await asyncio.gather(*(worker(t) for t in range(concurrency)))
        elapsed = clock() - start
    finally:
        await client.aclose()
    return {**counts, "seconds": elapsed}


# -- one Limiter.admit (run in a child process) --------------------------------------------------
def all_tiers_on() -> LimitSettings:
    """Every tier on, limits far above the load; burst factor 1 so the tenant tier decides with two tenants."""
    return LimitSettings(global_per_minute=HIGH, roles=dict.fromkeys(ROLES, HIGH), ip_per_minute=HIGH,
                         anonymous_per_minute=HIGH, tenant_burst_factor=1.0)


async def admit_latency(prefix: str, users: int, batches: int, batch: int) -> dict:
    from gateway._fast import compiled_modules

    client = aioredis.from_url(REDIS_URL)
    shared = SharedBuckets(client, prefix)
    settings = all_tiers_on()
    limiter = Limiter(shared, settings, BanList(None, prefix, settings))  # bans: local; no part in an admit
    await shared.start()
    try:
        tenants = [uuid.uuid4(), uuid.uuid4()]
        keys = [
            KeyEntry(id=uuid.uuid4(), prefix=f"gw_{u:010d}", key_hash="", salt="", tenant_id=tenants[u % 2],
                     user_id=uuid.uuid4(), role="USER", scopes=frozenset({"proxy"}), rate_limit_per_hour=100_000,
                     rate_limit_per_day=1_000_000, expires_at=None, key_active=True, user_active=True)
            for u in range(users)
        ]
        addresses = [f"198.51.100.{a}" for a in range(1, 201)]
        rng = random.Random(2)
        stream = [(rng.choice(keys), rng.choice(addresses)) for _ in range(batch)]
        admit, check_address, clock, perf = limiter.admit, limiter.check_address, time.monotonic, time.perf_counter
        admit_us: list[float] = []
        address_us: list[float] = []
        for n in range(batches + 2):  # the first two fill the buckets and the caches: not counted
            t0 = perf()
            for key, address in stream:
                await admit(key, 100, address, 1.0)
            t1 = perf()
            for key, address in stream:
                check_address(address, clock())
            t2 = perf()
            if n >= 2:
                admit_us.append((t1 - t0) / batch * 1e6)
                address_us.append((t2 - t1) / batch * 1e6)
            await asyncio.sleep(0.01)  # the sync loop runs between batches, as between requests
        if limiter.refusals:
            raise RuntimeError(f"the limiter refused requests: {limiter.refusals}; the figure would time refusals")
        tiers = {"tenant buckets": sum(1 for k in shared._buckets if isinstance(k, tuple) and k[0] == "tenant")}
    finally:
        limiter.close()
        await shared.stop()
        await client.aclose()
    return {
        "admit_us": statistics.median(admit_us),
        "check_address_us": statistics.median(address_us),
        "compiled": compiled_modules(),
        "syncs": shared.syncs,
        **tiers,
    }


def admit_child(args: argparse.Namespace, twin: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_NO_EXTENSIONS"}
    if twin:
        env["GATEWAY_NO_EXTENSIONS"] = "1"
    argv = [sys.executable, os.path.abspath(__file__), "--admit-child", "--prefix", args.prefix,
            "--users", str(args.users), "--loop", args.loop]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"the admit measurement failed ({'twin' if twin else 'compiled'}):\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if set(result["compiled"].values()) != {not twin}:
        raise RuntimeError(f"wrong implementation loaded ({'twin' if twin else 'compiled'}): {result['compiled']}")
    return result


# -- main -----------------------------------------------------------------------------------------
def run_loop(coro, loop: str):
    if loop == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


async def redis_info() -> dict:
    client = aioredis.from_url(REDIS_URL)
    try:
        return await client.info("server")
    finally:
        await client.aclose()


async def cleanup(prefix: str) -> int:
    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
        return len(keys)
    finally:
        await client.aclose()


def measure(args: argparse.Namespace) -> None:
    load_at_start = os.getloadavg()
    info = run_loop(redis_info(), args.loop)
    mix = Mix(args.users)
    print(f"{args.rounds} round(s) of {args.seconds:g} s per limiter, alternating which goes first", flush=True)
    runs: dict[str, list[dict]] = {"shared": [], "naive": []}
    for r in range(args.rounds):
        order = ("shared", "naive") if r % 2 == 0 else ("naive", "shared")
        for name in order:
            if name == "shared":
                result = run_loop(decide_shared(mix, args.prefix, args.processes, args.concurrency, args.seconds),
                                  args.loop)
            else:
                result = run_loop(decide_naive(mix, args.prefix, args.concurrency, args.seconds), args.loop)
            result["rate"] = result["decisions"] / result["seconds"]
            runs[name].append(result)
            extra = f", {result['syncs']} syncs" if "syncs" in result else ""
            print(f"  round {r + 1} {name:<7} {result['rate']:>12,.0f} decisions/s "
                  f"({result['admitted'] / result['decisions']:.1%} admitted{extra})", flush=True)

    admits: dict[str, list[dict]] = {"compiled": [], "twin": []}
    for r in range(args.rounds):
        for name in ("compiled", "twin") if r % 2 == 0 else ("twin", "compiled"):
            result = admit_child(args, twin=name == "twin")
            admits[name].append(result)
            print(f"  round {r + 1} admit {name:<8} {result['admit_us']:6.2f} us, check_address "
                  f"{result['check_address_us']:5.2f} us", flush=True)

    shared = statistics.median(x["rate"] for x in runs["shared"])
    naive = statistics.median(x["rate"] for x in runs["naive"])
    admit = {n: statistics.median(x["admit_us"] for x in admits[n]) for n in admits}
    address = {n: statistics.median(x["check_address_us"] for x in admits[n]) for n in admits}
    median = f"median of {args.rounds}" if args.rounds > 1 else "1 round"
    print()
    print(f"decisions per second ({median}):")
    print(f"  shared buckets, Redis sync on   {shared:>12,.0f} /s")
    print(f"  naive, one EVALSHA per decision {naive:>12,.0f} /s")
    print(f"  ratio shared / naive            {shared / naive:>12.1f}x")
    print(f"Limiter.admit, one authenticated request, every tier on ({median}):")
    for name, label in (("compiled", "compiled (gateway._fast)"), ("twin", "pure-Python twins")):
        print(f"  {label:<31} {admit[name]:>9.2f} us   check_address {address[name]:.2f} us")
    print(f"  ratio twin / compiled           {admit['twin'] / admit['compiled']:>9.2f}x")
    print()
    affinity = len(os.sched_getaffinity(0))
    print("conditions:")
    print(f"  CPUs              {os.cpu_count()} ({affinity} usable), load average at start "
          + " ".join(f"{x:.2f}" for x in load_at_start) + ", at end " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"  Redis             {info.get('redis_version')} at {REDIS_URL.rpartition('@')[2]} (shares these CPUs)")
    print(f"  Python            {platform.python_version()} ({platform.python_implementation()}), "
          f"redis-py {redis.__version__}, event loop {args.loop}")
    print(f"  decisions/s       {args.processes} SharedBuckets instances (processes) in one process, "
          f"{args.concurrency} tasks, {args.seconds:g} s per run; 1 global bucket + {args.users} user buckets "
          f"(user {USER_PER_MINUTE:,}/min, global {HIGH:,}/min); 2 decisions a request, one yield a request "
          "(shared) or one awaited EVALSHA a decision (naive)")
    syncs = statistics.median(x["syncs"] for x in runs["shared"])
    print(f"  sync loop         every 50 ms per instance, {syncs:.0f} script calls (median per run)")
    child = admits["compiled"][-1]
    print(f"  admit             {args.users} KeyEntry keys over 2 tenants (weight 100 each; "
          f"{child['tenant buckets']} tenant buckets used), 200 addresses; every tier at {HIGH:,}/min, "
          "keys 100,000/h and 1,000,000/day; median of 20 batches of 1,000 per child, sync loop running")
    print(f"  compiled modules  compiled child {child['compiled']}, twin child {admits['twin'][-1]['compiled']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per limiter per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=4, help="SharedBuckets instances (gateway processes)")
    parser.add_argument("--concurrency", type=int, default=32, help="tasks deciding at once")
    parser.add_argument("--users", type=int, default=1000, help="user buckets (and keys for admit)")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop", help="uvloop: the gateway's")
    parser.add_argument("--admit-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.admit_child:
        result = run_loop(admit_latency(args.prefix, args.users, batches=20, batch=1000), args.loop)
        print(json.dumps(result))
        return 0
    if args.seconds <= 0 or args.rounds < 1 or args.processes < 1 or args.concurrency < 1 or args.users < 1:
        parser.error("--seconds, --rounds, --processes, --concurrency and --users must be positive")
    args.prefix = f"gwbench-limits-{uuid.uuid4().hex[:10]}:"
    try:
        measure(args)
    finally:
        deleted = run_loop(cleanup(args.prefix), args.loop)
        print(f"  Redis keys        {deleted} under {args.prefix} deleted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
