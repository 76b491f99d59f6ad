"""Benchmark against a peer: this gateway and IBM ContextForge, one upstream, one load, one run.

    python bench/peers/contextforge.py                      # 10 s per target, 32 sessions, 256-byte calls
    python bench/peers/contextforge.py --duration 20 --rounds 3 --concurrency 16
    python bench/peers/contextforge.py --contextforge-version 1.1.0 --python python3.12

ContextForge (PyPI `mcp-contextforge-gateway`, the latest release the chosen
interpreter can run unless `--contextforge-version` says otherwise) is
installed in a virtual environment of its own,
`~/.cache/mcp-gateway-bench/contextforge-venv` ($XDG_CACHE_HOME respected),
reused while it holds that version on that Python. The newest release needs
Python 3.12 or later: the interpreter is the first of python3.12, 3.13, 3.11
found on PATH or under pyenv (`--python` to choose); with 3.11 pip installs the
newest release that still supports it, and the conditions say which ran.

One run starts, as child processes on free 127.0.0.1 ports, in a temporary
directory removed at the end (processes stopped, Ctrl-C included):
  - the upstream: `gateway.demo.upstream`, the official `mcp` SDK server
    (Streamable HTTP, stateful sessions that need `initialize`), tool `echo`;
  - our gateway: `gateway serve`, one process, SQLite, the upstream registered
    as server `bench` through the admin API, an API key (bench/peers/harness.py);
  - ContextForge: its `mcpgateway` command (uvicorn, one process: its default),
    the upstream registered as a gateway (`POST /gateways`, transport
    STREAMABLEHTTP), its `echo` tool (there `bench-echo`) put in a virtual server
    (`POST /servers`), called at `/servers/{id}/mcp` with a bearer JWT made by
    its own `mcpgateway.utils.create_jwt_token` for the platform admin.
Then the same tools/call load (harness.McpLoad: aiohttp, fixed concurrency, each
task on an MCP session of its own) goes to the upstream directly (the
reference), our gateway and ContextForge in turn, each with a warm-up, and it
prints requests/s, p50, p99, peak RSS of each target's process tree, CPU per
call, the ratio ours/theirs, and the conditions; the figures go to
bench/results/peers-contextforge-<UTC time>.json and a PNG chart beside it.
The gateways run on CPU 0; the upstream and the client on CPU 1 (taskset).

ContextForge's settings: its defaults (mcpgateway/config.py `Settings`, README
"Configuration"), plus these environment variables, and nothing else from this
environment (it starts from PATH, HOME, LANG and the variables below; its working
directory is the temporary one, so it reads no `.env`):
  JWT_SECRET_KEY, AUTH_ENCRYPTION_SECRET   required: it will not start without
      strong values. Made by its own `python -m mcpgateway.scripts.init_secrets
      --stdout` for each run.
  PLATFORM_ADMIN_PASSWORD, DEFAULT_USER_PASSWORD, BASIC_AUTH_PASSWORD   from the
      same utility: with email authentication on (its default) it refuses weak or
      placeholder passwords at start; the basic-auth one is only there so that no
      placeholder is left.
  PLATFORM_ADMIN_EMAIL=admin@bench.example.com   the admin user it creates at
      start; the bearer JWT names this user.
  DATABASE_URL=sqlite:///<temporary directory>/mcp.db   its default database is
      SQLite too, but in ./mcp.db; this run's own file instead.
  SSRF_ALLOW_LOCALHOST=true   its SSRF protection refuses loopback upstreams by
      default (ssrf_allow_localhost=False), and the upstream is on 127.0.0.1.
  RATE_LIMITING_ENABLED=false   its rate-limit middleware is on by default
      (MCP/tools tier 100 requests/min): the run would measure its refusals.
  --host 127.0.0.1 --port <free port>   on its command line.
Our gateway gets the matching settings: its rate limits off too
(GATEWAY_LIMITS_ENABLED=false) and log level WARNING (ContextForge logs at ERROR).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from harness import HOST, PROXY_CPU, BenchError, Children, Target, free_port, log  # noqa: E402

PACKAGE = "mcp-contextforge-gateway"
NAME = "contextforge"
ADMIN_EMAIL = "admin@bench.example.com"
# The interpreters tried, in order: the newest release needs 3.12 or later and supports up to 3.13.
PYTHONS = ("3.12", "3.13", "3.11")
INSTALL_TIMEOUT = 900


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mcp-gateway-bench"


# -- installing ----------------------------------------------------------------------------------
def python_version(python: str) -> str | None:
    """"3.12" for an interpreter that runs, else None (a pyenv shim without that version does not)."""
    try:
        done = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def find_python(requested: str | None) -> tuple[str, str]:
    """The interpreter for ContextForge's environment and its version."""
    if requested:
        found = shutil.which(requested) or requested
        version = python_version(found)
        if version is None:
            raise BenchError(f"--python {requested} does not run")
        return found, version
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    for minor in PYTHONS:
        candidates = [shutil.which(f"python{minor}"), *sorted(glob.glob(f"{pyenv}/{minor}.*/bin/python{minor}"),
                                                              reverse=True)]
        if f"{sys.version_info[0]}.{sys.version_info[1]}" == minor:
            candidates.append(sys.executable)
        for candidate in filter(None, candidates):
            if python_version(candidate) == minor:
                return candidate, minor
    raise BenchError(f"no Python {' or '.join(PYTHONS)} found for ContextForge (give one with --python)")


class Installation:
    """ContextForge in a virtual environment of its own, made or updated on demand."""

    def __init__(self, venv: Path) -> None:
        self.venv = venv
        self.python = venv / "bin" / "python"

    def installed(self) -> str | None:
        return self._metadata(PACKAGE)

    def _metadata(self, package: str) -> str | None:
        if not self.python.exists():
            return None
        done = subprocess.run([str(self.python), "-c", "import importlib.metadata as m, sys; "
                               "print(m.version(sys.argv[1]))", package], capture_output=True, text=True, timeout=60)
        return done.stdout.strip() if done.returncode == 0 else None

    def latest(self) -> str | None:
        """The newest release this environment's Python can install, from the package index (pip's answer)."""
        done = subprocess.run([str(self.python), "-m", "pip", "index", "versions", PACKAGE, "--disable-pip-version-check"],
                              capture_output=True, text=True, timeout=120)
        match = re.search(rf"^{re.escape(PACKAGE)} \(([^)]+)\)", done.stdout, re.MULTILINE)
        return match.group(1) if match else None

    def ensure(self, python: str, minor: str, wanted: str) -> str:
        """The installed version, after making the environment (with `python`) and installing `wanted` if needed."""
        if self.python.exists() and python_version(str(self.python)) != minor:
            log(f"bench: {self.venv} runs another Python than {minor}; making it anew")
            shutil.rmtree(self.venv)
        if not self.python.exists():
            log(f"bench: making {self.venv} with {python} (Python {minor}) ...")
            self.venv.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([python, "-m", "venv", str(self.venv)], check=True, timeout=300)
        if wanted == "latest":
            latest = self.latest()
            if latest is None:
                have = self.installed()
                if have is None:
                    raise BenchError(f"cannot find the latest {PACKAGE} on the package index, and none is installed")
                log(f"bench: the package index did not answer; using the installed {PACKAGE} {have}")
                return have
            wanted = latest
        have = self.installed()
        if have == wanted:
            log(f"bench: reusing {PACKAGE} {have} in {self.venv}")
            return have
        log(f"bench: installing {PACKAGE}=={wanted} into {self.venv} (was {have or 'not installed'}) ...")
        done = subprocess.run([str(self.python), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                               f"{PACKAGE}=={wanted}"], capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
        if done.returncode != 0:
            raise BenchError(f"pip install {PACKAGE}=={wanted} failed:\n{done.stderr[-3000:]}")
        return self.installed() or wanted

    def describe(self) -> str:
        done = subprocess.run([str(self.python), "-c", "import platform; print(platform.python_version())"],
                              capture_output=True, text=True, timeout=60)
        libs = ", ".join(f"{p} {self._metadata(p)}" for p in ("mcp", "fastapi", "uvicorn", "httpx", "sqlalchemy"))
        return f"{PACKAGE} {self.installed()} on Python {done.stdout.strip()} ({libs}), in {self.venv}"


# -- running -------------------------------------------------------------------------------------
def generated_secrets(python: Path, work_dir: Path) -> dict[str, str]:
    done = subprocess.run([str(python), "-m", "mcpgateway.scripts.init_secrets", "--stdout"], capture_output=True,
                          text=True, timeout=120, cwd=work_dir)
    values = dict(line.split("=", 1) for line in done.stdout.splitlines() if re.match(r"^[A-Z_]+=\S", line))
    needed = {"JWT_SECRET_KEY", "AUTH_ENCRYPTION_SECRET", "PLATFORM_ADMIN_PASSWORD"}
    if done.returncode != 0 or not needed <= values.keys():
        raise BenchError(f"mcpgateway.scripts.init_secrets --stdout gave no {sorted(needed)}:\n{done.stderr[-2000:]}")
    return values


def contextforge_env(secrets: dict[str, str], work_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Its environment, and the same with the secrets shown as such (for the conditions)."""
    settings = {
        "PLATFORM_ADMIN_EMAIL": ADMIN_EMAIL,
        "DATABASE_URL": f"sqlite:///{work_dir / 'mcp.db'}",
        "SSRF_ALLOW_LOCALHOST": "true",
        "RATE_LIMITING_ENABLED": "false",
    }
    base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    shown = {**{k: "(generated by init_secrets)" for k in secrets}, **settings}
    return {**base, **secrets, **settings}, shown


def start_contextforge(children: Children, install: Installation, work_dir: Path,
                       upstream_url: str) -> tuple[Target, dict[str, str]]:
    """ContextForge serving, with the upstream registered and a virtual server holding its echo tool."""
    secrets = generated_secrets(install.python, work_dir)
    env, shown = contextforge_env(secrets, work_dir)
    port = free_port()
    # Its working directory is the run's (this script changed into it): no .env read, nothing left behind.
    proc = children.start(NAME, [str(install.venv / "bin" / "mcpgateway"), "--host", HOST, "--port", str(port)],
                          cpu=PROXY_CPU, env=env)
    base = f"http://{HOST}:{port}"
    deadline = time.monotonic() + harness.START_TIMEOUT
    while not harness.http_ok(base + "/health"):
        if proc.poll() is not None:
            raise BenchError(f"ContextForge exited with {proc.returncode}:\n{children.log_tail(NAME, 40)}")
        if time.monotonic() > deadline:
            raise BenchError(f"ContextForge: /health not 200 after {harness.START_TIMEOUT:g}s:\n"
                             f"{children.log_tail(NAME, 40)}")
        time.sleep(0.25)
    token = make_token(install.python, secrets["JWT_SECRET_KEY"], env, work_dir)
    auth = {"Authorization": f"Bearer {token}"}
    gateway = harness.call_json("POST", base + "/gateways", {"name": harness.SERVER_NAME, "url": upstream_url,
                                                              "transport": "STREAMABLEHTTP"}, auth)
    tools = harness.call_json("GET", base + "/tools", None, auth)
    tools = tools if isinstance(tools, list) else tools.get("items", [])
    mine = [t for t in tools if t.get("gatewayId") == gateway["id"]
            and (t.get("originalName") or t.get("name")) == harness.UPSTREAM_TOOL]
    if len(mine) != 1:
        raise BenchError(f"ContextForge lists no single '{harness.UPSTREAM_TOOL}' tool of the registered upstream: "
                         f"{[(t.get('name'), t.get('originalName'), t.get('gatewayId')) for t in tools]}")
    server = harness.call_json("POST", base + "/servers", {"server": {"name": harness.SERVER_NAME,
                                                                      "associated_tools": [mine[0]["id"]]}}, auth)
    target = Target(NAME, f"ContextForge {install.installed()}", f"{base}/servers/{server['id']}/mcp",
                    mine[0]["name"], proc, auth,
                    describe=f"`mcpgateway` (uvicorn, 1 process), its defaults plus {json.dumps(shown)}; upstream "
                             f"registered as gateway '{harness.SERVER_NAME}' (STREAMABLEHTTP), tool "
                             f"'{mine[0]['name']}' in virtual server {server['id']}, endpoint /servers/{{id}}/mcp; "
                             "bearer JWT from mcpgateway.utils.create_jwt_token for the platform admin")
    return target, shown


def make_token(python: Path, secret: str, env: dict[str, str], work_dir: Path) -> str:
    """A bearer JWT for the platform admin, the documented way (its settings load too: it needs their env)."""
    done = subprocess.run([str(python), "-m", "mcpgateway.utils.create_jwt_token", "--username", ADMIN_EMAIL,
                           "--exp", "240", "--secret", secret], capture_output=True, text=True, timeout=120,
                          env=env, cwd=work_dir)
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not lines or lines[-1].count(".") != 2:
        raise BenchError(f"mcpgateway.utils.create_jwt_token made no token:\n{done.stdout[-1000:]}{done.stderr[-1000:]}")
    return lines[-1]


def run(args, work_dir: Path, children: Children) -> int:
    load_at_start = os.getloadavg()
    python, minor = find_python(args.python)
    venv = Path(args.venv) if args.venv else cache_dir() / "contextforge-venv"
    install = Installation(venv)
    install.ensure(python, minor, args.contextforge_version)
    installed = install.describe()
    log(f"bench: {installed}")

    load = harness.McpLoad(args.concurrency, args.payload_bytes)
    log("starting the upstream, our gateway and ContextForge ...")
    upstream, upstream_url = harness.start_upstream(children)
    ours = harness.start_our_gateway(children, work_dir, upstream_url)
    theirs, shown = start_contextforge(children, install, work_dir, upstream_url)
    targets = [upstream, ours, theirs]
    cond = harness.base_conditions(args, load, targets, load_at_start)
    cond["contextforge_install"] = installed
    cond["contextforge_python"] = python

    results = harness.measure_all(targets, upstream, load, args)
    cond["load_average_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    summary = harness.report(results, targets, theirs, cond)
    summary["contextforge_env"] = shown
    harness.write_results("peers-contextforge", summary, results, cond)
    errors = {t: sum(x.errors for x in rs) for t, rs in results.items()}
    if any(errors.values()):
        log(f"bench: errors in measured runs {errors}: the figures are suspect")
        return 1
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Our gateway against IBM ContextForge: the same upstream and load.")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per target (default 10)")
    parser.add_argument("--warmup", type=float, default=5.0,
                        help="seconds of load before the measured window opens, per target (default 5)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent MCP sessions (default 32)")
    parser.add_argument("--payload-bytes", type=int, default=256, help="tools/call body size (default 256)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the targets; report medians")
    parser.add_argument("--contextforge-version", default="latest", help="a release of mcp-contextforge-gateway "
                        "(default: the latest the interpreter can install)")
    parser.add_argument("--python", help="interpreter for ContextForge's environment (default: python3.12, 3.13 "
                        "or 3.11, on PATH or under pyenv)")
    parser.add_argument("--venv", help="ContextForge's environment (default ~/.cache/mcp-gateway-bench/"
                        "contextforge-venv)")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or args.concurrency < 1 or args.rounds < 1:
        parser.error("--duration, --concurrency and --rounds must be positive")
    if len(os.sched_getaffinity(0)) < 2:
        parser.error("needs two CPUs (one for the gateways, one for the upstream and the load)")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    os.sched_setaffinity(0, {harness.LOAD_CPU})  # the client (this process) keeps off the gateways' core

    work_dir = Path(tempfile.mkdtemp(prefix="gwbench-peer-"))
    children = Children(work_dir)
    cwd = os.getcwd()
    os.chdir(work_dir)  # every child's working directory: nothing is read from or left in the caller's
    try:
        return run(args, work_dir, children)
    except BenchError as exc:
        log(f"bench: {exc}")
        for name in ("upstream", "gateway", NAME):
            tail = children.log_tail(name)
            if tail:
                log(f"bench: the log of {name} ends with:\n{tail}")
        return 1
    except KeyboardInterrupt:
        log("bench: interrupted; cleaning up")
        return 130
    finally:
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            os.chdir(cwd)
            while children.procs:
                harness.stop_group(children.procs.pop())
            shutil.rmtree(work_dir, ignore_errors=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
