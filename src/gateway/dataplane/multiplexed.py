"""Calls in flight over one multiplexed stream: a stdio process, an SSE or WebSocket connection.

`StdioUpstream.start()` and `ChannelUpstream.start()` return a `StreamCall`,
the same interface as `mcp_client.UpstreamCall`, for `relay.Relay.call`:
`next(timeout)` gives what the upstream sends for the call before its
answer, then the answer; `reply(message)` answers a server-to-client request
on the same stream; `close(reason)` stops, cancelling the request upstream if
it is unanswered.

These transports do not say which request a server's message is about,
except progress (by its token). `CallTable` routes what the stream reader
hands it:

- `notifications/progress` go to the call that sent the token (the relay
  makes tokens unique in the process, so they are unique per stream);
- a server-to-client request (sampling, elicitation, roots) and a log message
  (`notifications/message`) go to the call in flight when it is the only
  request in flight on the stream. Otherwise the gateway cannot tell which of
  its clients it is for: a request is refused upstream (-32601) and a log
  message dropped. Requests made with `request()` (listings for `/mcp`) count
  too, since any of them may be the one asking.

What it must not do: grow without bound (a call holds at most `MAX_QUEUED`
messages; past that, notifications are dropped and requests refused), or
outlive its stream (when the process or connection ends, `fail` ends every
call: `next()` raises UpstreamError).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from gateway.dataplane.jsonrpc import METHOD_NOT_FOUND
from gateway.dataplane.upstream import UpstreamError, UpstreamTimeout

log = logging.getLogger("gateway.multiplexed")

PROGRESS = "notifications/progress"
LOG_MESSAGE = "notifications/message"
# Messages one call may hold before its reader takes them (a paused call is not read at all).
MAX_QUEUED = 64
INTERNAL_ERROR = -32603
CANNOT_TELL = "the gateway cannot tell which of its clients it is for"


class StreamCall:
    """One request in flight on a multiplexed stream: the messages routed to it, then its answer."""

    def __init__(
        self,
        table: CallTable,
        request_id: int,
        answer: asyncio.Future[dict[str, Any]],
        progress_token: Any,
        *,
        send: Callable[[dict[str, Any]], Awaitable[None]],
        cancel: Callable[[int, str], None],
    ) -> None:
        """`answer` is the future the stream's reader resolves (or fails) with the response;
        `send` writes one message on the stream; `cancel(id, reason)` tells the server to stop."""
        self.request_id = request_id
        self.progress_token = progress_token
        self.answered = False
        self.dropped = 0  # notifications dropped because the queue was full
        self._table = table
        self._answer = answer
        self._send = send
        self._cancel = cancel
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._arrived = asyncio.Event()
        self._closed = False
        answer.add_done_callback(self._resolved)
        table.add(self)

    def _resolved(self, answer: asyncio.Future[dict[str, Any]]) -> None:
        if not answer.cancelled():
            answer.exception()  # retrieved here: a call closed unread must not log it as lost
        self._arrived.set()

    async def next(self, timeout: float | None) -> dict[str, Any]:
        """The next message of this call; the answer (our id, no method) is the last.

        Raises UpstreamTimeout if nothing comes within `timeout` seconds, and
        UpstreamError if the stream ended first.
        """
        while not self._queue and not self._answer.done():
            if self._closed:
                raise UpstreamError("the call has been closed")
            self._arrived.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._arrived.wait()
            except TimeoutError:
                raise UpstreamTimeout(f"the upstream sent nothing for {timeout:g}s") from None
        if self._queue:
            return self._queue.popleft()
        if self.answered:
            raise UpstreamError("the call's answer has been read already")
        self.answered = True
        self._table.discard(self)
        if self._answer.cancelled():
            raise UpstreamError("the call has been closed")
        return self._answer.result()  # raises the stream's UpstreamError if it ended

    async def reply(self, message: dict[str, Any]) -> None:
        """Answer a server-to-client request of this call, on the stream it came from."""
        await self._send(message)

    def close(self, reason: str = "the client went away") -> None:
        """Stop; an unanswered call is cancelled upstream (`notifications/cancelled`)."""
        if self._closed:
            return
        self._closed = True
        self._table.discard(self)
        self._queue.clear()
        self._arrived.set()
        if not self._answer.done():
            self._cancel(self.request_id, reason)  # also forgets it: a late answer goes nowhere
            self.answered = True

    def abandon(self) -> None:
        """Forget a call whose request could not be sent (nothing to cancel upstream)."""
        self._closed = True
        self._table.discard(self)
        self._table.forget(self.request_id)
        if not self._answer.done():
            self._answer.cancel()

    # -- what the reader routes here -------------------------------------------------------------
    def push(self, message: dict[str, Any]) -> bool:
        """Queue a message for the reader; False if the queue is full."""
        if self._closed:
            return False
        if len(self._queue) >= MAX_QUEUED:
            return False
        self._queue.append(message)
        self._arrived.set()
        return True


class CallTable:
    """The started calls on one stream, by request id and by progress token."""

    def __init__(
        self, label: str, stream: str, pending: Callable[[], Collection[Any]], forget: Callable[[Any], None]
    ) -> None:
        """`stream` names it in messages ("process", "connection"); `pending()` is the ids of every
        request in flight on it (started or not); `forget(id)` drops one from them."""
        self.label = label
        self.stream = stream
        self._pending = pending
        self.forget = forget
        self._by_id: dict[int, StreamCall] = {}
        self._by_token: dict[Any, StreamCall] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def add(self, call: StreamCall) -> None:
        self._by_id[call.request_id] = call
        token = call.progress_token
        if _routable(token) and token not in self._by_token:  # a token in use stays with its first call
            self._by_token[token] = call

    def discard(self, call: StreamCall) -> None:
        if self._by_id.get(call.request_id) is call:
            del self._by_id[call.request_id]
        token = call.progress_token
        if _routable(token) and self._by_token.get(token) is call:
            del self._by_token[token]

    def clear(self) -> None:
        """The stream has ended: forget every call (their answers fail with the stream)."""
        self._by_id.clear()
        self._by_token.clear()

    # -- routing ------------------------------------------------------------------------------------
    def notification(self, method: str, message: dict[str, Any]) -> bool:
        """Give a notification to its call; False if it has none (the caller drops it)."""
        if method == PROGRESS:
            params = message.get("params")
            token = params.get("progressToken") if isinstance(params, dict) else None
            call = self._by_token.get(token) if _routable(token) else None
        elif method == LOG_MESSAGE:
            call = self._sole_call()
        else:
            return False
        if call is None:
            return False
        if not call.push(message):
            call.dropped += 1
            if call.dropped == 1:
                log.debug("%s: a call's queue is full; its notifications are dropped", self.label)
        return True

    def request(self, method: str, message: dict[str, Any]) -> dict[str, Any] | None:
        """Give a server-to-client request to its call; else the error to answer the server with."""
        call = self._sole_call()
        if call is None:
            in_flight = len(self._pending())
            log.debug("%s asked %s with %d requests in flight; refused", self.label, method, in_flight)
            if in_flight == 1:  # made with request(): nobody to ask
                why = f"the one request in flight on this {self.stream} has no client to put it to"
            elif in_flight == 0:
                why = f"{CANNOT_TELL} (none of its requests is in flight on this {self.stream})"
            else:
                why = (f"{CANNOT_TELL} ({in_flight} of its requests are in flight on this {self.stream}, "
                       "and this transport does not say which one asks)")
            return _error(message["id"], METHOD_NOT_FOUND, f"{method} cannot be relayed: {why}")
        if not call.push(message):
            log.debug("%s asked %s; refused, the call's queue is full", self.label, method)
            return _error(message["id"], INTERNAL_ERROR,
                          f"{method} cannot be relayed: too many messages wait for the call it belongs to")
        return None

    def _sole_call(self) -> StreamCall | None:
        """The started call that is the only request in flight, if there is one."""
        pending = self._pending()
        if len(pending) != 1:
            return None
        (request_id,) = pending
        return self._by_id.get(request_id)


def progress_token(params: dict[str, Any] | None) -> Any:
    """The progress token a request's params carry in `_meta`, or None."""
    meta = params.get("_meta") if isinstance(params, dict) else None
    return meta.get("progressToken") if isinstance(meta, dict) else None


def _routable(token: Any) -> bool:
    return isinstance(token, (str, int)) and not isinstance(token, bool)


def _error(request_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


class RestartBackoff:
    """When a supervised upstream (a stdio process, an SSE or WebSocket connection) may start again.

    The first failure waits `low`, each further one doubles it up to `high`; an
    upstream that had lived `stable_after` seconds before it failed starts over at `low`.
    """

    __slots__ = ("low", "high", "stable_after", "delay", "not_before")

    def __init__(self, low: float, high: float, stable_after: float = 30.0) -> None:
        self.low, self.high, self.stable_after = low, high, stable_after
        self.delay = 0.0  # the current backoff
        self.not_before = 0.0  # no start before this (monotonic)

    def failed(self, lived: float | None, at: float) -> None:
        """A start failed (`lived` None) or a running upstream ended after `lived` seconds, at `at`."""
        if (lived is not None and lived >= self.stable_after) or self.delay == 0.0:
            self.delay = self.low
        else:
            self.delay = min(self.delay * 2, self.high)
        self.not_before = at + self.delay

    def wait(self, now: float) -> float:
        """Seconds to wait before the next start."""
        return max(0.0, self.not_before - now)

