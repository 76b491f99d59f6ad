"""Keep-alive HTTP/1.1 connection pools to upstream MCP servers.

Why not aiohttp's client: on this workload it is most of a proxy's cost (about
150 us a call on one core). A pool of asyncio protocols (uvloop transports)
with the llhttp parser from `httptools` does the same exchange for a fraction
of that: one write per request, the response parsed in C, the body handed over
without copies, a small JSON answer finished within the same `data_received`.

What this module owns: opening, reusing, expiring and closing connections;
framing requests; parsing responses; streaming bodies (SSE) with flow control.
It knows nothing about MCP, tenants or limits. It never forwards credentials:
the caller decides every header it sends.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import time
from collections.abc import AsyncIterator, Iterable
from urllib.parse import urlsplit

import httptools

log = logging.getLogger("gateway.upstream")

# Pause reading from an upstream once this much body is buffered and not yet
# taken by the client side; resume below the low mark.
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024


class UpstreamError(Exception):
    """The upstream could not be reached or broke the exchange."""


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer in time."""


class UpstreamConnectError(UpstreamError):
    """No connection could be opened to the upstream."""


class UpstreamStopped(UpstreamError):
    """The gateway ended the exchange itself (its client's credential stopped being valid)."""


class UpstreamResponse:
    """One response: status and headers at once, the body complete or streaming."""

    __slots__ = (
        "status",
        "headers",
        "content_type",
        "_chunks",
        "_buffered",
        "_complete",
        "_error",
        "_waiter",
        "_conn",
        "_released",
    )

    def __init__(self, conn: _Connection) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_type = b""
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._complete = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._conn = conn
        self._released = False

    @property
    def complete(self) -> bool:
        """True once the whole body has arrived."""
        return self._complete

    @property
    def is_event_stream(self) -> bool:
        return self.content_type.startswith(b"text/event-stream")

    def header(self, name: bytes) -> bytes | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    # -- fed by the connection -------------------------------------------------
    def _feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > _HIGH_WATER:
            self._conn.pause_reading()
        self._wake()

    def _finish(self, error: BaseException | None = None) -> None:
        if error is None:
            self._complete = True
        elif not self._complete:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- read by the proxy ------------------------------------------------------
    async def _wait(self, timeout: float | None = None) -> None:
        waiter = self._waiter = self._conn.loop.create_future()
        timer = None
        if timeout is not None:
            timer = self._conn.loop.call_later(max(0.0, timeout), _idle_expire, waiter, timeout)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _take(self) -> bytes:
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._buffered < _LOW_WATER:
            self._conn.resume_reading()
        return chunk

    async def read(self) -> bytes:
        """The whole body (for JSON answers)."""
        while not self._complete:
            if self._error is not None:
                raise self._error
            await self._wait()
        body = b"".join(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
        self._chunks.clear()
        self._buffered = 0
        self.release()
        return body

    async def next_chunk(self, timeout: float | None = None) -> bytes | None:
        """The next body chunk, or None at the end; UpstreamTimeout after `timeout` seconds without one.

        For readers that pause between chunks for as long as they need (a call
        waiting for its client's input): nothing is released at the end.
        """
        while not self._chunks:
            if self._complete:
                return None
            if self._error is not None:
                raise self._error
            await self._wait(timeout)
        return self._take()

    async def iter_chunks(self, idle_timeout: float | None = None, max_duration: float | None = None) -> AsyncIterator[bytes]:
        """Body chunks as they arrive (for SSE); releases the connection at the end.

        Raises UpstreamTimeout when no byte arrives for `idle_timeout` seconds
        (every chunk, a progress event included, restarts that clock) or when
        the stream has run for `max_duration` seconds.
        """
        loop = self._conn.loop
        deadline = loop.time() + max_duration if max_duration is not None else None
        try:
            while True:
                if self._chunks:
                    yield self._take()
                    continue
                if self._complete:
                    break
                if self._error is not None:
                    raise self._error
                wait = idle_timeout
                if deadline is not None:
                    left = deadline - loop.time()
                    if left <= 0:
                        raise UpstreamTimeout(f"the stream reached its maximum duration of {max_duration:g}s")
                    wait = left if wait is None else min(wait, left)
                try:
                    await self._wait(wait)
                except UpstreamTimeout:
                    if deadline is not None and loop.time() >= deadline:
                        raise UpstreamTimeout(
                            f"the stream reached its maximum duration of {max_duration:g}s"
                        ) from None
                    raise
        finally:
            self.release()

    def abort(self, error: UpstreamError) -> None:
        """End a streaming exchange from the gateway's side: its reader gets `error` once the
        chunks already here are taken, and the connection is closed, not reused."""
        self._finish(error)

    def release(self) -> None:
        """Give the connection back to its pool (or close it if the exchange did not finish)."""
        if self._released:
            return
        self._released = True
        self._conn.response_done(reusable=self._complete and self._error is None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one exchange at a time (no pipelining)."""

    def __init__(self, pool: UpstreamPool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.headers_waiter: asyncio.Future[UpstreamResponse] | None = None
        self.closed = False
        self.reused = False
        self.got_bytes = False
        self.keep_alive = True
        self.idle_since = 0.0
        self._paused = False
        self._eof_body = False
        self._has_length = False

    # asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"upstream sent a malformed HTTP response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self.response
        if response is not None and not response.complete:
            if self._eof_body and response.status:
                # A body delimited by the end of the connection (no length, not chunked).
                response._finish()
            else:
                self._fail(UpstreamError("upstream closed the connection mid-response"))
        elif self.headers_waiter is not None and not self.headers_waiter.done():
            self._fail(UpstreamError("upstream closed the connection"))
        self.pool._forget(self)

    # httptools callbacks ------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.response = UpstreamResponse(self)
        self._has_length = False

    def on_header(self, name: bytes, value: bytes) -> None:
        response = self.response
        response.headers.append((name, value))
        size = len(name)
        if size == 12 or size == 14 or size == 17:
            lowered = name.lower()
            if lowered == b"content-type":
                response.content_type = value.lower()
            elif lowered == b"content-length" or lowered == b"transfer-encoding":
                self._has_length = True

    def on_headers_complete(self) -> None:
        response = self.response
        response.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self._eof_body = not self._has_length and response.status not in (204, 304)
        waiter = self.headers_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def on_body(self, body: bytes) -> None:
        self.response._feed(body)

    def on_message_complete(self) -> None:
        self.response._finish()

    # used by the pool and the response ----------------------------------------------------
    def send(self, data: bytes) -> asyncio.Future[UpstreamResponse]:
        self.response = None
        self.got_bytes = False
        self.headers_waiter = self.loop.create_future()
        self.transport.write(data)
        return self.headers_waiter

    def _fail(self, error: BaseException) -> None:
        waiter = self.headers_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        elif self.response is not None:
            self.response._finish(error)

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def response_done(self, reusable: bool) -> None:
        self.resume_reading()
        self.headers_waiter = None
        if reusable and self.keep_alive and not self.closed:
            self.pool._put_back(self)
        else:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            self.pool._forget(self)


def request_target(url: str) -> str:
    """The path and query of `url`: what goes on the request line."""
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


class UpstreamPool:
    """Keep-alive connections to one upstream origin (scheme, host, port); servers sharing it share the pool.

    At most `max_connections` are open; callers beyond that wait for one to be
    released (bounded by the connect timeout). Idle connections older than
    `idle_seconds` are closed instead of reused.
    """

    def __init__(
        self,
        url: str,
        *,
        max_connections: int = 64,
        idle_seconds: float = 30.0,
        connect_timeout: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = (ssl_context or ssl.create_default_context()) if parts.scheme == "https" else None
        default_port = 443 if parts.scheme == "https" else 80
        host_header = self.host if self.port == default_port else f"{self.host}:{self.port}"
        if ":" in self.host and not self.host.startswith("["):
            host_header = f"[{self.host}]" + ("" if self.port == default_port else f":{self.port}")
        self._host_line = f"Host: {host_header}\r\n".encode("latin-1")
        self.max_connections = max_connections
        self.idle_seconds = idle_seconds
        self.connect_timeout = connect_timeout
        self._idle: collections.deque[_Connection] = collections.deque()
        self._open: set[_Connection] = set()
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # statistics for /metrics
    @property
    def open_connections(self) -> int:
        return len(self._open)

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    def encode_request(
        self, method: str, target: str, headers: Iterable[tuple[bytes, bytes]], body: bytes | None
    ) -> bytes:
        """Frame one request for `target` (path and query) on this origin (no pipelining, no Expect).

        Headers are bytes as they came off the wire: no decoding and re-encoding per header.
        """
        parts = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1"), self._host_line]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if body is not None:
            parts.append(b"Content-Length: %d\r\n\r\n" % len(body))
            parts.append(body)
        else:
            parts.append(b"\r\n")
        return b"".join(parts)

    async def request(self, payload: bytes, *, timeout: float) -> UpstreamResponse:
        """Send a framed request; return once the response headers have arrived.

        A reused connection that the upstream had closed while idle is retried
        once on a fresh one, but only if not a byte of response had arrived
        (the request cannot have been answered).
        """
        for attempt in (0, 1):
            conn = await self._acquire()
            waiter = conn.send(payload)
            timer = conn.loop.call_later(timeout, _expire, waiter, timeout)
            try:
                return await waiter
            except UpstreamTimeout:
                conn.close()
                raise
            except UpstreamError:
                conn.close()
                if attempt == 0 and conn.reused and not conn.got_bytes:
                    continue
                raise
            except BaseException:
                # Cancelled (the client went away): the exchange cannot be resumed.
                conn.close()
                raise
            finally:
                timer.cancel()
        raise AssertionError("unreachable")

    async def _acquire(self) -> _Connection:
        if self._closed:
            raise UpstreamError("upstream pool is closed")
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()  # most recently used first: warm, least likely stale
            if conn.closed:
                continue
            if now - conn.idle_since > self.idle_seconds:
                conn.close()
                continue
            conn.reused = True
            return conn
        if len(self._open) >= self.max_connections:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, self.connect_timeout)
            except asyncio.TimeoutError:
                raise UpstreamTimeout(
                    f"all {self.max_connections} connections to {self.host}:{self.port} stayed busy "
                    f"for {self.connect_timeout:g}s"
                ) from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            return await self._acquire()
        return await self._connect()

    async def _connect(self) -> _Connection:
        loop = self._loop = asyncio.get_running_loop()
        conn = _Connection(self, loop)
        self._open.add(conn)
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: conn, self.host, self.port, ssl=self.ssl),
                self.connect_timeout,
            )
        except asyncio.TimeoutError:
            self._forget(conn)
            raise UpstreamTimeout(
                f"connecting to {self.host}:{self.port} took longer than {self.connect_timeout:g}s"
            ) from None
        except OSError as exc:
            self._forget(conn)
            raise UpstreamConnectError(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from None
        except BaseException:
            self._forget(conn)
            raise
        return conn

    def _put_back(self, conn: _Connection) -> None:
        if self._closed:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)
        self._wake_one()

    def _forget(self, conn: _Connection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._open):
            conn.close()
        self._idle.clear()


def _idle_expire(waiter: asyncio.Future, timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout(f"the upstream sent nothing for {timeout:g}s"))


def _expire(waiter: asyncio.Future, timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout(f"upstream did not answer within {timeout:g}s"))
