"""Benchmark: the gateway's proxy path against a plain aiohttp proxy and the bare upstream.

    python bench/proxy.py
    python bench/proxy.py --duration 8 --connections 32 --payload-bytes 256 --rounds 3
    python bench/proxy.py --database sqlite
    python bench/proxy.py --gateways on        # only the production gateway (every feature on)
    python bench/proxy.py --compare guard      # the upstream guard on against off, instead of the limits
    python bench/proxy.py --compare audit      # the audit trail on against off
    python bench/proxy.py --workers 1,2        # also `gateway serve --workers 1` and `--workers 2` (needs Redis)
    python bench/proxy.py --compare records --pairs 20   # and 20 short on/off pairs: the ratio with its interval
    BENCH_PG_URL=postgresql://user@host:5432/postgres python bench/proxy.py
    BENCH_REDIS_URL=redis://host:6379/0 python bench/proxy.py --workers 1,2

It starts, as child processes on free 127.0.0.1 ports: the stub upstream
(bench/stub_upstream.py), the baseline proxy (bench/baseline_proxy.py: aiohttp
server + one aiohttp ClientSession) and the gateway (`gateway serve`, one
process) on a database of its own: `gwbench_proxy_<random>`, created on the
PostgreSQL server BENCH_PG_URL names (default postgres@127.0.0.1:5432) and
dropped WITH (FORCE) at the end, or a temporary SQLite file. The gateway runs
as in production: API-key authentication and one `request_logs` row per
request through the batched writer are on, and so are the rate limits and
the upstream guard.

`--compare` (default `limits`) names the feature measured: the "on" gateway
is always the production configuration, every feature on; the "off" gateway
turns off that one feature and nothing else (the table COMPARISONS).
`--gateways` (default `both`) says which of the two run; "both": two gateway
processes on the same database, measured in every round (alternating which
goes first), and the report adds on/off ratios of throughput and of CPU per
request for the feature. (`--limits X` is the older spelling of `--compare
limits --gateways X`.)

The rate limits, on: every tier decides every request (per-address bucket,
the key's hour and day quotas, the user's bucket by role, the tenant's share,
the global bucket through the fair queue), at limits far above any load here
(LIMITS_HIGH per minute, the settings' maximum; burst factor 1 so that the
tenant tier decides with the two tenants the keys belong to): it measures the
cost of deciding, never refusals. Off (`--compare limits`):
GATEWAY_LIMITS_ENABLED=false, no tier at all (no per-key quota either).

The upstream guard, on: every call goes through the router, the upstream's
circuit breaker (local: no Redis), its queue (default max_concurrency 1024, so
nothing waits at this concurrency) and passive health. With `--compare guard`
each tenant also gets a routing rule, `bench-self`, that covers the benchmarked
server and has that same server as its only replica (weighted round robin),
so every request is routed too. Off (`--compare guard`):
GATEWAY_DATAPLANE_UPSTREAM_GUARD=false, calls go straight out (the rule stays
in the database; that gateway ignores it). After its first measured run each
gateway's /metrics is checked for a series only the feature makes
(gateway_fair_queue, gateway_upstream_calls): present when on, absent when
off, or the run stops.

`--workers N[,N...]` (default: none, the runs above only) adds one target per
count: the production gateway ("on": limits and guard on, every feature as
above) started as `gateway serve --workers N` on the same database, with Redis
(BENCH_REDIS_URL, default 127.0.0.1:6379/0, which more than one worker needs)
under a key prefix of this run's own, `gwbench-proxy-<random>:<target>:`,
whose keys are deleted at the end. N > 1 is a supervisor and N workers sharing
the ports (SO_REUSEPORT); `--workers 1` is one process, no supervisor, but
with Redis like the others, so that the ratio between counts measures workers
only. They are measured in the same rounds as the other targets; the report
adds, for each count after the smallest, "workers N/M": throughput and CPU
per request (the supervisor and every worker summed) over the smallest
count's, and how the measured requests split over the workers (the kernel
spreads wrk's connections). A --workers gateway's /metrics answers for all its
workers, merged: every scrape of it must say that all N answered, and the
check after its first measured run wants the feature's series in each
worker's figures (a gauge, so each has its `worker` label) and some of that
run's requests served by every worker. Each gateway's keys (warm-up and
measured run) are all made before its warm-up, so that every worker has
loaded them by the measured run.

It drives keep-alive POSTs (a JSON-RPC tools/call) at fixed concurrency with
wrk (one thread, a generated Lua script; an aiohttp client if wrk is not on
PATH) at three targets in turn: the upstream directly, the baseline, the
gateway(s). Each gets a warm-up, then a measured run; `--rounds` repeats them,
alternating the order of the baseline and the gateways, and the medians count.

`--pairs N` (with both gateways) adds, after the rounds, N pairs of short
measured runs (`--pair-seconds`, default 3, each after its own warm-up): the
two gateways one right after the other, the off one first in every other
pair. On a shared VM the machine's speed drifts over tens of seconds, so a
pair's own on/off ratio is steadier than the ratio of medians taken a round
apart. The report gives the median of the pairs' ratios (CPU per request,
throughput) with a 95% interval that assumes nothing about the noise: the
k-th smallest and k-th largest ratios, k from the binomial distribution of
how many ratios fall below the median. It also gives what the feature adds
in the kernel (system time), with its interval.

Placement on two cores: the proxy under test (baseline or gateway) is pinned
to CPU 0, the load generator and the stub to CPU 1, so each proxy has one core
of its own. "upstream direct" is wrk + stub sharing CPU 1: the ceiling of this
harness, not a proxy. The --workers gateways are the exception (WORKER_CPUS):
the supervisor and every worker, for every N (1 included), may use CPUs 0 and
1, placed by the scheduler, so they share CPU 1 with wrk and the stub, which
stay pinned there. A second worker gets no core of its own: "workers 2/1" is
what a second worker buys on a 2-core machine that also runs the load
generator, never a figure for twice the hardware. For each measured run the
script also reads the CPU time of the process(es) under test (so CPU us per
request, which other load on the machine disturbs less than req/s) and the
largest share of either pinned CPU that went to other work (for the --workers
gateways: the mean over both CPUs, which they share with the load); it warns
when the machine was not quiet.

Quotas are real, so they must never refuse a measured request: every gateway
phase gets fresh keys (100000 requests/hour each, the API's maximum), enough
that none can run dry even at the harness's ceiling, half in each of the two
tenants, and the script sends round-robin across them (the same work per
request as with one key). The "off" gateway gets the same keys, so both do
the same work but the compared feature.
Non-2xx answers are counted (wrk) and, for the gateway, broken down by status
from its /metrics; a 429 aborts the run. (A few 499s there are normal: wrk
closes its connections with requests in flight when time is up.)

Prints the table, gateway/baseline (target: >= 1.5x, for the production
gateway when it runs), gateway/upstream, "limits on/off" or "guard on/off"
when both run, "workers N/M" with --workers, then the conditions; writes the
same to bench/results/proxy-<time>.json (its "compare" says which feature,
its "workers" which counts).
Children are stopped and the database dropped (and the Redis keys deleted)
on every exit (errors, Ctrl-C, SIGTERM): each child is a process group of its
own, and stopping one waits for the whole group (a supervisor's workers),
SIGKILL for what is left after STOP_TIMEOUT. If this script is killed
outright, setpriv's parent-death signal still stops the children (a
supervisor then stops its workers; only the database and the Redis keys would
stay: gwbench_proxy_*, gwbench-proxy-*).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
PG_ADMIN_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")  # for the --workers gateways
HOST = "127.0.0.1"

PROXY_CPU = 0  # the process under test: baseline proxy or gateway
LOAD_CPU = 1  # load generator, stub upstream and this script
BENCH_CPUS = (PROXY_CPU, LOAD_CPU)
# `gateway serve --workers N` (the supervisor and every worker, for each N, 1 included): any of the two CPUs,
# the load CPU shared with wrk and the stub. Not a core per worker: what a second worker buys on a 2-core
# machine that also runs the load generator.
WORKER_CPUS = BENCH_CPUS
WARMUP_SECONDS = 2.0
PROTOCOL_VERSION = "2025-11-25"
SERVER_NAME = "bench"
# A key allows at most 100000 requests an hour and its bucket starts full;
# plan for at most KEY_BUDGET requests per key per phase.
KEY_PER_HOUR = 100_000
KEY_PER_DAY = 1_000_000
KEY_BUDGET = 80_000
# What the upstream and the baseline get in `Authorization`: a well-formed key
# nobody holds, so every target parses requests of the same length.
NO_KEY = "gw_" + "0" * 10 + "_" + "0" * 40
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0  # the gateway flushes its queued records before it exits
NOISE_PCT = 10.0  # other work above this share of a pinned CPU in a measured run: warn
# Two tenants, the keys alternating between them: with both active the tenant tier decides too.
TENANTS = ("bench", "bench-b")
# Far above any load the harness makes: LimitSettings' maximum for a per-minute limit.
LIMITS_HIGH = 100_000_000
# Every gateway starts from the production configuration, every feature on, always set explicitly: the
# limit defaults (global 5000/min, ...) would throttle the bench, not measure the gateway.
PRODUCTION_ENV = {
    "GATEWAY_LIMITS_ENABLED": "true",
    "GATEWAY_LIMITS_GLOBAL_PER_MINUTE": str(LIMITS_HIGH),
    "GATEWAY_LIMITS_ROLES": json.dumps(dict.fromkeys(("ADMIN", "USER", "SERVICE", "READONLY"), LIMITS_HIGH)),
    "GATEWAY_LIMITS_IP_PER_MINUTE": str(LIMITS_HIGH),
    "GATEWAY_LIMITS_ANONYMOUS_PER_MINUTE": str(LIMITS_HIGH),
    # Each of two equal tenants gets half the global rate, and with a burst factor of 1
    # (the least) that share is a bucket of its own: the tenant tier decides every request.
    "GATEWAY_LIMITS_TENANT_BURST_FACTOR": "1.0",
    "GATEWAY_DATAPLANE_UPSTREAM_GUARD": "true",
}
DESCRIBE_LIMITS_ON = (
    f"every tier at {LIMITS_HIGH:,}/min (global, each role, per address, anonymous), tenant burst factor 1 with "
    f"{len(TENANTS)} tenants active (the tenant tier decides), per-key quotas {KEY_PER_HOUR}/h and "
    f"{KEY_PER_DAY}/day (fresh keys per run); no Redis, so buckets are decided in the one process and never "
    "synchronized"
)
ROUTE_NAME = "bench-self"


@dataclass(frozen=True)
class Comparison:
    """What `--compare` measures: the production gateway ("on") against one with a single feature off."""

    feature: str  # "limits" or "guard", as labels, ratios and the JSON name it
    off_env: dict[str, str]  # the settings that turn the feature off, over PRODUCTION_ENV
    describe_on: str  # the conditions' line for each gateway
    describe_off: str
    cost: str  # what the on/off difference in CPU per request is
    on_metric: str  # a /metrics series only a gateway with the feature on has (after its first call)
    flag: str  # how the conditions spell the gateways that ran (followed by on, off or both)
    # Each tenant gets a routing rule sending calls to its server to that same server (its only replica),
    # so that every request is routed; a gateway with the guard off ignores it.
    routing_rule: bool = False

    @property
    def targets(self) -> dict[str, str]:
        """The target of each configuration ("gateway" stays the key of the production one)."""
        return {"on": "gateway", "off": f"gateway-{self.feature}-off"}

    @property
    def labels(self) -> dict[str, str]:
        return {target: f"gateway ({self.feature} {setting})" for setting, target in self.targets.items()}

    def env(self, setting: str) -> dict[str, str]:
        return PRODUCTION_ENV if setting == "on" else {**PRODUCTION_ENV, **self.off_env}

    def describe(self, setting: str) -> str:
        return f"{self.feature} {setting}: " + (self.describe_on if setting == "on" else self.describe_off)


COMPARISONS = {
    "limits": Comparison(
        feature="limits",
        off_env={"GATEWAY_LIMITS_ENABLED": "false"},
        describe_on=DESCRIBE_LIMITS_ON,
        describe_off="GATEWAY_LIMITS_ENABLED=false (no tier, no per-key quota)",
        cost="deciding every tier costs",
        on_metric="gateway_fair_queue",
        flag="--limits",
    ),
    "guard": Comparison(
        feature="guard",
        off_env={"GATEWAY_DATAPLANE_UPSTREAM_GUARD": "false"},
        describe_on=(
            f"every call through the upstream guard: routing rule '{ROUTE_NAME}' in each tenant (weighted round "
            f"robin, the server '{SERVER_NAME}' its own only replica), its circuit breaker (local: no Redis), the "
            "per-upstream queue (max_concurrency 1024: no call waits at this concurrency), passive health from "
            f"every call (no retry: none fails); limits on: {DESCRIBE_LIMITS_ON}"
        ),
        describe_off=(
            "GATEWAY_DATAPLANE_UPSTREAM_GUARD=false (calls go straight out: no routing, breaker, queue or retry; "
            "the same routing rules, ignored); limits on as in the guard-on gateway"
        ),
        cost="the breaker, routing and queue cost",
        on_metric="gateway_upstream_calls",
        flag="--compare guard --gateways",
        routing_rule=True,
    ),
    "audit": Comparison(
        feature="audit",
        off_env={"GATEWAY_AUDIT_ENABLED": "false"},
        describe_on=(
            "an audit entry per request (built on the request path with its raw params, decoded, sanitized and "
            "written as one JSON line to the gateway's log by the writer, chained and COPYed per batch); limits "
            f"and guard on: {DESCRIBE_LIMITS_ON}"
        ),
        describe_off="GATEWAY_AUDIT_ENABLED=false (no audit entry, no audit log line; request logs still written)",
        cost="the audit trail costs",
        on_metric="gateway_audit_entries",
        flag="--compare audit --gateways",
    ),
    "records": Comparison(
        feature="records",
        off_env={"GATEWAY_AUDIT_ENABLED": "false", "GATEWAY_WRITER_REQUEST_LOGS": "false"},
        describe_on=(
            "every record: a request_logs row and an audit entry per request (as in --compare audit), "
            f"server_metrics per window and per-tool counters, through the batched writer; limits and guard on: "
            f"{DESCRIBE_LIMITS_ON}"
        ),
        describe_off=(
            "GATEWAY_AUDIT_ENABLED=false and GATEWAY_WRITER_REQUEST_LOGS=false (no request_logs, audit or "
            "server_metrics rows; the /metrics counters stay)"
        ),
        cost="the records cost",
        on_metric="gateway_audit_entries",
        flag="--compare records --gateways",
    ),
}
COMPARE = COMPARISONS["limits"]  # set by --compare
LABELS = {"upstream": "upstream direct", "baseline": "baseline (aiohttp)"}  # and one per gateway (gateway_specs)


def label(target: str) -> str:
    return LABELS[target]


@dataclass(frozen=True)
class GatewaySpec:
    """One gateway target: how it is started, where it may run, what it is called."""

    name: str  # the target's key in the results
    label: str
    setting: str  # "on" (production) or "off" (the compared feature off)
    cpus: tuple[int, ...]
    workers: int = 0  # 0: plain `gateway serve`, no Redis; N: `gateway serve --workers N`, with Redis

    @property
    def argv(self) -> list[str]:
        return gateway_cli("serve", *(("--workers", str(self.workers)) if self.workers else ()))

    @property
    def worker_ids(self) -> list[str]:
        """The `worker` labels of its merged /metrics; none when one process serves (`--workers 1` included)."""
        return [str(i) for i in range(self.workers)] if self.workers > 1 else []


def gateway_specs(gateways: str, workers: list[int]) -> list[GatewaySpec]:
    """The gateways of a run: `--gateways` (on, off or both), then the production one per `--workers` count."""
    settings = ("on", "off") if gateways == "both" else (gateways,)
    specs = [GatewaySpec(COMPARE.targets[s], COMPARE.labels[COMPARE.targets[s]], s, (PROXY_CPU,)) for s in settings]
    specs += [GatewaySpec(f"gateway-{n}w", f"gateway, {n} worker{'s' if n > 1 else ''}", "on", WORKER_CPUS, n)
              for n in workers]
    LABELS.update((spec.name, spec.label) for spec in specs)
    return specs


class BenchError(Exception):
    """The benchmark cannot go on (or its figures would be wrong)."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- child processes ----------------------------------------------------------------------------
class Children:
    """Child processes, each pinned to its CPUs, logging to files; stopped newest first, with what they started."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []
        self._setpriv = shutil.which("setpriv")
        self._taskset = shutil.which("taskset")

    def command(self, argv: list[str], cpus: tuple[int, ...]) -> list[str]:
        prefix: list[str] = []
        if self._setpriv:
            # Should this script die without cleaning up (SIGKILL), the child gets SIGTERM.
            prefix += [self._setpriv, "--pdeathsig", "TERM"]
        if self._taskset:
            prefix += [self._taskset, "-c", ",".join(map(str, cpus))]
        return prefix + argv

    def start(self, name: str, argv: list[str], *, cpus: tuple[int, ...],
              env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "wb") as out:
            # A session (and process group) of its own: a Ctrl-C in the terminal reaches this script
            # only, which then stops the children in order; what a child starts (a supervisor's
            # workers) stays in its group, which stop() waits for.
            proc = subprocess.Popen(self.command(argv, cpus), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
        if not self._taskset:
            # Without taskset, pin after the start (children inherit this script's CPU meanwhile).
            os.sched_setaffinity(proc.pid, set(cpus))
        self.procs.append(proc)
        return proc

    def log_tail(self, name: str, lines: int = 20) -> str:
        try:
            return "\n".join((self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @staticmethod
    def stop(proc: subprocess.Popen) -> None:
        """SIGTERM (SIGKILL after STOP_TIMEOUT), then wait for the rest of its process group.

        A `gateway serve --workers N` supervisor forwards the SIGTERM to its workers and exits
        after them; should it be killed first, its workers get SIGTERM from their parent-death
        signal, and whatever is left of the group after STOP_TIMEOUT more gets SIGKILL.
        """
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        deadline = time.monotonic() + STOP_TIMEOUT
        try:
            while True:
                os.killpg(proc.pid, 0)  # ProcessLookupError once no process of the group is left
                if time.monotonic() > deadline:
                    log(f"bench: processes of group {proc.pid} still running {STOP_TIMEOUT:g}s later: killed")
                    os.killpg(proc.pid, signal.SIGKILL)
                    return
                time.sleep(0.1)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        while self.procs:
            proc = self.procs.pop()
            try:
                self.stop(proc)
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                log(f"bench: could not stop pid {proc.pid}: {exc}")

    def wait_ready(self, name: str, proc: subprocess.Popen, ready, what: str) -> None:
        """Poll `ready()` until true; fail with the child's log if it exits or time runs out."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BenchError(f"{name} exited with status {proc.returncode}:\n{self.log_tail(name)}")
            if ready():
                return
            time.sleep(0.05)
        raise BenchError(f"{name}: {what} after {START_TIMEOUT:g}s:\n{self.log_tail(name)}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:  # HTTPError included
        return False


# -- the database ----------------------------------------------------------------------------------
def _postgres_pids() -> list[int]:
    """The processes of a PostgreSQL server on this machine (run as the `postgres` user)."""
    try:
        found = subprocess.run(["pgrep", "-u", "postgres"], capture_output=True, text=True, check=False).stdout
        return [int(pid) for pid in found.split()]
    except (OSError, ValueError):
        return []


class Database:
    """A database of this run's own: created at the start, dropped (or deleted) at the end."""

    def __init__(self, kind: str, work_dir: Path) -> None:
        self.kind = kind
        self.name = f"gwbench_proxy_{uuid.uuid4().hex[:10]}"
        self.created: bool | None = False
        self.server_version = ""
        self.pinned: dict[int, set[int]] = {}  # server process -> its CPUs before pin_server
        self.pinning = "database server not pinned"
        if kind == "postgres":
            self.url = f"{PG_ADMIN_URL.rpartition('/')[0]}/{self.name}"
        else:
            self.path = work_dir / "gateway.db"  # goes with the work directory
            self.url = f"sqlite:///{self.path}"

    @staticmethod
    def _pg(url: str, *statements: str):
        async def go():
            import asyncpg

            conn = await asyncpg.connect(url, timeout=10)
            try:
                return [await conn.fetchval(sql) for sql in statements]
            finally:
                await conn.close()

        return asyncio.run(go())

    def create(self) -> None:
        if self.kind == "postgres":
            self.created = None  # maybe: an interrupted CREATE is dropped too (IF EXISTS)
            try:
                self._pg(PG_ADMIN_URL, f'CREATE DATABASE "{self.name}"')
            except (OSError, asyncio.TimeoutError, ImportError) as exc:
                from gateway.db.migrate import redact_url

                raise BenchError(f"cannot reach PostgreSQL at {redact_url(PG_ADMIN_URL)} (BENCH_PG_URL): {exc}; "
                                 "or use --database sqlite") from None
            except Exception as exc:  # asyncpg's errors: authentication, privileges
                raise BenchError(f"cannot create database {self.name}: {exc}") from None
            self.created = True
            self.server_version = self._pg(PG_ADMIN_URL, "SHOW server_version")[0]

    def pin_server(self, cpus: set[int]) -> str:
        """Keep a local PostgreSQL server's processes (and the backends they fork) on `cpus`, off the proxy's
        core: its COPYs and index updates would otherwise share that core with the gateway and show up as the
        gateway's cost. Returns what was done, for the conditions; `unpin_server` restores them."""
        local = PG_ADMIN_URL.startswith(("postgresql://postgres@127.0.0.1", "postgresql://postgres@localhost"))
        if self.kind != "postgres" or not local:
            return self.pinning
        for pid in _postgres_pids():
            try:
                before = os.sched_getaffinity(pid)
                os.sched_setaffinity(pid, cpus)
                self.pinned[pid] = before
            except OSError:  # gone, or not ours to move
                continue
        if not self.pinned:
            return self.pinning
        self.pinning = f"PostgreSQL server ({len(self.pinned)} processes and the backends they fork) on CPU " + \
            ",".join(map(str, sorted(cpus)))
        return self.pinning

    def unpin_server(self) -> None:
        for pid, before in self.pinned.items():
            try:
                os.sched_setaffinity(pid, before)
            except OSError:
                continue
        # Backends forked while pinned keep the narrow set: give every server process the machine back.
        everything = set(range(os.cpu_count() or 1))
        for pid in _postgres_pids():
            try:
                os.sched_setaffinity(pid, everything)
            except OSError:
                continue
        self.pinned = {}

    def drop(self) -> None:
        if self.kind != "postgres" or self.created is False:
            return
        try:
            self._pg(PG_ADMIN_URL, f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        except Exception as exc:  # noqa: BLE001 - reported; the rest of the cleanup goes on
            if self.created:
                log(f"bench: could not drop database {self.name}: {exc}; drop it by hand")
        self.created = False

    def count_request_logs(self) -> int | None:
        try:
            if self.kind == "postgres":
                return self._pg(self.url, "SELECT count(*) FROM request_logs")[0]
            import sqlite3

            with sqlite3.connect(self.path) as conn:
                return conn.execute("SELECT count(*) FROM request_logs").fetchone()[0]
        except Exception as exc:  # noqa: BLE001 - a figure for the report, not a reason to fail
            log(f"bench: could not count request_logs rows: {exc}")
            return None

    def describe(self) -> str:
        from gateway.db.migrate import redact_url

        if self.kind == "postgres":
            return f"PostgreSQL {self.server_version} ({redact_url(self.url)}, made and dropped by this run)"
        return "SQLite (a temporary file)"


class RedisKeys:
    """The --workers gateways' Redis: a key prefix of this run's own, each gateway a part of it; deleted at the end."""

    def __init__(self) -> None:
        self.url = REDIS_URL
        self.prefix = f"gwbench-proxy-{uuid.uuid4().hex[:10]}:"
        self.server_version = ""
        self.used = False

    def _client(self):
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=10)

    def check(self) -> None:
        import redis

        try:
            with self._client() as client:
                self.server_version = client.info("server")["redis_version"]
        except (redis.RedisError, OSError) as exc:
            raise BenchError(f"--workers needs Redis: cannot reach {self.url} (BENCH_REDIS_URL): {exc}") from None

    def env(self, part: str) -> dict[str, str]:
        self.used = True
        return {"GATEWAY_REDIS_URL": self.url, "GATEWAY_REDIS_KEY_PREFIX": f"{self.prefix}{part}:"}

    def delete(self) -> None:
        if not self.used:
            return
        try:
            with self._client() as client:
                keys = list(client.scan_iter(match=f"{self.prefix}*", count=1000))
                for start in range(0, len(keys), 1000):
                    client.delete(*keys[start:start + 1000])
        except Exception as exc:  # noqa: BLE001 - reported; the rest of the cleanup goes on
            log(f"bench: could not delete the Redis keys {self.prefix}*: {exc}; delete them by hand")
        self.used = False

    def describe(self) -> str:
        return f"Redis {self.server_version} ({self.url}), key prefix {self.prefix}<gateway>: (deleted by this run)"


# -- the gateway -----------------------------------------------------------------------------------
def gateway_env(db_url: str, dataplane_port: int = 0, controlplane_port: int = 0,
                setting: str = "on", redis: dict[str, str] | None = None) -> dict[str, str]:
    # Only our settings: a GATEWAY_* variable in the caller's environment would
    # change what is measured. GATEWAY_NO_EXTENSIONS is kept, and reported.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_") or k == "GATEWAY_NO_EXTENSIONS"}
    env.update(
        GATEWAY_DATABASE_URL=db_url,
        GATEWAY_DATAPLANE_HOST=HOST,
        GATEWAY_DATAPLANE_PORT=str(dataplane_port),
        GATEWAY_CONTROLPLANE_HOST=HOST,
        GATEWAY_CONTROLPLANE_PORT=str(controlplane_port),
        GATEWAY_LOG_LEVEL="WARNING",
    )
    env.update(COMPARE.env(setting))
    env.update(redis or {})
    return env


def gateway_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway.cli", *args]


class Gateway:
    """A gateway (one process, or a supervisor and its workers), provisioned through its admin API (or sharing
    the database of `peer`, provisioned).

    `spec.setting`: "on", the production configuration, or "off", with the feature `--compare` names off.
    `spec.workers`: `gateway serve --workers N`, on a Redis key prefix of its own (`redis`).
    """

    def __init__(self, children: Children, db: Database, upstream_url: str, spec: GatewaySpec,
                 peer: Gateway | None = None, redis: RedisKeys | None = None) -> None:
        self.spec = spec
        self.name = spec.name
        setting = spec.setting
        if peer is None:
            env = gateway_env(db.url, setting=setting)
            for command in ("migrate", "bootstrap"):
                done = subprocess.run(gateway_cli(command), env=env, capture_output=True, text=True, timeout=120)
                if done.returncode != 0:
                    raise BenchError(f"`gateway {command}` failed with {done.returncode}:\n{done.stderr}")
            match = re.search(r"^admin_key=(\S+)$", done.stdout, re.MULTILINE)
            if not match:
                raise BenchError(f"`gateway bootstrap` printed no admin_key= line:\n{done.stdout}")
            self.admin_key = match.group(1)
        else:
            self.admin_key = peer.admin_key
        dataplane, controlplane = free_port(), free_port()
        shared = redis.env(self.name) if spec.workers else None
        self.proc = children.start(self.name, spec.argv, cpus=spec.cpus,
                                   env=gateway_env(db.url, dataplane, controlplane, setting, shared))
        self.url = f"http://{HOST}:{dataplane}"
        self.admin_url = f"http://{HOST}:{controlplane}/api/v1"
        self.endpoint = f"{self.url}/servers/{SERVER_NAME}/mcp"
        # The control plane may start listening after the data plane answers /readyz: provisioning waits for both.
        children.wait_ready(self.name, self.proc, lambda: http_ok(self.url + "/readyz") and listening(controlplane),
                            "/readyz is not 200 or the control plane does not listen")
        if peer is None:
            self.user_ids = []
            for name in TENANTS:
                tenant = self.admin("POST", "/tenants", {"name": name})
                user = self.admin("POST", "/users", {"tenant_id": tenant["id"], "username": name,
                                                     "email": f"{name}@bench.invalid", "role": "USER"})
                self.user_ids.append(user["id"])
                server = self.admin("POST", "/servers", {"tenant_id": tenant["id"], "name": SERVER_NAME,
                                                         "endpoint_url": upstream_url, "transport_type": "http"})
                if COMPARE.routing_rule:
                    # Made before any key: a key that works is proof the snapshot holds the rule too.
                    self.admin("POST", "/routing-rules", {
                        "tenant_id": tenant["id"], "name": ROUTE_NAME, "match_server": SERVER_NAME,
                        "targets": [{"server_id": server["id"], "weight": 1}], "strategy": "weighted_round_robin",
                    })
        else:
            self.user_ids = peer.user_ids  # the same tenants, users and servers: one database
        self.keys_made = 0
        self.metrics_key = self._key(["metrics"])
        # /readyz answered for one worker: wait until /metrics merges every worker's figures (which also
        # says that the worker answering knows the key made just now).
        children.wait_ready(self.name, self.proc, self._all_workers_answer, "not every worker answers /metrics")

    def admin(self, method: str, path: str, body: dict) -> dict:
        request = urllib.request.Request(
            self.admin_url + path, data=json.dumps(body).encode(), method=method,
            headers={"Authorization": f"Bearer {self.admin_key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise BenchError(f"admin API {method} {path}: {exc.code} {exc.read().decode(errors='replace')}") from None

    def _key(self, scopes: list[str]) -> str:
        self.keys_made += 1
        return self.admin("POST", "/api-keys", {
            # Alternating between the tenants' users: a round-robin over the keys alternates the tenants.
            "user_id": self.user_ids[self.keys_made % len(self.user_ids)],
            "name": f"{self.name}-{self.keys_made}", "scopes": scopes,
            "rate_limit_per_hour": KEY_PER_HOUR, "rate_limit_per_day": KEY_PER_DAY,
        })["key"]

    def fresh_keys(self, count: int, body: bytes) -> list[str]:
        """`count` new proxy keys, each checked end to end with one request (a worker that has not loaded a key
        yet refuses it for a moment: retried)."""
        count = -(-count // len(TENANTS)) * len(TENANTS)  # as many in each tenant
        keys = [self._key(["proxy"]) for _ in range(count)]
        deadline = time.monotonic() + 15
        for key in keys:
            while CASE == "legacy-session" and key not in SESSIONS:
                try:
                    SESSIONS[key] = open_session(self.endpoint, key)
                except urllib.error.HTTPError as exc:
                    if time.monotonic() > deadline:
                        raise BenchError(f"the gateway refuses initialize with a fresh key: HTTP {exc.code}") from None
                    time.sleep(0.1)
            while (answer := post(self.endpoint, body, key))[0] != 200:
                if time.monotonic() > deadline:
                    raise BenchError(f"the gateway refuses a fresh key: HTTP {answer[0]}: {answer[1][:300]}")
                time.sleep(0.1)
        return keys

    def metrics(self) -> str:
        """/metrics; of N workers, merged from all of them, or BenchError (a partial sum would mislead)."""
        request = urllib.request.Request(self.url + "/metrics", headers={"Authorization": f"Bearer {self.metrics_key}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read().decode()
        answering = re.search(r'^gateway_workers\{state="answering"\} (\d+)$', text, re.MULTILINE)
        if self.spec.worker_ids and (answering is None or int(answering[1]) != self.spec.workers):
            raise BenchError(f"{label(self.name)}: /metrics merged {answering[1] if answering else 'no'} of "
                             f"{self.spec.workers} workers' figures")
        return text

    def _all_workers_answer(self) -> bool:
        try:
            self.metrics()
        except (BenchError, OSError):  # HTTPError included: a worker that does not know the key yet
            return False
        return True

    def counts(self) -> tuple[dict[str, float], dict[str, float]]:
        """Requests so far by HTTP status, and by worker (none for one process), as the gateway's /metrics counts
        them."""
        text = self.metrics()
        statuses: dict[str, float] = {}
        for match in re.finditer(r'^gateway_requests_total\{.*status="([^"]*)"\}\s+(\S+)$', text, re.MULTILINE):
            statuses[match[1]] = statuses.get(match[1], 0) + float(match[2])
        workers = {match[1]: float(match[2]) for match in
                   re.finditer(r'^gateway_worker_requests_total\{worker="([^"]*)"\}\s+(\S+)$', text, re.MULTILINE)}
        return statuses, workers

    def check_setting(self, first: Load) -> None:
        """After its first measured run (`first`): the compared feature is on in this gateway exactly when it
        should be, in each of its workers; and each worker served some of that run."""
        text = self.metrics()
        # A gauge only the feature makes; merged over workers, each worker's series has its `worker` label.
        series = {f"worker {w}": rf'^{COMPARE.on_metric}\{{worker="{w}"' for w in self.spec.worker_ids}
        for who, pattern in (series or {"the process": rf"^{COMPARE.on_metric}\{{"}).items():
            on = re.search(pattern, text, re.MULTILINE) is not None
            if on != (self.spec.setting == "on"):
                raise BenchError(f"{label(self.name)}, {who}: /metrics {'shows' if on else 'lacks'} "
                                 f"{COMPARE.on_metric} ({COMPARE.feature} {'on' if on else 'off'}): the setting did "
                                 "not take")
        idle = [w for w in self.spec.worker_ids if not first.worker_requests.get(w)]
        if idle:
            raise BenchError(f"{label(self.name)}: worker(s) {', '.join(idle)} served none of the measured "
                             f"requests ({first.worker_requests}): the figure would be of fewer workers")


# -- the request ---------------------------------------------------------------------------------
# What kind of MCP traffic the run sends (--case):
#   plain           a 2025-era tools/call with no session (the transport's bare minimum)
#   modern          a 2026-07-28 stateless tools/call: the _meta envelope in the body and
#                   Mcp-Method/Mcp-Name headers, which the gateway checks against the body
#   legacy-session  a 2025-11-25 tools/call inside a session: the stub hands out a session id on
#                   initialize; through the gateway each key gets its own sealed id, opened per request
CASES = ("plain", "modern", "legacy-session")
CASE = "plain"
MODERN_VERSION = "2026-07-28"
STUB_SESSION = "bench-session"
SESSIONS: dict[str, str] = {}  # API key -> the gateway's sealed session id for it (legacy-session)


def make_body(size: int) -> bytes:
    """A JSON-RPC tools/call of `size` bytes (or the bare envelope, if that is longer)."""
    def build(text: str) -> bytes:
        params = {"name": "echo", "arguments": {"text": text}}
        if CASE == "modern":
            params["_meta"] = {"io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
                               "io.modelcontextprotocol/clientCapabilities": {}}
        message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}
        return json.dumps(message, separators=(",", ":")).encode()

    return build("x" * max(0, size - len(build(""))))


def headers_for(key: str) -> dict[str, str]:
    # Every target gets the same request, credentials included; only the gateway checks them.
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": MODERN_VERSION if CASE == "modern" else PROTOCOL_VERSION,
        "Authorization": f"Bearer {key}",
    }
    if CASE == "modern":
        headers["Mcp-Method"] = "tools/call"
        headers["Mcp-Name"] = "echo"
    elif CASE == "legacy-session":
        headers["Mcp-Session-Id"] = SESSIONS.get(key, STUB_SESSION)
    return headers


def open_session(url: str, key: str) -> str:
    """initialize through `url` with `key`; the session id it hands out."""
    body = json.dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize",
                       "params": {"protocolVersion": PROTOCOL_VERSION, "capabilities": {},
                                  "clientInfo": {"name": "bench", "version": "1"}}}).encode()
    headers = {k: v for k, v in headers_for(key).items() if k != "Mcp-Session-Id"}
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        session = response.headers.get("Mcp-Session-Id")
    if not session:
        raise BenchError(f"initialize through {url} handed out no Mcp-Session-Id")
    return session


def post(url: str, body: bytes, key: str) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers_for(key))
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError as exc:
        return 0, str(exc)


# -- load generators -------------------------------------------------------------------------------
@dataclass
class Load:
    """One run against one target."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int  # answers with status >= 400 (as wrk counts them)
    socket_errors: int  # connect, read and write errors, timeouts
    statuses: dict[str, float] = field(default_factory=dict)  # the gateway's own count, by status
    worker_requests: dict[str, float] = field(default_factory=dict)  # and by worker (--workers N, N > 1)
    # CPU use of the processes under test (the stub for "upstream direct"; a
    # supervisor and its workers summed), and the largest share of a pinned CPU
    # (of a pair, for workers that may use both: their mean) that went to other
    # work (other users of the machine, the database and Redis servers).
    cpu_pct: float = math.nan
    others_pct: float = math.nan
    kernel_pct: float = math.nan  # the part of cpu_pct spent in the kernel (system time: syscalls, sockets, files)

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_pct / 100 / self.rps * 1e6 if self.rps else math.nan

    @property
    def kernel_us_per_request(self) -> float:
        return self.kernel_pct / 100 / self.rps * 1e6 if self.rps else math.nan


_WRK_SCRIPT = """\
-- Generated by bench/proxy.py. Requests are formatted once; request() only
-- picks the next (round-robin over the API keys).
local body = [==[{body}]==]
local header_sets = {{ {header_sets} }}
local requests, n, i = {{}}, 0, 0

function init(args)
  for _, headers in ipairs(header_sets) do
    n = n + 1
    requests[n] = wrk.format("POST", nil, headers, body)
  end
end

function request()
  i = i % n + 1
  return requests[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,'
    .. '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


class WrkLoad:
    """wrk, one thread on the load CPU, latency percentiles from its own histogram."""

    def __init__(self, children: Children, work_dir: Path, connections: int) -> None:
        self.children = children
        self.work_dir = work_dir
        self.connections = connections
        self.binary = shutil.which("wrk") or "wrk"
        self.runs = 0

    def describe(self) -> str:
        done = subprocess.run([self.binary, "-v"], capture_output=True, text=True, timeout=10)
        first = (done.stdout + done.stderr).strip().splitlines()
        return f"{first[0].split(' Copyright')[0] if first else 'wrk'}, 1 thread"

    def run(self, url: str, body: bytes, keys: list[str], seconds: float) -> Load:
        text = body.decode()
        if "]==]" in text:
            raise BenchError("the request body cannot be quoted in Lua")
        self.runs += 1
        script = self.work_dir / f"load-{self.runs}.lua"
        header_sets = ", ".join(
            "{" + ", ".join(f"[{json.dumps(n)}] = {json.dumps(v)}" for n, v in headers_for(k).items()) + "}"
            for k in keys
        )
        script.write_text(_WRK_SCRIPT.format(body=text, header_sets=header_sets))
        argv = [self.binary, "-t1", f"-c{self.connections}", f"-d{seconds:g}s", "--timeout", "10s",
                "-s", str(script), url]
        proc = subprocess.Popen(self.children.command(argv, (LOAD_CPU,)), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = proc.communicate(timeout=seconds + 60)
        except BaseException:
            # subprocess.run would not wait for it after a Ctrl-C: no zombie left behind.
            proc.kill()
            proc.wait()
            raise
        match = re.search(r"^BENCH_RESULT (\{.*\})$", stdout, re.MULTILINE)
        if proc.returncode != 0 or not match:
            raise BenchError(f"wrk failed ({proc.returncode}):\n{stdout}\n{stderr}")
        r = json.loads(match[1])
        elapsed = r["duration_us"] / 1e6
        return Load(requests=r["requests"], seconds=elapsed, rps=r["requests"] / elapsed,
                    p50_ms=r["p50_us"] / 1000, p99_ms=r["p99_us"] / 1000, non_2xx=r["status"],
                    socket_errors=r["connect"] + r["read"] + r["write"] + r["timeout"])


class AiohttpLoad:
    """Without wrk: an aiohttp client at the same concurrency, in this process (on the load CPU).

    It costs far more per request than wrk (aiohttp's client is ~150 us a
    request on one core), so it may be the bottleneck: trust its ratios less.
    """

    def __init__(self, connections: int) -> None:
        self.connections = connections

    def describe(self) -> str:
        import aiohttp

        return f"aiohttp {aiohttp.__version__} client, {self.connections} tasks (wrk not found)"

    def run(self, url: str, body: bytes, keys: list[str], seconds: float) -> Load:
        import uvloop

        return uvloop.run(self._run(url, body, [headers_for(k) for k in keys], seconds))

    async def _run(self, url: str, body: bytes, headers: list[dict], seconds: float) -> Load:
        import aiohttp

        latencies: list[float] = []
        counts = {"bad": 0, "socket": 0, "sent": 0}
        clock = time.perf_counter
        connector = aiohttp.TCPConnector(limit=self.connections)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:
            started = clock()
            deadline = started + seconds

            async def worker() -> None:
                while clock() < deadline:
                    counts["sent"] += 1
                    t0 = clock()
                    try:
                        async with session.post(url, data=body, headers=headers[counts["sent"] % len(headers)]) as r:
                            await r.read()
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        counts["socket"] += 1
                        continue
                    latencies.append(clock() - t0)
                    counts["bad"] += r.status >= 400

            await asyncio.gather(*(worker() for _ in range(self.connections)))
            elapsed = clock() - started
        latencies.sort()
        n = len(latencies)

        def percentile(p: float) -> float:
            return latencies[min(n - 1, int(p / 100 * n))] * 1000 if n else math.nan

        return Load(requests=n, seconds=elapsed, rps=n / elapsed, p50_ms=percentile(50), p99_ms=percentile(99),
                    non_2xx=counts["bad"], socket_errors=counts["socket"])


# -- CPU accounting -------------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far, all threads."""
    return sum(process_cpu_split(pid))


def process_cpu_split(pid: int) -> tuple[float, float]:
    """User and system (kernel) CPU seconds of one process so far, all threads."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def cpu_busy_seconds(cpu: int) -> float:
    """Seconds CPU `cpu` ran processes (user, nice, system) or was taken by the hypervisor (steal).

    Interrupt time is left out: most of it is the loopback traffic of the
    benchmark itself, which no process's CPU time includes.
    """
    with open("/proc/stat") as fh:
        for line in fh:
            if line.startswith(f"cpu{cpu} "):
                user, nice, system, _idle, _iowait, _irq, _softirq, steal = map(int, line.split()[1:9])
                return (user + nice + system + steal) / _TICK
    return math.nan


def our_cpu_seconds() -> float:
    """This process and its reaped children (wrk, once a run is over)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def process_tree(pid: int) -> set[int]:
    """`pid` and every process under it (a supervisor's workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as fh:
                    parent = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
            children.setdefault(parent, []).append(int(entry.name))
    tree, todo = set(), [pid]
    while todo:
        tree.add(member := todo.pop())
        todo += children.get(member, [])
    return tree


def cpu_pools(cpus: tuple[int, ...]) -> list[frozenset[int]]:
    """The CPUs whose busy time is set against ours together: those the target may use, then each other one."""
    spread = frozenset(cpus)
    return [spread, *(frozenset({c}) for c in BENCH_CPUS if c not in spread)]


def run_sampled(load, url: str, body: bytes, keys: list[str], seconds: float, pid: int, cpus: tuple[int, ...],
                stub_pid: int) -> Load:
    """A load run, with the CPU use of the processes under test (`pid` and its children) and of other work.

    Other work is busy time less ours, per pool of CPUs (cpu_pools): the
    target's processes on its CPUs; the stub and the load generator on the
    load CPU. A target that may use the load CPU too (the --workers
    gateways) shares it with them, so both CPUs make one pool and the figure
    is the mean share of the two.
    """
    tree = process_tree(pid)
    pools = cpu_pools(cpus)
    t0, o0 = time.monotonic(), our_cpu_seconds()
    p0 = {p: process_cpu_split(p) for p in tree | {stub_pid}}
    c0 = {c: cpu_busy_seconds(c) for c in BENCH_CPUS}
    result = load.run(url, body, keys, seconds)
    elapsed = time.monotonic() - t0
    if process_tree(pid) != tree:
        raise BenchError(f"a process under test (pid {pid} or one under it) started or ended during the measured "
                         "run (a worker restarted?): its CPU time would be lost")
    split = {p: [now - then for now, then in zip(process_cpu_split(p), p0[p])] for p in p0}
    used = {p: sum(split[p]) for p in split}
    target = sum(used[p] for p in tree)
    ours = dict.fromkeys(pools, 0.0)
    ours[pools[0]] += target
    ours[next(p for p in pools if LOAD_CPU in p)] += our_cpu_seconds() - o0 + (0.0 if stub_pid in tree
                                                                               else used[stub_pid])
    busy = {c: cpu_busy_seconds(c) - c0[c] for c in BENCH_CPUS}
    result.cpu_pct = 100 * target / elapsed
    result.kernel_pct = 100 * sum(split[p][1] for p in tree) / elapsed
    result.others_pct = max(100 * max(0.0, sum(busy[c] for c in pool) - ours[pool]) / elapsed / len(pool)
                            for pool in pools)
    return result


# -- one target ---------------------------------------------------------------------------------
def keys_needed(rate_ceiling: float, seconds: float) -> int:
    return max(1, math.ceil(rate_ceiling * seconds * 1.25 / KEY_BUDGET))


def measure(target: str, url: str, pids: dict[str, int], cpus: dict[str, tuple[int, ...]], load, body: bytes,
            gateways: dict[str, Gateway], duration: float, rate_ceiling: float) -> Load:
    """A warm-up, then a measured run; a gateway with fresh keys for each, all made before the warm-up (so
    that every worker of a --workers gateway has loaded them by the measured run)."""
    sampled = {"pid": pids[target], "cpus": cpus[target], "stub_pid": pids["upstream"]}
    gateway = gateways.get(target)
    if gateway is None:
        load.run(url, body, [NO_KEY], WARMUP_SECONDS)
        return run_sampled(load, url, body, [NO_KEY], duration, **sampled)
    warm_up = gateway.fresh_keys(keys_needed(rate_ceiling, WARMUP_SECONDS), body)
    keys = gateway.fresh_keys(keys_needed(rate_ceiling, duration), body)
    load.run(url, body, warm_up, WARMUP_SECONDS)
    log(f"    {len(keys)} fresh key(s) of {KEY_PER_HOUR}/h for the measured run (ceiling {rate_ceiling:,.0f} req/s)")
    before, before_workers = gateway.counts()
    result = run_sampled(load, url, body, keys, duration, **sampled)
    after, after_workers = gateway.counts()
    result.statuses = {s: n - before.get(s, 0) for s, n in after.items() if n != before.get(s, 0)}
    result.worker_requests = {w: n - before_workers.get(w, 0) for w, n in after_workers.items()}
    if result.statuses.get("429"):
        raise BenchError(
            f"{label(target)} refused {result.statuses['429']:.0f} measured requests with 429: a key's quota "
            f"ran out or a limit is too low, so the figures would measure refusals (statuses {result.statuses})"
        )
    return result


# -- the report ---------------------------------------------------------------------------------
PAIRS_MIN = 6  # the fewest pairs whose extreme ratios bound the median at 95% (1 - 2 * 0.5**6 = 0.97)


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """The median of `values` and a distribution-free interval for it: the k-th smallest and k-th largest
    values, k the largest whose interval covers the median with at least `confidence` (each value falls
    below the median with probability 1/2, so the count below is binomial(n, 1/2))."""
    ordered = sorted(values)
    n = len(ordered)
    k, below = 0, 0.0  # below: P(fewer than k + 1 of the n values fall under the median)
    while True:
        below += math.comb(n, k) / 2**n
        if 1 - 2 * below < confidence:
            break
        k += 1
    if k == 0:
        raise ValueError(f"{n} values cannot bound a median at {confidence:.0%}")
    return statistics.median(ordered), ordered[k - 1], ordered[n - k]


def report_pairs(pairs: list[tuple[Load, Load]], seconds: float) -> dict:
    """The on/off ratios of the pairs: their medians, each with its 95% interval."""
    feature = COMPARE.feature
    cpu = median_interval([a.cpu_us_per_request / b.cpu_us_per_request for a, b in pairs])
    rps = median_interval([a.rps / b.rps for a, b in pairs])
    extra = median_interval([a.cpu_us_per_request - b.cpu_us_per_request for a, b in pairs])
    kernel = median_interval([a.kernel_us_per_request - b.kernel_us_per_request for a, b in pairs])
    print(f"\n{len(pairs)} pairs of {seconds:g} s runs, each gateway right after the other (every other pair the "
          "off one first):")
    print(f"{feature + ' on/off':<16} = {cpu[0]:.3f}x CPU per request, 95% interval {cpu[1]:.3f}-{cpu[2]:.3f}x "
          f"({extra[0]:+.1f} us/request, {extra[1]:+.1f} to {extra[2]:+.1f}: what {COMPARE.cost})")
    print(f"{'':<16}   {rps[0]:.3f}x throughput, 95% interval {rps[1]:.3f}-{rps[2]:.3f}x "
          "(median of the pairs' own ratios; the interval: order statistics, no assumption about the noise)")
    print(f"{'':<16}   in the kernel: {kernel[0]:+.1f} us/request, 95% interval {kernel[1]:+.1f} to {kernel[2]:+.1f} "
          "(system time: the syscalls, sockets and files of the extra work)")
    return {"count": len(pairs), "seconds": seconds,
            "cpu_per_request_ratio": dict(zip(("median", "low", "high"), cpu)),
            "throughput_ratio": dict(zip(("median", "low", "high"), rps)),
            "extra_cpu_us_per_request": dict(zip(("median", "low", "high"), extra)),
            "extra_kernel_us_per_request": dict(zip(("median", "low", "high"), kernel))}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gateway_source() -> str:
    """The commit the measured gateway was built from, and whether its sources differ from it."""
    import gateway

    src = Path(gateway.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"{src} (not a git checkout)"
    if not commit:
        return f"{src} (not a git checkout)"
    return f"{commit}" + (" + uncommitted changes under src/gateway" if dirty else "")


def conditions(args, body: bytes, load, db: Database, redis: RedisKeys, pids: dict[str, int], load_at_start,
               source: str, gateways: dict[str, Gateway]) -> dict:
    import aiohttp
    import httptools
    import uvloop

    from gateway._fast import compiled_modules

    def cpus(pid: int) -> str:
        return ",".join(map(str, sorted(os.sched_getaffinity(pid))))

    def placed(target: str) -> str:
        """Where each process of a target may run, as the kernel says."""
        root = pids[target]
        under = sorted(process_tree(root) - {root})
        own = f"{label(target)}: cpus {cpus(root)}"
        return f"{own} (supervisor), its workers cpus {' and '.join(cpus(p) for p in under)}" if under else own

    plain = [t for t, g in gateways.items() if not g.spec.workers]
    scaled = {t: g.spec.workers for t, g in gateways.items() if g.spec.workers}
    return {
        "case": CASE,
        "cpus": f"{os.cpu_count()} x {cpu_model()}",
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "libraries": f"uvloop {uvloop.__version__}, aiohttp {aiohttp.__version__}, httptools {httptools.__version__}",
        "load_generator": load.describe(),
        "connections": args.connections,
        "payload_bytes": len(body),
        "duration_s": f"{args.duration:g} measured + {WARMUP_SECONDS:g} warm-up per target, {args.rounds} round(s)",
        "database": db.describe(),
        "pinning": (
            f"proxy under test on CPU {PROXY_CPU} ("
            + ", ".join(placed(t) for t in ["baseline", *plain])
            + f"); wrk + stub on CPU {LOAD_CPU} (stub: cpus {cpus(pids['upstream'])}); database"
            + (" and Redis servers not pinned" if scaled else f" ({db.pinning})")
        ),
        "gateway": (
            f"1 process per configuration ({len(plain)}: {COMPARE.flag} {args.gateways}"
            + (", both on one database, the idle one waiting on the same CPU" if len(plain) > 1 else "")
            + f"); API-key auth and request_logs through the batched writer on; {len(TENANTS)} tenants, the keys "
            "alternating between them; log level WARNING; no Redis"
            + (" (but the --workers gateways: see workers)" if scaled else "")
        ),
        **{label(t): COMPARE.describe(gateways[t].spec.setting) for t in plain},
        **({
            "workers": (
                f"--workers {','.join(map(str, scaled.values()))}: the production gateway ({COMPARE.feature} on, "
                "as above, every feature on) as `gateway serve --workers N` on the same database, waiting idle "
                "while the others are measured; N > 1 is a supervisor and N worker processes sharing the ports "
                "(SO_REUSEPORT: the kernel spreads wrk's connections over them), --workers 1 is one process (no "
                "supervisor). Each with Redis: limit buckets decided in each process and synchronized through "
                "Redis every 50 ms, bans, breaker transitions and configuration changes shared (nothing on the "
                "request path). CPU per request sums the supervisor and its workers; the Redis and PostgreSQL "
                "servers' CPU is not in it (it shows in others%)"
            ),
            "workers_pinning": (
                ", ".join(placed(t) for t in scaled)
                + f": every process of every N may use CPUs {','.join(map(str, WORKER_CPUS))} (the scheduler "
                f"places them), so they share CPU {LOAD_CPU} with wrk and the stub, which stay pinned there; the "
                "same CPUs for each N, so the ratio between them is what more workers buy on this 2-core machine "
                "that also runs the load generator, not a figure for twice the hardware"
            ),
            "redis": redis.describe(),
        } if scaled else {}),
        "gateway_source": source,
        "fast_modules_compiled": compiled_modules(),
        "GATEWAY_NO_EXTENSIONS": os.environ.get("GATEWAY_NO_EXTENSIONS", "(unset)"),
        "load_average_at_start": " ".join(f"{x:.2f}" for x in load_at_start),
    }


def summarize(loads: list[Load]) -> dict:
    return {
        "rps": statistics.median(x.rps for x in loads),
        "p50_ms": statistics.median(x.p50_ms for x in loads),
        "p99_ms": statistics.median(x.p99_ms for x in loads),
        "cpu_us_per_request": statistics.median(x.cpu_us_per_request for x in loads),
        "cpu_pct": statistics.median(x.cpu_pct for x in loads),
        "others_pct": max(x.others_pct for x in loads),
        "errors": sum(x.errors for x in loads),
        "requests": sum(x.requests for x in loads),
    }


def report(results: dict[str, list[Load]], cond: dict, gateways: dict[str, Gateway]) -> dict:
    targets = list(results)
    medians = {t: summarize(results[t]) for t in targets}
    # The production configuration (every feature on) is the one held to the target, when it ran.
    feature, off_target = COMPARE.feature, COMPARE.targets["off"]
    primary = "gateway" if "gateway" in medians else off_target
    gateway, baseline = medians[primary], medians["baseline"]
    ratios = {
        "gateway/baseline": gateway["rps"] / baseline["rps"],
        "gateway/upstream": gateway["rps"] / medians["upstream"]["rps"],
        "baseline/gateway CPU per request": baseline["cpu_us_per_request"] / gateway["cpu_us_per_request"],
    }
    both = "gateway" in medians and off_target in medians
    if both:
        on, off = medians["gateway"], medians[off_target]
        ratios[f"gateway {feature} off/baseline"] = off["rps"] / baseline["rps"]
        ratios[f"baseline/gateway {feature} off CPU per request"] = (baseline["cpu_us_per_request"]
                                                                     / off["cpu_us_per_request"])
        ratios[f"{feature} on/off"] = on["rps"] / off["rps"]
        ratios[f"{feature} on/off CPU per request"] = on["cpu_us_per_request"] / off["cpu_us_per_request"]
        # On a machine whose CPU is shared (a VM's steal), a round's figures move together: the best round of
        # each, and the on/off ratio of each round (both ran within seconds), are steadier than the medians.
        best_on = min(x.cpu_us_per_request for x in results["gateway"])
        best_off = min(x.cpu_us_per_request for x in results[off_target])
        ratios[f"{feature} on/off CPU per request, best rounds"] = best_on / best_off
        ratios[f"{feature} on/off CPU per request, per-round median"] = statistics.median(
            a.cpu_us_per_request / b.cpu_us_per_request for a, b in zip(results["gateway"], results[off_target]))
    # --workers: each count against the smallest (2 workers / 1 worker).
    scaled = sorted((g.spec.workers, t) for t, g in gateways.items() if g.spec.workers)
    scaling = [(n, t, scaled[0]) for n, t in scaled[1:]]
    for n, t, (n0, t0) in scaling:
        more, fewer = medians[t], medians[t0]
        ratios[f"workers {n}/{n0}"] = more["rps"] / fewer["rps"]
        ratios[f"workers {n}/{n0} CPU per request"] = more["cpu_us_per_request"] / fewer["cpu_us_per_request"]
    rounds = len(results[primary])
    print(f"\n{'target':<20} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'CPU us/req':>10} "
          f"{'CPU%':>5} {'others%':>7}" + (f"   median of {rounds} rounds" if rounds > 1 else ""))
    for t in targets:
        m = medians[t]
        print(f"{label(t):<20} {m['rps']:>9,.0f} {m['p50_ms']:>7.2f} {m['p99_ms']:>7.2f} {m['errors']:>6} "
              f"{m['cpu_us_per_request']:>10.1f} {m['cpu_pct']:>5.0f} {m['others_pct']:>7.0f}")
    print("(CPU: the proxy's own, a supervisor's and its workers' summed, the stub's for upstream direct; others%: "
          "the most either pinned CPU gave to other work in a measured run, for the --workers gateways the mean "
          "over both CPUs)")
    noisy = max(m["others_pct"] for m in medians.values())
    if noisy > NOISE_PCT:
        print(f"WARNING: other work took up to {noisy:.0f}% of a pinned CPU during a measured run: the machine "
              "was not quiet, req/s are disturbed (CPU us/req less so)")
    verdict = "meets" if ratios["gateway/baseline"] >= 1.5 else "BELOW"
    which = f"{feature} on" if primary == "gateway" else f"{feature} off"
    print(f"\ngateway/baseline = {ratios['gateway/baseline']:.2f}x   ({which}; {verdict} the target of 1.50x; "
          f"by CPU per request {ratios['baseline/gateway CPU per request']:.2f}x)")
    if both:
        print(f"{label(off_target)}/baseline = {ratios[f'gateway {feature} off/baseline']:.2f}x   (by CPU per request "
              f"{ratios[f'baseline/gateway {feature} off CPU per request']:.2f}x)")
    print(f"gateway/upstream = {ratios['gateway/upstream']:.2f}x   ({which}; upstream direct = load generator + stub "
          "on one core, this harness's ceiling)")
    if both:
        extra = on["cpu_us_per_request"] - off["cpu_us_per_request"]
        print(f"{feature + ' on/off':<16} = {ratios[f'{feature} on/off']:.2f}x throughput, "
              f"{ratios[f'{feature} on/off CPU per request']:.2f}x CPU per request ({extra:+.1f} us/request: what "
              f"{COMPARE.cost})")
        if rounds > 1:
            print(f"{'':<16}   CPU per request, best round of each: {best_on:.1f} against {best_off:.1f} us "
                  f"({best_on - best_off:+.1f} us, {ratios[f'{feature} on/off CPU per request, best rounds']:.2f}x); "
                  f"median of the rounds' own on/off: "
                  f"{ratios[f'{feature} on/off CPU per request, per-round median']:.2f}x")
    for n, t, (n0, t0) in scaling:
        print(f"{f'workers {n}/{n0}':<16} = {ratios[f'workers {n}/{n0}']:.2f}x throughput, "
              f"{ratios[f'workers {n}/{n0} CPU per request']:.2f}x CPU per request   ({label(t)} over {label(t0)}, "
              f"p99 {medians[t]['p99_ms']:.2f} against {medians[t0]['p99_ms']:.2f} ms; every process of both may use "
              f"CPUs {','.join(map(str, WORKER_CPUS))}, wrk + stub pinned to CPU {LOAD_CPU}: what more workers buy "
              "on this 2-core machine that also runs the load generator, not twice the hardware)")
    for n, t in scaled:
        split = {}
        for x in results[t]:
            for worker, count in x.worker_requests.items():
                split[worker] = split.get(worker, 0) + count
        if total := sum(split.values()):
            print(f"{label(t)}: measured requests per worker "
                  + ", ".join(f"{w} {100 * c / total:.0f}%" for w, c in sorted(split.items()))
                  + f" (the kernel's SO_REUSEPORT spread of {cond['connections']} connections)")
    print("\nconditions:")
    for name, value in cond.items():
        print(f"  {name:<22} {value}")
    return {"medians": medians, "ratios": ratios}


# -- main ------------------------------------------------------------------------------------------
def run(args, specs: list[GatewaySpec], work_dir: Path, children: Children, db: Database, redis: RedisKeys) -> int:
    load_at_start = os.getloadavg()
    source = gateway_source()  # before the gateway starts: what it loads is what was measured
    body = make_body(args.payload_bytes)
    if args.load == "wrk" or (args.load == "auto" and shutil.which("wrk")):
        load = WrkLoad(children, work_dir, args.connections)
    else:
        log("bench: wrk is not on PATH; an aiohttp client drives the load instead (it may be the bottleneck)")
        load = AiohttpLoad(args.connections)

    db.create()
    if not args.workers:
        db.pin_server({LOAD_CPU})
    if args.workers:
        redis.check()
    log("starting the stub upstream, the baseline proxy and the gateway(s) ...")
    stub_port, baseline_port = free_port(), free_port()
    stub = children.start("stub", [sys.executable, str(BENCH_DIR / "stub_upstream.py"), "--port", str(stub_port)],
                          cpus=(LOAD_CPU,))
    children.wait_ready("stub", stub, lambda: listening(stub_port), f"not listening on {stub_port}")
    stub_url = f"http://{HOST}:{stub_port}/mcp"
    baseline = children.start("baseline", [sys.executable, str(BENCH_DIR / "baseline_proxy.py"), "--port",
                                           str(baseline_port), "--upstream", stub_url,
                                           "--connections", str(args.connections)], cpus=(PROXY_CPU,))
    children.wait_ready("baseline", baseline, lambda: listening(baseline_port), f"not listening on {baseline_port}")
    gateways: dict[str, Gateway] = {}
    for spec in specs:  # the first provisions the database; the others share it
        gateways[spec.name] = Gateway(children, db, stub_url, spec, peer=next(iter(gateways.values()), None),
                                      redis=redis)
    urls = {"upstream": stub_url, "baseline": f"http://{HOST}:{baseline_port}/mcp",
            **{t: g.endpoint for t, g in gateways.items()}}
    pids = {"upstream": stub.pid, "baseline": baseline.pid, **{t: g.proc.pid for t, g in gateways.items()}}
    cpus = {"upstream": (LOAD_CPU,), "baseline": (PROXY_CPU,), **{t: g.spec.cpus for t, g in gateways.items()}}
    for target in ("upstream", "baseline"):
        status, text = post(urls[target], body, NO_KEY)
        if status != 200:
            raise BenchError(f"{target} does not answer the benchmark request: HTTP {status}: {text[:300]}")

    proxies = ["baseline", *gateways]
    results: dict[str, list[Load]] = {t: [] for t in ("upstream", *proxies)}
    ceiling = 0.0
    for r in range(args.rounds):
        # The upstream first (it sets the key budget's ceiling), then the proxies, every other round reversed.
        for target in ["upstream", *(proxies if r % 2 == 0 else reversed(proxies))]:
            log(f"round {r + 1}/{args.rounds}: {label(target)} ...")
            result = measure(target, urls[target], pids, cpus, load, body, gateways, args.duration, ceiling)
            if target == "upstream":
                # Nothing behind this harness goes faster than wrk + stub alone.
                ceiling = max(ceiling, result.rps)
            results[target].append(result)
            if r == 0 and target in gateways:
                gateways[target].check_setting(result)  # before any more time goes into a run that would mislead
            statuses = f", gateway statuses {result.statuses}" if result.statuses else ""
            statuses += f", per worker {result.worker_requests}" if result.worker_requests else ""
            log(f"    {result.rps:,.0f} req/s, p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, "
                f"{result.requests} requests, {result.non_2xx} non-2xx, {result.socket_errors} socket errors, "
                f"CPU {result.cpu_pct:.0f}% ({result.cpu_us_per_request:.1f} us/request), other work on the pinned "
                f"CPUs up to {result.others_pct:.0f}%{statuses}")

    pairs: list[tuple[Load, Load]] = []
    if args.pairs:
        on_target, off_target = "gateway", COMPARE.targets["off"]
        for i in range(args.pairs):
            # Every other pair the off gateway goes first: a drift of the machine's speed within a pair then
            # favours neither.
            order = (on_target, off_target) if i % 2 == 0 else (off_target, on_target)
            measured = {}
            for target in order:
                measured[target] = measure(target, urls[target], pids, cpus, load, body, gateways,
                                           args.pair_seconds, ceiling)
            on, off = measured[on_target], measured[off_target]
            pairs.append((on, off))
            log(f"pair {i + 1}/{args.pairs}: CPU per request {on.cpu_us_per_request:.1f} against "
                f"{off.cpu_us_per_request:.1f} us ({on.cpu_us_per_request / off.cpu_us_per_request:.3f}x; in the "
                f"kernel {on.kernel_us_per_request:.1f} against {off.kernel_us_per_request:.1f}), "
                f"{on.rps:,.0f} against {off.rps:,.0f} req/s")

    cond = conditions(args, body, load, db, redis, pids, load_at_start, source, gateways)
    # Stopped first (a supervisor after its workers), the gateways flush every record they queued; then count them.
    for gateway in gateways.values():
        Children.stop(gateway.proc)
    rows = db.count_request_logs()
    measured = sum(x.requests for t in gateways for x in results[t]) + sum(a.requests + b.requests for a, b in pairs)
    cond["request_logs_rows"] = (f"{rows} for the run ({measured} measured gateway requests, plus warm-ups and "
                                 "probes)")
    summary = report(results, cond, gateways)
    if pairs:
        summary["pairs"] = report_pairs(pairs, args.pair_seconds)
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS_DIR / f"proxy-{stamp}.json"
    runs = {t: [{**asdict(x), "cpu_us_per_request": x.cpu_us_per_request} for x in results[t]] for t in results}
    if pairs:
        runs["pairs"] = [{"on": {**asdict(a), "cpu_us_per_request": a.cpu_us_per_request},
                          "off": {**asdict(b), "cpu_us_per_request": b.cpu_us_per_request}} for a, b in pairs]
    out.write_text(json.dumps({"benchmark": "proxy", "compare": COMPARE.feature, "workers": args.workers,
                               "timestamp": stamp, **summary, "labels": {t: label(t) for t in results},
                               "runs": runs, "conditions": cond, "request_logs_rows": rows}, indent=2) + "\n")
    print(f"\nfigures written to {out.relative_to(BENCH_DIR.parent)}")
    from chart import try_write_chart  # bench/chart.py: a PNG beside the JSON, when matplotlib is installed

    if (png := try_write_chart(out)) is not None:
        print(f"chart written to {png.relative_to(BENCH_DIR.parent)}")
    errors = {t: sum(x.errors for x in results[t]) for t in results}
    if any(errors.values()):
        log(f"bench: errors in measured runs {errors}: the figures are suspect")
        return 1
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def worker_counts(text: str) -> list[int]:
    """`--workers 1,2`: distinct positive counts, smallest first."""
    try:
        counts = {int(part) for part in text.split(",")}
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if min(counts) < 1:
        raise argparse.ArgumentTypeError(f"worker counts must be at least 1: {text!r}")
    return sorted(counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Proxy benchmark: upstream direct, baseline aiohttp proxy, gateway.")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per target (default 8)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent keep-alive connections (default 32)")
    parser.add_argument("--payload-bytes", type=int, default=256, help="request body size (default 256)")
    parser.add_argument("--database", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the three targets; report medians")
    parser.add_argument("--case", choices=CASES, default="plain",
                        help="plain 2025-era calls, 2026-07-28 stateless calls, or 2025-era calls in a session")
    parser.add_argument("--load", choices=("auto", "wrk", "aiohttp"), default="auto",
                        help="load generator (auto: wrk if on PATH)")
    parser.add_argument("--compare", choices=tuple(COMPARISONS), default="limits",
                        help="the feature the second gateway turns off: limits (every rate-limit tier, far above "
                             "the load) or guard (the upstream guard: routing, breaker, queue, retries)")
    parser.add_argument("--gateways", choices=("on", "off", "both"),
                        help="the production gateway (on), the one with the compared feature off, or both in "
                             "each round (default)")
    parser.add_argument("--limits", choices=("on", "off", "both"),
                        help="the same as --compare limits --gateways LIMITS")
    parser.add_argument("--pairs", type=int, default=0, metavar="N",
                        help="after the rounds, N short runs of each of the two gateways back to back (--pair-seconds "
                             "each), reported as the median on/off ratio with its 95%% confidence interval")
    parser.add_argument("--pair-seconds", type=float, default=3.0, help="measured seconds of each run of a pair "
                                                                         "(default 3)")
    parser.add_argument("--workers", type=worker_counts, default=[], metavar="N[,N...]",
                        help="also measure the production gateway as `gateway serve --workers N` for each N (e.g. "
                             "1,2), with Redis (BENCH_REDIS_URL), on CPUs 0 and 1; the ratio of each N to the first")
    args = parser.parse_args(argv)
    if args.limits is not None:
        if args.compare != "limits" or args.gateways is not None:
            parser.error("--limits X means --compare limits --gateways X: give --limits alone")
        args.gateways = args.limits
    args.gateways = args.gateways or "both"
    if args.duration <= 0 or args.connections < 1 or args.rounds < 1:
        parser.error("--duration, --connections and --rounds must be positive")
    if args.pairs < 0 or args.pair_seconds <= 0:
        parser.error("--pairs must be 0 or more and --pair-seconds positive")
    if args.pairs and args.gateways != "both":
        parser.error("--pairs compares the two gateways: it needs --gateways both")
    if 0 < args.pairs < PAIRS_MIN:
        parser.error(f"--pairs needs at least {PAIRS_MIN} pairs for a 95% interval of the median")
    if len(os.sched_getaffinity(0)) < 2:
        parser.error("needs two CPUs (one for the proxy under test, one for the load)")
    if args.database == "sqlite" and any(n > 1 for n in args.workers):
        parser.error("--workers N with N > 1 needs PostgreSQL (the gateway refuses SQLite with several workers)")
    global CASE, COMPARE
    CASE = args.case
    COMPARE = COMPARISONS[args.compare]
    specs = gateway_specs(args.gateways, args.workers)
    # SIGTERM and SIGHUP unwind like Ctrl-C, through the cleanup below.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    # This script (and the aiohttp fallback client) keeps off the proxy's core.
    os.sched_setaffinity(0, {LOAD_CPU})

    work_dir = Path(tempfile.mkdtemp(prefix="gwbench-proxy-"))
    children = Children(work_dir)
    db = Database(args.database, work_dir)
    redis = RedisKeys()
    try:
        return run(args, specs, work_dir, children, db, redis)
    except BenchError as exc:
        log(f"bench: {exc}")
        for name in (spec.name for spec in specs):
            tail = children.log_tail(name)
            if tail:
                log(f"bench: the log of {name} ends with:\n{tail}")
        return 1
    except KeyboardInterrupt:
        log("bench: interrupted; cleaning up")
        return 130
    finally:
        # No interruptions while cleaning up: half a cleanup leaves things behind.
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            children.stop_all()
            redis.delete()
            db.unpin_server()
            db.drop()
            shutil.rmtree(work_dir, ignore_errors=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
