"""Benchmark: a live gateway's instructions per request with a feature on and off, under callgrind.

    python bench/proxy_instructions.py                         # --compare records, PostgreSQL, 1500 requests
    python bench/proxy_instructions.py --compare audit --requests 3000
    python bench/proxy_instructions.py --database sqlite       # the embedded default's records path
    python bench/proxy_instructions.py --keep /tmp/cg          # and keep the counted dumps, per function

`proxy.py --compare X` measures a feature's cost end to end, in CPU time and
throughput; on a shared 2-vCPU VM its runs of one tree differ by a third.
`records_cost.py` counts instructions, which do not move with the machine,
but for the records pipeline alone, outside the gateway. This counts them for
the whole gateway: it starts the stub upstream and the two gateways of
proxy.py's `--compare` (the same settings, database and provisioning; its
harness is imported), each under valgrind's callgrind, sends 300 warm-up
requests, zeroes the counters (`callgrind_control -z`), sends `--requests`
tools/calls (the proxy benchmark's 256-byte body, 8 at a time, keys of both
tenants in turn), waits past a writer flush so that their records are
written, and dumps the counters (`callgrind_control -d`). It prints each
gateway's instructions per request and their ratio.

Instructions are not time: cache misses, the kernel and the database's own
work are not in them, and valgrind runs SHA-256 without the CPU's SHA
extensions, so the report also gives the instructions counted in libcrypto
(the audit chain's hashing) and the ratio without them. Under callgrind a gateway answers about a hundred requests a
second, so the writer's batches are far smaller than at full load and their
per-batch round trips count for more here. Each gateway takes about a
minute to start under valgrind.

`--full-batches` writes the batches a loaded gateway writes instead: at
10,000 requests a second each lane reaches the writer's batch size (2,000
rows) in a fifth of a second and is written on that, never on the flush
interval. Here the interval is set past the run (GATEWAY_WRITER_FLUSH_INTERVAL
=3600), the warm-up is one batch of requests and the counted requests a whole
number of batches (default 4,000), so that the counted window holds the
writing of as many rows of each table as it counted requests, in full
batches; the report gives the rows each table gained in the window, which
should be those numbers. One rate-bound cost stays: a server's latency
window (`_fast/windows`, 60 s) sees about 6,000 calls here instead of
600,000, so its reservoir replaces a sample on most calls past the first
2,048 (about 7k instructions a request, both windows of a call) where at full
load it replaces one on about one call in fifty.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import proxy  # noqa: E402 - the proxy benchmark's harness: children, database, provisioning
from callgrind_dump import in_object  # noqa: E402

WARM_UP = 300
CONCURRENCY = 8
BATCH = 2_000  # the writer's default batch_size (config.py WriterConfig)
RECORD_TABLES = ("request_logs", "audit_logs")


def under_callgrind(children: proxy.Children, out_dir: Path) -> None:
    """`gateway serve` children start under callgrind, counting from the start; the rest as proxy.py runs them."""
    command = children.command

    def wrapped(argv: list[str], cpus: tuple[int, ...]) -> list[str]:
        if "gateway.cli" in argv and "serve" in argv:
            argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir}/cg.%p", *argv]
        return command(argv, cpus)

    children.command = wrapped


async def drive(endpoint: str, body: bytes, keys: list[str], count: int) -> None:
    import aiohttp

    gate = asyncio.Semaphore(CONCURRENCY)
    async with aiohttp.ClientSession() as session:
        async def one(i: int) -> None:
            async with gate:
                async with session.post(endpoint, data=body, headers=proxy.headers_for(keys[i % len(keys)])) as answer:
                    await answer.read()
                    if answer.status != 200:
                        raise proxy.BenchError(f"the gateway answered {answer.status}")

        await asyncio.gather(*(one(i) for i in range(count)))


def with_full_batches() -> None:
    """Gateways started from here flush on a full batch only (`--full-batches`)."""
    environment = proxy.gateway_env

    def env(*args, **kwargs) -> dict[str, str]:
        values = environment(*args, **kwargs)
        values["GATEWAY_WRITER_FLUSH_INTERVAL"] = "3600"
        return values

    proxy.gateway_env = env


def record_counts(db: proxy.Database) -> tuple[int, ...]:
    """The rows in each of RECORD_TABLES."""
    statements = [f"SELECT count(*) FROM {table}" for table in RECORD_TABLES]
    if db.kind == "postgres":
        return tuple(db._pg(db.url, *statements))
    import sqlite3

    with sqlite3.connect(db.path, timeout=30) as conn:
        return tuple(conn.execute(sql).fetchone()[0] for sql in statements)


def settled(db: proxy.Database, quiet: float, limit: float = 300.0) -> tuple[int, ...]:
    """The record counts once they stayed the same for `quiet` seconds (a batch written under callgrind takes
    a few)."""
    deadline = time.monotonic() + limit
    last = record_counts(db)
    since = time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() > deadline:
            raise proxy.BenchError("the record tables kept growing")
        time.sleep(0.5)
        now = record_counts(db)
        if now != last:
            last, since = now, time.monotonic()
    return last


def counted(gateway: proxy.Gateway, out_dir: Path, body: bytes, requests: int,
            settle: float, db: proxy.Database, warm_up: int) -> tuple[float, float, tuple[int, ...]]:
    """Instructions per request of `requests` calls (and their records) to `gateway`, how many of them
    were libcrypto's (SHA-256, which valgrind runs without the CPU's SHA extensions), and the rows each
    record table gained while they were counted."""
    keys = gateway.fresh_keys(4, body)
    asyncio.run(drive(gateway.endpoint, body, keys, warm_up))
    time.sleep(settle)  # the warm-up's records written before the count starts
    before = settled(db, settle)
    pid = str(gateway.proc.pid)
    subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)
    asyncio.run(drive(gateway.endpoint, body, keys, requests))
    time.sleep(settle)
    after = settled(db, settle)
    subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
    dumps = sorted(out_dir.glob(f"cg.{pid}.*"), key=lambda p: int(p.name.rsplit(".", 1)[1]))
    if not dumps:
        raise proxy.BenchError(f"callgrind wrote no dump for pid {pid}")
    summary = re.search(r"^summary: (\d+)", dumps[-1].read_text(errors="replace"), re.M)
    gained = tuple(b - a for a, b in zip(before, after))
    return int(summary.group(1)) / requests, in_object(dumps[-1], "libcrypto") / requests, gained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", choices=tuple(proxy.COMPARISONS), default="records")
    parser.add_argument("--database", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--requests", type=int, help="counted requests per gateway (default 1500; with "
                        "--full-batches 4000, and a multiple of 2000)")
    parser.add_argument("--full-batches", action="store_true",
                        help="the writer flushes only full batches of 2,000 rows, as at full load (see above)")
    parser.add_argument("--keep", metavar="DIR", help="keep each gateway's counted dump in DIR (on.callgrind, "
                        "off.callgrind), for callgrind_annotate --inclusive=yes")
    args = parser.parse_args(argv)
    for tool in ("valgrind", "callgrind_control"):
        if not shutil.which(tool):
            parser.error(f"{tool} is not on PATH")
    proxy.COMPARE = proxy.COMPARISONS[args.compare]
    proxy.START_TIMEOUT = 600.0  # imports and start-up under valgrind
    if args.full_batches:
        args.requests = args.requests or 2 * BATCH
        if args.requests % BATCH:
            parser.error(f"with --full-batches, --requests is a multiple of {BATCH}")
        with_full_batches()
        warm_up, settle = BATCH, 3.0
    else:
        args.requests = args.requests or 1500
        warm_up, settle = WARM_UP, 2 * 0.5 + 0.5  # past the writer's flush interval (0.5 s) twice
    work = Path(tempfile.mkdtemp(prefix="gwbench-instructions-"))
    children = proxy.Children(work)
    under_callgrind(children, work)
    db = proxy.Database(args.database, work)
    body = proxy.make_body(256)
    per_request: dict[str, float] = {}
    sha: dict[str, float] = {}
    gained: dict[str, tuple[int, ...]] = {}
    try:
        db.create()
        port = proxy.free_port()
        stub = children.start("stub", [sys.executable, str(proxy.BENCH_DIR / "stub_upstream.py"), "--port", str(port)],
                              cpus=(proxy.LOAD_CPU,))
        children.wait_ready("stub", stub, lambda: proxy.listening(port), f"not listening on {port}")
        upstream = f"http://{proxy.HOST}:{port}/mcp"
        first = None
        for setting in ("on", "off"):
            spec = proxy.GatewaySpec(proxy.COMPARE.targets[setting], proxy.COMPARE.targets[setting], setting,
                                     (proxy.PROXY_CPU,))
            proxy.log(f"starting the gateway ({setting}) under callgrind ...")
            gateway = proxy.Gateway(children, db, upstream, spec, peer=first)
            first = first or gateway
            per_request[setting], sha[setting], gained[setting] = counted(gateway, work, body, args.requests, settle,
                                                                           db, warm_up)
            if args.keep:
                keep = Path(args.keep)
                keep.mkdir(parents=True, exist_ok=True)
                dumps = sorted(work.glob(f"cg.{gateway.proc.pid}.*"), key=lambda p: int(p.name.rsplit(".", 1)[1]))
                shutil.copy(dumps[-1], keep / f"{setting}.callgrind")
            proxy.log(f"  {per_request[setting]:,.0f} instructions a request")
            children.stop(gateway.proc)
            children.procs.remove(gateway.proc)
    finally:
        children.stop_all()
        db.drop()
        shutil.rmtree(work, ignore_errors=True)
    on, off = per_request["on"], per_request["off"]
    print(f"\n{proxy.COMPARE.feature} on    {on:12,.0f} instructions a request")
    print(f"{proxy.COMPARE.feature} off   {off:12,.0f} instructions a request")
    print(f"on/off      {on / off:12.2f}x   (+{on - off:,.0f} a request: what {proxy.COMPARE.cost}, in instructions)")
    # valgrind hides the CPU's SHA extensions from libcrypto, so its SHA-256 runs in software here (about 30
    # instructions a byte hashed); with them it takes about half a nanosecond a byte (timeit, 2026-11-27).
    lean_on, lean_off = on - sha["on"], off - sha["off"]
    print(f"of which in libcrypto (SHA-256 in software under valgrind): on {sha['on']:,.0f}, off {sha['off']:,.0f}; "
          f"without them on/off {lean_on / lean_off:.2f}x (+{lean_on - lean_off:,.0f})")
    print("rows written while counted: " + "; ".join(
        f"{setting} " + ", ".join(f"{table} {count:,}" for table, count in zip(RECORD_TABLES, gained[setting]))
        for setting in ("on", "off")))
    version = subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip()
    batches = (f"the writer flushing full batches of {BATCH:,} rows only" if args.full_batches
               else "the writer flushing every 0.5 s (its default)")
    print(f"\nconditions: {args.requests} counted requests per gateway after {warm_up} warm-up ones, {CONCURRENCY} at "
          f"a time, {len(body)}-byte tools/call; {batches}; database {args.database}; one gateway process each, "
          f"pinned to CPU {proxy.PROXY_CPU}; {version}; gateway source {proxy.gateway_source()}")
    print(f"            on:  {proxy.COMPARE.describe('on')}")
    print(f"            off: {proxy.COMPARE.describe('off')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
