"""What every peer benchmark shares: the MCP load, the process-tree meters, our gateway, the report.

A peer script (contextforge.py) installs and starts the other gateway and
registers the upstream there; this module starts the same upstream and our
gateway, drives the same tools/call load through each target, measures, prints
and writes the figures. It reuses bench/proxy.py's process handling (pinning,
logs, cleanup) and CPU accounting, and must not measure anything a peer script
could do differently for one target: one client, one payload, one pinning.

The load: an aiohttp client (on uvloop) in this process, `concurrency` tasks,
each on a keep-alive connection and an MCP session of its own (2025-11-25
`initialize`, then `notifications/initialized`; the session id, when the
target hands one out, is sent with every call and DELETEd at the end), sending
`tools/call` of the upstream's `echo` tool one after another. An answer counts
when it is HTTP 200, a JSON-RPC result (JSON or one SSE event), not `isError`,
and echoes the text sent; anything else is an error. The load runs without a
break from the warm-up into the measured window, so a slow target's pipeline is
full when the window opens (the tasks start one after another over the first
half of the warm-up, so that their calls do not finish in waves); what completes
inside the window counts, and calls still running when it closes are waited
for, uncounted.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCH_DIR))

import proxy  # noqa: E402  - bench/proxy.py: Children, CPU accounting, the gateway's source
from proxy import HOST, LOAD_CPU, PROXY_CPU, BenchError, Children, free_port, http_ok, listening, log  # noqa: E402

RESULTS_DIR = BENCH_DIR / "results"
PROTOCOL_VERSION = "2025-11-25"
REQUEST_TIMEOUT = 60.0  # one call; the peer at its slowest answers within seconds
START_TIMEOUT = 180.0  # a peer that migrates its database at start, on a busy machine
NOISE_PCT = 10.0
SERVER_NAME = "bench"  # the upstream's name in our gateway (and the peer's, where it has names)
UPSTREAM_TOOL = "echo"
MIB = 1024 * 1024
_PAGE = os.sysconf("SC_PAGE_SIZE")


# -- process trees ---------------------------------------------------------------------------------
def descendants(root: int) -> list[int]:
    """`root` and every process below it, from /proc (a peer may fork workers or helpers)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as fh:
                total += int(fh.read().split()[1]) * _PAGE
        except (OSError, ValueError, IndexError):
            pass  # gone since the tree was read
    return total


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += proxy.process_cpu_seconds(pid)
        except (OSError, ValueError, IndexError):
            pass
    return total


class TreeMeter:
    """The memory of a process tree under load, sampled in a thread: peak RSS and peak PSS over the window.

    RSS sums each process's resident pages, so pages that forked workers share with their parent count
    once per process (what `ps` and most dashboards add up); PSS splits each shared page between the
    processes sharing it, so its sum is the tree's real share of memory. The tree is re-read every
    second (a worker may start late); RSS every 100 ms, PSS (a walk of the page tables) every 500 ms.
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self.rss = self.pss = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        tree = descendants(self.root)
        self.rss, self.pss = rss_bytes(tree), pss_bytes(tree)
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name=f"memory-{self.root}", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        tree, ticks = descendants(self.root), 0
        while not self._stop.wait(0.1):
            ticks += 1
            if ticks % 10 == 0:
                tree = descendants(self.root)
            self.rss = max(self.rss, rss_bytes(tree))
            if ticks % 5 == 0:
                self.pss = max(self.pss, pss_bytes(tree))

    def stop(self) -> tuple[int, int]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        tree = descendants(self.root)
        return max(self.rss, rss_bytes(tree)), max(self.pss, pss_bytes(tree))


def pss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError, IndexError):
            pass
    return total


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a child started in a session of its own, then whatever it forked and left (its process group).

    The leader goes first, alone, so that it can stop and reap its own workers (a worker whose parent is
    gone would be left to an init that may never reap it); the group's leftovers get SIGTERM, then SIGKILL.
    """
    Children.stop(proc)  # SIGTERM, a wait, SIGKILL if it lingers
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return  # nothing left in the group
        time.sleep(1.0)


# -- targets ---------------------------------------------------------------------------------------
@dataclass
class Target:
    """Where the load goes: an MCP endpoint, its credentials, the tool's name there, and its process."""

    name: str  # key in the results: "upstream", "gateway", the peer's name
    label: str
    url: str
    tool: str
    proc: subprocess.Popen
    headers: dict[str, str] = field(default_factory=dict)  # credentials
    describe: str = ""  # its configuration, for the conditions


def start_upstream(children: Children) -> tuple[Target, str]:
    """The official `mcp` SDK server of `gateway demo` (Streamable HTTP, 2025-era sessions), on the load CPU."""
    port = free_port()
    proc = children.start("upstream", [sys.executable, "-m", "gateway.demo.upstream", "--port", str(port)],
                          cpu=LOAD_CPU)
    children.wait_ready("upstream", proc, lambda: listening(port), f"not listening on {port}")
    url = f"http://{HOST}:{port}/mcp"
    return Target("upstream", "upstream direct (mcp SDK)", url, UPSTREAM_TOOL, proc,
                  describe="gateway.demo.upstream: the mcp SDK's MCPServer over Streamable HTTP (uvicorn, SSE "
                           "answers, stateful sessions), tool echo"), url


def our_gateway_env(db_url: str, dataplane: int, controlplane: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_") or k == "GATEWAY_NO_EXTENSIONS"}
    env.update(OUR_SETTINGS, GATEWAY_DATABASE_URL=db_url, GATEWAY_DATAPLANE_HOST=HOST,
               GATEWAY_DATAPLANE_PORT=str(dataplane), GATEWAY_CONTROLPLANE_HOST=HOST,
               GATEWAY_CONTROLPLANE_PORT=str(controlplane))
    return env


# Our gateway's settings besides addresses and the database; everything else is its default (upstream guard
# on, API-key authentication, a request_logs row per call through the batched writer, no Redis).
OUR_SETTINGS = {
    # Its rate limits off, as the peer's are: the defaults (global 5000/min) would measure refusals.
    "GATEWAY_LIMITS_ENABLED": "false",
    # The peer logs at ERROR by default; ours at WARNING logs nothing per call either.
    "GATEWAY_LOG_LEVEL": "WARNING",
}


def start_our_gateway(children: Children, work_dir: Path, upstream_url: str) -> Target:
    """`gateway serve` (one process) on a SQLite file of this run, the upstream registered, an API key made."""
    db_url = f"sqlite:///{work_dir / 'gateway.db'}"
    env = our_gateway_env(db_url, 0, 0)
    for command in ("migrate", "bootstrap"):
        done = subprocess.run(proxy.gateway_cli(command), env=env, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise BenchError(f"`gateway {command}` failed with {done.returncode}:\n{done.stderr}")
    match = re.search(r"^admin_key=(\S+)$", done.stdout, re.MULTILINE)
    if not match:
        raise BenchError(f"`gateway bootstrap` printed no admin_key= line:\n{done.stdout}")
    admin_key = match.group(1)
    dataplane, controlplane = free_port(), free_port()
    proc = children.start("gateway", proxy.gateway_cli("serve"), cpu=PROXY_CPU,
                          env=our_gateway_env(db_url, dataplane, controlplane))
    base = f"http://{HOST}:{dataplane}"
    children.wait_ready("gateway", proc, lambda: http_ok(base + "/readyz"), "/readyz is not 200")
    children.wait_ready("gateway", proc, lambda: listening(controlplane), f"admin API not listening on {controlplane}")
    admin = f"http://{HOST}:{controlplane}/api/v1"
    auth = {"Authorization": f"Bearer {admin_key}"}
    tenant = call_json("POST", admin + "/tenants", {"name": "bench"}, auth)
    user = call_json("POST", admin + "/users", {"tenant_id": tenant["id"], "username": "bench",
                                                "email": "bench@bench.invalid", "role": "USER"}, auth)
    call_json("POST", admin + "/servers", {"tenant_id": tenant["id"], "name": SERVER_NAME,
                                           "endpoint_url": upstream_url, "transport_type": "http"}, auth)
    key = call_json("POST", admin + "/api-keys", {"user_id": user["id"], "name": "bench", "scopes": ["proxy"],
                                                  "rate_limit_per_hour": 100_000, "rate_limit_per_day": 1_000_000},
                    auth)["key"]
    settings = ", ".join(f"{k}={v}" for k, v in OUR_SETTINGS.items())
    return Target("gateway", "mcp-gateway (ours)", f"{base}/servers/{SERVER_NAME}/mcp", UPSTREAM_TOOL, proc,
                  {"Authorization": f"Bearer {key}"},
                  describe=f"`gateway serve`, 1 process, SQLite file, {settings}; otherwise defaults (API-key auth, "
                           "upstream guard, request_logs through the batched writer, no Redis); endpoint "
                           f"/servers/{SERVER_NAME}/mcp")


def call_json(method: str, url: str, body: dict | None, headers: dict[str, str], timeout: float = 60) -> dict:
    """One JSON request of the set-up (not measured); a refusal stops the run with the answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={**headers, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        raise BenchError(f"{method} {url}: HTTP {exc.code} {exc.read().decode(errors='replace')[:500]}") from None
    except OSError as exc:
        raise BenchError(f"{method} {url}: {exc}") from None


# -- the load ------------------------------------------------------------------------------------
@dataclass
class Run:
    """One measured run against one target."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    first_error: str = ""
    cpu_pct: float = math.nan  # the target's process tree (the upstream's for upstream direct)
    others_pct: float = math.nan  # the most of a pinned CPU that went to other work
    rss_peak_mib: float = math.nan  # peak resident memory of the target's process tree (TreeMeter)
    pss_peak_mib: float = math.nan  # the same, shared pages split between the processes sharing them
    processes: int = 0  # in the target's tree at the end of the window

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_pct / 100 / self.rps * 1e6 if self.rps else math.nan


def echo_text(payload_bytes: int) -> str:
    """The text the calls echo: the tools/call body to the upstream is `payload_bytes` long (or the bare envelope)."""
    bare = len(call_body(UPSTREAM_TOOL, "", 1))
    return "x" * max(0, payload_bytes - bare)


def call_body(tool: str, text: str, request_id: int) -> bytes:
    params = {"name": tool, "arguments": {"text": text}}
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params},
                      separators=(",", ":")).encode()


class McpLoad:
    """tools/call at fixed concurrency, each task on its own MCP session; the same client for every target."""

    def __init__(self, concurrency: int, payload_bytes: int) -> None:
        self.concurrency = concurrency
        self.text = echo_text(payload_bytes)

    def describe(self) -> str:
        import aiohttp
        import uvloop

        return (f"aiohttp {aiohttp.__version__} client on uvloop {uvloop.__version__}, in the bench process on CPU "
                f"{LOAD_CPU}: {self.concurrency} tasks, each on its own keep-alive connection and MCP session "
                f"(initialize {PROTOCOL_VERSION} + notifications/initialized), tools/call one after another")

    def body_bytes(self, tool: str) -> int:
        return len(call_body(tool, self.text, 1))

    def run(self, target: Target, warmup: float, seconds: float, meter) -> Run:
        import uvloop

        return uvloop.run(self._run(target, warmup, seconds, meter))

    async def _run(self, target: Target, warmup: float, seconds: float, meter) -> Run:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self.concurrency)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            sessions = await asyncio.gather(*(self._open(http, target) for _ in range(self.concurrency)))
            try:
                latencies, errors, first_error, figures = await self._drive(http, target, sessions, warmup, seconds,
                                                                            meter)
            finally:
                await asyncio.gather(*(self._close(http, target, s) for s in sessions), return_exceptions=True)
        latencies.sort()
        n = len(latencies)

        def percentile(p: float) -> float:
            return latencies[min(n - 1, int(p / 100 * n))] * 1000 if n else math.nan

        return Run(requests=n, seconds=seconds, rps=n / seconds, p50_ms=percentile(50), p99_ms=percentile(99),
                   errors=errors, first_error=first_error, **figures)

    def _headers(self, target: Target, session: str | None) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
                   "MCP-Protocol-Version": PROTOCOL_VERSION, **target.headers}
        if session:
            headers["Mcp-Session-Id"] = session
        return headers

    async def _open(self, http, target: Target) -> str | None:
        body = json.dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize",
                           "params": {"protocolVersion": PROTOCOL_VERSION, "capabilities": {},
                                      "clientInfo": {"name": "mcp-gateway-bench", "version": "1"}}}).encode()
        headers = self._headers(target, None)
        del headers["MCP-Protocol-Version"]  # not on initialize
        async with http.post(target.url, data=body, headers=headers) as response:
            text = await response.read()
            session = response.headers.get("Mcp-Session-Id")
            if response.status != 200 or "result" not in (answer_of(response.content_type, text) or {}):
                raise BenchError(f"{target.label}: initialize answered HTTP {response.status}: {text[:300]!r}")
        note = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()
        async with http.post(target.url, data=note, headers=self._headers(target, session)) as response:
            await response.read()
            if response.status not in (200, 202, 204):
                raise BenchError(f"{target.label}: notifications/initialized answered HTTP {response.status}")
        return session

    async def _close(self, http, target: Target, session: str | None) -> None:
        if session:
            async with http.delete(target.url, headers=self._headers(target, session)) as response:
                await response.read()

    async def _drive(self, http, target: Target, sessions: list[str | None], warmup: float, seconds: float, meter):
        """One continuous load: the warm-up fills the pipeline, then the window of `seconds` is measured.

        What counts is what completes inside the window (a slow target's calls are already under way when it
        opens); calls still running when it closes are waited for, uncounted.
        """
        import aiohttp

        clock = time.perf_counter
        latencies: list[float] = []
        state = {"errors": 0, "first": ""}
        prefix, suffix = call_body(target.tool, self.text, 1).split(b'"id":1', 1)
        opens = clock() + warmup
        closes = opens + seconds

        def failed(reason: str, at: float) -> None:
            if opens <= at <= closes:
                state["errors"] += 1
                state["first"] = state["first"] or reason

        async def worker(worker_id: int, session: str | None) -> None:
            headers = self._headers(target, session)
            n = 0
            # Started one after another over the first half of the warm-up: tasks started together on a
            # target that shares its CPU between calls all finish together, and stay in step, so the
            # window would count whole waves of `concurrency` calls (one wave more or less is a big error
            # for a slow target). Staggered, their completions spread out and stay spread.
            await asyncio.sleep(worker_id * warmup / 2 / len(sessions))
            while (t0 := clock()) < closes:
                n += 1
                body = b'%s"id":%d%s' % (prefix, worker_id * 10_000_000 + n, suffix)
                try:
                    async with http.post(target.url, data=body, headers=headers) as response:
                        raw = await response.read()
                        status, content_type = response.status, response.content_type
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    failed(f"{type(exc).__name__}: {exc}", clock())
                    continue
                t1 = clock()
                if status != 200:
                    failed(f"HTTP {status}: {raw[:200]!r}", t1)
                    continue
                problem = check_echo(answer_of(content_type, raw), self.text)
                if problem:
                    failed(problem, t1)
                elif opens <= t1 <= closes:
                    latencies.append(t1 - t0)

        async def window() -> dict:
            await asyncio.sleep(max(0.0, opens - clock()))
            meter.start()
            await asyncio.sleep(max(0.0, closes - clock()))
            return meter.stop()

        meter_task = asyncio.ensure_future(window())
        await asyncio.gather(*(worker(i, s) for i, s in enumerate(sessions)))
        return latencies, state["errors"], state["first"], await meter_task


def answer_of(content_type: str, raw: bytes) -> dict | None:
    """The JSON-RPC answer in a response body: plain JSON, or the SSE event that carries it."""
    try:
        if content_type == "text/event-stream":
            for line in raw.splitlines():
                if line.startswith(b"data:"):
                    message = json.loads(line[5:])
                    if "result" in message or "error" in message:
                        return message
            return None
        return json.loads(raw)
    except ValueError:
        return None


def check_echo(message: dict | None, text: str) -> str:
    """Why this answer is not the echoed text ("" when it is)."""
    if message is None:
        return "no JSON-RPC answer in the body"
    if "result" not in message:
        return f"JSON-RPC error: {json.dumps(message.get('error'))[:200]}"
    result = message["result"]
    if result.get("isError"):
        return f"tool error: {json.dumps(result)[:200]}"
    content = result.get("content") or [{}]
    if content[0].get("text") != text:
        return f"not the text sent: {json.dumps(result)[:200]}"
    return ""


class Meter:
    """CPU and memory around one measured run: the target's process tree, and other work on the pinned CPUs."""

    def __init__(self, target: Target, upstream: Target) -> None:
        self.target = target
        self.upstream = upstream
        self.rss = TreeMeter(target.proc.pid)

    def start(self) -> None:
        self.rss.start()
        self.tree = descendants(self.target.proc.pid)
        self.up_tree = descendants(self.upstream.proc.pid)
        self.t0 = time.monotonic()
        self.ours0 = proxy.our_cpu_seconds()
        self.cpu0 = cpu_seconds(self.tree)
        self.up0 = cpu_seconds(self.up_tree) if self.target is not self.upstream else 0.0
        self.busy0 = {c: proxy.cpu_busy_seconds(c) for c in (PROXY_CPU, LOAD_CPU)}

    def stop(self) -> dict:
        elapsed = time.monotonic() - self.t0
        used = cpu_seconds(self.tree) - self.cpu0
        up = cpu_seconds(self.up_tree) - self.up0 if self.target is not self.upstream else used
        ours = proxy.our_cpu_seconds() - self.ours0
        if self.target is self.upstream:
            mine = {PROXY_CPU: 0.0, LOAD_CPU: up + ours}
        else:
            mine = {PROXY_CPU: used, LOAD_CPU: up + ours}
        # The gateways' CPU counts only when a gateway is measured (upstream direct uses the load CPU alone).
        cpus = [LOAD_CPU] if self.target is self.upstream else [PROXY_CPU, LOAD_CPU]
        others = max(100 * max(0.0, proxy.cpu_busy_seconds(c) - self.busy0[c] - mine[c]) / elapsed for c in cpus)
        rss, pss = self.rss.stop()
        return {"cpu_pct": 100 * used / elapsed, "others_pct": others, "rss_peak_mib": rss / MIB,
                "pss_peak_mib": pss / MIB, "processes": len(descendants(self.target.proc.pid))}


# -- running and reporting -------------------------------------------------------------------------
def measure_all(targets: list[Target], upstream: Target, load: McpLoad, args) -> dict[str, list[Run]]:
    """Each round: every target in turn (the order of the gateways reversed every other round)."""
    results: dict[str, list[Run]] = {t.name: [] for t in targets}
    gateways = [t for t in targets if t is not upstream]
    for r in range(args.rounds):
        for target in [upstream, *(gateways if r % 2 == 0 else reversed(gateways))]:
            log(f"round {r + 1}/{args.rounds}: {target.label} ...")
            run = load.run(target, args.warmup, args.duration, Meter(target, upstream))
            results[target.name].append(run)
            log(f"    {run.rps:,.1f} req/s, p50 {run.p50_ms:.1f} ms, p99 {run.p99_ms:.1f} ms, {run.requests} calls, "
                f"{run.errors} errors, peak RSS {run.rss_peak_mib:.0f} MiB / PSS {run.pss_peak_mib:.0f} MiB in "
                f"{run.processes} process(es), CPU {run.cpu_pct:.0f}% "
                f"({run.cpu_us_per_request:,.0f} us/call), other work on the pinned CPUs up to {run.others_pct:.0f}%")
            if run.first_error:
                log(f"    first error: {run.first_error}")
            if run.requests == 0:
                raise BenchError(f"{target.label}: no call succeeded in the measured run ({run.first_error})")
    return results


def summarize(runs: list[Run]) -> dict:
    return {
        "rps": statistics.median(x.rps for x in runs),
        "p50_ms": statistics.median(x.p50_ms for x in runs),
        "p99_ms": statistics.median(x.p99_ms for x in runs),
        "rss_peak_mib": max(x.rss_peak_mib for x in runs),
        "pss_peak_mib": max(x.pss_peak_mib for x in runs),
        "processes": max(x.processes for x in runs),
        "cpu_us_per_request": statistics.median(x.cpu_us_per_request for x in runs),
        "cpu_pct": statistics.median(x.cpu_pct for x in runs),
        "others_pct": max(x.others_pct for x in runs),
        "errors": sum(x.errors for x in runs),
        "requests": sum(x.requests for x in runs),
    }


def base_conditions(args, load: McpLoad, targets: list[Target], load_at_start) -> dict:
    import aiohttp

    def cpus(pid: int) -> str:
        try:
            return ",".join(map(str, sorted(os.sched_getaffinity(pid))))
        except OSError:
            return "?"

    from importlib.metadata import version

    return {
        "cpus": f"{os.cpu_count()} x {proxy.cpu_model()}",
        "kernel": platform.release(),
        "python (ours, upstream, client)": f"{platform.python_implementation()} {platform.python_version()}",
        "libraries (ours)": f"mcp {version('mcp')}, aiohttp {aiohttp.__version__}, uvicorn {version('uvicorn')}",
        "load_generator": load.describe(),
        "concurrency": args.concurrency,
        "payload": ", ".join(f"{t.label}: {load.body_bytes(t.tool)} bytes" for t in targets)
        + f" (tools/call body; the echoed text is {len(load.text)} bytes)",
        "duration_s": f"{args.duration:g} measured + {args.warmup:g} warm-up per target, {args.rounds} round(s)",
        "pinning": "; ".join(f"{t.label}: cpus {cpus(t.proc.pid)}" for t in targets)
        + f"; the load client: cpus {cpus(0)} (taskset; children inherit it)",
        **{t.label: t.describe for t in targets},
        "gateway_source": proxy.gateway_source(),
        "load_average_at_start": " ".join(f"{x:.2f}" for x in load_at_start),
    }


def report(results: dict[str, list[Run]], targets: list[Target], peer: Target, cond: dict) -> dict:
    medians = {name: summarize(runs) for name, runs in results.items()}
    labels = {t.name: t.label for t in targets}
    ours, theirs, up = medians["gateway"], medians[peer.name], medians["upstream"]
    ratios = {
        "ours/theirs throughput": ours["rps"] / theirs["rps"],
        "theirs/ours p50 latency": theirs["p50_ms"] / ours["p50_ms"],
        "theirs/ours p99 latency": theirs["p99_ms"] / ours["p99_ms"],
        "ours/theirs peak RSS": ours["rss_peak_mib"] / theirs["rss_peak_mib"],
        "ours/theirs peak PSS": ours["pss_peak_mib"] / theirs["pss_peak_mib"],
        "theirs/ours CPU per call": theirs["cpu_us_per_request"] / ours["cpu_us_per_request"],
        "ours/upstream throughput": ours["rps"] / up["rps"],
        "theirs/upstream throughput": theirs["rps"] / up["rps"],
    }
    rounds = len(results["upstream"])
    print(f"\n{'target':<28} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'RSS MiB':>8} {'PSS MiB':>8} {'procs':>5} "
          f"{'errors':>6} {'CPU us/call':>11} {'CPU%':>5} {'others%':>7}"
          + (f"   median of {rounds} rounds" if rounds > 1 else ""))
    for name, m in medians.items():
        print(f"{labels[name]:<28} {m['rps']:>9,.1f} {m['p50_ms']:>8.1f} {m['p99_ms']:>8.1f} {m['rss_peak_mib']:>8.0f} "
              f"{m['pss_peak_mib']:>8.0f} {m['processes']:>5} {m['errors']:>6} {m['cpu_us_per_request']:>11,.0f} "
              f"{m['cpu_pct']:>5.0f} {m['others_pct']:>7.0f}")
    print("(RSS: peak resident memory of the target's process tree under load, summed over its processes; PSS: the "
          "same with shared pages split between the processes sharing them; CPU: that tree's, the upstream's for "
          "upstream direct; others%: the most either pinned CPU gave to other work in a measured run)")
    noisy = max(m["others_pct"] for m in medians.values())
    if noisy > NOISE_PCT:
        print(f"WARNING: other work took up to {noisy:.0f}% of a pinned CPU during a measured run: the machine was "
              "not quiet, req/s and latencies are disturbed")
    print(f"\nours/theirs = {ratios['ours/theirs throughput']:.1f}x throughput   (p50 {ratios['theirs/ours p50 latency']:.1f}x "
          f"and p99 {ratios['theirs/ours p99 latency']:.1f}x lower latency; peak RSS ours/theirs "
          f"{ratios['ours/theirs peak RSS']:.2f}, PSS {ratios['ours/theirs peak PSS']:.2f})")
    print(f"CPU per call: theirs/ours = {ratios['theirs/ours CPU per call']:.0f}x   (each gateway's own process tree; "
          f"ours used {ours['cpu_pct']:.0f}% of its core, so where it matches the upstream's throughput the upstream "
          "side, not ours, set the pace)")
    print(f"through ours {ratios['ours/upstream throughput']:.2f}x and through {peer.label} "
          f"{ratios['theirs/upstream throughput']:.3f}x the throughput of the upstream called directly (the client "
          "and the upstream share one core: this harness's ceiling)")
    print("\nconditions:")
    for name, value in cond.items():
        print(f"  {name:<32} {value}")
    return {"labels": labels, "medians": medians, "ratios": ratios}


def write_results(benchmark: str, summary: dict, results: dict[str, list[Run]], cond: dict) -> Path:
    """bench/results/<benchmark>-<UTC time>.json, and its chart beside it when matplotlib is installed."""
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS_DIR / f"{benchmark}-{stamp}.json"
    runs = {t: [{**asdict(x), "cpu_us_per_request": x.cpu_us_per_request} for x in rs] for t, rs in results.items()}
    out.write_text(json.dumps({"benchmark": benchmark, "timestamp": stamp, **summary, "runs": runs,
                               "conditions": cond}, indent=2) + "\n")
    print(f"\nfigures written to {out.relative_to(BENCH_DIR.parent)}")
    from chart import try_write_chart

    png = try_write_chart(out)
    if png is not None:
        print(f"chart written to {png.relative_to(BENCH_DIR.parent)}")
    return out
