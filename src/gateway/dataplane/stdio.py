"""The gateway as an MCP client of a local process: the stdio transport.

A server whose `transport_type` is `stdio` is a command line (its
`endpoint_url`, split with `shlex`, run without a shell). `StdioUpstream` is a
drop-in for `UpstreamClient`: `request()` returns a result or raises
`UpstreamRpcError`, `UpstreamError` or `UpstreamTimeout`.

`start()` sends a request and returns it in flight (a `StreamCall`, see
multiplexed.py), for the relay to carry what the server sends before its
answer: progress (routed by its token), log messages and server-to-client
requests (sampling, elicitation, roots). stdio does not say which request a
server's request or log message belongs to: the gateway relays one only while
exactly one request is in flight on the process, and otherwise refuses the
request (-32601, saying why) or drops the log message. `ping` is answered by
the gateway. The handshake announces what it relays
(`RELAYED_CLIENT_CAPABILITIES`).

What it owns: one child process per upstream, started on first use in a
process group of its own; the handshake (initialize, then initialized); many
requests multiplexed over the one stdin/stdout by the gateway's own ids;
restarting a process that died, with backoff; and stopping it (stdin closed,
SIGTERM, SIGKILL, each to the whole group), so no process outlives the
gateway's interest in it. Whatever is left in a group once its leader has
exited is killed: a stdio server's children do not outlive it.

What it must not do: log what messages carry (method names only; a server's
own stderr is logged, truncated and rate-limited), or buffer without bound
(one stdout line is capped at `MAX_LINE`; a started call holds at most
`multiplexed.MAX_QUEUED` messages).

Why a `SubprocessProtocol` and not `create_subprocess_exec` with reader tasks:
the protocol hears `process_exited` at once on asyncio and on uvloop, while on
Python 3.11 `Process.wait()` returns only after every pipe has closed, which a
grandchild holding stdout can put off forever (`asyncio/base_subprocess.py`,
`_try_finish`). It also costs no task per process, and parses lines straight
from the pipe's chunks.

Stdio servers speak the handshake era (2025-11-25); `era` is "legacy".
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import orjson

from gateway.dataplane.mcp_client import CLIENT_INFO, HANDSHAKE, RELAYED_CLIENT_CAPABILITIES, UpstreamRpcError
from gateway.dataplane.multiplexed import CallTable, RestartBackoff, StreamCall, progress_token
from gateway.dataplane.upstream import UpstreamError, UpstreamTimeout

log = logging.getLogger("gateway.stdio")

# One JSON-RPC message is one line; a longer line fails what is pending and
# restarts the process (the stream cannot be trusted past it).
MAX_LINE = 16 * 1024 * 1024
# Stop sequence (close()): after stdin is closed, after SIGTERM, after SIGKILL.
EOF_GRACE = 2.0
TERM_GRACE = 2.0
KILL_WAIT = 5.0
# A process that closed stdout but keeps running cannot answer: killed after this.
STDOUT_GRACE = 2.0
# A process that lived this long resets the restart backoff.
STABLE_AFTER = 30.0
# stderr: each line logged is cut at this many characters, at most this many a second.
STDERR_LINE = 1000
STDERR_LINES_PER_SECOND = 50
# Answers to server-to-client pings are skipped while this much waits unwritten.
_MAX_UNWRITTEN = 1024 * 1024
# Only these of the gateway's own variables reach a stdio server: the gateway's
# environment holds its database URL and secrets. (The SDK's stdio client keeps
# a similar list: mcp/client/stdio.py DEFAULT_INHERITED_ENV_VARS.)
INHERITED_ENV = ("HOME", "LOGNAME", "PATH", "SHELL", "TERM", "USER", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "TZ")


class StdioUpstream:
    """One stdio MCP server, started on first use and restarted when it dies."""

    def __init__(
        self,
        command: str,
        *,
        timeout: float,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        restart_backoff: tuple[float, float] = (0.1, 5.0),
        start_timeout: float = 30.0,
    ) -> None:
        """`timeout` bounds each request; `start_timeout` bounds start-up and the handshake
        (servers launched through `npx`/`uvx` can take many seconds the first time).

        `env` is added to a few inherited variables (`INHERITED_ENV`), not to the whole
        environment of the gateway.
        """
        self.command = command
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.cwd = cwd
        self.era = "legacy"  # stdio servers speak the handshake era
        self.server_capabilities: dict[str, Any] = {}
        self.server_info: dict[str, Any] = {}
        self.instructions: str | None = None
        self.protocol_version: str | None = None
        self.restarts = 0
        try:
            self.argv: list[str] = shlex.split(command)
        except ValueError as exc:
            self.argv = []
            self._unusable: str | None = f"cannot start the stdio server {command!r}: {exc}"
        else:
            self._unusable = None if self.argv else "the stdio server's command line is empty"
        self.name = os.path.basename(self.argv[0]) if self.argv else "?"
        inherited = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
        self._env = {**inherited, **(env or {})}
        self._ids = itertools.count(1)
        self._process: _Process | None = None
        self._processes: set[_Process] = set()  # every one not yet finished, for close()
        self._starting: asyncio.Future[_Process] | None = None
        self._spawned = False
        self._backoff = RestartBackoff(*restart_backoff, stable_after=STABLE_AFTER)
        self._closed = False
        self._closing: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<StdioUpstream {self.command!r} pid={self.pid} restarts={self.restarts}>"

    @property
    def pid(self) -> int | None:
        """The current child's pid, or None when none is running."""
        process = self._process
        return process.pid if process is not None and process.usable else None

    # -- the client interface ---------------------------------------------------------------
    async def ensure_ready(self) -> dict[str, Any]:
        """Start the process and complete the handshake if needed; return the server's capabilities."""
        await self._ready()
        return self.server_capabilities

    async def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one request; return its result or raise UpstreamRpcError / UpstreamError."""
        process = await self._ready()
        return _result(await self._exchange(process, method, params, self.timeout))

    async def start(self, method: str, params: dict[str, Any]) -> StreamCall:
        """Send one request and return it in flight: what the server sends for it, then its answer."""
        process = await self._ready()
        request_id = next(self._ids)
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        process.pending[request_id] = answer
        call = StreamCall(process.calls, request_id, answer, progress_token(params),
                          send=partial(self._send, process), cancel=process.cancel_request)
        data = orjson.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}) + b"\n"
        try:
            async with asyncio.timeout(self.timeout):
                await process.write(data)
        except TimeoutError:
            call.close("timeout")  # written, not yet taken: the server may still read it
            raise UpstreamTimeout(
                f"the stdio server {self.name} did not take {method} within {self.timeout:g}s"
            ) from None
        except UpstreamError:
            call.abandon()  # not written
            raise
        except BaseException:
            call.close()
            raise
        return call

    async def _send(self, process: _Process, message: dict[str, Any]) -> None:
        """Write one message to `process` (not to a successor: an answer belongs to its stream)."""
        try:
            async with asyncio.timeout(self.timeout):
                await process.write(orjson.dumps(message) + b"\n")
        except TimeoutError:
            raise UpstreamTimeout(f"the stdio server {self.name} did not read for {self.timeout:g}s") from None

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        """Send one notification (no answer is expected)."""
        process = await self._ready()
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        await process.write(orjson.dumps(message) + b"\n")

    async def close(self) -> None:
        """Stop the process (stdin closed, then SIGTERM, then SIGKILL, to its group); idempotent."""
        if self._closing is None:
            self._closed = True
            self._closing = asyncio.ensure_future(self._shut_down())
        await asyncio.shield(self._closing)

    # -- one exchange -------------------------------------------------------------------------
    async def _exchange(
        self, process: _Process, method: str, params: dict[str, Any] | None, timeout: float
    ) -> dict[str, Any]:
        request_id = next(self._ids)
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        answer = asyncio.get_running_loop().create_future()
        process.pending[request_id] = answer
        try:
            async with asyncio.timeout(timeout):
                await process.write(orjson.dumps(message) + b"\n")
                return await answer
        except TimeoutError:
            if method != "initialize":  # which must not be cancelled; the process is killed instead
                process.cancel_request(request_id, "timeout")
            raise UpstreamTimeout(f"the stdio server {self.name} did not answer {method} within {timeout:g}s") from None
        except asyncio.CancelledError:
            process.cancel_request(request_id, "the client went away")
            raise
        finally:
            process.pending.pop(request_id, None)

    # -- starting, restarting -----------------------------------------------------------------
    async def _ready(self) -> _Process:
        process = self._process
        if process is not None and process.usable:
            return process
        if self._closed:
            raise UpstreamError(f"the stdio server {self.name} has been closed")
        if self._unusable is not None:
            raise UpstreamError(self._unusable)
        if self._starting is None:
            if process is not None:  # it died: the next start waits out the backoff
                self._process = None
                ended = process.ended_at or time.monotonic()
                self._backoff.failed(ended - process.started_at, ended)
            delay = self._backoff.wait(time.monotonic())
            self._starting = asyncio.ensure_future(self._start(delay))
            self._starting.add_done_callback(self._started)
        starting = self._starting
        try:
            # Shielded: a caller that gives up does not abandon a start others wait for.
            return await asyncio.shield(starting)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if starting.cancelled() and task is not None and not task.cancelling():
                # close() stopped the start, not our caller: an error, not a cancellation.
                raise UpstreamError(f"the stdio server {self.name} has been closed") from None
            raise

    def _started(self, task: asyncio.Future[_Process]) -> None:
        self._starting = None
        if task.cancelled():
            return
        if task.exception() is not None:  # also marks it retrieved when no caller is left
            self._backoff.failed(None, time.monotonic())
            return
        self._process = task.result()

    async def _start(self, delay: float) -> _Process:
        if delay > 0:
            await asyncio.sleep(delay)
        if self._closed:
            raise UpstreamError(f"the stdio server {self.name} has been closed")
        loop = asyncio.get_running_loop()
        try:
            transport, process = await loop.subprocess_exec(
                lambda: _Process(self.name, self._processes.discard),
                *self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # its own process group: signals reach its children too
                env=self._env,
                cwd=self.cwd,
            )
        except OSError as exc:
            raise UpstreamError(f"cannot start the stdio server {self.command!r}: {exc.strerror or exc}") from None
        process.attach(transport)
        self._processes.add(process)
        if self._spawned:
            self.restarts += 1
        self._spawned = True
        log.info("started the stdio server %s (pid %s)", self.name, process.pid)
        try:
            answer = await self._exchange(
                process,
                "initialize",
                {"protocolVersion": HANDSHAKE, "capabilities": RELAYED_CLIENT_CAPABILITIES, "clientInfo": CLIENT_INFO},
                self.start_timeout,
            )
            if "error" in answer:
                raise UpstreamError(f"it refused initialize: {_error_text(answer)}")
            result = answer.get("result")
            if not isinstance(result, dict):
                raise UpstreamError("it answered initialize without a result object")
            await process.write(b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n')
        except BaseException as exc:
            process.kill()  # half-started: no graceful stop; close() awaits its end
            if isinstance(exc, UpstreamError):
                kind = UpstreamTimeout if isinstance(exc, UpstreamTimeout) else UpstreamError
                raise kind(f"the stdio server {self.command!r} did not start: {exc}") from None
            raise
        self.server_capabilities = result.get("capabilities") or {}
        self.server_info = result.get("serverInfo") or {}
        self.instructions = result.get("instructions")
        self.protocol_version = result.get("protocolVersion")
        return process

    async def _shut_down(self) -> None:
        starting = self._starting
        if starting is not None:
            starting.cancel()
            await asyncio.wait({starting})
        reason = f"the stdio server {self.name} has been closed"
        await asyncio.gather(*(p.stop(reason) for p in list(self._processes)))
        self._process = None


class _Process(asyncio.SubprocessProtocol):
    """One child: its pipes, its pending requests, and its end."""

    def __init__(self, name: str, on_finished: Callable[[_Process], None]) -> None:
        loop = asyncio.get_running_loop()
        self.name = name
        self.pid: int | None = None
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        # The started calls among them, for what the server sends before answering.
        self.calls = CallTable(f"the stdio server {name}", "process",
                               lambda: self.pending, lambda i: self.pending.pop(i, None))
        self.failure: str | None = None  # why it stopped being usable, when not just its exit
        self.stopping = False  # the gateway is ending it (close, kill)
        self._stdout_open = True
        self.started_at = time.monotonic()
        self.ended_at = 0.0
        self.exited: asyncio.Future[int] = loop.create_future()
        self.finished: asyncio.Future[None] = loop.create_future()
        self._on_finished = on_finished
        self._transport: asyncio.SubprocessTransport | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._out = bytearray()
        self._err = bytearray()
        self._err_cut = False
        self._log_window = 0.0
        self._logged = 0
        self._suppressed = 0
        self._grace: asyncio.TimerHandle | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self.pid = transport.get_pid()  # type: ignore[attr-defined]

    def attach(self, transport: asyncio.SubprocessTransport) -> None:
        """Take stdin once `subprocess_exec` has returned (both loops have the pipes by then)."""
        self._stdin = transport.get_pipe_transport(0)  # type: ignore[assignment]

    @property
    def usable(self) -> bool:
        """Running, and both ways of talking to it intact."""
        return (
            self._stdin is not None
            and self._stdout_open
            and not self.stopping
            and self.failure is None
            and not self.exited.done()
        )

    def process_exited(self) -> None:
        status = self._transport.get_returncode()  # type: ignore[union-attr]
        self.ended_at = time.monotonic()
        self.signal_group(signal.SIGKILL)  # whatever it left behind in its group
        if not self.exited.done():
            self.exited.set_result(status)
        if self.stopping or self.failure is not None:
            log.debug("the stdio server %s (pid %s) exited with status %s", self.name, self.pid, status)
        else:
            log.warning("the stdio server %s (pid %s) exited with status %s (%d requests pending)",
                        self.name, self.pid, status, len(self.pending))
        if self._grace is not None:
            self._grace.cancel()  # the stdout grace, if any: it has exited
            self._grace = None
        if not self.finished.done():
            # A pipe held open by a process outside its group would hold everything up.
            self._set_grace(1.0, self._close_transport)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 1:
            self._stdout_open = False  # nothing it says can reach us any more
            if not self.exited.done():
                self._set_grace(STDOUT_GRACE, self._kill_mute)
        elif fd == 2:
            self._flush_stderr()
        elif fd == 0:
            self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._grace is not None:
            self._grace.cancel()
        self._flush_stderr()
        self._writable.set()
        status = self.exited.result() if self.exited.done() else None
        self.fail_pending(self.failure or f"the stdio server {self.name} (pid {self.pid}) exited with status {status}")
        if not self.finished.done():
            self.finished.set_result(None)
        self._close_transport()
        self._on_finished(self)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def stop(self, reason: str) -> None:
        """Close stdin, then SIGTERM, then SIGKILL its group, each after a grace; reap it."""
        self.stopping = True
        self.fail_pending(reason)
        try:
            if not self.exited.done():
                if self._stdin is not None:
                    self._stdin.close()
                if not await _within(self.exited, EOF_GRACE):
                    self.signal_group(signal.SIGTERM)
                    if not await _within(self.exited, TERM_GRACE):
                        log.warning("the stdio server %s (pid %s) ignored SIGTERM; killing it", self.name, self.pid)
                        self.signal_group(signal.SIGKILL)
                        if not await _within(self.exited, KILL_WAIT):
                            log.error("the stdio server %s (pid %s) survived SIGKILL", self.name, self.pid)
            if not await _within(self.finished, 1.0):
                self._close_transport()
                await _within(self.finished, 1.0)
        except asyncio.CancelledError:
            self.kill()  # no time left for grace
            raise

    def kill(self) -> None:
        """SIGKILL the whole group now; the end is reported as usual."""
        self.stopping = True
        if not self.exited.done():
            self.signal_group(signal.SIGKILL)

    def signal_group(self, sig: int) -> None:
        if self.pid is None:
            return
        try:
            # start_new_session: the child leads a group whose id is its pid. Once the
            # leader is reaped the id stays reserved while any member lives (Linux).
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError as exc:
            log.warning("cannot signal the process group of stdio server %s (pid %s): %s", self.name, self.pid, exc)

    def fail_pending(self, reason: str) -> None:
        self.calls.clear()
        pending, self.pending = self.pending, {}
        for answer in pending.values():
            if not answer.done():
                answer.set_exception(UpstreamError(reason))

    def _fail(self, reason: str) -> None:
        """The stream is broken: fail what waits, and kill the process (the next request restarts it)."""
        if self.failure is None:
            self.failure = reason
            log.warning("%s; stopping it", reason)
        self.fail_pending(reason)
        self.kill()

    def _kill_mute(self) -> None:
        if not self.exited.done():
            log.warning("the stdio server %s (pid %s) closed its stdout but kept running; killing it",
                        self.name, self.pid)
            self.kill()

    def _set_grace(self, seconds: float, then: Callable[[], None]) -> None:
        if self._grace is None:
            self._grace = asyncio.get_running_loop().call_later(seconds, then)

    def _close_transport(self) -> None:
        if self._transport is not None:
            self._transport.close()

    async def _why_gone(self) -> str:
        """Why the server cannot be written to: its exit status, which may come a moment after its pipes
        close (waited for up to a second), or that it is not running."""
        try:
            status = await asyncio.wait_for(asyncio.shield(self.exited), 1.0)
        except TimeoutError:
            return f"the stdio server {self.name} (pid {self.pid}) is not running"
        return f"the stdio server {self.name} (pid {self.pid}) exited with status {status}"

    # -- writing ------------------------------------------------------------------------------
    async def write(self, data: bytes) -> None:
        """Write one framed message; wait while the pipe is full (the child is not reading)."""
        stdin = self._stdin
        if not self.usable or stdin is None or stdin.is_closing():
            raise UpstreamError(self.failure or await self._why_gone())
        stdin.write(data)
        if not self._writable.is_set():
            await self._writable.wait()

    def _write_now(self, message: dict[str, Any]) -> None:
        stdin = self._stdin
        if self.usable and stdin is not None and not stdin.is_closing():
            if stdin.get_write_buffer_size() < _MAX_UNWRITTEN:
                stdin.write(orjson.dumps(message) + b"\n")

    def cancel_request(self, request_id: int, reason: str) -> None:
        """Tell the server to stop working on a request nobody waits for any more."""
        self.pending.pop(request_id, None)
        self._write_now({"jsonrpc": "2.0", "method": "notifications/cancelled",
                         "params": {"requestId": request_id, "reason": reason}})

    # -- reading stdout -----------------------------------------------------------------------
    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self._stdout(data)
        elif fd == 2:
            self._stderr(data)

    def _stdout(self, data: bytes) -> None:
        if self.failure is not None:
            return
        buffer = self._out
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            if buffer:
                buffer += memoryview(data)[start:end]
                line = bytes(buffer)
                buffer.clear()
            else:
                line = data[start:end]
            start = end + 1
            if len(line) > MAX_LINE:
                self._fail(f"the stdio server {self.name} (pid {self.pid}) wrote a line longer than {MAX_LINE} bytes")
                return
            self._line(line)
            if self.failure is not None:
                return
        if start < len(data):
            buffer += memoryview(data)[start:]
            if len(buffer) > MAX_LINE:
                buffer.clear()
                self._fail(f"the stdio server {self.name} (pid {self.pid}) wrote a line longer than {MAX_LINE} bytes")

    def _line(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            message = orjson.loads(line)
        except orjson.JSONDecodeError:
            self._log_stdout_noise(line)
            return
        messages = message if isinstance(message, list) else (message,)  # a list: a batch (2025-03-26)
        if not all([self._dispatch(m) for m in messages]):
            self._log_stdout_noise(line)

    def _dispatch(self, message: Any) -> bool:
        """Act on one message; False if it is not a JSON-RPC message at all."""
        if not isinstance(message, dict):
            return False
        method = message.get("method")
        if method is None:
            request_id = message.get("id")
            answer = self.pending.pop(request_id, None) if type(request_id) is int else None
            if answer is not None:
                if not answer.done():
                    answer.set_result(message)
            elif request_id is None and isinstance(message.get("error"), dict):
                # The server could not read something we sent (a parse error has no id).
                error = message["error"]
                log.warning("the stdio server %s reported an error for no request: %s %.200s",
                            self.name, error.get("code"), error.get("message"))
            else:
                # Late (after a timeout), or an id that is not ours.
                log.debug("the stdio server %s answered request %r, which nobody waits for", self.name, request_id)
            return "result" in message or "error" in message
        if not isinstance(method, str):
            return False
        if "id" not in message:
            if not self.calls.notification(method, message):
                log.debug("the stdio server %s sent notification %s (dropped)", self.name, method)
        elif method == "ping":
            self._write_now({"jsonrpc": "2.0", "id": message["id"], "result": {}})
        else:
            refusal = self.calls.request(method, message)
            if refusal is not None:
                self._write_now(refusal)
        return True

    def _log_stdout_noise(self, line: bytes) -> None:
        if self._may_log():
            log.warning("the stdio server %s wrote a line that is not a JSON-RPC message (%d bytes, skipped): %r",
                        self.name, len(line), line[:80])

    # -- reading stderr -----------------------------------------------------------------------
    def _stderr(self, data: bytes) -> None:
        # Drained always (a full pipe would block the child), logged a line at a time,
        # each line cut at STDERR_LINE: the buffer never holds more than one such line.
        buffer = self._err
        start = 0
        size = len(data)
        while start < size:
            end = data.find(b"\n", start)
            stop = size if end < 0 else end
            room = STDERR_LINE * 4 - len(buffer)  # bytes: up to 4 per character
            if stop - start > room:
                self._err_cut = True
            if room > 0:
                buffer += memoryview(data)[start:min(stop, start + room)]
            if end < 0:
                break
            self._emit_stderr()
            start = end + 1

    def _flush_stderr(self) -> None:
        if self._err:
            self._emit_stderr()
        if self._suppressed:
            log.info("%s[%s]: %d more lines not logged", self.name, self.pid, self._suppressed)
            self._suppressed = 0

    def _emit_stderr(self) -> None:
        text = self._err.decode("utf-8", "replace").rstrip("\r")
        cut = self._err_cut or len(text) > STDERR_LINE
        self._err.clear()
        self._err_cut = False
        if self._may_log():
            log.info("%s[%s]: %s%s", self.name, self.pid, text[:STDERR_LINE], " [cut]" if cut else "")

    def _may_log(self) -> bool:
        now = time.monotonic()
        if now - self._log_window >= 1.0:
            if self._suppressed:
                log.info("%s[%s]: %d more lines not logged", self.name, self.pid, self._suppressed)
            self._log_window, self._logged, self._suppressed = now, 0, 0
        if self._logged < STDERR_LINES_PER_SECOND:
            self._logged += 1
            return True
        self._suppressed += 1
        return False


async def _within(future: asyncio.Future[Any], seconds: float) -> bool:
    """Wait for `future` (without cancelling it) at most `seconds`; True if it is done."""
    if not future.done():
        await asyncio.wait({future}, timeout=seconds)
    return future.done()


def _error_text(answer: dict[str, Any]) -> str:
    error = answer.get("error")
    return str(error.get("message", error)) if isinstance(error, dict) else str(error)


def _result(answer: dict[str, Any]) -> dict[str, Any]:
    if "error" in answer:
        error = answer["error"]
        raise UpstreamRpcError(error if isinstance(error, dict) else {"code": -32603, "message": str(error)})
    result = answer.get("result")
    if not isinstance(result, dict):
        raise UpstreamError("the stdio server's answer has no result object")
    return result
