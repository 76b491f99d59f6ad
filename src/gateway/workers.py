"""`gateway serve --workers N`: N gateway processes on the same ports, supervised.

The supervisor (this process) checks what must be checked once, then starts N workers,
each a complete `gateway serve` that binds the data-plane and control-plane ports with
SO_REUSEPORT: the kernel spreads new connections over the workers' listening sockets.
It never serves a request itself and holds no gateway state.

- Once, before any worker: the configuration is loaded and checked, migrations are
  applied when `--migrate` asks for them, and the schema is checked (a database not at
  head refuses to start with one message, not one per worker).
- Shared state: every limit, ban, breaker, session count and configuration signal that
  must be one for the deployment already goes through Redis when `[redis] url` is set,
  the same path separate machines use. Without Redis each worker would enforce limits of
  its own (N times the configured ones) and not see the others' bans, so more than one
  worker without Redis is refused; so is SQLite (one file, one writer at a time) and port
  0 (each worker would get a port of its own).
- A worker that dies is started again after a backoff (0.5 s, doubling while it keeps
  dying within a minute of its start, at most 30 s). One that exits with status 2 before
  it ever served for long (a configuration error) stops the whole gateway with status 2.
- SIGTERM or SIGINT: forwarded to every worker as SIGTERM; each stops accepting, lets its
  requests in flight finish and flushes its record writer (app.Gateway.stop); the
  supervisor waits for all of them (at most `writer.shutdown_timeout` + 30 s, then
  SIGKILL) and exits 0 when every worker did.
- Workers get SIGTERM if the supervisor itself dies (PR_SET_PDEATHSIG on Linux).

In each worker (`attach`): `/metrics` answers for the whole gateway. The worker a scrape
reaches asks every sibling for its own figures over a Unix socket in the supervisor's
private runtime directory and merges them: counters and histograms are summed (the same
series a single process reports), gauges are given per worker with a `worker` label
(breaker levels or processes alive do not add up), and `gateway_workers`,
`gateway_worker_requests_total{worker}` say who answered. `/metrics?scope=worker` is the
answering worker's own figures. `/healthz` and `/metrics` name the worker that answered
in `X-Gateway-Worker` and `X-Gateway-Pid`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.config import Config, ConfigError

log = logging.getLogger("gateway.workers")

WORKER_HEADER = "X-Gateway-Worker"
PID_HEADER = "X-Gateway-Pid"
RESTART_BACKOFF_FIRST = 0.5
RESTART_BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # a worker that lived this long starts its backoff over
FATAL_STATUS = 2  # what `gateway serve` exits with for a configuration or schema error
_SIBLING_TIMEOUT = 2.0


def parse_workers(text: str) -> int:
    """`--workers`: a positive number, or `auto` for one per CPU."""
    if text == "auto":
        return os.cpu_count() or 1
    try:
        count = int(text)
    except ValueError:
        raise ConfigError(f"--workers must be a number or 'auto', not {text!r}") from None
    if count < 1:
        raise ConfigError(f"--workers must be at least 1, not {count}")
    return count


def check_config(cfg: Config, count: int) -> None:
    """Refuse a configuration that N workers cannot share (raises ConfigError naming the fix)."""
    if count == 1:
        return
    if not cfg.redis.url:
        raise ConfigError(
            f"--workers {count} needs Redis (redis.url / GATEWAY_REDIS_URL): rate limits, bans, breakers, "
            "session caps and configuration signals are shared between processes through it; without it "
            f"each worker would enforce its own copy of every limit ({count} times the configured rates). "
            "Set redis.url, or run one worker"
        )
    if cfg.database.url.startswith("sqlite"):
        raise ConfigError(
            f"--workers {count} needs PostgreSQL (database.url / GATEWAY_DATABASE_URL): every worker writes "
            "records, and a SQLite file takes one writer at a time. Use PostgreSQL, or run one worker"
        )
    for section in ("dataplane", "controlplane"):
        part = getattr(cfg, section)
        if part.port == 0 and (section == "dataplane" or cfg.controlplane.enabled):
            raise ConfigError(
                f"--workers {count} needs a fixed {section}.port (GATEWAY_{section.upper()}_PORT), not 0: "
                "the workers share one port, and 0 would give each a port of its own"
            )


# -- the supervisor --------------------------------------------------------------------------------
@dataclass
class _Slot:
    index: int
    process: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0  # how many times this slot's worker was started again
    quick_deaths: int = 0  # deaths in a row within STABLE_AFTER of a start
    restart_at: float | None = None


class Supervisor:
    """Starts `count` workers, restarts those that die, and stops them all on SIGTERM/SIGINT."""

    def __init__(self, count: int, worker_command: Callable[[int, str, int], list[str]], *,
                 stop_timeout: float) -> None:
        self.count = count
        self.worker_command = worker_command  # (index, runtime dir, restarts) -> argv
        self.stop_timeout = stop_timeout
        self.slots = [_Slot(i) for i in range(count)]
        self._stopping: int | None = None  # the signal that asked us to stop
        self.runtime_dir = ""

    def run(self) -> int:
        """Supervise until a signal stops the gateway or a worker cannot start; the exit status."""
        self.runtime_dir = tempfile.mkdtemp(prefix="gateway-workers-")  # 0700: the metrics sockets
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            log.info("supervisor %d starting %d workers", os.getpid(), self.count)
            for slot in self.slots:
                self._start(slot)
            status = self._supervise()
            if status is None:
                log.info("stopping: SIGTERM to %d workers; each drains its requests and flushes its records",
                         sum(1 for s in self.slots if _alive(s)))
                status = self._stop_all()
            else:
                self._stop_all()
            log.info("all workers stopped%s", "" if status == 0 else f" (exit status {status})")
            return status
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def _on_signal(self, signum: int, _frame) -> None:
        self._stopping = signum

    def _start(self, slot: _Slot) -> None:
        argv = self.worker_command(slot.index, self.runtime_dir, slot.restarts)
        slot.process = subprocess.Popen(argv, preexec_fn=_die_with_parent)
        slot.started = time.monotonic()
        slot.restart_at = None
        log.info("worker %d started (pid %d)", slot.index, slot.process.pid)

    def _supervise(self) -> int | None:
        """Watch the workers until asked to stop (None) or one cannot start (its status)."""
        while self._stopping is None:
            now = time.monotonic()
            for slot in self.slots:
                if slot.process is not None and slot.process.poll() is not None:
                    fatal = self._died(slot, now)
                    if fatal is not None:
                        return fatal
                if slot.restart_at is not None and now >= slot.restart_at and self._stopping is None:
                    slot.restarts += 1
                    self._start(slot)
            time.sleep(0.1)  # a signal ends the sleep early; restarts are due in tenths of a second anyway
        return None

    def _died(self, slot: _Slot, now: float) -> int | None:
        status = slot.process.returncode
        lived = now - slot.started
        how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
        if status == FATAL_STATUS and lived < STABLE_AFTER:
            log.error("worker %d (pid %d) %s: a configuration or schema error; stopping the gateway",
                      slot.index, slot.process.pid, how)
            slot.process = None
            return FATAL_STATUS
        slot.quick_deaths = slot.quick_deaths + 1 if lived < STABLE_AFTER else 1
        delay = min(RESTART_BACKOFF_MAX, RESTART_BACKOFF_FIRST * 2 ** (slot.quick_deaths - 1))
        log.warning("worker %d (pid %d) %s after %.1f s; starting it again in %.1f s",
                    slot.index, slot.process.pid, how, lived, delay)
        slot.process = None
        slot.restart_at = now + delay
        return None

    def _stop_all(self) -> int:
        """SIGTERM every worker, wait for all (SIGKILL after stop_timeout); 0 when each exited 0."""
        alive = [s for s in self.slots if _alive(s)]
        for slot in alive:
            _signal(slot.process, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        status = 0
        for slot in alive:
            try:
                code = slot.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d (pid %d) did not stop within %.0f s: killed", slot.index, slot.process.pid,
                          self.stop_timeout)
                slot.process.kill()
                slot.process.wait()
                status = 1
                continue
            if code not in (0, -signal.SIGTERM):  # -SIGTERM: it had not started serving (no handler yet)
                log.error("worker %d (pid %d) exited with status %d while stopping", slot.index, slot.process.pid,
                          code)
                status = 1
        return status


def _alive(slot: _Slot) -> bool:
    return slot.process is not None and slot.process.poll() is None


def _signal(process: subprocess.Popen, sig: int) -> None:
    try:
        process.send_signal(sig)
    except ProcessLookupError:
        pass


def _die_with_parent() -> None:  # pragma: no cover - runs in the child, between fork and exec
    """Linux: the worker gets SIGTERM (and so drains) if the supervisor dies without stopping it."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# -- in each worker --------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerIdentity:
    index: int
    count: int
    runtime_dir: str
    restarts: int = 0

    def socket_path(self, index: int | None = None) -> str:
        return os.path.join(self.runtime_dir, f"worker-{self.index if index is None else index}.sock")


class _WorkerLogName(logging.Filter):
    """Log lines name their worker: `gateway.dataplane[w1]`."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.suffix = f"[w{index}]"

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.endswith(self.suffix):
            record.name += self.suffix
        return True


def name_worker_logs(index: int) -> None:
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerLogName(index))


async def attach(gateway, identity: WorkerIdentity) -> None:
    """Make a gateway one worker of many, before it listens: its own figures on a Unix socket, whole-gateway
    /metrics, and the worker named on /healthz and /metrics."""
    from aiohttp import web

    pid = str(os.getpid())
    own = {WORKER_HEADER: str(identity.index), PID_HEADER: pid}
    gateway.metrics.gauge("gateway_worker_info", "This worker process (value 1)", lambda: [((pid,), 1)], ("pid",))
    gateway.metrics.gauge("gateway_worker_restarts", "Times the supervisor started this worker again",
                          lambda: [((), identity.restarts)])

    async def local_figures(request: web.BaseRequest) -> web.Response:
        return web.Response(text=gateway.metrics.render(), content_type="text/plain", charset="utf-8", headers=own)

    path = identity.socket_path()
    try:
        os.unlink(path)  # left by this slot's previous worker
    except FileNotFoundError:
        pass
    runner = web.ServerRunner(web.Server(local_figures, access_log=None), handle_signals=False)
    await runner.setup()
    await web.UnixSite(runner, path).start()
    gateway.add_runner(runner)

    def whole_gateway_metrics(handler):
        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            response = await handler(request)  # authentication, and this worker's own figures
            if response.status != 200 or request.query.get("scope") == "worker":
                response.headers.update(own)
                return response
            texts = {identity.index: response.text}
            siblings = [i for i in range(identity.count) if i != identity.index]
            for index, text in zip(siblings, await asyncio.gather(*(_sibling(identity, i) for i in siblings))):
                if text is not None:
                    texts[index] = text
            return web.Response(text=merge_metrics(texts, identity.count), content_type="text/plain",
                                charset="utf-8", headers=own)
        return handle

    def named(handler):
        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            response = await handler(request)
            response.headers.update(own)
            return response
        return handle

    gateway.dataplane.wrap_operational("/metrics", whole_gateway_metrics)
    gateway.dataplane.wrap_operational("/healthz", named)
    log.info("worker %d of %d (pid %s): figures on %s", identity.index, identity.count, pid, path)


async def _sibling(identity: WorkerIdentity, index: int) -> str | None:
    """A sibling's own figures, or None when it does not answer (dead, starting, stuck)."""
    import aiohttp

    try:
        connector = aiohttp.UnixConnector(path=identity.socket_path(index))
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.get("http://worker/metrics", timeout=aiohttp.ClientTimeout(total=_SIBLING_TIMEOUT)) as r:
                return await r.text() if r.status == 200 else None
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
        return None


async def serve_worker(config: Config, identity: WorkerIdentity) -> None:
    """One worker: serve until SIGTERM/SIGINT (from the supervisor), then drain and flush like `serve`."""
    from gateway.app import Gateway, serve_until_signalled

    gateway = Gateway(config, reuse_port=True, check_schema=False, before_listen=lambda gw: attach(gw, identity))
    await serve_until_signalled(gateway)


# -- merging figures -------------------------------------------------------------------------------
_SUMMED = frozenset({"counter", "histogram", "summary"})


def merge_metrics(texts: dict[int, str], configured: int) -> str:
    """One Prometheus text for the whole gateway from each worker's (worker index -> its own text).

    Counters and histograms: each series summed over the workers that answered. Gauges (and
    anything untyped): each worker's series with a `worker` label added. Then how many
    workers are configured and answered, and each worker's request count.
    """
    order: list[str] = []
    meta: dict[str, tuple[str, str]] = {}  # family -> (help line, type)
    summed: dict[str, dict[str, float]] = {}
    labelled: dict[str, list[str]] = {}
    requests: dict[int, float] = {}
    for worker in sorted(texts):
        family, kind = "", "untyped"
        for line in texts[worker].splitlines():
            if not line:
                continue
            if line.startswith("# HELP "):
                family = line.split(" ", 3)[2]
                if family not in meta:
                    order.append(family)
                    meta[family] = (line, "untyped")
                continue
            if line.startswith("# TYPE "):
                _, _, family, kind = line.split(" ", 3)
                if family not in meta:
                    order.append(family)
                meta[family] = (meta.get(family, (f"# HELP {family} {family}", ""))[0], kind)
                continue
            if line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            try:
                number = float(value)
            except ValueError:
                continue
            if family == "gateway_requests_total":
                requests[worker] = requests.get(worker, 0.0) + number
            if kind in _SUMMED:
                bucket = summed.setdefault(family, {})
                bucket[series] = bucket.get(series, 0.0) + number
            else:
                labelled.setdefault(family, []).append(f"{_with_worker(series, worker)} {_number(number)}")
    lines: list[str] = []
    for family in order:
        help_line, kind = meta[family]
        lines += [help_line, f"# TYPE {family} {kind}"]
        if kind in _SUMMED:
            lines += [f"{series} {_number(v)}" for series, v in summed.get(family, {}).items()]
        else:
            lines += labelled.get(family, [])
    lines += [
        "# HELP gateway_workers Worker processes: configured, and those that answered this scrape",
        "# TYPE gateway_workers gauge",
        f'gateway_workers{{state="configured"}} {configured}',
        f'gateway_workers{{state="answering"}} {len(texts)}',
        "# HELP gateway_worker_requests_total MCP requests per worker (gateway_requests_total sums them)",
        "# TYPE gateway_worker_requests_total counter",
    ]
    lines += [f'gateway_worker_requests_total{{worker="{w}"}} {_number(requests.get(w, 0.0))}' for w in sorted(texts)]
    return "\n".join(lines) + "\n"


def _with_worker(series: str, worker: int) -> str:
    name, brace, rest = series.partition("{")
    if not brace:
        return f'{name}{{worker="{worker}"}}'
    return f'{name}{{worker="{worker}",{rest}' if rest != "}" else f'{name}{{worker="{worker}"}}'


def _number(value: float) -> str:
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def worker_command(config_path: str | None, count: int) -> Callable[[int, str, int], list[str]]:
    """The argv of worker `index`: this same program, `serve` in worker mode, same configuration."""
    base = [sys.executable, "-m", "gateway"]
    if config_path:
        base += ["--config", config_path]

    def command(index: int, runtime_dir: str, restarts: int) -> list[str]:
        return [*base, "serve", "--worker-index", str(index), "--worker-count", str(count),
                "--worker-dir", runtime_dir, "--worker-restarts", str(restarts)]

    return command
