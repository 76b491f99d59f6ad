"""Benchmark: what the records cost per request, in instructions, stage by stage, against another revision.

    python bench/records_cost.py                       # this tree, 400 requests' records
    python bench/records_cost.py --against bab2d11     # and the tree of that commit, in the same run
    python bench/records_cost.py --rows 1000 --tool time
    python bench/records_cost.py --body resource --against 528f7dd   # a resources/read of a gateway URI
    python bench/records_cost.py --body generate --against ff62f56   # a call with a float (a temperature)
    BENCH_PG_URL=postgresql://user@host:5432/postgres python bench/records_cost.py

The proxy benchmark (proxy.py --compare records) measures the records' cost
end to end, but on a shared 2-CPU VM its rounds differ by more than most
changes to the records path. This one runs the records pipeline of `rows`
MCP requests in one process, as the gateway does, under callgrind
(valgrind's instruction counter: the same count for the same code and
input whatever else the machine does), and reports instructions per request
for each stage:

- path_request_log: what `DataPlane._record` does for the request log row
  (its id, its time, the tuple);
- path_audit: the audit row (`AuditTrail.mcp_row`'s builder, which the
  data plane calls), with its own read of the time;
- prepare: `AuditTrail.prepare` (decode, screen or sanitize, bound, the
  `gateway.audit` line through `AuditLogHandler` to /dev/null);
- copy_request_logs: `PostgresSink.write` of the request log rows (COPY);
- write_audit: `PostgresSink.write` of the audit entries (canonical form,
  chain lock, head, hashes, COPY), into a real PostgreSQL database made and
  dropped by this run (BENCH_PG_URL, default postgres@127.0.0.1:5432).

Each stage is counted alone: the child process runs `os.getppid()` before a
stage and `os.getpgrp()` after it, and callgrind zeroes its counters on the
first and dumps them on the second (--zero-before / --dump-before). The
body (`--body`, BODIES) is the proxy benchmark's 256-byte tools/call
("bench"), a tools/call whose argument is a web address ("fetch"), or a
resources/read of a resource URI as the gateway lists it ("resource":
mcpgw://server/..., its target the same URI), a question in French
("french", UTF-8), or a call with a float among its arguments ("generate":
a temperature). Instructions are not
time (cache misses, the kernel, the database's own work are not in them)
and valgrind runs OpenSSL's SHA-256 without the CPU's SHA extensions, so
the audit hashing counts for more here than it costs on the machine: the
report gives the instructions counted in libcrypto and the total without
them.

`--against REV` also measures the tree of commit REV (git archive into a
temporary directory, its compiled core built there) in the same run, and
prints this tree's figures over REV's. `--tool time` counts process CPU
time instead (best of 5 rounds), for a machine without valgrind: noisy. It
also reports, from one more round, the longest the event loop waited while
each write stage ran with `rows` rows (a task that only yields notes the
time between its turns): how long the requests in flight stall when the
writer flushes a batch of that size.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from callgrind_dump import in_object  # bench/, this script's directory

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("path_request_log", "path_audit", "prepare", "copy_request_logs", "write_audit")
CRYPTO = "of which libcrypto"  # the audit chain's SHA-256, run in software under valgrind
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
RESOURCE_URI = "mcpgw://docs/file:///srv/docs/guide/install.md"
# --body: (method, target, params) of the request whose records are measured.
BODIES = {
    "bench": ("tools/call", "echo", {"name": "echo", "arguments": {"text": "x" * (256 - 95)}}),  # proxy.py's 256 bytes
    "fetch": ("tools/call", "fetch", {"name": "fetch", "arguments": {
        "url": "https://docs.example.com/guide/install?lang=en&page=2", "max_length": 5000}}),
    "resource": ("resources/read", RESOURCE_URI, {"uri": RESOURCE_URI}),
    "french": ("tools/call", "ask", {"name": "ask", "arguments": {
        "question": "Quelle est la m\u00e9t\u00e9o \u00e0 Paris demain\u00a0? R\u00e9ponds en fran\u00e7ais."}}),
    "generate": ("tools/call", "generate", {"name": "generate", "arguments": {
        "prompt": "Summarize the meeting notes.", "max_tokens": 500, "temperature": 0.7}}),
}


# -- the child: one process running the stages --------------------------------------------------
def child(rows: int, database_url: str, tool: str, kind: str) -> None:
    import gc
    import json
    import logging
    import time
    from datetime import datetime, timezone

    import asyncpg

    from gateway.dataplane.server import _RowIds
    from gateway.records.audit import AuditLogHandler, AuditTrail, audit_log
    from gateway.records.sinks import PostgresSink
    from gateway.records.writer import COLUMNS

    gc.collect()
    gc.freeze()  # as the gateway does at start-up (app.py _tune_gc)
    gc.set_threshold(20_000, *gc.get_threshold()[1:])
    method, target, params = BODIES[kind]
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}, separators=(",", ":"),
                      ensure_ascii=False).encode()  # UTF-8, as the SDKs send it

    class Key:
        tenant_id, user_id, id, role = uuid.UUID(int=1), uuid.UUID(int=2), uuid.UUID(int=3), "USER"

    server_id = uuid.UUID(int=4)
    audit_log.handlers[:] = [AuditLogHandler(open(os.devnull, "w"))]
    audit_log.setLevel(logging.INFO)
    audit_log.propagate = False
    ids = _RowIds()
    trail = AuditTrail()
    trail.new_id = ids.next  # what the data plane gives it

    # What DataPlane._record calls, in the tree measured (an older tree: what it called then).
    try:
        from gateway._fast.ids import utc_now
    except ImportError:
        def utc_now():
            return datetime.now(timezone.utc)
    try:
        from gateway._fast.auditentry import mcp_row
        from gateway.records.audit import McpDetails

        def audit_row():
            return mcp_row(McpDetails, Key, "bench", method, target, body, 200, None, None, 1.234, "127.0.0.1",
                           utc_now(), False)
    except ImportError:
        def audit_row():
            return trail.mcp_row(Key, "bench", method, target, body, 200, None, None, 1.234, "127.0.0.1",
                                 utc_now())

    def request_log_row():
        return (ids.next(), Key.tenant_id, Key.user_id, Key.id, server_id, "bench", method, target, 200, None,
                None, 1.234, len(body), 321, "127.0.0.1", utc_now())

    async def run() -> dict[str, float]:
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        sink = PostgresSink(pool)
        try:
            # Every path once before counting (imports, prepared statements, caches).
            await sink.write("request_logs", COLUMNS["request_logs"], [request_log_row()])
            await sink.write("audit_logs", COLUMNS["audit_logs"], trail.prepare([audit_row()]))
            spent: dict[str, float] = {}
            for _ in range(1 if tool == "callgrind" else 5):
                marks = []

                def begin():
                    os.getppid()  # callgrind: zero the counters
                    marks.append(time.process_time())

                def end(stage):
                    spent[stage] = min(spent.get(stage, float("inf")), time.process_time() - marks.pop())
                    os.getpgrp()  # callgrind: dump the counters

                begin(); logs = [request_log_row() for _ in range(rows)]; end("path_request_log")  # noqa: E702
                begin(); entries = [audit_row() for _ in range(rows)]; end("path_audit")  # noqa: E702
                begin(); prepared = trail.prepare(entries); end("prepare")  # noqa: E702
                begin(); await sink.write("request_logs", COLUMNS["request_logs"], logs); end("copy_request_logs")  # noqa: E702,E501
                begin(); await sink.write("audit_logs", COLUMNS["audit_logs"], prepared); end("write_audit")  # noqa: E702,E501
            if tool == "time":  # a round of its own: the ticker's turns would count in the CPU time above
                spent.update(await holds(sink, [request_log_row() for _ in range(rows)],
                                         trail.prepare([audit_row() for _ in range(rows)])))
            return spent
        finally:
            await pool.close()

    async def holds(sink, logs, prepared) -> dict[str, float]:
        """The longest the event loop waited for each write (the requests in flight wait as long): a task
        that only yields notes the time between its turns."""
        gaps: list[float] = []

        async def ticker():
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        longest = {}
        running = asyncio.create_task(ticker())
        try:
            for stage, table, batch in (("copy_request_logs", "request_logs", logs),
                                        ("write_audit", "audit_logs", prepared)):
                # Collected first: the batches built for this round would start the collector inside the
                # write, which the gateway's steady state does not (a batch's objects are freed as they
                # are written, so the young generation stays under its threshold: app.py _tune_gc).
                gc.collect()
                for _ in range(3):  # the ticker's own last turn before the write is not the write's
                    await asyncio.sleep(0)
                gaps.clear()
                await sink.write(table, COLUMNS[table], batch)
                longest[f"hold_{stage}"] = max(gaps, default=0.0)
        finally:
            running.cancel()
        return longest

    spent = asyncio.run(run())
    print("CHILD", json.dumps({"stages": list(spent), "seconds": spent, "body_bytes": len(body)}))


# -- the parent ---------------------------------------------------------------------------------
def admin(url: str, *statements: str) -> None:
    import asyncpg

    async def go():
        conn = await asyncpg.connect(url)
        try:
            for sql in statements:
                await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(go())


def this_tree() -> str:
    """The checkout's commit, and whether src/ has changes not committed."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "src"], capture_output=True,
                           text=True).stdout.strip()
    return commit + (" + uncommitted changes" if dirty else "")


def build_tree(rev: str, into: Path) -> Path:
    """The `src` tree of commit `rev` with its compiled core built; returns its src directory."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src", "setup.py", "pyproject.toml"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", "build/lib"], cwd=into, check=True,
                   capture_output=True)
    for built in (into / "build" / "lib" / "gateway" / "_fast").glob("*.so"):
        shutil.copy(built, into / "src" / "gateway" / "_fast" / built.name)
    return into / "src"


def measure(src: Path | None, rows: int, database_url: str, tool: str, keep: Path | None = None,
            body: str = "bench") -> tuple[dict[str, float], int]:
    """Per-request figures of each stage for the tree at `src` (None: the gateway this interpreter imports,
    an editable install's or an installed build of this tree): instructions (callgrind) or microseconds."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    if src is not None:
        env["PYTHONPATH"] = str(src)
    env.pop("GATEWAY_NO_EXTENSIONS", None)
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--rows", str(rows), "--tool", tool,
            "--database-url", database_url, "--body", body]
    with tempfile.TemporaryDirectory() as dumps:
        if tool == "callgrind":
            # Names written in full in every dump (not as references to an earlier one), so that each stage's
            # file reads alone in callgrind_annotate.
            argv = ["valgrind", "--tool=callgrind", "--zero-before=os_getppid", "--dump-before=os_getpgrp",
                    "--compress-strings=no",
                    f"--callgrind-out-file={dumps}/cg.%p"] + argv
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the measured process failed ({done.returncode}):\n{done.stderr[-3000:]}")
        found = re.search(r"^CHILD (.*)$", done.stdout, re.M)
        import json

        report = json.loads(found.group(1))
        if tool == "time":
            figures = {s: report["seconds"][s] / rows * 1e6 for s in STAGES}
            figures.update({s: report["seconds"][s] * 1e3 for s in report["seconds"] if s.startswith("hold_")})
            return figures, report["body_bytes"]
        counts, files = {}, {}
        for path in Path(dumps).glob("cg.*.*"):
            number = int(path.name.rsplit(".", 1)[1])
            summary = re.search(r"^summary: (\d+)", path.read_text(errors="replace"), re.M)
            counts[number], files[number] = int(summary.group(1)), path
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            tag = "this" if src is None else src.parent.name
            for i, stage in enumerate(report["stages"]):
                shutil.copy(files[i + 1], keep / f"{tag}.{stage}.callgrind")
        # Dumps are numbered in the order the stages ran (one dump per stage).
        figures = {s: counts[i + 1] / rows for i, s in enumerate(report["stages"])}
        # valgrind runs libcrypto's SHA-256 in software (no SHA extensions): what of the count is that.
        figures[CRYPTO] = sum(in_object(files[i + 1], "libcrypto") for i in range(len(report["stages"]))) / rows
        return figures, report["body_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400, help="requests whose records are measured (default 400)")
    parser.add_argument("--against", metavar="REV", help="also measure the tree of this commit, in the same run")
    parser.add_argument("--tool", choices=("callgrind", "time"), default=None,
                        help="callgrind (default when valgrind is installed) or process CPU time")
    parser.add_argument("--keep", metavar="DIR", help="keep callgrind's dumps in DIR (one per stage and tree), "
                        "for callgrind_annotate --inclusive=yes")
    parser.add_argument("--body", choices=tuple(BODIES), default="bench",
                        help="the request: the proxy benchmark's tools/call (default), a tools/call with a web "
                        "address, a resources/read of a gateway resource URI, a question in French")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tool = args.tool or ("callgrind" if shutil.which("valgrind") else "time")
    if args.child:
        return child(args.rows, args.database_url, tool, args.body)

    base = os.environ.get("BENCH_PG_URL", DEFAULT_PG)
    name = f"gwbench_records_{uuid.uuid4().hex[:10]}"
    database_url = f"{base.rsplit('/', 1)[0]}/{name}"
    admin(base, f'CREATE DATABASE "{name}"')
    try:
        from gateway.db import migrate

        migrate.upgrade(database_url)
        trees: dict[str, Path | None] = {"this tree": None}
        with tempfile.TemporaryDirectory() as work:
            if args.against:
                print(f"building the tree of {args.against} ...", file=sys.stderr)
                trees[args.against] = build_tree(args.against, Path(work))
            results = {}
            for label, src in trees.items():
                print(f"measuring {label} ({tool}, {args.rows} requests) ...", file=sys.stderr)
                results[label], body_bytes = measure(src, args.rows, database_url, tool,
                                                     Path(args.keep) if args.keep else None, args.body)
    finally:
        admin(base, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    unit = "instructions" if tool == "callgrind" else "us CPU"
    labels = list(results)
    print(f"\n{'stage (per request)':22s}" + "".join(f"{label:>16s}" for label in labels)
          + ("          ratio" if len(labels) == 2 else ""))
    for stage in (*STAGES, "total", *((CRYPTO, "total without it") if tool == "callgrind" else ())):
        values = [sum(r[s] for s in STAGES) if stage == "total" else
                  sum(r[s] for s in STAGES) - r[CRYPTO] if stage == "total without it" else r[stage]
                  for r in results.values()]
        line = f"{stage:22s}" + "".join(f"{v:16,.0f}" if tool == "callgrind" else f"{v:16.2f}" for v in values)
        if len(values) == 2 and values[1]:
            line += f"{values[0] / values[1]:14.2f}x"
        print(line)
    print(f"\nconditions: {unit} per request; {args.rows} requests' records (a request_logs row and an audit entry "
          f"each, the {body_bytes}-byte {BODIES[args.body][0]} body '{args.body}'); one process; "
          f"PostgreSQL {base.rsplit('@', 1)[-1]}; CPython {platform.python_version()}; this tree: {this_tree()}")
    if tool == "time":
        print("\nlongest the event loop waited for one write of the batch (ms; the requests in flight wait as long):")
        for stage in STAGES[3:]:
            print(f"{stage:22s}" + "".join(f"{r['hold_' + stage]:16.2f}" for r in results.values()))
    if tool == "callgrind":
        version = subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip()
        print(f"            {version} (instruction counts: the database's work and the kernel's are not in them)")


if __name__ == "__main__":
    main()
